"""Embedded demo: a tiny float video segmentation network and its shipped checkpoint."""

from resq_brevitas.demo.model import (
    CHECKPOINT_PATH,
    FRAME_SIZE,
    NUM_CLASSES,
    DemoSegNet,
    load_demo_model,
)

__all__ = ["CHECKPOINT_PATH", "FRAME_SIZE", "NUM_CLASSES", "DemoSegNet", "load_demo_model"]

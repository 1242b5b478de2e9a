"""A small TSN-style action classifier for the VideoIQ demo (issue 10).

:class:`DemoActionNet` is a per-frame 2D convolutional backbone (four 3x3 convs with BatchNorm and
ReLU, two of them strided, global max pooling, a linear classifier): ``forward`` maps frames
``[B, 3, H, W]`` to frame logits ``[B, NUM_ACTIONS]``. As in TSN and VideoIQ the clip prediction
is the mean of the frame logits over the frames that ran (:func:`clip_logits`; skipped frames are
left out). Plain ``torch.nn``; :func:`resq_brevitas.convert` folds the BatchNorms and quantizes
it, and a family-scheme :class:`~resq_brevitas.ResQModel` of it runs VideoIQ's per-frame
precision policy.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from resq_brevitas.demo.actions import NUM_ACTIONS

__all__ = [
    "ACTION_CHECKPOINT_PATH",
    "ACTION_FRAME_SIZE",
    "DemoActionNet",
    "clip_logits",
    "load_action_model",
]

#: Frame height and width the shipped checkpoint was trained on.
ACTION_FRAME_SIZE: int = 32
#: Location of the shipped float checkpoint (a ``state_dict``), trained by
#: ``recipes/train_recognition_demo.py``.
ACTION_CHECKPOINT_PATH: Path = Path(__file__).with_name("actionnet.pt")


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DemoActionNet(nn.Module):
    """Per-frame backbone of the TSN-style demo classifier.

    Args:
        num_classes: Output classes.
        width: Channels of the first conv (the others are 2x and 4x).
        in_channels: Input channels.

    Raises:
        ValueError: A non-positive size.
    """

    def __init__(self, num_classes: int = NUM_ACTIONS, width: int = 16,
                 in_channels: int = 3) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("width", width),
                            ("in_channels", in_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.num_classes = num_classes
        self.features = nn.Sequential(
            _block(in_channels, width, 1),
            _block(width, 2 * width, 2),
            _block(2 * width, 2 * width, 2),
            _block(2 * width, 4 * width, 1),
        )
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Frame logits.

        Args:
            x: ``[B, C, H, W]`` normalised frames.

        Returns:
            ``[B, num_classes]``.
        """
        if x.dim() != 4:
            raise ValueError(f"x must be frames [B, C, H, W], got shape {tuple(x.shape)}")
        return self.classifier(self.features(x).amax(dim=(2, 3)))


def clip_logits(frame_logits: Tensor, kept: Tensor | None = None) -> Tensor:
    """TSN consensus: the mean of the frame logits over the kept frames.

    Args:
        frame_logits: ``[B, T, K]``.
        kept: Bool or float ``[B, T]`` (1 = the frame ran); ``None``: every frame.

    Returns:
        ``[B, K]``; a clip with no kept frame gets zeros.

    Raises:
        ValueError: Mismatched shapes.
    """
    if frame_logits.dim() != 3:
        raise ValueError(f"frame_logits must be [B, T, K], got {tuple(frame_logits.shape)}")
    if kept is None:
        return frame_logits.mean(1)
    if tuple(kept.shape) != tuple(frame_logits.shape[:2]):
        raise ValueError(f"kept must be [B, T] = {tuple(frame_logits.shape[:2])}, got "
                         f"{tuple(kept.shape)}")
    w = kept.to(frame_logits.dtype).unsqueeze(-1)
    return (frame_logits * w).sum(1) / w.sum(1).clamp_min(1e-12)


def load_action_model(path: str | Path | None = None) -> DemoActionNet:
    """The shipped (or a given) float checkpoint in a :class:`DemoActionNet`, eval mode, CPU.

    Raises:
        FileNotFoundError: The checkpoint does not exist.
    """
    path = ACTION_CHECKPOINT_PATH if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"action checkpoint not found at {path}; train one with "
                                "`python recipes/train_recognition_demo.py`")
    model = DemoActionNet()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()

"""Model outputs of any pytree shape: flattening, naming, unflattening and stacking over time.

A wrapped model may return a tensor or any nesting of tuples, lists, named tuples and dicts of
tensors (``{"out": ..., "aux": ...}``, ``(flow_low, flow_up)``). The runtime treats each tensor
*leaf* on its own: per-frame outputs are stacked over time per leaf, time-batched outputs are
cut back into ``[B, T, ...]`` per leaf. These helpers are the one place that defines the
flattening, so exporters (which need one named graph output per leaf) and the runtime agree::

    leaves, spec = flatten_outputs(out)           # tensors, in a fixed order
    names = output_names(out)                     # "out", "aux", "0", "1.flow", ...
    same = unflatten_outputs(leaves, spec)        # the original structure again
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import (
    MappingKey,
    SequenceKey,
    TreeSpec,
    tree_flatten,
    tree_flatten_with_path,
    tree_unflatten,
)

__all__ = ["flatten_outputs", "output_names", "stack_outputs", "unflatten_outputs"]


def flatten_outputs(out: Any) -> tuple[list[Tensor], TreeSpec]:
    """The tensor leaves of a model output, in pytree order, and the structure to rebuild it.

    Raises:
        TypeError: A leaf that is not a Tensor (naming its position).
    """
    leaves, spec = tree_flatten(out)
    if len(leaves) != 1 or leaves[0] is not out:  # a structure: name the bad leaf
        for path, leaf in tree_flatten_with_path(out)[0]:
            if not isinstance(leaf, Tensor):
                raise TypeError(f"model output {_name(path) or '<root>'} must be a Tensor, got "
                                f"{type(leaf).__name__}")
    elif not isinstance(out, Tensor):
        raise TypeError(f"model output must be a Tensor or a tuple/list/dict of them, got "
                        f"{type(out).__name__}")
    return leaves, spec


def unflatten_outputs(leaves: list[Any], spec: TreeSpec) -> Any:
    """The structure :func:`flatten_outputs` took apart, with ``leaves`` in place."""
    return tree_unflatten(list(leaves), spec)


def output_names(out: Any) -> list[str]:
    """A name per tensor leaf, in :func:`flatten_outputs` order: dict keys and sequence indices
    joined by ``.`` (``"out"``, ``"1.flow"``); a bare tensor is ``"output"``."""
    flatten_outputs(out)  # validates
    if isinstance(out, Tensor):
        return ["output"]
    return [_name(path) for path, _ in tree_flatten_with_path(out)[0]]


def _name(path: tuple[Any, ...]) -> str:
    parts = []
    for key in path:
        if isinstance(key, MappingKey):
            parts.append(str(key.key))
        elif isinstance(key, SequenceKey):
            parts.append(str(key.idx))
        else:  # named tuples (GetAttrKey) and other node kinds
            parts.append(str(getattr(key, "name", key)))
    return ".".join(parts)


def stack_outputs(outputs: list[Any]) -> Any:
    """Stack per-frame outputs along a new time dimension 1, leaf by leaf (any pytree shape).

    Raises:
        TypeError: A non-tensor leaf.
        ValueError: Frames whose outputs have different structures.
    """
    flat = [flatten_outputs(out) for out in outputs]
    spec = flat[0][1]
    for t, (_, other) in enumerate(flat[1:], 1):
        if other != spec:
            raise ValueError(f"the model's output structure changed at frame {t}: {other} "
                             f"instead of {spec}")
    stacked = [torch.stack(list(leaves), dim=1) for leaves in zip(*(f[0] for f in flat))]
    return unflatten_outputs(stacked, spec)

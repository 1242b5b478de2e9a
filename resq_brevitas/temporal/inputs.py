"""What a frame is: one tensor, or several (a tuple of positional inputs, a dict of keyword
inputs), each a batch of frames of any rank; and what the model expects of each.

A ResQ model's frame is whatever its wrapped model takes per time step:

* a tensor ``[B, ...]`` -> ``model(frame)`` (an image ``[B, C, H, W]``, a sliding clip
  ``[B, C, T', H, W]`` of a 3D-CNN, tokens ``[B, N, D]``);
* a tuple/list of tensors -> ``model(*frame)`` (a flow model's ``(image1, image2)``);
* a dict of tensors -> ``model(**frame)`` (a VOS model's ``{"frame": ..., "mask": ...}``).

A clip (``forward``, ``step_clip``, calibration) has the same structure with a time dimension
after the batch: every leaf ``[B, T, ...]``.

What each input must look like is read off the model (:func:`expected_inputs`), never guessed
from the data: the ResQ layer an input reaches first (on a ``torch.fx`` trace, through
shape-preserving ops only) fixes its rank (a ``Conv2d`` takes ``[B, C, H, W]``, a ``Conv3d``
``[B, C, D, H, W]``, a ``Linear`` any rank) and its channel count. :class:`FrameInputs` and
:class:`ClipInputs` are validated frames and clips (only :func:`check_frame_inputs` /
:func:`check_clip_inputs` build them), which the runtime slices, flattens and feeds to the
model.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from resq_brevitas.checks import check_tensor
from resq_brevitas.nn.layers import is_resq_layer

__all__ = [
    "ClipInputs",
    "FrameInputs",
    "InputSpec",
    "check_clip_inputs",
    "check_frame_inputs",
    "check_signature",
    "expected_inputs",
    "input_arity",
    "model_signature",
]

#: A leaf's key: ``None`` for a single tensor, an int (position) or a str (keyword).
Key = int | str | None


@dataclass(frozen=True)
class InputSpec:
    """What the model expects of one input (a batch of frames).

    Attributes:
        rank: Rank of a batch of frames (with the batch dim), ``None``: any (a ``Linear``).
        channels: Size of the channel dim, ``None``: unknown.
        channel_dim: The channel dim of a batch of frames (1, or -1 for ``Linear``).
        layer: The ResQ layer it was read off (for messages), ``None``: set explicitly.
    """

    rank: int | None
    channels: int | None
    channel_dim: int = 1
    layer: str | None = None


def layer_input_spec(name: str, layer: nn.Module) -> InputSpec:
    """What a ResQ layer takes: convs a batch of the weight's rank with ``in_channels``
    channels, ``Linear``-like layers any rank with ``in_features`` on the last dim."""
    if getattr(layer, "channel_dim", 1) == -1:
        return InputSpec(None, int(layer.in_features), -1, name)
    return InputSpec(int(layer.weight.dim()), int(layer.in_channels), 1, name)


# Ops that keep a tensor's rank and channels: an input that reaches a ResQ layer only through
# these must fit that layer. Anything else (reshapes, indexing, concats) ends the search.
_PRESERVING_MODULES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.Identity, nn.Dropout, nn.Dropout2d,
    nn.Dropout3d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Hardswish,
    nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.ELU, nn.Mish,
)
_PRESERVING_FUNCTIONS = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
    torch.relu, torch.sigmoid, torch.tanh, torch.nn.functional.relu,
    torch.nn.functional.gelu, torch.nn.functional.silu, torch.nn.functional.hardswish,
})
_PRESERVING_METHODS = frozenset({"contiguous", "clone", "relu", "sigmoid", "tanh", "float",
                                 "detach", "__add__", "__sub__", "__mul__", "__truediv__"})


class _LeafTracer(torch.fx.Tracer):
    """Keeps ResQ layers (Brevitas internals) as leaves of the trace."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_resq_layer(m) or super().is_leaf_module(m, qualname)


def _first_layers(node: torch.fx.Node, modules: Mapping[str, nn.Module]) -> list[str]:
    """ResQ layers reached from ``node`` through shape-preserving ops only."""
    found, seen, todo = [], set(), [node]
    while todo:
        current = todo.pop()
        for user in current.users:
            if user in seen:
                continue
            seen.add(user)
            if user.op == "call_module":
                module = modules.get(str(user.target))
                if module is not None and is_resq_layer(module):
                    if user.args and user.args[0] is current:
                        found.append(str(user.target))
                    continue
                if isinstance(module, _PRESERVING_MODULES):
                    todo.append(user)
            elif user.op == "call_function" and user.target in _PRESERVING_FUNCTIONS:
                todo.append(user)
            elif user.op == "call_method" and user.target in _PRESERVING_METHODS:
                todo.append(user)
    return found


def expected_inputs(model: nn.Module) -> dict[Key, InputSpec] | None:
    """What each input of ``model`` must look like, read off its first ResQ layers.

    The model is traced with ``torch.fx`` (ResQ layers as leaves); each placeholder (a
    ``forward`` argument) that reaches a ResQ layer through shape-preserving ops gets that
    layer's :func:`layer_input_spec`, keyed by its position and by its name. When the model
    cannot be traced, the first ResQ convolution in module order stands for a single input's
    rank (channels unknown).

    Returns:
        ``key -> InputSpec`` (keys: positions and argument names), or ``None`` when nothing
        could be read off.
    """
    modules = dict(model.named_modules())
    try:
        graph = _LeafTracer().trace(model)
    except Exception:  # untraceable user code (data-dependent control flow, ...)
        for name, module in modules.items():
            if is_resq_layer(module) and getattr(module, "channel_dim", 1) == 1:
                spec = layer_input_spec(name, module)
                return {0: InputSpec(spec.rank, None, 1, name)}
        return None
    specs: dict[Key, InputSpec] = {}
    position = 0
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        name = str(node.target).lstrip("*")
        layers = _first_layers(node, modules)
        if layers:
            spec = layer_input_spec(layers[0], modules[layers[0]])
            others = [layer_input_spec(n, modules[n]) for n in layers[1:]]
            if any((o.rank, o.channels) != (spec.rank, spec.channels) for o in others):
                spec = InputSpec(None, None, spec.channel_dim, None)  # layers disagree
            specs[position] = specs[name] = spec
        position += 1
    return specs or None


def input_arity(model: nn.Module) -> int | None:
    """Required positional arguments of ``model.forward`` (``None``: takes ``*args``)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return None
    return sum(1 for p in params if p.default is inspect.Parameter.empty
               and p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                              inspect.Parameter.POSITIONAL_OR_KEYWORD))


def model_signature(model: nn.Module) -> inspect.Signature | None:
    """``model.forward``'s signature (``None`` when Python cannot read it)."""
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None


def check_signature(signature: inspect.Signature | None, inputs: _Inputs, name: str) -> None:
    """Raise a ``TypeError`` naming ``name`` if the inputs do not bind to ``forward`` (a
    missing, extra or misnamed input), before the model runs."""
    if signature is None:
        return
    try:
        if inputs.kind == "kwargs":
            signature.bind(**{str(k): None for k in inputs.keys})
        else:
            signature.bind(*([None] * len(inputs.leaves)))
    except TypeError as err:
        given = ("1 tensor" if inputs.kind == "tensor" else
                 f"{len(inputs.leaves)} positional inputs" if inputs.kind == "args" else
                 f"keyword inputs {list(inputs.keys)}")
        raise TypeError(f"{name} ({given}) does not fit the model's forward{signature}: "
                        f"{err}") from None


def _leaf_name(name: str, key: Key) -> str:
    if key is None:
        return name
    return f"{name}[{key!r}]"


class _Inputs:
    """Validated leaves with the structure they came in (shared by frames and clips)."""

    def __init__(self, kind: str, keys: tuple[Key, ...], leaves: tuple[Tensor, ...]) -> None:
        self.kind = kind  # "tensor", "args" or "kwargs"
        self.keys = keys
        self.leaves = leaves

    @property
    def batch(self) -> int:
        """Rows ``B`` (the same for every leaf)."""
        return int(self.leaves[0].shape[0])

    @property
    def device(self) -> torch.device:
        return self.leaves[0].device

    @property
    def value(self) -> Any:
        """The structure as the caller passes it (a tensor, a tuple, a dict)."""
        if self.kind == "tensor":
            return self.leaves[0]
        if self.kind == "args":
            return tuple(self.leaves)
        return dict(zip(self.keys, self.leaves))

    def _map(self, fn: Callable[[Tensor], Tensor]) -> tuple[Tensor, ...]:
        return tuple(fn(leaf) for leaf in self.leaves)


class FrameInputs(_Inputs):
    """A validated frame: every leaf ``[B, ...]``."""

    @property
    def signature(self) -> tuple[tuple[Key, tuple[int, ...]], ...]:
        """``(key, shape)`` of every leaf: what a stream's frames must keep."""
        return tuple((k, tuple(leaf.shape)) for k, leaf in zip(self.keys, self.leaves))

    def call(self, model: Callable[..., Any], copy: bool = False) -> Any:
        """``model`` on this frame; ``copy``: on the model's own contiguous copies (a layer
        keeps its input as its reference, and callers reuse frame buffers)."""
        leaves = (self._map(lambda t: t.clone(memory_format=torch.contiguous_format))
                  if copy else self.leaves)
        if self.kind == "tensor":
            return model(leaves[0])
        if self.kind == "args":
            return model(*leaves)
        return model(**dict(zip(self.keys, leaves)))


class ClipInputs(_Inputs):
    """A validated clip: every leaf ``[B, T, ...]``."""

    @property
    def frames(self) -> int:
        """Frames ``T``."""
        return int(self.leaves[0].shape[1])

    def frame(self, t: int) -> FrameInputs:
        """Frame ``t`` of every stream."""
        return FrameInputs(self.kind, self.keys, self._map(lambda leaf: leaf[:, t]))

    def chunk(self, start: int, stop: int) -> ClipInputs:
        """Frames ``start:stop``."""
        return ClipInputs(self.kind, self.keys, self._map(lambda leaf: leaf[:, start:stop]))

    def rows(self, order: Tensor) -> FrameInputs:
        """The clip's ``B * T`` frames (row ``b * T + t``) as one batch, in ``order`` (new,
        contiguous tensors: the model's own copies)."""
        return FrameInputs(self.kind, self.keys, self._map(
            lambda leaf: leaf.flatten(0, 1).index_select(0, order.to(leaf.device)).contiguous()))


def _structure(value: Any, name: str, example: str) -> tuple[str, tuple[Key, ...],
                                                             tuple[Any, ...]]:
    if isinstance(value, Tensor):
        return "tensor", (None,), (value,)
    if isinstance(value, (tuple, list)) and value:
        return "args", tuple(range(len(value))), tuple(value)
    if isinstance(value, Mapping) and value:
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"{name} keys must be argument names (str), got {list(value)}")
        return "kwargs", tuple(value), tuple(value.values())
    raise TypeError(f"{name} must be a torch.Tensor {example}, or a non-empty tuple/dict of "
                    f"them (one per model input), got {type(value).__name__}")


def _check_leaves(value: Any, name: str, specs: Mapping[Key, InputSpec] | None,
                  dtype: torch.dtype, device: torch.device, time_dim: bool
                  ) -> tuple[str, tuple[Key, ...], tuple[Tensor, ...]]:
    example = "[B, T, C, ...]" if time_dim else "[B, C, ...]"
    kind, keys, leaves = _structure(value, name, example)
    lead = 2 if time_dim else 1
    for key, leaf in zip(keys, leaves):
        spec = None
        if specs is not None:
            spec = specs.get(0 if key is None else key)
        rank = channels = None
        channel_dim = 1
        if spec is not None:
            rank = None if spec.rank is None else spec.rank + lead - 1
            channels, channel_dim = spec.channels, spec.channel_dim
        if time_dim and isinstance(leaf, Tensor) and leaf.dim() >= 2 and leaf.shape[1] == 0:
            raise ValueError(f"{_leaf_name(name, key)} must have at least one frame (dim 1), "
                             f"got shape {tuple(leaf.shape)}")
        if isinstance(leaf, Tensor) and leaf.dim() >= 1 and leaf.shape[0] == 0:
            raise ValueError(f"{_leaf_name(name, key)} must have at least one batch row, got "
                             f"shape {tuple(leaf.shape)}")
        check_tensor(leaf, _leaf_name(name, key), dtype=dtype, device=device, rank=rank,
                     min_rank=lead + 1, channels=channels,
                     channel_dim=channel_dim + lead - 1 if channel_dim >= 0 else channel_dim,
                     layout="[B, T, C, ...]" if time_dim else "[B, C, ...]",
                     source=None if spec is None else spec.layer)
    batch = tuple(int(leaf.shape[0]) for leaf in leaves)
    if len(set(batch)) > 1:
        raise ValueError(f"{name}: every input must have the same batch size (dim 0), got "
                         f"{dict(zip(keys, batch))}")
    if time_dim:
        frames = tuple(int(leaf.shape[1]) for leaf in leaves)
        if len(set(frames)) > 1:
            raise ValueError(f"{name}: every input must have the same number of frames (dim 1), "
                             f"got {dict(zip(keys, frames))}")
    return kind, keys, leaves


def _check_finite(leaves: tuple[Tensor, ...], keys: tuple[Key, ...], name: str) -> None:
    for key, leaf in zip(keys, leaves):
        if not bool(torch.isfinite(leaf).all()):
            raise ValueError(f"{_leaf_name(name, key)} contains NaN or Inf values")


def check_frame_inputs(value: Any, name: str, specs: Mapping[Key, InputSpec] | None,
                       dtype: torch.dtype, device: torch.device,
                       stream: tuple[Any, ...] | None = None,
                       signature: inspect.Signature | None = None) -> FrameInputs:
    """Validate a frame (a tensor or a tuple/dict of tensors ``[B, ...]``) before any layer.

    Args:
        value: The frame.
        name: The argument's name for messages (``"frame"``).
        specs: What each input must look like (:func:`expected_inputs`), if known.
        dtype: The model's dtype.
        device: The model's device.
        stream: The running stream's :attr:`FrameInputs.signature`, if any.
        signature: The model's ``forward`` signature: missing, extra or misnamed inputs.

    Raises:
        TypeError: Not a tensor (or tuple/dict of them), not floating point, another dtype or
            device than the model's, inputs that do not bind to ``forward``.
        ValueError: Wrong rank or channels, empty, a shape or structure change mid-stream, NaN
            or Inf.
    """
    kind, keys, leaves = _check_leaves(value, name, specs, dtype, device, time_dim=False)
    frame = FrameInputs(kind, keys, leaves)
    check_signature(signature, frame, name)
    _check_stream(frame, name, stream)
    _check_finite(leaves, keys, name)
    return frame


def _check_stream(frame: FrameInputs, name: str, stream: tuple[Any, ...] | None) -> None:
    if stream is not None and frame.signature != stream:
        def shown(sig: tuple[Any, ...]) -> Any:
            return sig[0][1] if len(sig) == 1 and sig[0][0] is None else dict(sig)

        raise ValueError(f"{name} shape changed mid-stream: expected {shown(stream)}, got "
                         f"{shown(frame.signature)}; call reset() to start a new stream")


def check_clip_inputs(value: Any, name: str, specs: Mapping[Key, InputSpec] | None,
                      dtype: torch.dtype, device: torch.device,
                      stream: tuple[Any, ...] | None = None,
                      signature: inspect.Signature | None = None) -> ClipInputs:
    """Validate a clip (a tensor or a tuple/dict of tensors ``[B, T, ...]``) before any layer.

    As :func:`check_frame_inputs`; ``stream`` is checked against the clip's frames.
    """
    kind, keys, leaves = _check_leaves(value, name, specs, dtype, device, time_dim=True)
    clip = ClipInputs(kind, keys, leaves)
    check_signature(signature, clip, name)
    _check_stream(clip.frame(0), f"{name} frame", stream)
    _check_finite(leaves, keys, name)
    return clip

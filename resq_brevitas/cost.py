"""Counting MACs and static BOPs of a model (the records and reports are in
:mod:`resq_brevitas.nn.cost`; a running ResQ model fills ``last_cost`` itself).

:func:`count_macs` runs one forward on zeros and reads every supported layer's MACs;
:func:`count_bops` turns them into the BOPs of one keyframe period at a static scheme.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from resq_brevitas.checks import check_int, check_period
from resq_brevitas.config import Scheme
from resq_brevitas.nn.cost import CostReport, CostTally, LayerCost, precision_bops
from resq_brevitas.nn.layers import DEFAULT_LAYER_MAP, resq_layer_class_of
from resq_brevitas.temporal.model import ResQModel

__all__ = ["count_bops", "count_macs"]


InputShape = Sequence[int] | Sequence[Sequence[int]] | Mapping[str, Sequence[int]]


def _one_shape(shape: Any, name: str) -> tuple[int, ...]:
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
        raise TypeError(f"{name} must be a sequence of ints (one frame's shape without the batch "
                        f"dim, e.g. [C, H, W]), got {type(shape).__name__} {shape!r}")
    if not shape:
        raise ValueError(f"{name} must be non-empty, got {tuple(shape)}")
    for size in shape:
        check_int(size, f"{name} entries", minimum=1)
    return tuple(shape)


def _zeros_inputs(model: nn.Module, input_shape: Any) -> Any:
    """Validated zero inputs of batch 1 on the model's dtype and device: a tensor for one
    shape, a tuple for a sequence of shapes, a dict for a mapping (keyword inputs)."""
    param = next(model.parameters(), None)
    kwargs: dict[str, Any] = {} if param is None else {"dtype": param.dtype,
                                                        "device": param.device}
    if isinstance(input_shape, Mapping) and input_shape:
        value: Any = {k: torch.zeros((1, *_one_shape(v, f"input_shape[{k!r}]")), **kwargs)
                      for k, v in input_shape.items()}
    elif (isinstance(input_shape, Sequence) and input_shape
          and all(isinstance(s, Sequence) and not isinstance(s, str) for s in input_shape)):
        value = tuple(torch.zeros((1, *_one_shape(v, f"input_shape[{i}]")), **kwargs)
                      for i, v in enumerate(input_shape))
    else:
        value = torch.zeros((1, *_one_shape(input_shape, "input_shape")), **kwargs)
    if isinstance(model, ResQModel):  # rank and channels the first layers expect
        try:
            model.check_frame(value, "input_shape", stream=False)
        except ValueError as err:
            raise ValueError(f"{err} (input_shape is one frame without the batch dim)") from None
    return value


def count_macs(model: nn.Module, input_shape: InputShape,
               layer_map: Mapping[type[nn.Module], type[nn.Module]] = DEFAULT_LAYER_MAP
               ) -> dict[str, int]:
    """MACs per sample of each supported layer (float or ResQ), from one forward on zeros.

    Args:
        model: A float model, a converted model, or a ``ResQModel``.
        input_shape: One frame's shape without the batch dimension (e.g. ``[C, H, W]``, or
            ``[C, T', H, W]`` for a 3D-CNN's sliding clip); for a model with several inputs, a
            tuple of shapes (positional inputs) or a dict ``name -> shape`` (keyword inputs).
        layer_map: Which float layers count (and how their MACs are computed).

    Returns:
        ``name -> MACs`` in call order.

    Raises:
        TypeError, ValueError: A malformed ``input_shape``, or (for a ``ResQModel``) one whose
            rank or channels its first layers do not take.
    """
    net = model.model if isinstance(model, ResQModel) else model
    if isinstance(model, ResQModel):
        layer_map = model.layer_map
    inputs = _zeros_inputs(model, input_shape)
    macs: dict[str, int] = {}
    handles = []
    for name, module in net.named_modules():
        resq_class = resq_layer_class_of(module, layer_map)  # one linear op (not attention)
        if resq_class is None:
            continue

        def hook(mod: nn.Module, args: tuple, out: Tensor, name: str = name,
                 count=resq_class._macs) -> None:
            in_shape, out_shape = tuple(args[0].shape[1:]), tuple(out.shape[1:])
            macs[name] = macs.get(name, 0) + count(mod, in_shape, out_shape)

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            if isinstance(inputs, Tensor):
                net(inputs)
            elif isinstance(inputs, tuple):
                net(*inputs)
            else:
                net(**inputs)
    finally:
        for h in handles:
            h.remove()
    return macs


def count_bops(model: nn.Module, input_shape: InputShape, scheme: str | Scheme,
               period: int = 1) -> CostReport:
    """Static BOPs of one keyframe period: a keyframe then ``period - 1`` residual frames.

    Args:
        model: A float model, a converted model, or a ``ResQModel``.
        input_shape: As :func:`count_macs`.
        scheme: Scheme or notation, applied to every layer; a frame-quantization scheme ignores
            ``period``.
        period: Keyframe period ``T``.

    Returns:
        A :class:`CostReport` whose ``per_frame`` lists the ``T`` frames of one period.
    """
    scheme = Scheme.parse(scheme)
    try:
        period = check_period(period)
    except TypeError as err:
        raise ValueError(str(err)) from None
    if scheme.is_dynamic:
        raise ValueError(f"count_bops needs a static scheme; {scheme} depends on the data")
    if scheme.is_frame_quantization:
        period = 1
    macs = count_macs(model, input_shape)
    one = torch.ones(1, dtype=torch.bool)
    tally = CostTally(scheme.notation)
    for t in range(period):
        records = {}
        for name, m in macs.items():
            residual = None
            if t > 0:
                assert scheme.residual is not None
                residual = torch.full((1,), float(precision_bops(m, scheme.residual)),
                                      dtype=torch.float64)
            bits = (torch.full((1,), float(scheme.residual.bops_act_bits), dtype=torch.float64)
                    if t > 0 and scheme.residual is not None else None)
            records[name] = LayerCost(m, one if t == 0 else ~one,
                                      float(precision_bops(m, scheme.keyframe)), residual, bits)
        tally.add_frame(records)
    return tally.report()

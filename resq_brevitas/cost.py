"""Counting MACs and static BOPs of a model (the records and reports are in
:mod:`resq_brevitas.nn.cost`; a running ResQ model fills ``last_cost`` itself).

:func:`count_macs` runs one forward on zeros and reads every supported layer's MACs;
:func:`count_bops` turns them into the BOPs of one keyframe period at a static scheme.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from resq_brevitas.checks import check_period
from resq_brevitas.config import Scheme
from resq_brevitas.nn.cost import CostReport, CostTally, LayerCost, precision_bops
from resq_brevitas.nn.layers import DEFAULT_LAYER_MAP, resq_layer_class_of
from resq_brevitas.temporal.model import ResQModel

__all__ = ["count_bops", "count_macs"]


def count_macs(model: nn.Module, input_shape: Sequence[int],
               layer_map: Mapping[type[nn.Module], type[nn.Module]] = DEFAULT_LAYER_MAP
               ) -> dict[str, int]:
    """MACs per sample of each supported layer (float or ResQ), from one forward on zeros.

    Args:
        model: A float model, a converted model, or a ``ResQModel``.
        input_shape: One frame's shape without the batch dimension (e.g. ``[C,H,W]``).
        layer_map: Which float layers count (and how their MACs are computed).

    Returns:
        ``name -> MACs`` in call order.
    """
    net = model.model if isinstance(model, ResQModel) else model
    if isinstance(model, ResQModel):
        layer_map = model.layer_map
    shape = tuple(int(s) for s in input_shape)
    if not shape:
        raise ValueError("input_shape must be non-empty, got ()")
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
    param = next(net.parameters(), None)
    device = param.device if param is not None else None
    try:
        with torch.no_grad():
            net(torch.zeros((1,) + shape, device=device))
    finally:
        for h in handles:
            h.remove()
    return macs


def count_bops(model: nn.Module, input_shape: Sequence[int], scheme: str | Scheme,
               period: int = 1) -> CostReport:
    """Static BOPs of one keyframe period: a keyframe then ``period - 1`` residual frames.

    Args:
        model: A float model, a converted model, or a ``ResQModel``.
        input_shape: One frame's shape without the batch dimension (e.g. ``[C,H,W]``).
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

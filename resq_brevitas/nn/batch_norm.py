"""Folding a BatchNorm into the supported layer before it, given the pair's names.

The traces that find the pairs (torch.fx or an eager run) live in :mod:`resq_brevitas.bn_fold`;
this is the fold itself, low enough in the package for :class:`~resq_brevitas.ResQModel` to
repeat a saved fold when it loads a state (no trace needed, no example frame).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from brevitas.graph.base import ModuleInstanceToModuleInstance
from brevitas.nn.utils import merge_bn
from torch import nn

from resq_brevitas.nn.layers import DEFAULT_LAYER_MAP, overridden_members, resq_layer_class_of

__all__ = ["BN_TYPES", "fold_pairs", "is_plain_batch_norm"]

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def is_plain_batch_norm(module: nn.Module) -> bool:
    """Whether ``module`` computes exactly a BatchNorm: one of :data:`BN_TYPES` or a subclass
    that changes nothing but ``__init__``. A subclass with its own ``forward`` (timm's
    ``BatchNormAct2d``: BN then an activation) does more, and folding it would drop that."""
    base = next((b for b in type(module).__mro__ if b in BN_TYPES), None)
    return base is not None and not overridden_members(type(module), base)


def fold_pairs(model: nn.Module, pairs: Iterable[tuple[str, str]],
               layer_map: Mapping[type[nn.Module], type[nn.Module]] = DEFAULT_LAYER_MAP
               ) -> list[tuple[str, str]]:
    """Fold each named BatchNorm into its named layer (the pairs a trace found) and replace it
    by ``Identity``; pairs that cannot fold (no running statistics, no per-channel axis) stay.

    Args:
        model: Modified in place.
        pairs: ``(layer name, batch norm name)`` in ``model.named_modules()`` terms.
        layer_map: The layer map that gives each layer class its fold axis.

    Returns:
        The pairs folded.

    Raises:
        ValueError: If a name is not a module of ``model``, or the layer is not supported.
    """
    modules = dict(model.named_modules())
    checked = []
    for layer_name, bn_name in pairs:  # every pair checked before anything is folded
        layer, bn = modules.get(layer_name), modules.get(bn_name)
        resq_class = None if layer is None else resq_layer_class_of(layer, layer_map)
        if resq_class is None or bn is None or not is_plain_batch_norm(bn):
            raise ValueError(f"pairs must name a supported layer and a BatchNorm of the model, "
                             f"got ({layer_name!r}, {bn_name!r}): "
                             f"{type(layer).__name__}, {type(bn).__name__}")
        checked.append((layer_name, layer, bn_name, bn, resq_class))
    folded = []
    for layer_name, layer, bn_name, bn, resq_class in checked:
        if bn.running_mean is None:
            continue
        axis = resq_class.bn_fold_axis(layer)
        if axis is None:
            continue  # e.g. grouped transposed weights interleave output channels: keep the BN
        merge_bn(layer, bn, output_channel_dim=axis)
        ModuleInstanceToModuleInstance(bn, nn.Identity()).apply(model)
        folded.append((layer_name, bn_name))
    return folded

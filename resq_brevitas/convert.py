"""``convert``: float model + :class:`ResQConfig` in, :class:`ResQModel` out.

The float model is deep-copied and left untouched. BatchNorm layers that directly follow a conv or
linear layer are folded into it (:mod:`resq_brevitas.bn_fold`; when ``torch.fx`` cannot trace the
model, folding waits for the first calibration frame and uses an eager trace); then every supported
layer is replaced by its ResQ layer with a Brevitas graph rewriter. Weight layers
that are not supported are reported by name.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from brevitas.graph.base import ModuleToModuleByInstance
from brevitas.graph.utils import signature_keys
from torch import nn

from resq_brevitas.bn_fold import fold_batch_norms
from resq_brevitas.config import ResQConfig, Scheme
from resq_brevitas.nn.layers import RESQ_LAYER_FOR, is_resq_layer
from resq_brevitas.quant.quantizers import act_quant, weight_quant
from resq_brevitas.temporal.model import ResQModel

__all__ = ["convert", "fold_batch_norms", "find_unsupported", "resq_layer_kwargs", "ToResQLayer"]

# Layers that hold weights but are left in floating point by design: they are not
# multiply-accumulate layers (normalisation, per-channel affine, PReLU slopes).
_ELEMENTWISE_WEIGHT_LAYERS = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.PReLU, nn.LocalResponseNorm,
    nn.RMSNorm,
)


class ToResQLayer(ModuleToModuleByInstance):
    """Brevitas rewriter replacing one float layer instance by a ResQ layer.

    Brevitas's default ``init_new_module`` builds on the meta device and loads with ``strict=True``;
    a ResQ layer has quantizer parameters a float layer lacks, so the new module is built on the
    float weight's device and only the float tensors are copied in (checked key by key).
    """

    def init_new_module(self, old_module: nn.Module, name: str | None = None,
                        load_state_dict: bool = True) -> nn.Module:
        attrs = self._map_origin_vars(self._module_attributes(old_module))
        allowed = set(signature_keys(self.new_module_class.brevitas_class)) - {
            "device", "dtype", "weight_quant", "input_quant", "bias_quant", "output_quant",
            "return_quant_tensor",
        }
        kwargs = {k: v for k, v in attrs.items() if k in allowed}
        kwargs = self._evaluate_new_kwargs(kwargs, old_module, name)
        new_module = self.new_module_class(**kwargs)
        new_module.to(device=old_module.weight.device, dtype=old_module.weight.dtype)
        float_state = old_module.state_dict()
        unknown = set(float_state) - {"weight", "bias"}
        if unknown:
            raise ValueError(f"layer {name!r} has state {sorted(unknown)} that ResQ cannot carry")
        with torch.no_grad():
            new_module.weight.copy_(float_state["weight"])
            if "bias" in float_state:
                new_module.bias.copy_(float_state["bias"])
        new_module.train(old_module.training)
        return new_module


def resq_layer_kwargs(scheme: Scheme, weight_granularity: str) -> dict[str, Any]:
    """Quantizer keyword arguments of every ResQ layer for ``scheme``."""
    key, res = scheme.keyframe, scheme.residual
    kwargs: dict[str, Any] = {
        "weight_quant": weight_quant(key.weight_bits, weight_granularity),
        "input_quant": act_quant(key.act_bits[0] if key.act_bits else None),
        "has_residual": res is not None,
    }
    if res is not None:
        kwargs["residual_weight_quant"] = weight_quant(res.weight_bits, weight_granularity)
        if res.is_pool:
            # Dynamic-ResQ: one activation quantizer per pool bit width; the residual view
            # itself gets no input quantizer (the policy quantizes per pixel).
            assert res.act_bits is not None
            kwargs["residual_input_quant"] = None
            kwargs["residual_input_pool"] = tuple((b, act_quant(b)) for b in res.act_bits)
        else:
            kwargs["residual_input_quant"] = act_quant(res.act_bits[0] if res.act_bits else None)
    return kwargs


def find_unsupported(model: nn.Module) -> list[str]:
    """Names of modules with their own weights that ResQ cannot run (e.g. LSTM, MHA)."""
    names = []
    for name, module in model.named_modules():
        if type(module) in RESQ_LAYER_FOR or is_resq_layer(module):
            continue
        if isinstance(module, _ELEMENTWISE_WEIGHT_LAYERS):
            continue
        if any(True for _ in module.parameters(recurse=False)):
            names.append(f"{name or '<root>'} ({type(module).__name__})")
    return names


def convert(model: nn.Module, config: ResQConfig | None = None) -> ResQModel:
    """Convert a float model to a :class:`ResQModel`.

    Args:
        model: The float model (not modified).
        config: The configuration (default ``ResQConfig()``: ``W8A8->W4A4``, ``T=4``).

    Returns:
        A ``ResQModel``; calibrate it with :func:`resq_brevitas.calibrate` before use.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module`` or ``config`` not a ``ResQConfig``.
        ValueError: If ``config.strict`` and the model has unsupported weight layers, or the model
            has no supported layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if config is None:
        config = ResQConfig()
    if not isinstance(config, ResQConfig):
        raise TypeError(f"config must be a resq_brevitas.ResQConfig, got {type(config).__name__}")
    if type(model) in RESQ_LAYER_FOR:
        raise ValueError(
            f"model must contain its layers; wrap a bare {type(model).__name__} in nn.Sequential"
        )
    net = copy.deepcopy(model)
    # None: torch.fx could not trace the model; calibrate() folds on an eager trace instead.
    bn_fold_pending = config.fold_bn and fold_batch_norms(net) is None
    unsupported = find_unsupported(net)
    if unsupported:
        message = ("these weight layers are not supported by ResQ and stay in floating point "
                   f"(not counted in BOPs): {', '.join(unsupported)}")
        if config.strict:
            raise ValueError(message)
        warnings.warn(message, stacklevel=2)
    kwargs = resq_layer_kwargs(config.scheme, config.weight_granularity)  # type: ignore[arg-type]
    targets = [m for m in net.modules() if type(m) in RESQ_LAYER_FOR]
    for module in targets:
        net = ToResQLayer(module, RESQ_LAYER_FOR[type(module)], **kwargs).apply(net)
    qm = ResQModel(net, config, tuple(unsupported))
    qm.bn_fold_pending = bn_fold_pending
    return qm

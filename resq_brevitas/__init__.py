"""resq-brevitas: residual quantization of video networks across time, as a Brevitas plugin.

Typical use::

    import resq_brevitas as resq
    qm = resq.convert(float_model, resq.ResQConfig(scheme="W8A8->W4A4", period=4))
    resq.calibrate(qm, clips)
    y = qm(video)            # [B, T, C, H, W] -> [B, T, ...]
    print(qm.last_cost)      # BOPs per layer and frame

Every public name is imported on first use (PEP 562): ``import resq_brevitas`` itself loads
neither torch nor Brevitas, and export (onnx), FX and observer machinery load only when a name
that needs them is used.
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings
from types import MappingProxyType
from typing import Any

# Brevitas warns on import that an optional CUDA kernel package is missing; it changes nothing
# for this package (no Hadamard rotation is used), so that one message from that one module is
# silenced. Installed before anything imports Brevitas.
warnings.filterwarnings("ignore", message=r"fast_hadamard_transform package not found",
                        category=UserWarning, module=r"brevitas\.graph\.equalize")

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_EXPORTS = MappingProxyType({
    "activation_ranges": "resq_brevitas.calibrate",
    "analyze": "resq_brevitas.experiments.analysis",
    "calibrate": "resq_brevitas.calibrate",
    "copy_ranges": "resq_brevitas.calibrate",
    "set_activation_ranges": "resq_brevitas.calibrate",
    "ErrorBoundPolicy": "resq_brevitas.config",
    "ErrorBudgetRefresh": "resq_brevitas.config",
    "FixedPeriodRefresh": "resq_brevitas.config",
    "LayerOverride": "resq_brevitas.config",
    "LearnedFramePolicy": "resq_brevitas.config",
    "LineSearch": "resq_brevitas.config",
    "Precision": "resq_brevitas.config",
    "ResQConfig": "resq_brevitas.config",
    "SceneCutRefresh": "resq_brevitas.config",
    "Scheme": "resq_brevitas.config",
    "convert": "resq_brevitas.convert",
    "count_bops": "resq_brevitas.cost",
    "count_macs": "resq_brevitas.cost",
    "export": "resq_brevitas.deploy.onnx_export",
    "CostReport": "resq_brevitas.nn.cost",
    "LayerCost": "resq_brevitas.nn.cost",
    "DEFAULT_LAYER_MAP": "resq_brevitas.nn.layers",
    "quantization_disabled": "resq_brevitas.quant.control",
    "ResQModel": "resq_brevitas.temporal.model",
    "with_execution": "resq_brevitas.convert",
    "train_qat": "resq_brevitas.train",
    "QATHistory": "resq_brevitas.train",
    "FloatTeacher": "resq_brevitas.train",
})

#: Subpackages and modules reachable as attributes (``resq.nn.ResQConv2d``).
_SUBMODULES = frozenset({
    "bn_fold", "checks", "cost", "demo", "deploy", "experiments", "nn", "observers", "policy",
    "quant", "temporal", "train",
})

#: Public functions whose names are also submodules: importing ``resq_brevitas.convert`` binds
#: the module on the package under the function's name, which must stay the function.
_SHADOWED = frozenset(name for name, module in _EXPORTS.items()
                      if module == f"{__name__}.{name}")

__all__ = sorted(_EXPORTS)


class _Package(types.ModuleType):
    """This package's module type: keeps ``resq.convert`` / ``resq.calibrate`` the functions."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return  # the submodule stays reachable through sys.modules and import statements
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    """Import a public name or a subpackage on first use, then keep it in the namespace."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | _SUBMODULES)

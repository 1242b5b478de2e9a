"""Model outputs of any pytree shape in the step graphs: flat graph outputs, a JSON structure.

ONNX graphs have flat outputs; models return a tensor, or a dict / tuple / list of them
(torchvision's segmentation models return ``{"out": ..., "aux": ...}``). The export flattens
the output of every frame into its leaves (:func:`flatten_output`), names each leaf after its
path (``output`` for a single tensor, ``output.out`` for the key ``"out"``, ``output.0`` for
position 0, ``output.x`` for a namedtuple's field ``x``, nested paths joined by dots) and
records the structure in ``manifest.json`` as JSON (:func:`output_structure`);
:class:`~resq_brevitas.deploy.runtime.OnnxStream` rebuilds the same structure per frame
(:func:`rebuild_output`).

The structure is a nested JSON object, one node per container::

    {"kind": "tensor", "name": "output.out"}
    {"kind": "dict", "keys": ["out", "aux"], "items": [<node>, <node>]}
    {"kind": "tuple" | "list", "items": [<node>, ...]}
    {"kind": "namedtuple", "type": "Point", "fields": ["x", "y"], "items": [...]}

It is written here rather than with ``torch.utils._pytree``'s serialised specs so that a host
program can read it without torch, and so that the leaves' names are part of it. Dict keys must
be strings (they become JSON keys and tensor names).
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

__all__ = [
    "OUTPUT_NAME",
    "FlatOutputs",
    "flatten_output",
    "leaf_names",
    "output_structure",
    "rebuild_output",
]

#: Name of a single-tensor output, and the root of every leaf's name.
OUTPUT_NAME = "output"


def _is_namedtuple(value: Any) -> bool:
    return isinstance(value, tuple) and hasattr(value, "_fields")


def _walk(value: Any, name: str, leaves: list[Any]) -> dict[str, Any]:
    """The structure node of ``value``; appends its leaves (depth first) to ``leaves``."""
    if isinstance(value, Tensor):
        leaves.append(value)
        return {"kind": "tensor", "name": name}
    if isinstance(value, Mapping):
        keys = list(value)
        bad = [k for k in keys if not isinstance(k, str)]
        if bad:
            raise ValueError(
                f"export names each output after its dict key, so keys must be str; the model's "
                f"output {name!r} has the keys {bad!r}"
            )
        return {"kind": "dict", "keys": keys,
                "items": [_walk(value[k], f"{name}.{k}", leaves) for k in keys]}
    if _is_namedtuple(value):
        items = [_walk(v, f"{name}.{f}", leaves) for f, v in zip(value._fields, value)]
        return {"kind": "namedtuple", "type": type(value).__name__,
                "fields": list(value._fields), "items": items}
    if isinstance(value, (tuple, list)):
        items = [_walk(v, f"{name}.{i}", leaves) for i, v in enumerate(value)]
        return {"kind": "tuple" if isinstance(value, tuple) else "list", "items": items}
    raise ValueError(
        "export needs model outputs made of tensors (a tensor, or dicts/tuples/lists of them); "
        f"the output {name!r} is a {type(value).__name__}"
    )


def flatten_output(value: Any) -> tuple[list[Tensor], dict[str, Any]]:
    """The leaves of a model output (depth first, dict keys in order) and its structure.

    Raises:
        ValueError: A leaf that is not a tensor, a dict key that is not a str, or two leaves
            whose names clash (e.g. the key ``"a.b"`` beside ``{"a": {"b": ...}}``).
    """
    leaves: list[Any] = []
    structure = _walk(value, OUTPUT_NAME, leaves)
    names = leaf_names(structure)
    if len(set(names)) != len(names):
        clash = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"the model's output leaves would share the names {clash}; rename the "
                         "dict keys")
    return leaves, structure


def output_structure(value: Any) -> dict[str, Any]:
    """The JSON structure of a model output (see the module docstring)."""
    return flatten_output(value)[1]


def leaf_names(structure: Mapping[str, Any]) -> list[str]:
    """The graph output names of a structure's leaves, in graph order."""
    if structure["kind"] == "tensor":
        return [structure["name"]]
    return [name for item in structure["items"] for name in leaf_names(item)]


def rebuild_output(structure: Mapping[str, Any], values: Mapping[str, Any] | Sequence[Any]
                   ) -> Any:
    """The output of the structure with its leaves taken from ``values``.

    Args:
        structure: From :func:`flatten_output` (or ``manifest.output_structure``).
        values: ``leaf name -> value``, or the values in :func:`leaf_names` order.

    Raises:
        ValueError: ``values`` lacks a leaf, or a sequence of the wrong length.
    """
    names = leaf_names(structure)
    if not isinstance(values, Mapping):
        values = list(values)
        if len(values) != len(names):
            raise ValueError(f"the output structure has {len(names)} leaves {names}, got "
                             f"{len(values)} values")
        values = dict(zip(names, values))
    missing = [n for n in names if n not in values]
    if missing:
        raise ValueError(f"no values for the output leaves {missing}")
    return _build(structure, values)


def _build(node: Mapping[str, Any], values: Mapping[str, Any]) -> Any:
    kind = node["kind"]
    if kind == "tensor":
        return values[node["name"]]
    items = [_build(item, values) for item in node["items"]]
    if kind == "dict":
        return dict(zip(node["keys"], items))
    if kind == "namedtuple":
        return collections.namedtuple(node["type"], node["fields"])(*items)
    if kind == "list":
        return items
    if kind == "tuple":
        return tuple(items)
    raise ValueError(f"unknown output structure kind {kind!r}")


class FlatOutputs(nn.Module):
    """A step module whose model output is flattened: ``(*leaves, *state)`` instead of
    ``(output, *state)``, for exporters that need a flat tuple of tensors.

    Args:
        step: A keyframe or residual step module (``(...) -> (output, *state)``).
    """

    def __init__(self, step: nn.Module) -> None:
        super().__init__()
        self.step = step

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        output, *state = self.step(*args)
        leaves, _ = flatten_output(output)
        return (*leaves, *state)

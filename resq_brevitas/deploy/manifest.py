"""``manifest.json``: what an export wrote and how to drive it, written and read by one class.

:class:`Manifest` is a versioned dataclass: :func:`resq_brevitas.export` fills and writes it,
:class:`resq_brevitas.deploy.runtime.OnnxStream` reads it back (:meth:`Manifest.read`), and both
go through the same fields. It carries the model's full :class:`~resq_brevitas.ResQConfig`
(``config``, from :meth:`ResQConfig.to_dict`), so an exported folder says how it was built.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["MANIFEST_NAME", "MANIFEST_VERSION", "GraphIO", "Manifest", "TensorEntry"]

MANIFEST_NAME = "manifest.json"
#: Version of the manifest layout (2: typed manifest with the config; 1 had no ``config``).
MANIFEST_VERSION = 2


@dataclass(frozen=True)
class TensorEntry:
    """A graph input, output or state tensor.

    Attributes:
        name: The tensor's name in the graphs.
        shape: Its static shape.
        dtype: Its dtype (``"float32"``).
        layer: State tensors: the ResQ layer it belongs to.
        kind: State tensors: ``"x_ref"`` or ``"z_ref"``.
    """

    name: str
    shape: list[int]
    dtype: str
    layer: str | None = None
    kind: str | None = None


@dataclass(frozen=True)
class GraphIO:
    """The input and output names of one graph, in order.

    Attributes:
        inputs: The graph's inputs.
        outputs: Its outputs as the host loop sees them (output, then the state).
        aliases: Outputs left out of the ONNX file because they equal an input or another
            output (QONNX graphs for FINN): ``output name -> the input/output it equals``. The
            runtime re-creates them, so ``outputs`` is what every call returns.
    """

    inputs: list[str]
    outputs: list[str]
    aliases: dict[str, str] = field(default_factory=dict)


@dataclass
class Manifest:
    """Everything a host program needs to run the exported step graphs.

    Attributes:
        format: ``"qonnx"``, ``"qcdq"`` or ``"fx"``.
        period: Keyframe period of the host loop (:class:`~resq_brevitas.temporal.
            KeyframeSchedule`).
        files: ``graph kind -> file name`` (``keyframe``, ``residual``; ``graph_module`` and
            ``code`` for ``fx``).
        config: The model's :meth:`ResQConfig.to_dict`.
        scheme: The notation (with per-layer overrides).
        input: The frame input.
        output: The model output (its first leaf when the model returns a dict, tuple or list).
        outputs: Every leaf of the model output, in graph order (one entry for a tensor).
        output_structure: How the leaves make up the output per frame
            (:mod:`resq_brevitas.deploy.outputs`: dict keys, tuple/list positions).
        state: The state tensors in graph order.
        keyframe: The keyframe graph's inputs and outputs.
        residual: The residual graph's, or ``None`` under frame quantization.
        reference: ``"keyframe"`` or ``"previous"``.
        threshold: RRM truncation ``eps``.
        opset: ONNX opset of the standard domain (the lowest the graphs need, or the one asked
            for; :func:`resq_brevitas.export`).
        exporter: How the graphs were produced.
        graph_source: ``"torch.fx"`` or ``"eager"`` step modules.
        refresh_not_exported: Refresh policies the host loop does not run (fixed period only).
        how_to_drive: The host loop in words.
        finn: QONNX graphs: per graph, what :func:`resq_brevitas.deploy.finn.prepare_for_finn`
            did and what FINN maps only to floating-point layers.
        parity: What the export's check measured (:func:`resq_brevitas.deploy.parity.
            check_export`): the graphs against PyTorch on the example frame, per backend level.
        extra: Format-specific fields (``fx``: call sites for a ``QConfigMapping``).
        version: :data:`MANIFEST_VERSION`.
    """

    format: str
    period: int
    files: dict[str, str]
    config: dict[str, Any] = field(default_factory=dict)
    scheme: str = ""
    input: TensorEntry | None = None
    output: TensorEntry | None = None
    outputs: list[TensorEntry] = field(default_factory=list)
    output_structure: dict[str, Any] | None = None
    state: list[TensorEntry] = field(default_factory=list)
    keyframe: GraphIO | None = None
    residual: GraphIO | None = None
    reference: str = "keyframe"
    threshold: float = 0.0
    opset: int | None = None
    exporter: str = ""
    graph_source: str = ""
    refresh_not_exported: list[str] = field(default_factory=list)
    how_to_drive: list[str] = field(default_factory=list)
    finn: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    version: int = MANIFEST_VERSION

    @property
    def output_names(self) -> list[str]:
        """Names of the model output's leaves, in graph order (``outputs``, else ``output``)."""
        if self.outputs:
            return [entry.name for entry in self.outputs]
        return [self.output.name] if self.output is not None else []

    @property
    def state_names(self) -> list[str]:
        """Names of the state tensors, in graph order."""
        return [entry.name for entry in self.state]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (the file's content)."""
        return asdict(self)

    def write(self, out_dir: str | os.PathLike[str]) -> Path:
        """Write ``out_dir/manifest.json``; returns its path."""
        path = Path(out_dir) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """The manifest of :meth:`to_dict`'s output.

        Raises:
            ValueError: Another manifest version, or missing required fields.
        """
        if not isinstance(data, dict):
            raise ValueError(f"a manifest must be a JSON object, got {type(data).__name__}")
        version = data.get("version")
        if version != MANIFEST_VERSION:
            raise ValueError(
                f"manifest version {version!r} is not supported (this release reads version "
                f"{MANIFEST_VERSION}); export the model again"
            )
        known = {f.name for f in fields(cls)}
        missing = [name for name in ("format", "period", "files") if name not in data]
        if missing:
            raise ValueError(f"manifest lacks the fields {missing}")
        values = {k: v for k, v in data.items() if k in known}
        for key in ("input", "output"):
            if values.get(key) is not None:
                values[key] = TensorEntry(**values[key])
        for key in ("state", "outputs"):
            values[key] = [TensorEntry(**entry) for entry in values.get(key, [])]
        for key in ("keyframe", "residual"):
            if values.get(key) is not None:
                values[key] = GraphIO(**values[key])
        return cls(**values)

    @classmethod
    def read(cls, out_dir: str | os.PathLike[str]) -> Manifest:
        """Read ``out_dir/manifest.json``.

        Raises:
            FileNotFoundError: No manifest in ``out_dir``.
            ValueError: Not a manifest this release reads.
        """
        path = Path(out_dir) / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {MANIFEST_NAME} in {out_dir}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        return cls.from_dict(data)

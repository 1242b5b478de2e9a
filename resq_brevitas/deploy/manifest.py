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

__all__ = ["MANIFEST_NAME", "MANIFEST_VERSION", "READABLE_VERSIONS", "ActionEntry", "GraphIO",
           "Manifest", "PolicyEntry", "TensorEntry"]

MANIFEST_NAME = "manifest.json"
#: Version of the manifest layout (3: ``actions``, ``policy`` and ``graphs`` for a learned
#: frame policy; 2: typed manifest with the config; 1 had no ``config``).
MANIFEST_VERSION = 3
#: Versions :meth:`Manifest.from_dict` reads: version 3 only adds fields with defaults, so a
#: version 2 manifest reads as an export without a policy.
READABLE_VERSIONS = (2, 3)


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


@dataclass(frozen=True)
class ActionEntry:
    """One action of a family scheme's learned policy (the policy graph's logit ``index``).

    Attributes:
        index: Position in the policy's logits (the family's written order).
        name: ``"W4A4"``, ``"skip"`` or ``"key"``.
        kind: ``"precision"``, ``"skip"`` or ``"key"``.
        graph: The ``files`` key of the graph the action runs (``"keyframe"`` for ``key``),
            ``None`` for ``skip`` (the host reuses the previous output: nothing runs).
        file: That graph's file name in the export folder (``None`` for ``skip``).
        weights: What the graph stores as this action's weights (e.g. a float copy of the
            truncated any-precision weight); ``None`` for ``skip``.
    """

    index: int
    name: str
    kind: str
    graph: str | None
    file: str | None = None
    weights: str | None = None


@dataclass(frozen=True)
class PolicyEntry:
    """The learned frame policy's graph and how the host turns its logits into actions.

    Attributes:
        graph: The ``files`` key of the policy graph (``"policy"``).
        side: ``"frame"`` (``{W8A8,W4A4,skip}``: every frame runs its action's graph) or
            ``"residual"`` (``W8A8->{W4A4,skip,key}``: keyframes on the schedule, the action
            picks each residual frame's graph).
        logits: The policy graph's logits output ``[B, |actions|]``.
        state: The policy's recurrent state in graph order (LSTM ``h``, ``c``, then
            ``policy.previous``, the previous downsampled frame, when the policy's inputs use
            the frame difference; manifests written before that option list ``h``, ``c`` only):
            inputs under these names, outputs under ``name + "_out"``; zeros at a stream's
            first frame.
        skip_index: The ``skip`` action, or ``None``.
        key_index: The ``key`` action, or ``None``.
        top_index: The highest precision action, taken where the chosen action is not allowed
            (``skip`` before a stream has an output).
        forced_action: The action every row takes whatever the logits (the PyTorch policy was
            exported inside ``FramePolicyNetwork.forced``), else ``None``.
        how_to_choose: The rule in words.
    """

    graph: str
    side: str
    logits: TensorEntry
    state: list[TensorEntry]
    skip_index: int | None
    key_index: int | None
    top_index: int
    forced_action: int | None = None
    how_to_choose: list[str] = field(default_factory=list)

    @property
    def state_names(self) -> list[str]:
        """Names of the policy state tensors, in graph order."""
        return [entry.name for entry in self.state]


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
        actions: Family schemes: the policy's actions in logit order, with the graph of each.
        policy: Family schemes: the policy graph, its state and the choice rule; ``None`` for
            a fixed scheme.
        graphs: The inputs and outputs of every graph other than ``keyframe``/``residual``
            (the policy graph, one graph per precision action), by ``files`` key.
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
    actions: list[ActionEntry] = field(default_factory=list)
    policy: PolicyEntry | None = None
    graphs: dict[str, GraphIO] = field(default_factory=dict)
    version: int = MANIFEST_VERSION

    def io(self, kind: str) -> GraphIO:
        """The inputs and outputs of graph ``kind`` (a ``files`` key).

        Raises:
            ValueError: ``kind`` names no graph with known inputs and outputs.
        """
        known = self.graphs.get(kind) if kind not in ("keyframe", "residual") else getattr(
            self, kind)
        if known is None:
            kinds = [k for k in self.files if k in self.graphs or k in ("keyframe", "residual")]
            raise ValueError(f"kind must name a graph of this export, one of {kinds}, got "
                             f"{kind!r}")
        return known

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
        if version not in READABLE_VERSIONS:
            raise ValueError(
                f"manifest version {version!r} is not supported (this release reads versions "
                f"{READABLE_VERSIONS}); export the model again"
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
        values["graphs"] = {k: GraphIO(**v) for k, v in values.get("graphs", {}).items()}
        values["actions"] = [ActionEntry(**entry) for entry in values.get("actions", [])]
        if values.get("policy") is not None:
            policy = dict(values["policy"])
            policy["logits"] = TensorEntry(**policy["logits"])
            policy["state"] = [TensorEntry(**entry) for entry in policy["state"]]
            values["policy"] = PolicyEntry(**policy)
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

"""Drive exported keyframe/residual graphs over a stream of frames.

:class:`OnnxStream` is what a deployer would otherwise write by hand around the two graphs that
:func:`resq_brevitas.export` writes: a frame counter, the state tensors carried from one
call to the next, a keyframe every ``period`` frames::

    stream = OnnxStream("out/qcdq")          # reads manifest.json, opens two sessions
    for frame in frames:                     # numpy [B, C, H, W] float32
        y = stream.step(frame)
    stream.reset()                           # next frame starts a new stream (a keyframe)

The backend follows the manifest's ``format`` unless one is given: ``qcdq`` graphs run in
onnxruntime (``backend="onnxruntime"``), ``qonnx`` graphs (``Quant`` nodes, which onnxruntime does
not know) node by node with ``qonnx.core.onnx_exec.execute_onnx`` (``backend="qonnx"``, as FINN's
reference execution does). ``backend=`` overrides the choice.

The default onnxruntime optimisation is ``"faithful"``: onnxruntime's basic level (constant
folding, redundant-node removal) with its QDQ transformations turned off (the session option
``session.disable_quant_qdq``), so the graph runs as exported and reproduces the PyTorch model to
float rounding. onnxruntime's own levels change what is computed: already ``"basic"`` quantizes
the float bias of a ``DequantizeLinear -> Conv`` to int32 at the scale ``s_in * s_w`` (its QDQ
bias quantization; 35-40 dB from PyTorch on the demo model), and ``"extended"``/``"all"`` (its
default) fuse ``DequantizeLinear -> Conv/Gemm -> QuantizeLinear`` into integer kernels that
requantize in one step (QLinearConv, QGemm) and rewrite attention, LayerNorm and GELU subgraphs
(~17 dB lost on timm's LeViT and EfficientViT, issue 12). They stay available
(``optimization="all"``) for speed; :func:`resq_brevitas.export` measures every level on the
example frame (``manifest.parity``) and warns about a level that is not faithful.

Models that return a dict, tuple or list per frame get the same structure back from
:meth:`OnnxStream.step` and :meth:`OnnxStream.run` (with numpy leaves), rebuilt from
``manifest.output_structure``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from resq_brevitas.deploy.finn import restore_aliases
from resq_brevitas.deploy.manifest import Manifest
from resq_brevitas.deploy.outputs import rebuild_output
from resq_brevitas.temporal.actions import SCHEDULED_KEYFRAME
from resq_brevitas.temporal.schedule import KeyframeSchedule

__all__ = [
    "BACKEND_OF_FORMAT",
    "DEFAULT_OPTIMIZATION",
    "OPTIMIZATIONS",
    "SCHEDULED_KEYFRAME",
    "OnnxStream",
    "PolicyOnnxStream",
    "backend_for",
    "qonnx_ir_compat",
]

_BACKENDS = ("onnxruntime", "qonnx")
#: The backend that runs each export format's step graphs.
BACKEND_OF_FORMAT = MappingProxyType({"qcdq": "onnxruntime", "qonnx": "qonnx"})
#: onnxruntime graph optimisation levels :class:`OnnxStream` accepts: ``"faithful"`` (onnxruntime's
#: basic level with its QDQ transformations off) and onnxruntime's own four levels.
OPTIMIZATIONS = ("faithful", "disable", "basic", "extended", "all")
#: The level that computes what the exported graph says: :class:`OnnxStream`'s default.
DEFAULT_OPTIMIZATION = "faithful"
#: The onnxruntime session option that turns off its QDQ transformations (bias quantization,
#: QLinear* fusions); the graph's QuantizeLinear/DequantizeLinear then run as written.
_NO_QDQ_TRANSFORMS = ("session.disable_quant_qdq", "1")


@contextmanager
def qonnx_ir_compat(model: Any) -> Iterator[None]:
    """Let qonnx's node-by-node execution build single-node models onnxruntime accepts.

    qonnx 1.0 wraps each standard node in a fresh model stamped with ``onnx.IR_VERSION``; with
    onnx >= 1.20 that IR version is newer than what current onnxruntime releases load
    ("Unsupported model IR version"). Inside this block the stamp is the IR version of ``model``
    itself (a graph onnxruntime can load), and the previous value is restored on exit. Nothing
    changes when the installed onnx is not newer than the model.

    Args:
        model: The ``onnx.ModelProto`` about to be executed or transformed.
    """
    import onnx

    previous = onnx.IR_VERSION
    target = int(getattr(model, "ir_version", previous) or previous)
    if target >= previous:
        yield
        return
    onnx.IR_VERSION = target
    try:
        yield
    finally:
        onnx.IR_VERSION = previous


def backend_for(manifest: Manifest, backend: str | None = None) -> str:
    """The backend to run ``manifest``'s graphs with: ``backend`` if given, else the format's.

    Raises:
        ValueError: An unknown ``backend``, or a format without step graphs to run (``fx``).
    """
    if backend is not None:
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS} or None, got {backend!r}")
        return backend
    if manifest.format not in BACKEND_OF_FORMAT:
        raise ValueError(
            f"manifest format {manifest.format!r} has no ONNX step graphs to run; OnnxStream runs "
            f"the formats {tuple(BACKEND_OF_FORMAT)}"
        )
    return BACKEND_OF_FORMAT[manifest.format]


class OnnxStream:
    """Run the exported keyframe and residual graphs over frames, carrying the state.

    For an export with a learned frame policy (``manifest.policy``), ``OnnxStream(out_dir)``
    returns a :class:`PolicyOnnxStream`, which runs the policy and then each row's action.

    Args:
        out_dir: A directory written by :func:`resq_brevitas.export` (with ``manifest.json``).
        backend: ``"onnxruntime"`` or ``"qonnx"`` (``execute_onnx``); ``None`` (default) picks
            the one for the manifest's format (:data:`BACKEND_OF_FORMAT`).
        providers: onnxruntime execution providers (default: CPU).
        optimization: ``"faithful"`` (default: the graph as exported, faithful to PyTorch;
            onnxruntime's basic level without its QDQ transformations) or one of onnxruntime's
            levels ``"disable"``, ``"basic"``, ``"extended"``, ``"all"`` (its own default),
            which quantize biases and fuse integer kernels that round differently; see
            ``manifest.parity`` for what each did on the example frame.

    Raises:
        FileNotFoundError: If the manifest or a graph file is missing.
        ValueError: If ``backend`` or ``optimization`` is unknown or the manifest is malformed.
    """

    def __new__(cls, out_dir: str | os.PathLike[str], *args: Any, **kwargs: Any) -> OnnxStream:
        """An :class:`OnnxStream`, or a :class:`PolicyOnnxStream` when the manifest in
        ``out_dir`` has a learned frame policy.

        The kind of host loop is chosen here, once, from the manifest, so that
        ``OnnxStream(out_dir)`` runs any export of :func:`resq_brevitas.export`.
        """
        if cls is OnnxStream and _has_policy(out_dir):
            return super().__new__(PolicyOnnxStream)
        return super().__new__(cls)

    def __init__(self, out_dir: str | os.PathLike[str], backend: str | None = None,
                 providers: list[str] | None = None,
                 optimization: str = DEFAULT_OPTIMIZATION) -> None:
        if backend is not None and backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS} or None, got {backend!r}")
        if optimization not in OPTIMIZATIONS:
            raise ValueError(
                f"optimization must be one of {OPTIMIZATIONS}, got {optimization!r}"
            )
        self.optimization = optimization
        self.out_dir = Path(out_dir)
        #: The export's :class:`~resq_brevitas.deploy.manifest.Manifest`.
        self.manifest = Manifest.read(self.out_dir)
        if "keyframe" not in self.manifest.files or self.manifest.input is None:
            raise ValueError(f"{self.out_dir} holds no ResQ step-graph export")
        #: ``"onnxruntime"`` or ``"qonnx"``: given, or the manifest format's.
        self.backend = backend_for(self.manifest, backend)
        self.schedule = KeyframeSchedule(self.manifest.period)
        self.frame_name = self.manifest.input.name
        self.frame_shape = tuple(self.manifest.input.shape)
        self.state_names = self.manifest.state_names
        #: Names of the model output's leaves (graph outputs before the state).
        self.output_names = self.manifest.output_names or ["output"]
        self.output_structure = self.manifest.output_structure
        self._runners = {kind: self._open(kind, self.out_dir / name, providers)
                         for kind, name in self.manifest.files.items()}
        self.t = 0
        self.state: list[np.ndarray] = []

    @property
    def period(self) -> int:
        """The keyframe period of the host loop."""
        return self.schedule.period

    def _open(self, kind: str, path: Path, providers: list[str] | None) -> Any:
        """A runner ``feeds -> outputs`` (in the manifest's output order) for one graph."""
        if not path.is_file():
            raise FileNotFoundError(f"graph file {path} listed in the manifest is missing")
        io = self.manifest.io(kind)
        if self.backend == "onnxruntime":
            import onnxruntime as ort

            levels = {"faithful": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                      "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                      "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                      "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                      "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
            options = ort.SessionOptions()
            options.graph_optimization_level = levels[self.optimization]
            if self.optimization == "faithful":
                options.add_session_config_entry(*_NO_QDQ_TRANSFORMS)
            session = ort.InferenceSession(str(path), options,
                                           providers=providers or ["CPUExecutionProvider"])
            names = [o.name for o in session.get_outputs()]

            def produce(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
                return dict(zip(names, session.run(None, feeds)))
        else:
            from qonnx.core.modelwrapper import ModelWrapper
            from qonnx.core.onnx_exec import execute_onnx

            model = ModelWrapper(str(path))

            def produce(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
                with qonnx_ir_compat(model.model):
                    return execute_onnx(model, feeds)

        def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            produced = restore_aliases(io.aliases, feeds, produce(feeds))
            return [produced[name] for name in io.outputs]

        return run

    def reset(self) -> None:
        """Forget the state: the next frame is a keyframe."""
        self.t = 0
        self.state = []

    @property
    def next_is_keyframe(self) -> bool:
        """Whether the next :meth:`step` runs the keyframe graph."""
        return self.schedule.is_keyframe(self.t) or "residual" not in self._runners

    def run_graph(self, kind: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run one graph (a ``manifest.files`` key: ``"keyframe"``, ``"residual"``, or for a
        family scheme ``"policy"`` and the action graphs) on named inputs, outside the loop.

        Returns every output in the manifest's order (the output leaves, then the state), aliases
        re-created; the stream's counter and state are not touched.

        Raises:
            ValueError: An unknown ``kind``.
        """
        if kind not in self._runners:
            raise ValueError(f"kind must be one of {tuple(self._runners)}, got {kind!r}")
        return self._runners[kind](feeds)

    def _output(self, leaves: list[np.ndarray]) -> Any:
        if self.output_structure is None:
            return leaves[0]
        return rebuild_output(self.output_structure, leaves)

    def step(self, frame: Any) -> Any:
        """Run one frame; returns the model output for it.

        Args:
            frame: ``[B, C, ...]`` float array (or torch tensor) of the exported shape.

        Returns:
            A numpy array, or the model's dict/tuple/list of arrays (``manifest.output_structure``).

        Raises:
            ValueError: If the frame's shape differs from the exported one.
        """
        return self._output(self._step_leaves(frame))

    def _frame_array(self, frame: Any) -> np.ndarray:
        """``frame`` as a float32 array of the exported shape."""
        x = _as_numpy(frame)
        if tuple(x.shape) != self.frame_shape:
            raise ValueError(
                f"frame must have the exported shape {self.frame_shape}, got {tuple(x.shape)}"
            )
        return x

    def _step_leaves(self, frame: Any) -> list[np.ndarray]:
        """One frame of the host loop; the output leaves in graph order."""
        x = self._frame_array(frame)
        if self.next_is_keyframe:
            outputs = self._runners["keyframe"]({self.frame_name: x})
        else:
            feeds = {self.frame_name: x, **dict(zip(self.state_names, self.state))}
            outputs = self._runners["residual"](feeds)
        n = len(self.output_names)
        self.state = list(outputs[n:])
        self.t += 1
        return list(outputs[:n])

    def run(self, video: Any) -> Any:
        """Run a fresh clip ``[B, T, C, ...]``; outputs stacked on dim 1 (like ``ResQModel``),
        leaf by leaf for dict/tuple/list outputs."""
        v = _as_numpy(video)
        if v.ndim != len(self.frame_shape) + 1:
            raise ValueError(
                f"video must be [B, T, C, ...] of rank {len(self.frame_shape) + 1}, got shape "
                f"{tuple(v.shape)}"
            )
        self.reset()
        n = len(self.output_names)
        frames = [self._step_leaves(v[:, t]) for t in range(v.shape[1])]
        return self._output([np.stack([f[i] for f in frames], axis=1) for i in range(n)])


# --------------------------------------------------------------------------------------------
# Family schemes: the policy graph, then the chosen action's graph
# --------------------------------------------------------------------------------------------
class PolicyOnnxStream(OnnxStream):
    """Run an export with a learned frame policy over frames (a family scheme, written by
    :func:`resq_brevitas.deploy.policy_export.export_family`), frame by frame, as
    :class:`~resq_brevitas.temporal.actions.ActionExecutor` runs the PyTorch model in eval::

        stream = OnnxStream("out/videoiq")       # a PolicyOnnxStream: the manifest has a policy
        y = stream.run(video)                    # [B, T, ...]
        stream.last_actions                      # [B, T] chosen action per row and frame

    Each frame of each stream (batch row):

    1. the policy graph reads the frame and the row's policy state (``manifest.policy.state``:
       the LSTM's ``(h, c)`` and, for a policy shown the frame difference, the previous
       downsampled frame; zeros at the start) and returns the logits and the next state, which
       is carried to the next frame;
    2. the action is the argmax of the logits, with ``skip`` masked out until the row has an
       output (or the exported ``forced_action``); an action the row may not take becomes the
       highest precision member, as in PyTorch;
    3. the row runs its action's graph: a frame family's member graph; for a residual family the
       keyframe graph when the schedule says so (the stream's first frame, or ``period`` frames
       after the row's last keyframe; recorded as action ``-1``, like
       :data:`~resq_brevitas.temporal.actions.SCHEDULED_KEYFRAME`, unless the policy chose
       ``key`` itself) or for ``key``, else the member's residual graph on the row's ResQ
       state; ``skip`` reuses the row's last output and state.

    Graphs have the static batch of the export. When the rows of one call take different actions,
    each graph needed runs on the whole batch and every row keeps the rows of its own action (a
    row's result does not depend on the other rows: quantizer ranges are calibrated constants).

    ``OnnxStream(out_dir)`` returns one of these when the manifest has a ``policy``.

    Args:
        out_dir: A directory written by :func:`resq_brevitas.export` for a family scheme.
        backend: As :class:`OnnxStream`.
        providers: As :class:`OnnxStream`.
        optimization: As :class:`OnnxStream`.

    Raises:
        FileNotFoundError: If the manifest or a graph file is missing.
        ValueError: If the manifest has no policy, or ``backend``/``optimization`` is unknown.
    """

    def __init__(self, out_dir: str | os.PathLike[str], backend: str | None = None,
                 providers: list[str] | None = None,
                 optimization: str = DEFAULT_OPTIMIZATION) -> None:
        super().__init__(out_dir, backend, providers, optimization)
        if self.manifest.policy is None or not self.manifest.actions:
            raise ValueError(f"{self.out_dir} holds an export without a learned frame policy; "
                             "open it with OnnxStream")
        #: The manifest's :class:`~resq_brevitas.deploy.manifest.PolicyEntry`.
        self.policy = self.manifest.policy
        #: The graph of each action (logit order); ``None`` for skip.
        self.action_graphs = [entry.graph for entry in self.manifest.actions]
        self.reset()

    def reset(self) -> None:
        """Forget every stream: the next frame starts them (keyframe, zero policy state)."""
        super().reset()
        self.phase: np.ndarray | None = None
        self.policy_state: list[np.ndarray] = []
        self.last_out: list[np.ndarray] | None = None
        self._actions: list[np.ndarray] = []
        self._logits: list[np.ndarray] = []

    @property
    def next_is_keyframe(self) -> bool:
        """Whether the schedule makes the next frame a keyframe for every row (a residual
        family's stream start or period end; the policy's ``key`` is not known in advance)."""
        if self.policy.side == "frame":
            return False
        return self.phase is None or bool(self._scheduled(self.phase).all())

    @property
    def last_actions(self) -> np.ndarray:
        """``[B, frames]`` int64: the action each row took on each frame since :meth:`reset`
        (an index into ``manifest.actions``, or ``-1`` for a keyframe the schedule made while
        the policy chose another action), like ``ResQModel.last_actions``."""
        if not self._actions:
            return np.zeros((self.frame_shape[0], 0), dtype=np.int64)
        return np.stack(self._actions, 1)

    @property
    def last_logits(self) -> np.ndarray:
        """``[B, frames, |actions|]``: the policy graph's logits on each frame since
        :meth:`reset`."""
        if not self._logits:
            return np.zeros((self.frame_shape[0], 0, len(self.action_graphs)), dtype=np.float32)
        return np.stack(self._logits, 1)

    def _scheduled(self, phase: np.ndarray) -> np.ndarray:
        if self.policy.side == "frame":
            return np.zeros(phase.shape, dtype=bool)
        return (phase == 0) | (phase >= self.period)

    def _choose(self, logits: np.ndarray, seen: np.ndarray) -> np.ndarray:
        """The action of every row (the rule of ``FramePolicyNetwork.sample`` in eval)."""
        policy = self.policy
        skip = policy.skip_index
        if policy.forced_action is not None:
            chosen = np.full(logits.shape[0], policy.forced_action, dtype=np.int64)
        else:
            masked = logits.astype(np.float64, copy=True)
            if skip is not None:
                masked[~seen, skip] = -np.inf
            chosen = masked.argmax(-1).astype(np.int64)
        if skip is not None:  # e.g. a forced skip on a stream's first frame
            chosen = np.where((chosen == skip) & ~seen, policy.top_index, chosen)
        return chosen

    def _step_leaves(self, frame: Any) -> list[np.ndarray]:
        """One frame of every stream: the policy, then each row's action; the output leaves."""
        x = self._frame_array(frame)
        rows = x.shape[0]
        policy = self.policy
        if self.phase is None:
            self.phase = np.zeros(rows, dtype=np.int64)
            self.policy_state = [np.zeros(e.shape, dtype=np.float32) for e in policy.state]
        # 1. The policy reads this frame and its carried state before anything else runs: the
        #    action it picks is this frame's.
        logits, *policy_state = self.run_graph(
            policy.graph, {self.frame_name: x, **dict(zip(policy.state_names,
                                                          self.policy_state))})
        seen = self.phase > 0
        scheduled = self._scheduled(self.phase)
        chosen = self._choose(logits, seen)
        graph = [("keyframe" if scheduled[r] else self.action_graphs[chosen[r]])
                 for r in range(rows)]
        # 2. Each graph needed runs once on the whole batch; every row keeps its own rows.
        n = len(self.output_names)
        leaves = [leaf.copy() for leaf in self.last_out] if self.last_out is not None else None
        state = [s.copy() for s in self.state]
        for kind in dict.fromkeys(g for g in graph if g is not None):
            take = np.array([g == kind for g in graph])
            available = {self.frame_name: x, **dict(zip(self.state_names, self.state))}
            outputs = self.run_graph(kind, {name: available[name]
                                            for name in self.manifest.io(kind).inputs})
            if leaves is None:  # the first frame: no row skips, every row is filled here
                leaves = [np.empty_like(leaf) for leaf in outputs[:n]]
            for k in range(n):
                leaves[k][take] = outputs[k][take]
            if self.state_names:
                if not state:
                    state = [np.empty_like(s) for s in outputs[n:]]
                for k in range(len(self.state_names)):
                    state[k][take] = outputs[n + k][take]
        assert leaves is not None
        # 3. Commit: phases, both states, the outputs, the record.
        if policy.side == "frame":
            ran = (np.ones(rows, dtype=bool) if policy.skip_index is None
                   else chosen != policy.skip_index)
        else:
            ran = scheduled | ((chosen == policy.key_index) if policy.key_index is not None
                               else np.zeros(rows, dtype=bool))
        self.phase = np.where(ran, 1, self.phase + 1)
        self.policy_state = list(policy_state)
        self.state = state
        self.last_out = leaves
        # A scheduled keyframe the policy did not ask for is the schedule's (as in PyTorch).
        by_schedule = scheduled & ~((chosen == policy.key_index) if policy.key_index is not None
                                    else np.zeros(rows, dtype=bool))
        self._actions.append(np.where(by_schedule, SCHEDULED_KEYFRAME, chosen))
        self._logits.append(logits)
        self.t += 1
        return [leaf.copy() for leaf in leaves]


def _has_policy(out_dir: Any) -> bool:
    """Whether ``out_dir`` holds a manifest with a learned frame policy (``False`` when there is
    no readable manifest: :class:`OnnxStream` then reports the problem)."""
    try:
        return Manifest.read(out_dir).policy is not None
    except (OSError, TypeError, ValueError):
        return False


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray):
        raise TypeError(f"frame must be a numpy array or torch tensor, got {type(value).__name__}")
    if not np.issubdtype(value.dtype, np.floating):
        raise TypeError(f"frame must be a floating-point array, got dtype {value.dtype}")
    return np.ascontiguousarray(value, dtype=np.float32)

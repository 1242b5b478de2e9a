"""``ResQModel``: the temporal-state wrapper around a converted model.

``forward(video)`` runs a fresh clip ``[B, T, ...]``; ``step(frame)`` continues a stream and
``reset()`` starts a new one. Each batch row is its own stream with its own keyframe phase. The
wrapped model is arbitrary code: ResQ layers consult their attached :class:`LayerState` while a
step runs, everything between them (adds, concats, upsampling, SE blocks, tuple/dict outputs)
runs as written.

Keyframes come from the fixed-period schedule and, when configured, from the refresh policies of
:mod:`resq_brevitas.policy.refresh` (per stream: a forced keyframe restarts only that row's
period). After each call, ``last_cost`` holds the BOPs, ``last_keyframes`` / ``last_refreshes``
which rows were keyframes (and which of those were forced), and, for Dynamic-ResQ,
``last_bit_maps`` the bits each pixel of each layer's input was processed at.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from resq_brevitas.config import ErrorBudgetRefresh, ResQConfig, SceneCutRefresh, Scheme
from resq_brevitas.cost import CostReport, LayerCost, build_report
from resq_brevitas.nn.layers import ResQLayerMixin, is_resq_layer
from resq_brevitas.policy.refresh import predict_error_eq8
from resq_brevitas.temporal.schedule import KeyframeSchedule
from resq_brevitas.temporal.state import LayerState, Observer, StepContext

__all__ = ["ResQModel", "stack_outputs"]


def stack_outputs(outputs: list[Any]) -> Any:
    """Stack per-frame outputs along a new time dimension 1, through tuples, lists and dicts."""
    first = outputs[0]
    if isinstance(first, Tensor):
        return torch.stack(outputs, dim=1)
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(stack_outputs(list(items)) for items in zip(*outputs)))
    if isinstance(first, (tuple, list)):
        return type(first)(stack_outputs(list(items)) for items in zip(*outputs))
    if isinstance(first, Mapping):
        return type(first)((k, stack_outputs([o[k] for o in outputs])) for k in first)
    raise TypeError(
        f"model output must be a Tensor or a tuple/list/dict of them, got {type(first).__name__}"
    )


class ResQModel(nn.Module):
    """Keyframe/residual inference over video for a model whose linear layers are ResQ layers.

    Build it with :func:`resq_brevitas.convert`, calibrate it with
    :func:`resq_brevitas.calibrate`.

    Args:
        model: The converted model (its supported layers replaced by ResQ layers).
        config: The configuration it was converted with.
        unsupported_layers: Names of weight layers that were left in floating point.
    """

    def __init__(self, model: nn.Module, config: ResQConfig,
                 unsupported_layers: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.model = model
        self.training = model.training  # wrap an eval model -> an eval ResQModel
        self.config = config
        self.unsupported_layers = tuple(unsupported_layers)
        self.schedule = KeyframeSchedule(config.effective_period)
        # A plain list (not submodules): the layers are registered once, under ``model``.
        self._layers: list[tuple[str, ResQLayerMixin]] = [
            (name, m) for name, m in model.named_modules() if is_resq_layer(m)
        ]
        self._states = {name: LayerState(name) for name, _ in self._layers}
        if not self._states:
            raise ValueError("model has no supported layer (Conv1d/2d/3d, ConvTranspose2d, Linear)")
        self._phase: Tensor | None = None
        self._stream_shape: tuple[int, ...] | None = None
        #: ``(frame rank incl. batch, channels)``, learnt at calibration or at the first frame.
        self.input_spec: tuple[int, int] | None = None
        self.calibrated = False
        #: BatchNorm folding waits for an example frame (the model could not be fx-traced).
        self.bn_fold_pending = False
        self.last_cost: CostReport | None = None
        #: Per stream: accumulated truncated energy since its last keyframe (RRM eq. 7).
        self._truncation: Tensor | None = None
        #: Bool ``[B, T]`` of the last call: rows run as keyframes (scheduled or forced).
        self.last_keyframes: Tensor | None = None
        #: Bool ``[B, T]`` of the last call: keyframes forced by a refresh policy.
        self.last_refreshes: Tensor | None = None
        #: Dynamic-ResQ: ``name -> int8 [B, T, *S]``, the activation bits each input pixel of
        #: the layer was processed at in the last call (keyframe rows at the keyframe bits).
        self.last_bit_maps: dict[str, Tensor] = {}
        #: The :class:`StepContext` of the last frame run (for calibration and diagnostics).
        self.last_context: StepContext | None = None
        #: ``reference="previous"``: error feedback ``x_ref <- x_ref + q(delta)``. Ablation only:
        #: ``False`` stores ``x_ref <- x_t`` (RRM's Algorithm 1), whose error accumulates.
        self.error_feedback = True
        budget = config.refresh_of(ErrorBudgetRefresh)
        #: RRM eq. 8 coefficients ``(c_1, ..., c_d)`` of the error-budget refresh: given in the
        #: config or fitted by :func:`resq_brevitas.calibrate`.
        self.error_polynomial: tuple[float, ...] | None = (
            budget.coefficients if budget is not None else None)

    # ------------------------------------------------------------------ introspection
    @property
    def scheme(self) -> Scheme:
        """The keyframe/residual scheme."""
        return self.config.scheme  # type: ignore[return-value]

    @property
    def period(self) -> int:
        """The keyframe period actually used (1 under frame quantization)."""
        return self.schedule.period

    def resq_layers(self) -> Iterator[tuple[str, ResQLayerMixin]]:
        """``(name, layer)`` for every ResQ layer, in module order."""
        yield from self._layers

    @property
    def in_stream(self) -> bool:
        """Whether a stream is in progress (``step`` was called since the last ``reset``)."""
        return self._stream_shape is not None

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget every stream: the next frame is a keyframe for every row."""
        for state in self._states.values():
            state.reset()
        self._phase = None
        self._truncation = None
        self._stream_shape = None

    def get_extra_state(self) -> dict[str, Any]:
        return {"input_spec": self.input_spec, "calibrated": self.calibrated,
                "error_polynomial": self.error_polynomial}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        spec = state.get("input_spec")
        self.input_spec = tuple(spec) if spec is not None else None  # type: ignore[assignment]
        self.calibrated = bool(state.get("calibrated", False))
        poly = state.get("error_polynomial")
        if poly is not None:
            self.error_polynomial = tuple(float(c) for c in poly)

    # ------------------------------------------------------------------ validation
    def check_frame(self, frame: Any, name: str = "frame") -> None:
        """Raise a clear error if ``frame`` cannot continue the current stream."""
        if not isinstance(frame, Tensor):
            raise TypeError(
                f"{name} must be a torch.Tensor [B, C, ...], got {type(frame).__name__}"
            )
        if not frame.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {frame.dtype}")
        if frame.dim() < 2:
            raise ValueError(
                f"{name} must be [B, C, ...] (rank >= 2), got shape {tuple(frame.shape)}"
            )
        if frame.shape[0] == 0:
            raise ValueError(
                f"{name} must have at least one batch row, got shape {tuple(frame.shape)}"
            )
        if self.input_spec is not None:
            rank, channels = self.input_spec
            if frame.dim() != rank:
                raise ValueError(
                    f"{name} must have rank {rank} ([B, C, ...]), got rank {frame.dim()} "
                    f"(shape {tuple(frame.shape)})"
                )
            if frame.shape[1] != channels:
                raise ValueError(
                    f"{name} must have {channels} channels (dim 1), got {frame.shape[1]} "
                    f"(shape {tuple(frame.shape)})"
                )
        if self._stream_shape is not None and tuple(frame.shape) != self._stream_shape:
            raise ValueError(
                f"{name} shape changed mid-stream: expected {self._stream_shape}, got "
                f"{tuple(frame.shape)}; call reset() to start a new stream"
            )
        if not bool(torch.isfinite(frame).all()):
            raise ValueError(f"{name} contains NaN or Inf values")

    def _check_video(self, video: Any) -> None:
        if not isinstance(video, Tensor):
            raise TypeError(
                f"video must be a torch.Tensor [B, T, C, ...], got {type(video).__name__}"
            )
        if video.dim() < 3:
            raise ValueError(
                f"video must be [B, T, C, ...] (rank >= 3), got shape {tuple(video.shape)}"
            )
        if video.shape[1] == 0:
            raise ValueError(f"video must have at least one frame, got shape {tuple(video.shape)}")
        if self.input_spec is not None and video.dim() != self.input_spec[0] + 1:
            raise ValueError(
                f"video must have rank {self.input_spec[0] + 1} ([B, T, C, ...]), got rank "
                f"{video.dim()} (shape {tuple(video.shape)})"
            )
        saved, self._stream_shape = self._stream_shape, None  # a clip starts a fresh stream
        try:
            self.check_frame(video[:, 0], name="video frame")
        finally:
            self._stream_shape = saved
        if not bool(torch.isfinite(video).all()):
            raise ValueError("video contains NaN or Inf values")

    # ------------------------------------------------------------------ running
    def run_step(self, frame: Tensor, detach: bool, observer: Observer | None = None,
                 adaptive: bool = True) -> tuple[Any, dict[str, LayerCost]]:
        """One frame through the model; state is committed only if the forward succeeds.

        Args:
            frame: ``[B, C, ...]``, already validated.
            detach: Detach the stored references from autograd (streaming).
            observer: Optional calibration hook (see :class:`StepContext`).
            adaptive: Let the configured refresh policies force keyframes (calibration runs the
                fixed schedule only).

        Returns:
            The model output and the per-layer cost records of this frame. The step's context
            (key mask, bit maps, forced rows) is kept in ``self.last_context``.
        """
        config = self.config
        rows = frame.shape[0]
        phase = self._phase
        if phase is None:
            phase = torch.zeros(rows, dtype=torch.long)
        key_mask = self.schedule.key_mask(phase)
        forced = torch.zeros(rows, dtype=torch.bool)
        budget = config.refresh_of(ErrorBudgetRefresh) if adaptive else None
        if budget is not None and self.error_polynomial is None:
            raise RuntimeError(
                "ErrorBudgetRefresh has no fitted polynomial: run resq.calibrate(qm, clips) "
                "or pass ErrorBudgetRefresh(coefficients=...)"
            )
        if budget is not None and self._truncation is not None:
            assert self.error_polynomial is not None
            predicted = predict_error_eq8(self.error_polynomial, self._truncation)
            forced = (predicted > budget.budget) & ~key_mask
            key_mask = key_mask | forced
        scene_cut = config.refresh_of(SceneCutRefresh) if adaptive else None
        keyframe = self.scheme.keyframe
        ctx = StepContext(
            key_mask=key_mask.to(frame.device),
            observer=observer,
            reference=config.reference,
            threshold=config.threshold,
            policy=config.policy,
            error_feedback=self.error_feedback,
            scene_cut=scene_cut.fraction if scene_cut is not None else None,
            record_bit_maps=self.scheme.is_dynamic,
            keyframe_act_bits=keyframe.bops_act_bits,
        )
        layers = self._layers
        for name, layer in layers:
            state = self._states[name]
            state.context = ctx
            layer.temporal_slot = state
        try:
            out = self.model(frame)
            for state in self._states.values():
                state.verify()
        except BaseException:
            for state in self._states.values():
                state.rollback()
            raise
        finally:
            for name, layer in layers:
                layer.temporal_slot = None
                self._states[name].context = None
        for state in self._states.values():
            state.commit(detach=detach)
        final_mask = ctx.key_mask.cpu()
        assert ctx.cut is not None and ctx.truncated is not None
        ctx.cut = ctx.cut | forced
        self._phase = self.schedule.advance(phase, final_mask)
        previous = self._truncation if self._truncation is not None else torch.zeros(
            rows, dtype=torch.float64)
        self._truncation = torch.where(final_mask, torch.zeros_like(previous),
                                       previous + ctx.truncated)
        self._stream_shape = tuple(frame.shape)
        if self.input_spec is None:
            self.input_spec = (frame.dim(), int(frame.shape[1]))
        self.last_context = ctx
        return out, ctx.costs

    def _record(self, contexts: list[StepContext]) -> None:
        """Fill ``last_keyframes``, ``last_refreshes`` and ``last_bit_maps`` from a call."""
        self.last_keyframes = torch.stack([c.key_mask.cpu() for c in contexts], 1)
        self.last_refreshes = torch.stack([c.cut for c in contexts], 1)  # type: ignore[misc]
        names = contexts[0].bit_maps.keys()
        self.last_bit_maps = {n: torch.stack([c.bit_maps[n] for c in contexts], 1)
                              for n in names if all(n in c.bit_maps for c in contexts)}

    def step(self, frame: Tensor) -> Any:
        """Continue every row's stream with one frame ``[B, C, ...]``.

        The first frame after :meth:`reset` (or construction) is a keyframe for every row; then
        each row runs ``period - 1`` residual frames before its next keyframe.

        Raises:
            TypeError, ValueError: On a malformed frame, or a shape/batch change mid-stream.
                The model's state is unchanged after an error.
        """
        self.check_frame(frame)
        out, costs = self.run_step(frame, detach=True)
        self.last_cost = build_report(self.scheme, [costs])
        assert self.last_context is not None
        self._record([self.last_context])
        return out

    def forward(self, video: Tensor) -> Any:
        """Run a fresh clip ``[B, T, C, ...]``; returns outputs stacked on dim 1 (``[B, T, ...]``).

        The state is reset first; afterwards it holds the end of this clip, so :meth:`step` can
        continue it. Autograd history is kept across the clip (for QAT through time).
        """
        self._check_video(video)
        saved = self._snapshot()
        self.reset()
        outputs, records, contexts = [], [], []
        try:
            for t in range(video.shape[1]):
                out, costs = self.run_step(video[:, t], detach=False)
                outputs.append(out)
                records.append(costs)
                contexts.append(self.last_context)  # type: ignore[arg-type]
        except BaseException:
            self._restore(saved)
            raise
        self.last_cost = build_report(self.scheme, records)
        self._record(contexts)
        return stack_outputs(outputs)

    def _snapshot(self) -> tuple[Any, ...]:
        refs = {n: (s.x_ref, s.z_ref) for n, s in self._states.items()}
        return refs, self._phase, self._truncation, self._stream_shape, self.input_spec

    def _restore(self, saved: tuple[Any, ...]) -> None:
        refs, self._phase, self._truncation, self._stream_shape, self.input_spec = saved
        for name, state in self._states.items():
            state.reset()
            state.x_ref, state.z_ref = refs[name]

    def extra_repr(self) -> str:
        text = (f"scheme={self.scheme.notation}, period={self.period}, "
                f"reference={self.config.reference!r}, layers={len(self._states)}")
        if self.config.policy is not None:
            text += f", policy={self.config.policy}"
        if self.config.threshold:
            text += f", threshold={self.config.threshold:g}"
        if self.config.refresh:
            text += f", refresh={self.config.refresh}"
        return text


"""``ResQModel``: the temporal-state wrapper around a converted model.

``forward(video)`` runs a fresh clip ``[B, T, ...]``; ``step(frame)`` continues a stream and
``reset()`` starts a new one. Each batch row is its own stream with its own keyframe phase. The
wrapped model is arbitrary code: ResQ layers consult their attached :class:`LayerState` while a
step runs, everything between them (adds, concats, upsampling, SE blocks, tuple/dict outputs)
runs as written.

Keyframes come from the fixed-period schedule and, when configured, from refresh triggers
(:mod:`resq_brevitas.policy.refresh`; per stream: a forced keyframe restarts only that row's
period). After each call, ``last_cost`` holds the BOPs, ``last_keyframes`` / ``last_refreshes``
which rows were keyframes (and which of those were forced), and, for Dynamic-ResQ,
``last_bit_maps`` the bits each pixel of each layer's input was processed at.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from brevitas.proxy.quant_proxy import QuantProxyFromInjector
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from resq_brevitas.checks import check_int
from resq_brevitas.config import (
    READABLE_CONFIG_VERSIONS,
    ResQConfig,
    Scheme,
    load_object,
    upgrade_config_data,
)
from resq_brevitas.nn.batch_norm import fold_pairs
from resq_brevitas.nn.cost import CostReport, CostTally
from resq_brevitas.nn.layers import DEFAULT_LAYER_MAP, ResQLayerMixin, is_resq_layer
from resq_brevitas.policy.base import StreamStatus, build_policy, build_refresh
from resq_brevitas.quant.quantizers import PICKLE_PAYLOAD, make_unsigned, pickle_reduction
from resq_brevitas.temporal.actions import ActionExecutor
from resq_brevitas.temporal.clip import ClipExecutor, ClipLayout, NotBatchable, plan_clip
from resq_brevitas.temporal.context import (
    FrameContext,
    Observer,
    StepInputs,
    StepOutputs,
    attached,
)
from resq_brevitas.temporal.inputs import (
    ClipInputs,
    FrameInputs,
    InputSpec,
    Key,
    check_clip_inputs,
    check_frame_inputs,
    expected_inputs,
    model_signature,
)
from resq_brevitas.temporal.outputs import stack_outputs
from resq_brevitas.temporal.schedule import KeyframeSchedule
from resq_brevitas.temporal.state import LayerState
from resq_brevitas.temporal.step import ResidualMode

__all__ = ["ResQModel", "StreamState", "stack_outputs"]


def _unflatten_rows(leaf: Any, batch: int, frames: int, inverse: Tensor) -> Tensor:
    """A time-batched output leaf (rows in run order) as ``[B, T, ...]``."""
    if not isinstance(leaf, Tensor):
        raise TypeError(
            f"model output must be a Tensor or a tuple/list/dict of them, got {type(leaf).__name__}"
        )
    if leaf.dim() == 0 or leaf.shape[0] != batch * frames:
        raise NotBatchable(f"a model output of shape {tuple(leaf.shape)} has no row per frame")
    return leaf.index_select(0, inverse).unflatten(0, (batch, frames))


def _in_row_order(outputs: StepOutputs, inverse: Tensor) -> StepOutputs:
    """A time-batched chunk's reports (in run order) in row order ``b * T + t``."""
    assert outputs.truncated is not None and outputs.forced is not None
    return StepOutputs(
        costs={name: cost.select(inverse) for name, cost in outputs.costs.items()},
        bit_maps={name: bits.index_select(0, inverse) for name, bits in outputs.bit_maps.items()},
        truncated=outputs.truncated.index_select(0, inverse),
        forced=outputs.forced.index_select(0, inverse),
        layers_run=outputs.layers_run,
    )


@dataclass(frozen=True)
class CallRecord:
    """What the layers reported for ``frames`` frames of ``batch`` streams that ran together
    (one frame stepped, or a time-batched chunk); per-row tensors hold row ``b * frames + t``.

    Attributes:
        key: Bool ``[B, T]``: keyframes (scheduled or forced).
        outputs: The layers' :class:`~resq_brevitas.temporal.context.StepOutputs`.
        batch: ``B``.
        frames: ``T``.
    """

    key: Tensor
    outputs: StepOutputs
    batch: int
    frames: int


@dataclass
class StreamState:
    """The model-level state of the running streams (one per batch row).

    Attributes:
        phase: Long ``[B]``: frames since each row's last keyframe, including it (0: none yet).
        energy: Float64 ``[B]``: truncated energy since each row's last keyframe (RRM eq. 7).
        shape: The stream's frame signature (``(input key, shape)`` of each input, see
            :attr:`~resq_brevitas.temporal.inputs.FrameInputs.signature`).
    """

    phase: Tensor | None = None
    energy: Tensor | None = None
    shape: tuple[Any, ...] | None = None


class ResQModel(nn.Module):
    """Keyframe/residual inference over video for a model whose linear layers are ResQ layers.

    Build it with :func:`resq_brevitas.convert`, calibrate it with
    :func:`resq_brevitas.calibrate`.

    Training (QAT, :func:`resq_brevitas.train_qat` or your own loop): ``qm.train()`` /
    ``qm.eval()`` switch the wrapped model as usual. BatchNorm was folded into the preceding
    layers at conversion, so there are no batch statistics to update; dropout and other
    train-only modules of the model behave as the model has them; the quantizers fake-quantize
    in both modes, with straight-through rounding (the paper's section 5) and learnable
    log-domain activation thresholds (:meth:`quantizer_parameters`; the weights and biases are
    :meth:`weight_parameters`). :meth:`forward` keeps autograd across the clip and detaches
    every stored reference when it returns, so no graph outlives the clip. In training mode
    :attr:`training_phase` may randomise each row's keyframe phase.

    Args:
        model: The converted model (its supported layers replaced by ResQ layers).
        config: The configuration it was converted with.
        unsupported_layers: Names of weight layers that were left in floating point.
        skipped_layers: Names of supported layers ``filter_fn`` left in floating point.
        layer_map: The layer map the model was converted with (BatchNorm folding at
            calibration reads its axes).
    """

    def __init__(self, model: nn.Module, config: ResQConfig,
                 unsupported_layers: tuple[str, ...] = (),
                 skipped_layers: tuple[str, ...] = (),
                 layer_map: Mapping[type[nn.Module], type[nn.Module]] | None = None) -> None:
        super().__init__()
        self.model = model
        self.training = model.training  # wrap an eval model -> an eval ResQModel
        self.config = config
        self.unsupported_layers = tuple(unsupported_layers)
        self.skipped_layers = tuple(skipped_layers)
        #: Layers whose keyframe activation quantizer calibration made unsigned
        #: (``act_signedness="auto"``).
        self.unsigned_inputs: tuple[str, ...] = ()
        # A plain dict: it must deep-copy (with_policy) and two models must not share it.
        self.layer_map = dict(layer_map) if layer_map is not None else dict(DEFAULT_LAYER_MAP)
        self.schedule = KeyframeSchedule(config.effective_period)
        # A plain list (not submodules): the layers are registered once, under ``model``.
        self._layers: list[tuple[str, ResQLayerMixin]] = [
            (name, m) for name, m in model.named_modules() if is_resq_layer(m)
        ]
        if not self._layers:
            raise ValueError("model has no supported layer (Conv1d/2d/3d, ConvTranspose2d, Linear)")
        self._states = {name: LayerState(name) for name, _ in self._layers}
        #: The refresh triggers built from ``config.refresh`` (fixed-period entries have none).
        self.refresh_triggers = nn.ModuleList(
            t for t in (build_refresh(r) for r in config.refresh) if t is not None)
        self._stream = StreamState()
        self._mode = ResidualMode.from_config(config)
        # Ranks of each input's frames (incl. batch) seen in a successful call: they stand in
        # for a rank the model does not fix (a Linear first layer takes any rank).
        self._learned_ranks: dict[Key, int] = {}
        self._rank_override: int | None = None
        self._expected: dict[Key, InputSpec] | None = None
        self._expected_read = False
        #: Family schemes (VideoIQ): the learned per-frame policy network (its parameters are
        #: the model's), and the executor that runs one action per stream and frame.
        self.frame_policy: nn.Module | None = None
        self._actions: ActionExecutor | None = None
        if config.scheme.is_family:
            self.frame_policy = load_object(type(config.policy).implementation)(
                config.policy, config.scheme.family)
            self._actions = ActionExecutor(config.scheme, config.period, self._mode)
        #: Family schemes: long ``[B, T]`` action index per stream and frame of the last call
        #: (``-1``: a keyframe the schedule forced), the BOPs of each (``last_row_bops``) and
        #: the policy's logits and samples (``last_policy``, for the losses of eq. 10-13).
        self.last_actions: Tensor | None = None
        self.last_row_bops: Tensor | None = None
        self.last_policy: Any = None
        self.calibrated = False
        #: BatchNorm folding waits for an example frame (the model could not be fx-traced).
        self.bn_fold_pending = False
        #: ``(layer, batch norm)`` names folded into each other (saved in the state, so a
        #: freshly converted copy of an untraceable model repeats the fold when it loads).
        self.folded_batch_norms: tuple[tuple[str, str], ...] = ()
        self.last_cost: CostReport | None = None
        #: Bool ``[B, T]`` of the last call: rows run as keyframes (scheduled or forced).
        self.last_keyframes: Tensor | None = None
        #: Bool ``[B, T]`` of the last call: keyframes forced by a refresh policy.
        self.last_refreshes: Tensor | None = None
        #: Dynamic-ResQ: ``name -> int8 [B, T, *S]``, the activation bits each input pixel of
        #: the layer was processed at in the last call (keyframe rows at the keyframe bits).
        self.last_bit_maps: dict[str, Tensor] = {}
        #: Count non-zero entries for the residual densities and RRM eq. 10 in ``last_cost`` (a
        #: count and a host sync per layer and call). On by default where the figures mean
        #: something to the method: RRM (``reference="previous"`` or a threshold) and
        #: Dynamic-ResQ pools; set it for other models when you read ``density``/``speedup``.
        self.measure_density = (config.reference == "previous" or config.threshold > 0
                                or config.scheme.is_dynamic
                                or any(o.scheme.is_dynamic for o in config.overrides))
        #: ``"auto"``: clips run time-batched when the mode allows (:attr:`batches_clips`);
        #: ``"sequential"``: always frame by frame.
        self.clip_execution = "auto"
        #: Time-batched clips: at most this many rows (streams x frames) per model call, to
        #: bound memory on long clips (``None``: the whole clip at once).
        self.max_frames_per_batch: int | None = None
        #: Keyframe phase of a fresh clip in training mode (:meth:`forward` while
        #: ``self.training``): ``"zero"`` (frame 0 starts a full period, as in eval) or
        #: ``"random"`` (frame 0 is still a keyframe, but each batch row's next keyframe comes
        #: after a random ``1..period`` frames, so short clips train every residual position
        #: of the schedule; one extra model call for frame 0). Eval always uses ``"zero"``.
        self.training_phase = "zero"

    # ------------------------------------------------------------------ training
    def quantizer_parameters(self) -> Iterator[nn.Parameter]:
        """The learnable quantizer parameters: every parameter held by a Brevitas quant proxy
        (the activation thresholds, ``log2`` of ``max(r_max, -r_min)``, of the keyframe,
        residual and pool quantizers). LSQ-style QAT gives them their own learning rate."""
        seen: set[int] = set()
        for module in self.modules():
            if isinstance(module, QuantProxyFromInjector):
                for param in module.parameters():
                    if id(param) not in seen:
                        seen.add(id(param))
                        yield param

    def weight_parameters(self) -> Iterator[nn.Parameter]:
        """Every other parameter: layer weights (each shared weight once) and biases, and the
        parameters of float layers and learned policies."""
        quantizer = {id(p) for p in self.quantizer_parameters()}
        for param in self.parameters():
            if id(param) not in quantizer:
                yield param

    # ------------------------------------------------------------------ introspection
    @property
    def scheme(self) -> Scheme:
        """The model-wide keyframe/residual scheme (per-layer overrides aside)."""
        return self.config.scheme

    @property
    def notation(self) -> str:
        """The scheme in the paper's notation, with per-layer overrides."""
        return self.config.notation

    @property
    def period(self) -> int:
        """The keyframe period actually used (1 under frame quantization)."""
        return self.schedule.period

    @property
    def error_feedback(self) -> bool:
        """``reference="previous"``: whether ``x_ref <- x_ref + q(delta)`` (see the config)."""
        return self.config.error_feedback

    @property
    def mode(self) -> ResidualMode:
        """Reference rule and truncation of residual frames."""
        return self._mode

    def resq_layers(self) -> Iterator[tuple[str, ResQLayerMixin]]:
        """``(name, layer)`` for every ResQ layer, in module order."""
        yield from self._layers

    @property
    def expected_inputs(self) -> dict[Key, InputSpec]:
        """What each model input must look like, keyed by position (and by argument name):
        read off the first ResQ layer it reaches (:func:`~resq_brevitas.temporal.inputs.
        expected_inputs`); a rank the model does not fix comes from :attr:`frame_rank` when set
        explicitly, else from the frames of a successful call."""
        specs = dict(self._model_inputs())
        overridden: set[Key] = set()
        if self._rank_override:  # the first input, by position and by its parameter's name
            overridden.add(0)
            signature = model_signature(self.model)
            if signature is not None and signature.parameters:
                overridden.add(next(iter(signature.parameters)))
        keys = set(specs) | set(self._learned_ranks) | overridden
        for key in keys:
            spec = specs.get(key, InputSpec(None, None, 1, None))
            if spec.rank is None:
                rank = self._rank_override or self._learned_ranks.get(key)
                spec = replace(spec, rank=rank)
            specs[key] = spec
        return specs

    def _model_inputs(self) -> dict[Key, InputSpec]:
        """:func:`expected_inputs` of the wrapped model, traced once."""
        if not self._expected_read:
            self._expected = expected_inputs(self.model)
            self._expected_read = True
        return self._expected or {}

    @property
    def frame_rank(self) -> int | None:
        """Rank of a batch of frames ``[B, C, ...]`` the model's (first) input takes: read off
        the first ResQ layer it reaches (``Conv2d``: 4, ``Conv3d``: 5), else set explicitly
        (``qm.frame_rank = 3`` for a token model whose first layer is a ``Linear``), else seen
        in a successful call, else ``None`` (any rank).

        Raises:
            ValueError: Setting a rank that contradicts the model's first layer.
        """
        spec = self.expected_inputs.get(0)
        return None if spec is None else spec.rank

    @frame_rank.setter
    def frame_rank(self, rank: int | None) -> None:
        if rank is not None:
            rank = check_int(rank, "frame_rank", minimum=2)
            fixed = self._model_inputs().get(0)
            if fixed is not None and fixed.rank is not None and fixed.rank != rank:
                raise ValueError(f"frame_rank: layer {fixed.layer!r} takes frames of rank "
                                 f"{fixed.rank}, got {rank}")
        self._rank_override = rank

    @property
    def input_spec(self) -> tuple[int, int] | None:
        """``(rank incl. batch, channels on dim 1)`` of a single-tensor model's frames when
        both are known (see :attr:`expected_inputs` for models with several inputs)."""
        spec = self.expected_inputs.get(0)
        if spec is None or spec.rank is None or spec.channels is None or spec.channel_dim != 1:
            return None
        return spec.rank, spec.channels

    @property
    def in_stream(self) -> bool:
        """Whether a stream is in progress (a frame ran since the last ``reset``)."""
        return self._stream.shape is not None

    @property
    def truncated_energy(self) -> Tensor | None:
        """Float64 ``[B]``: each stream's truncated energy since its last keyframe (RRM eq. 7),
        or ``None`` before the first frame (a copy)."""
        energy = self._stream.energy
        return None if energy is None else energy.clone()

    @property
    def error_polynomial(self) -> tuple[float, ...] | None:
        """RRM eq. 8 coefficients of the error-budget refresh (given or fitted), else ``None``."""
        for trigger in self.refresh_triggers:
            coefficients = getattr(trigger, "coefficients", None)
            if coefficients is not None:
                return coefficients
        return None

    # ------------------------------------------------------------------ state
    def reset(self, rows: Any = None) -> None:
        """Forget the streams: the next frame is a keyframe for every row.

        Args:
            rows: Restart only these streams (batch row indices or a bool ``[B]`` mask); the
                others continue. Needs a running stream.

        Raises:
            ValueError: ``rows`` outside the running stream's batch.
        """
        if rows is None:
            for state in self._states.values():
                state.reset()
            self._stream = StreamState()
            if self._actions is not None:
                self._actions.reset()
            return
        stream = self._stream
        # A family scheme's phases live in its action executor (this stream's stay unused).
        phase = stream.phase if self._actions is None else self._actions.stream.phase
        if phase is None:
            raise ValueError("reset(rows=...) needs a running stream; call reset() instead")
        mask = torch.zeros_like(phase, dtype=torch.bool)
        try:
            mask[torch.as_tensor(rows)] = True
        except (IndexError, TypeError) as err:
            raise ValueError(f"rows must index the stream's {mask.numel()} batch rows, got "
                             f"{rows!r}") from err
        if stream.phase is not None:
            stream.phase = torch.where(mask, torch.zeros_like(stream.phase), stream.phase)
        if self._actions is not None:
            self._actions.reset(mask)
        if stream.energy is not None:
            stream.energy = torch.where(mask, torch.zeros_like(stream.energy), stream.energy)

    def with_policy(self, policy: Any) -> ResQModel:
        """A copy of this (calibrated) model with another precision policy; no recalibration.

        Pool quantizers are calibrated on residuals in floating point, where the policy plays no
        part, so a ``tau`` sweep calibrates once and swaps the policy.

        Args:
            policy: Policy settings (e.g. ``ErrorBoundPolicy(tau=1.0)``).

        Returns:
            A new ResQModel (deep copy, reset) whose pool layers use the new policy.
        """
        config = replace(self.config, policy=policy)  # validates against the scheme
        implementation = build_policy(policy)
        new = copy.deepcopy(self)
        new.config = config
        for _, layer in new.resq_layers():
            if layer.residual is not None and hasattr(layer.residual, "policy"):
                layer.residual.policy = implementation
        new.reset()
        return new

    def with_refresh(self, refresh: Any) -> ResQModel:
        """A copy of this (calibrated) model with other refresh policies; no recalibration.

        Args:
            refresh: As ``ResQConfig.refresh`` (``None`` for the fixed period). A policy that
                needs fitting (an :class:`~resq_brevitas.ErrorBudgetRefresh` without
                coefficients) needs :func:`resq_brevitas.calibrate` again.

        Returns:
            A new ResQModel (deep copy, reset).
        """
        config = replace(self.config, refresh=refresh)  # validates
        new = copy.deepcopy(self)
        new.config = config
        new.refresh_triggers = nn.ModuleList(
            t for t in (build_refresh(r) for r in config.refresh) if t is not None)
        new.reset()
        return new

    @staticmethod
    def config_from_state_dict(state_dict: Mapping[str, Any], prefix: str = "") -> ResQConfig:
        """The config a saved ``state_dict`` of a ResQModel was built with (to rebuild it:
        ``resq.convert(float_model, config).load_state_dict(state_dict)``).

        Args:
            state_dict: From :meth:`state_dict`.
            prefix: The model's key prefix if it was saved inside a larger model.

        Raises:
            ValueError: The state dict holds no ResQModel config.
        """
        key = prefix + "_extra_state"
        extra = state_dict.get(key)
        if not isinstance(extra, Mapping) or "config" not in extra:
            raise ValueError(f"state_dict has no ResQModel config under {key!r}")
        return ResQConfig.from_dict(extra["config"])

    def use_unsigned_input(self, name: str) -> None:
        """Make layer ``name``'s keyframe activation quantizer unsigned (``act_signedness=
        "auto"``; its threshold must be set again afterwards)."""
        layer = dict(self._layers)[name]
        if name not in self.unsigned_inputs:
            make_unsigned(layer.input_quant)
            self.unsigned_inputs = (*self.unsigned_inputs, name)

    def get_extra_state(self) -> dict[str, Any]:
        return {"input_ranks": dict(self._learned_ranks), "frame_rank": self._rank_override,
                "calibrated": self.calibrated,
                "config": self.config.to_dict(), "unsigned_inputs": list(self.unsigned_inputs),
                "folded_batch_norms": [list(pair) for pair in self.folded_batch_norms]}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        # Runs before the layers load their parameters, so their quantizers are rebuilt first,
        # and a fold the saved model did at calibration (an eager trace) is repeated here, so
        # the folded weights load into layers with no BatchNorm after them.
        saved_folds = [tuple(pair) for pair in state.get("folded_batch_norms", ())]
        if self.bn_fold_pending and saved_folds:
            self.folded_batch_norms = tuple(fold_pairs(self.model, saved_folds, self.layer_map))
            self.bn_fold_pending = False
        for name in state.get("unsigned_inputs", ()):
            self.use_unsigned_input(name)
        self._learned_ranks = dict(state.get("input_ranks", {}))
        spec = state.get("input_spec")  # saved before models took several inputs
        if spec is not None:
            self._learned_ranks.setdefault(0, int(spec[0]))
        self._rank_override = state.get("frame_rank")
        self.calibrated = bool(state.get("calibrated", False))
        saved = state.get("config")
        if saved is not None and saved.get("version") in READABLE_CONFIG_VERSIONS:
            saved = upgrade_config_data(saved)  # compare like with like
        if saved is not None and saved != self.config.to_dict():
            differ = sorted(k for k in saved if saved.get(k) != self.config.to_dict().get(k))
            warnings.warn(f"the loaded state was saved from a model built with another config "
                          f"(fields {differ} differ); the model keeps its own", stacklevel=2)

    # ------------------------------------------------------------------ persistence
    def __reduce_ex__(self, protocol: Any) -> Any:
        """``torch.save(qm)``: Brevitas's run-time injector classes do not pickle; a copy whose
        proxies store them as recipes does (:func:`~resq_brevitas.quant.quantizers.
        pickle_reduction`)."""
        if self.__dict__.get(PICKLE_PAYLOAD, False):
            return super().__reduce_ex__(protocol)
        return pickle_reduction(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> ResQModel:
        # The default deep copy (it would otherwise go through __reduce_ex__ above).
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__dict__, memo))
        return new

    # ------------------------------------------------------------------ validation
    def _param_dtype_device(self) -> tuple[torch.dtype, torch.device]:
        weight = self._layers[0][1].weight
        return weight.dtype, weight.device

    def check_frame(self, frame: Any, name: str = "frame", stream: bool = True) -> FrameInputs:
        """Validate a frame (a tensor ``[B, ...]``, or a tuple/dict of them for a model with
        several inputs) against the model and (``stream``) the running stream, before any layer
        runs.

        Returns:
            The validated frame.

        Raises:
            TypeError: Not a tensor (or tuple/dict of them), not floating point, or not the
                model's dtype or device.
            ValueError: Wrong rank or channels (from the first layers), empty, NaN/Inf, a shape
                or structure change mid-stream.
        """
        dtype, device = self._param_dtype_device()
        return check_frame_inputs(frame, name, self.expected_inputs, dtype, device,
                                  self._stream.shape if stream else None,
                                  model_signature(self.model))

    def check_video(self, video: Any, name: str = "video", stream: bool = False
                    ) -> ClipInputs:
        """Validate a clip (every input ``[B, T, ...]``) as :meth:`check_frame` does a frame.

        Args:
            video: The clip.
            name: The argument's name for messages.
            stream: Whether the clip continues the running stream (its frames must keep the
                stream's shape).
        """
        dtype, device = self._param_dtype_device()
        # The signature is read each call (microseconds), not kept on the model (pickling).
        return check_clip_inputs(video, name, self.expected_inputs, dtype, device,
                                 self._stream.shape if stream else None,
                                 model_signature(self.model))

    def _as_frame(self, frame: Any) -> FrameInputs:
        return frame if isinstance(frame, FrameInputs) else self.check_frame(frame)

    def _learn_ranks(self, frame: FrameInputs) -> None:
        for key, leaf in zip(frame.keys, frame.leaves):
            self._learned_ranks.setdefault(0 if key is None else key, leaf.dim())

    def _apply(self, fn: Any, recurse: bool = True) -> ResQModel:
        """``.to()``, ``.half()``, ``.double()``, ``.cuda()``: the references of a running
        stream move with the parameters (as buffers would), so a stream continues in the new
        dtype/device and never mixes precisions."""
        super()._apply(fn, recurse)
        for state in self._states.values():
            if state.ref is not None:
                state.ref = type(state.ref)(fn(state.ref.x), fn(state.ref.z))
        return self

    def _check_calibrated(self, stacklevel: int = 3) -> None:
        """An uncalibrated model runs every range at its default (1.0): warn once per model
        (raise under ``config.strict``), unless every quantizer is disabled (the ranges then
        play no part, e.g. inside :func:`~resq_brevitas.quantization_disabled`)."""
        if self.calibrated or getattr(self, "_warned_uncalibrated", False):
            return
        if not any(getattr(layer.input_quant, "is_quant_enabled", False)
                   for _, layer in self._layers):
            return
        missing = getattr(self, "uncalibrated_ranges", ())
        message = ("the model is not calibrated: its activation ranges are defaults"
                   + (f" (zero-range calibration left {', '.join(missing)})" if missing else "")
                   + "; run resq_brevitas.calibrate(qm, clips) first")
        if self.config.strict:
            raise RuntimeError(message)
        self._warned_uncalibrated = True
        warnings.warn(message, stacklevel=stacklevel)

    # ------------------------------------------------------------------ running
    def _step_inputs(self, frame: FrameInputs, adaptive: bool, observer: Observer | None
                     ) -> tuple[StepInputs, Tensor, Tensor]:
        """The frame's inputs, its phases and the rows ``before_frame`` triggers forced."""
        rows = frame.batch
        stream = self._stream
        phase = stream.phase if stream.phase is not None else torch.zeros(rows, dtype=torch.long)
        key_mask = self.schedule.key_mask(phase)
        forced = torch.zeros(rows, dtype=torch.bool)
        triggers = tuple(self.refresh_triggers) if adaptive else ()
        status = StreamStatus(phase, key_mask, stream.energy)
        for trigger in triggers:
            if hasattr(trigger, "before_frame"):
                rows_flagged = trigger.before_frame(status)
                if rows_flagged is not None:
                    forced |= rows_flagged.cpu() & ~key_mask
        inputs = StepInputs(
            key_mask=(key_mask | forced).to(frame.device),
            mode=self._mode,
            observer=observer,
            first_layer_triggers=tuple(t for t in triggers if hasattr(t, "at_first_layer")),
            record_density=self.measure_density and observer is None,
            record_bit_maps=self._records_bit_maps,
        )
        return inputs, phase, forced

    @property
    def _records_bit_maps(self) -> bool:
        return self.scheme.is_dynamic or any(o.scheme.is_dynamic for o in self.config.overrides)

    def run_frame(self, frame: Any, *, adaptive: bool = True, detach: bool = True,
                  observer: Observer | None = None) -> Any:
        """One frame through the model; the state is committed only on success.

        This is the hook calibration uses; users call :meth:`step` or :meth:`forward`.

        Args:
            frame: ``[B, C, ...]`` (or a tuple/dict of inputs), validated here unless it is a
                :class:`~resq_brevitas.temporal.inputs.FrameInputs` (already validated).
            adaptive: Let the refresh triggers force keyframes (calibration runs the fixed
                schedule only).
            detach: Detach the stored references from autograd.
            observer: Optional calibration hook (see :class:`StepInputs`).

        Returns:
            The model output.
        """
        return self._run_frame(self._as_frame(frame), adaptive, detach, observer)[0]

    def _run_frame(self, frame: FrameInputs, adaptive: bool, detach: bool,
                   observer: Observer | None) -> tuple[Any, CallRecord]:
        """:meth:`run_frame`, also returning what the layers reported."""
        inputs, phase, forced = self._step_inputs(frame, adaptive, observer)
        ctx = FrameContext(inputs)
        for state in self._states.values():
            state.context = ctx
        try:
            with attached(self._layers, self._states.__getitem__):
                # The model's own copy: a layer reading the frame keeps it as its reference,
                # and callers reuse frame buffers (decoders, pinned-memory loaders).
                out = frame.call(self.model, copy=True)
            for state in self._states.values():
                state.verify()
        except BaseException:
            for state in self._states.values():
                state.rollback()
            raise
        finally:
            for state in self._states.values():
                state.context = None
        for state in self._states.values():
            state.commit(detach=detach)
        outputs = ctx.outputs
        assert outputs.forced is not None and outputs.truncated is not None
        final_mask = ctx.key_mask.cpu()
        outputs.forced |= forced
        stream = self._stream
        stream.phase = self.schedule.advance(phase, final_mask)
        previous = stream.energy if stream.energy is not None else torch.zeros(
            frame.batch, dtype=torch.float64)
        stream.energy = torch.where(final_mask, torch.zeros_like(previous),
                                    previous + outputs.truncated)
        stream.shape = frame.signature
        self._learn_ranks(frame)
        return out, CallRecord(final_mask.view(-1, 1), outputs, frame.batch, 1)

    def keyframe_output(self, frame: Any) -> Any:
        """The output of the keyframe path on every layer (no temporal state read or written)."""
        return self._as_frame(frame).call(self.model)

    def _record(self, records: list[CallRecord]) -> None:
        """Fill ``last_cost``, ``last_keyframes``, ``last_refreshes`` and ``last_bit_maps``."""
        tally = CostTally(self.notation)
        for record in records:
            tally.add_clip(record.outputs.costs, record.batch, record.frames, record.key)
        self.last_cost = replace(tally.report(), rrm=self.config.reference == "previous",
                                 float_operations=tuple(getattr(self, "float_operations", ())))
        self.last_keyframes = torch.cat([r.key for r in records], 1)
        forced = [r.outputs.forced.view(r.batch, r.frames) for r in records]
        self.last_refreshes = torch.cat(forced, 1)
        names = records[0].outputs.bit_maps.keys()
        self.last_bit_maps = {
            n: torch.cat([r.outputs.bit_maps[n].unflatten(0, (r.batch, r.frames))
                          for r in records], 1)
            for n in names if all(n in r.outputs.bit_maps for r in records)}

    def step(self, frame: Any) -> Any:
        """Continue every row's stream with one frame ``[B, C, ...]`` (any rank the model
        takes; a tuple or dict of such tensors for a model with several inputs: positional or
        keyword arguments).

        The first frame after :meth:`reset` (or construction) is a keyframe for every row; then
        each row runs ``period - 1`` residual frames before its next keyframe.

        Raises:
            TypeError, ValueError: On a malformed frame, or a shape/batch change mid-stream.
                The model's state is unchanged after an error.
        """
        inputs = self.check_frame(frame)
        self._check_calibrated()
        if self._actions is not None:  # a family scheme: one learned action per stream
            out = self._actions.step(self, _single_tensor(inputs, "frame"))
            self._learn_ranks(inputs)
            return out
        out, record = self._run_frame(inputs, True, True, None)
        self._record([record])
        return out

    @property
    def batches_clips(self) -> bool:
        """Whether :meth:`forward` runs a clip time-batched (every layer once over all frames).

        True with ``clip_execution="auto"`` when residual frames depend only on their keyframe:
        the ``keyframe`` reference and no adaptive refresh. The ``previous`` reference (each
        frame's reference is the one before) and refresh triggers (decisions from earlier
        frames) run frame by frame; so does a model one of whose ResQ layers does not see one
        row per frame (detected on the fly).
        """
        return (self.clip_execution == "auto" and not self._mode.advances
                and len(self.refresh_triggers) == 0)

    def step_clip(self, video: Any, *, keep_graph: bool = False) -> Any:
        """Continue every row's stream with the frames of a clip ``[B, T, C, ...]``.

        The same as calling :meth:`step` on each frame (same outputs, state and ``last_cost``),
        time-batched when the mode allows: for a stream decoded a chunk of frames at a time.
        ``keep_graph=True`` keeps autograd across the chunk's frames, as :meth:`forward` does
        (truncated backpropagation through time: the carried references are detached, before
        and after).

        Raises:
            TypeError, ValueError: On a malformed clip, or a shape change mid-stream; the state
                is unchanged after an error.
        """
        clip = self.check_video(video, stream=True)
        self._check_calibrated()
        if self._actions is not None:  # a family scheme: frame by frame, one action each
            out = self._actions.forward(self, _single_tensor(clip, "video"), fresh=False)
            self._learn_ranks(clip.frame(0))
            return out
        if not keep_graph:
            return self._run_recorded(clip, detach=True)
        for state in self._states.values():
            state.detach()
        out = self._run_recorded(clip, detach=False)
        for state in self._states.values():
            state.detach()
        return out

    def _run_recorded(self, video: ClipInputs, detach: bool, start_phase: Tensor | None = None
                      ) -> Any:
        """:meth:`run_clip` that restores the state on failure and records ``last_*``."""
        saved = self._snapshot()
        try:
            out, frames = self.run_clip(video, detach=detach, start_phase=start_phase)
        except BaseException:
            self._restore(saved)
            raise
        self._record(frames)
        return out

    def forward(self, video: Any) -> Any:
        """Run a fresh clip ``[B, T, C, ...]``; returns outputs stacked on dim 1 (``[B, T, ...]``).

        For a model with several inputs, ``video`` is a tuple (positional) or dict (keyword) of
        clips ``[B, T, ...]``; outputs of any pytree shape come back stacked per leaf.

        The state is reset first; afterwards it holds the end of this clip, exactly as if the
        clip had been stepped frame by frame, so :meth:`step` can continue it. Autograd history
        is kept across the clip (for QAT through time). How the clip runs: see
        :attr:`batches_clips` and :attr:`max_frames_per_batch`.
        """
        if self.training_phase not in ("zero", "random"):
            raise ValueError(f"training_phase must be 'zero' or 'random', got "
                             f"{self.training_phase!r}")
        clip = self.check_video(video)
        self._check_calibrated(stacklevel=5)  # through nn.Module.__call__ to the caller
        if self._actions is not None:  # a family scheme: one learned action per stream
            out = self._actions.forward(self, _single_tensor(clip, "video"))
            self._learn_ranks(clip.frame(0))
            return out
        saved = self._snapshot()
        self.reset()
        start = None
        if self.training and self.training_phase == "random" and self.period > 1:
            first_period = torch.randint(1, self.period + 1, (clip.batch,))
            start = self.period + 1 - first_period  # phase after frame 0 (see run_clip)
        try:
            out = self._run_recorded(clip, detach=False, start_phase=start)
        except BaseException:
            self._restore(saved)
            raise
        # The clip's autograd graph ends with the clip: a later step() must not reach into it.
        for state in self._states.values():
            state.detach()
        return out

    def run_clip(self, video: Any, *, adaptive: bool = True, detach: bool = True,
                 observer: Observer | None = None, start_phase: Tensor | None = None
                 ) -> tuple[Any, list[CallRecord]]:
        """Continue every stream with the frames of ``video``, time-batched when the mode allows
        (:attr:`batches_clips`), else frame by frame. ``last_*`` are not updated, and the
        state is not restored on failure (:meth:`step_clip` does both).

        Args:
            video: ``[B, T, C, ...]`` (or a tuple/dict of them), validated here unless it is a
                :class:`~resq_brevitas.temporal.inputs.ClipInputs` (already validated).
            adaptive: Let refresh triggers force keyframes (calibration: fixed schedule only).
            detach: Detach the stored references from autograd.
            observer: Optional calibration hook.
            start_phase: Long ``[B]``: each stream's phase right after frame 0 (instead of 1),
                which moves its next keyframe to frame ``period + 1 - start_phase``
                (``training_phase="random"``); frame 0 then runs as a call of its own.

        Returns:
            The outputs stacked on dim 1, and per frame ``(key mask, StepOutputs)``.
        """
        if not isinstance(video, ClipInputs):
            video = self.check_video(video, stream=True)
        if start_phase is not None and video.frames > 1:
            first, first_records = self.run_clip(video.chunk(0, 1), adaptive=adaptive,
                                                 detach=detach, observer=observer)
            self._stream.phase = start_phase.clone()
            rest, records = self.run_clip(video.chunk(1, video.frames), adaptive=adaptive,
                                          detach=detach, observer=observer)
            out = tree_map(lambda *leaves: torch.cat(leaves, 1), first, rest)
            return out, first_records + records
        if self.batches_clips or (not adaptive and not self._mode.advances
                                  and self.clip_execution == "auto"):
            saved = self._snapshot()
            try:
                return self._run_chunks(video, detach, observer)
            except NotBatchable:
                self._restore(saved)
        outputs, frames = [], []
        for t in range(video.frames):
            out, record = self._run_frame(video.frame(t), adaptive, detach, observer)
            outputs.append(out)
            frames.append(record)
        return stack_outputs(outputs), frames

    def _run_chunks(self, video: ClipInputs, detach: bool, observer: Observer | None
                    ) -> tuple[Any, list[CallRecord]]:
        """The clip in time-batched chunks of at most ``max_frames_per_batch`` rows."""
        batch, frames = video.batch, video.frames
        limit = self.max_frames_per_batch
        per_chunk = frames if limit is None else max(1, limit // batch)
        outputs, records = [], []
        for start in range(0, frames, per_chunk):
            out, chunk_records = self._run_chunk(video.chunk(start, start + per_chunk), detach,
                                                 observer)
            outputs.append(out)
            records.extend(chunk_records)
        if len(outputs) == 1:
            return outputs[0], records
        return tree_map(lambda *leaves: torch.cat(leaves, 1), *outputs), records

    def _run_chunk(self, video: ClipInputs, detach: bool, observer: Observer | None
                   ) -> tuple[Any, list[CallRecord]]:
        """One time-batched chunk ``[B, T', ...]``: every layer once over ``B * T'`` rows."""
        batch, frames = video.batch, video.frames
        stream = self._stream
        phase = stream.phase if stream.phase is not None else torch.zeros(batch, dtype=torch.long)
        plan = plan_clip(self.schedule, phase, frames)
        layout = ClipLayout.of(plan)
        order, inverse = plan.order, plan.inverse
        inputs = StepInputs(
            key_mask=layout.key_in_order.to(video.device),
            mode=self._mode,
            observer=observer,
            record_costs=observer is None,
            record_density=self.measure_density and observer is None,
            record_bit_maps=self._records_bit_maps,
        )
        ctx = FrameContext(inputs)
        executors = {name: ClipExecutor(state, ctx, plan, layout)
                     for name, state in self._states.items()}
        device_inverse = inverse.to(video.device)
        try:
            with attached(self._layers, executors.__getitem__):
                out = video.rows(order).call(self.model)
            out = tree_map(lambda leaf: _unflatten_rows(leaf, batch, frames, device_inverse), out)
        except BaseException:
            for state in self._states.values():
                state.rollback()
            raise
        for state in self._states.values():
            state.commit(detach=detach)
        outputs = _in_row_order(ctx.outputs, inverse)
        assert outputs.truncated is not None
        truncated = outputs.truncated.view(batch, frames)
        energy = stream.energy if stream.energy is not None else torch.zeros(
            batch, dtype=torch.float64)
        for t in range(frames):  # the frame-by-frame update, in the same order
            energy = torch.where(plan.key[:, t], torch.zeros_like(energy),
                                 energy + truncated[:, t])
        stream.phase, stream.energy = plan.phase, energy
        first = video.frame(0)
        stream.shape = first.signature
        self._learn_ranks(first)
        return out, [CallRecord(plan.key.clone(), outputs, batch, frames)]

    def _snapshot(self) -> tuple[Any, ...]:
        refs = {n: s.ref for n, s in self._states.items()}
        return refs, copy.copy(self._stream), dict(self._learned_ranks)

    def _restore(self, saved: tuple[Any, ...]) -> None:
        refs, self._stream, self._learned_ranks = saved
        for name, state in self._states.items():
            state.reset()
            state.ref = refs[name]

    def extra_repr(self) -> str:
        text = (f"scheme={self.notation}, period={self.period}, "
                f"reference={self.config.reference!r}, layers={len(self._states)}")
        if self.config.policy is not None:
            text += f", policy={self.config.policy}"
        if self.config.threshold:
            text += f", threshold={self.config.threshold:g}"
        if self.config.refresh:
            text += f", refresh={self.config.refresh}"
        return text

    def __repr__(self) -> str:
        """A short summary (``print(qm)``); ``qm.model`` prints the converted network in full."""
        kinds: dict[str, int] = {}
        for _, layer in self._layers:
            kind = type(layer).__name__.removeprefix("ResQ")
            kinds[kind] = kinds.get(kind, 0) + 1
        layers = ", ".join(f"{kind} x{count}" for kind, count in kinds.items())
        lines = [
            f"ResQModel({type(self.model).__name__}, scheme={self.notation}, "
            f"period={self.period}, reference={self.config.reference!r}, "
            f"{'calibrated' if self.calibrated else 'not calibrated'}",
            f"  {len(self._layers)} ResQ layers: {layers}",
        ]
        policy = next((layer.residual.policy for _, layer in self._layers
                       if getattr(layer.residual, "policy", None) is not None), None)
        if policy is not None:
            lines.append(f"  policy: {type(policy).__name__}({policy.extra_repr()})")
        if self.config.threshold:
            lines.append(f"  threshold: {self.config.threshold:g}")
        if self.config.refresh:
            lines.append(f"  refresh: {', '.join(repr(r) for r in self.config.refresh)}")
        float_ops = getattr(self, "float_operations", ())  # set by convert
        if float_ops:
            lines.append(f"  weight-free ops in floating point: {', '.join(float_ops)}")
        floating = self.unsupported_layers + self.skipped_layers
        if floating:
            shown = ", ".join(floating[:4]) + (", ..." if len(floating) > 4 else "")
            lines.append(f"  left in floating point: {len(floating)} ({shown})")
        return "\n".join(lines) + ")"


def _single_tensor(inputs: Any, name: str) -> Tensor:
    """The one tensor of a single-input frame or clip: family schemes (a learned per-frame
    policy reads the frame itself) take no tuple or dict inputs yet."""
    if inputs.kind != "tensor":
        raise TypeError(f"{name}: family schemes take one tensor per frame, got a "
                        f"{'tuple' if inputs.kind == 'args' else 'dict'} of inputs")
    return inputs.leaves[0]

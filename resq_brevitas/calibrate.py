"""``calibrate``: set every activation range of a :class:`ResQModel` with the line search (eq. 8).

Each layer says what to calibrate (:meth:`~resq_brevitas.nn.ResQLayerMixin.calibration_targets`):
the keyframe quantizer on frame inputs, the residual quantizer (or each quantizer of a
Dynamic-ResQ pool) on residuals with respect to the keyframe, each scored with its own quantized
weight. The model runs in floating point with its temporal decomposition
(:func:`quantization_disabled`) in two streaming passes over the same ``c`` frames: pass 1
reduces min/max, pass 2 accumulates the per-candidate output SSE. Memory does not grow with
``c``; under ``torch.distributed`` both reductions are all-reduced.

Refresh triggers and precision policies that need fitting (RRM's error budget, whose eq. 8
polynomial was not given; a policy solving for an operating point) are fitted afterwards on the
same frames: ``fit(qm, frames, samples, progress)`` of each object whose ``needs_fit`` is true
(:meth:`~resq_brevitas.policy.refresh.ErrorBudgetTrigger.fit`).

Ranges can be read, set and copied between models (:func:`activation_ranges`,
:func:`set_activation_ranges`, :func:`copy_ranges`): keyframe ranges do not depend on the period
or the residual scheme, so a sweep calibrates them once.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from resq_brevitas.bn_fold import fold_batch_norm_pairs, warn_unfolded
from resq_brevitas.config import LineSearch
from resq_brevitas.nn.residual import CalibrationTarget, value_of
from resq_brevitas.quant.control import quantization_disabled
from resq_brevitas.quant.line_search import (
    StreamingLineSearch,
    act_threshold,
    copy_act_threshold,
    distributed_initialized,
    set_act_threshold,
)
from resq_brevitas.temporal.context import Observer
from resq_brevitas.temporal.inputs import (
    ClipInputs,
    check_signature,
    input_arity,
    model_signature,
)
from resq_brevitas.temporal.model import ResQModel

__all__ = [
    "PATHS",
    "activation_ranges",
    "calibrate",
    "copy_ranges",
    "iter_clip_frames",
    "iter_clips",
    "set_activation_ranges",
]

#: The quantizer paths: keyframe (calibrated on frame inputs) and residual (on residuals).
PATHS = ("keyframe", "residual")
# Observer kinds of each path's inputs (see resq_brevitas.temporal.context.Observer).
_OBSERVED = MappingProxyType({"keyframe": "frame", "residual": "residual"})


def _clip_inputs(qm: ResQModel, clip: object) -> object:
    """The model inputs of a clip: a ``(clip, labels)`` pair from a DataLoader gives its first
    element. A tuple of tensors is a pair for a single-input model and the inputs themselves
    for a model with several inputs."""
    if isinstance(clip, (tuple, list)) and clip:
        first = clip[0]
        if isinstance(first, (tuple, list, Mapping)):
            return first  # ((image1, image2), labels) or ({"frame": ..}, labels)
        if isinstance(first, Tensor) and input_arity(qm.model) in (None, 1):
            return first  # (clip, labels)
    return clip


def _as_batched_clip(qm: ResQModel, clip: object, index: int) -> object:
    """``[B, T, C, ...]`` (per input) from a batched or an unbatched clip.

    Whether a clip is batched is decided by the model's frame rank
    (:attr:`ResQModel.expected_inputs`): a clip of the rank of a batch of frames is unbatched
    (``[T, C, ...]``), one more is batched; every input of a clip must agree.

    Raises:
        TypeError: Not a tensor (or a tuple/dict of them).
        ValueError: A rank that fits neither, inputs that disagree, or a model whose frame rank
            is unknown (a ``Linear`` first layer that takes any rank) with no way to tell.
    """
    name = f"clips[{index}]"
    clip = _clip_inputs(qm, clip)
    if isinstance(clip, Tensor):
        keys, leaves = [None], [clip]
    elif isinstance(clip, (tuple, list)) and clip:
        keys, leaves = list(range(len(clip))), list(clip)
    elif isinstance(clip, Mapping) and clip:
        keys, leaves = list(clip), list(clip.values())
    else:
        raise TypeError(f"{name} must be a torch.Tensor (or a tuple/dict of them, one per model "
                        f"input), got {type(clip).__name__}")
    kind = "tensor" if isinstance(clip, Tensor) else "kwargs" if isinstance(clip, Mapping) \
        else "args"
    # missing, extra or misnamed inputs first: their ranks cannot be read off the model
    check_signature(model_signature(qm.model), ClipInputs(kind, tuple(keys), tuple(leaves)),
                    name)
    specs = qm.expected_inputs
    batched = set()
    for key, leaf in zip(keys, leaves):
        leaf_name = name if key is None else f"{name}[{key!r}]"
        if not isinstance(leaf, Tensor):
            raise TypeError(f"{leaf_name} must be a torch.Tensor, got {type(leaf).__name__}")
        spec = specs.get(0 if key is None else key)
        rank = None if spec is None else spec.rank
        if rank is None:
            continue
        if leaf.dim() not in (rank, rank + 1):
            raise ValueError(
                f"{leaf_name} must have rank {rank} ([T, C, ...]) or {rank + 1} ([B, T, C, ...]) "
                f"for this model (frames of rank {rank} incl. batch, read off "
                f"{spec.layer or 'frame_rank'}), got shape {tuple(leaf.shape)}")
        batched.add(leaf.dim() == rank + 1)
    if not batched:
        raise ValueError(
            f"cannot tell whether {name} (shapes {[tuple(t.shape) for t in leaves]}) is one clip "
            "[T, ...] or a batch [B, T, ...]: the model's first layers take frames of any rank; "
            "set qm.frame_rank (the rank of a batch of frames) or run one frame through qm first")
    if len(batched) > 1:
        raise ValueError(f"{name}: some inputs are batched clips [B, T, ...] and others unbatched "
                         f"[T, ...] (shapes {[tuple(t.shape) for t in leaves]})")
    if batched.pop():
        return clip
    leaves = [t.unsqueeze(0) for t in leaves]
    if isinstance(clip, Tensor):
        return leaves[0]
    return dict(zip(keys, leaves)) if isinstance(clip, Mapping) else tuple(leaves)


def iter_clip_frames(qm: ResQModel, clips: Iterable[Any], samples: int
                     ) -> Iterator[tuple[bool, Any]]:
    """Yield ``(starts_clip, frame)`` until ``samples`` frames (counted per batch row) were seen.

    Frames come as the model takes them (a tensor ``[B, ...]``, or a tuple/dict of them for a
    model with several inputs). Every clip is validated against the model (rank, channels,
    dtype, device, finite values) before its first frame is yielded. Clips holding fewer than
    ``samples`` frames are used whole, with a warning (Python shows it once per session; every
    pass over the clips issues it).
    """
    seen = 0
    for index, raw in enumerate(clips):
        clip = qm.check_video(_as_batched_clip(qm, raw, index), f"clips[{index}]")
        for t in range(clip.frames):
            if seen >= samples:
                return
            yield t == 0, clip.frame(t).value
            seen += clip.batch
    _check_seen(seen, samples)


def _check_seen(seen: int, samples: int) -> None:
    """No frame at all is an error; fewer frames than asked for is used, with a warning."""
    if seen == 0:
        raise ValueError("clips must contain at least one frame, got none")
    if seen < samples:
        warnings.warn(f"calibration asked for samples={samples} frames (counted per batch row), "
                      f"but the clips hold {seen}: calibrating on those {seen}",
                      stacklevel=5)  # _check_seen <- generator <- pass <- calibrate <- caller


def iter_clips(qm: ResQModel, clips: Iterable[Any], samples: int) -> Iterator[ClipInputs]:
    """Yield validated batched clips (every input ``[B, T', C, ...]``), cut so that ``samples``
    frames (counted per batch row, as :func:`iter_clip_frames`) are seen in all."""
    seen = 0
    for index, raw in enumerate(clips):
        if seen >= samples:
            return
        clip = qm.check_video(_as_batched_clip(qm, raw, index), f"clips[{index}]")
        frames = min(clip.frames, -(-(samples - seen) // clip.batch))
        yield clip.chunk(0, frames)
        seen += frames * clip.batch
    _check_seen(seen, samples)


def _run_pass(qm: ResQModel, clips: Iterable[Any], samples: int, observer: Observer,
              desc: str, progress: bool) -> None:
    bar = tqdm(total=samples, desc=desc, disable=not progress, leave=False)
    try:
        for clip in iter_clips(qm, clips, samples):
            qm.reset()  # each clip is a stream of its own
            qm.run_clip(clip, adaptive=False, observer=observer)
            bar.update(clip.batch * clip.frames)
    finally:
        bar.close()
        qm.reset()


def _fold_on_first_frame(qm: ResQModel, clips: Iterable[Any]) -> None:
    first = next(iter_clip_frames(qm, clips, 1))[1]
    try:
        with quantization_disabled(qm):
            folded = fold_batch_norm_pairs(qm.model, first, layer_map=qm.layer_map)
    except Exception as err:  # the eager trace runs user code: report, keep BN in float
        warn_unfolded(qm.model, f"the eager trace failed ({err})")
    else:
        if folded is None:
            warn_unfolded(qm.model, "the model could not be traced")
        else:
            qm.folded_batch_norms = tuple(folded)
    qm.bn_fold_pending = False


def _targets(qm: ResQModel, paths: Collection[str]) -> dict[tuple[str, str, int],
                                                           CalibrationTarget]:
    """Every target to calibrate, keyed ``(layer, path, slot)``."""
    found = {}
    for name, layer in qm.resq_layers():
        for target in layer.calibration_targets():
            # period 1 never runs residuals: there is nothing to calibrate them on
            if target.path in paths and (target.path == "keyframe" or qm.period > 1):
                found[(name, target.path, target.slot)] = target
    return found


def _check_clips(clips: Any) -> None:
    if clips is None or isinstance(clips, Tensor) or not isinstance(clips, Iterable):
        raise TypeError(
            "clips must be a re-iterable collection of clip tensors (e.g. a list), "
            f"got {type(clips).__name__}"
        )
    if iter(clips) is clips:
        raise TypeError(
            "clips must be re-iterable (it is read twice): pass a list or a Dataset, "
            f"not a one-shot {type(clips).__name__}"
        )


def calibrate(qm: ResQModel, clips: Iterable[Any], *, samples: int | None = None,
              candidates: int | None = None, paths: Collection[str] = PATHS,
              progress: bool = True) -> ResQModel:
    """Calibrate all activation ranges of ``qm`` in place (eq. 8, streaming).

    Args:
        qm: A model from :func:`resq_brevitas.convert`.
        clips: A re-iterable collection (list, Dataset-like, DataLoader without shuffling) of
            clips ``[T, C, ...]`` or ``[B, T, C, ...]`` (or ``(clip, labels)`` pairs); for a
            model with several inputs, each clip is a tuple/dict of such tensors. Whether a
            clip is batched is read off the model's frame rank (:attr:`ResQModel.frame_rank`);
            it is read twice, in the same order.
        samples: Calibration frames ``c`` (default: ``qm.config.calibration.samples``).
        candidates: Line-search points ``r`` (default: ``qm.config.calibration.candidates``).
        paths: Which quantizers to calibrate: ``"keyframe"`` (on frame inputs) and/or
            ``"residual"`` (on residuals).
        progress: Show tqdm progress bars.

    Returns:
        ``qm`` (calibrated, reset).

    Raises:
        TypeError: If ``qm`` is not a ResQModel or ``clips`` is a one-shot iterator.
        ValueError: If ``clips`` holds no frame or a malformed clip.
    """
    if not isinstance(qm, ResQModel):
        raise TypeError(f"qm must be a ResQModel (from resq.convert), got {type(qm).__name__}")
    _check_clips(clips)
    if isinstance(paths, str) or not set(paths) <= set(PATHS) or not paths:
        raise ValueError(f"paths must be a non-empty subset of {PATHS}, got {paths!r}")
    settings = LineSearch(
        candidates=candidates if candidates is not None else qm.config.calibration.candidates,
        samples=samples if samples is not None else qm.config.calibration.samples,
    )
    if qm.bn_fold_pending:
        _fold_on_first_frame(qm, clips)
    layers = dict(qm.resq_layers())
    targets = _targets(qm, paths)
    searches = {key: StreamingLineSearch(t.bits, settings.candidates)
                for key, t in targets.items()}
    with torch.no_grad():
        weights = {key: (layers[key[0]].weight.detach(), value_of(t.view.quant_weight()).detach())
                   for key, t in targets.items()}
    by_input: dict[tuple[str, str], list[tuple[str, str, int]]] = {}
    for key in searches:
        by_input.setdefault((key[0], _OBSERVED[key[1]]), []).append(key)
    # Objects that fit themselves on calibration frames once the ranges are set: refresh
    # triggers (RRM eq. 8's polynomial) and precision policies (e.g. a target operating point).
    fits = [t for t in qm.refresh_triggers if getattr(t, "needs_fit", False)]
    policies = {id(p): p for _, layer in qm.resq_layers()
                if (p := getattr(layer.residual, "policy", None)) is not None}
    fits += [p for p in policies.values() if getattr(p, "needs_fit", False)]
    fit_refresh = bool(fits) and "residual" in paths and qm.period > 1

    def observe_range(name: str, kind: str, x: Tensor) -> None:
        for key in by_input.get((name, kind), ()):
            searches[key].observe_range(x)

    def accumulate(name: str, kind: str, x: Tensor) -> None:
        for key in by_input.get((name, kind), ()):
            weight, qweight = weights[key]
            searches[key].accumulate(x, layers[name].linear_op, weight, qweight)

    uncalibrated: tuple[str, ...] = ()
    modes = [(m, m.training) for m in qm.modules()]  # restored one by one: modes may be mixed
    qm.eval()
    try:
        if searches:
            with torch.no_grad(), quantization_disabled(qm):
                _run_pass(qm, clips, settings.samples, observe_range, "calibration ranges",
                          progress)
                _end_range_pass(searches)
                if qm.config.act_signedness == "auto":
                    _unsigned_where_non_negative(qm, targets, searches)
                _run_pass(qm, clips, settings.samples, accumulate, "calibration line search",
                          progress)
            zero = [key for key, search in searches.items() if _zero_range(search)]
            for key, search in searches.items():
                threshold, _, _ = search.result()
                if key not in zero:
                    set_act_threshold(targets[key].proxy, threshold)
            uncalibrated = tuple(_range_key(*key) for key in zero)
            if uncalibrated:
                warnings.warn(
                    "calibration clips gave these quantizer inputs a range of exactly zero (are "
                    "the clips all-zero or constant?); they keep their previous range and the "
                    f"model stays marked uncalibrated: {', '.join(uncalibrated)}", stacklevel=2)
        if fit_refresh:
            for trigger in fits:
                trigger.fit(qm, iter_clip_frames(qm, clips, settings.samples),
                            settings.samples, progress)
    finally:
        for module, mode in modes:
            module.training = mode
        qm.reset()
    #: ``"layer/path/slot"`` of the quantizers the last calibration could not set (their
    #: inputs' range was exactly zero).
    qm.uncalibrated_ranges = uncalibrated if searches else ()
    qm.calibrated = not qm.uncalibrated_ranges
    return qm


def _zero_range(search: StreamingLineSearch) -> bool:
    """Whether every input the search saw was exactly zero (after pass 1, all-reduced)."""
    search.thresholds()
    return search.global_min == 0.0 and search.global_max == 0.0


def _end_range_pass(searches: dict[tuple[str, str, int], StreamingLineSearch]) -> None:
    """End pass 1 of every search, on every rank in the same order.

    Under torch.distributed a rank may see no sample of some input (its clips hold one frame:
    no residual), and a search that ended pass 1 lazily, at its first sample of pass 2, would
    all-reduce at a different point on each rank (a collective mismatch that aborts the group).
    Here every rank first agrees on which inputs were seen anywhere (one all-reduce), raises the
    same error if some input was seen nowhere, then reduces every range in key order.
    """
    seen = torch.tensor([float(s.observed) for s in searches.values()], dtype=torch.float64)
    if distributed_initialized():
        dist.all_reduce(seen, op=dist.ReduceOp.MAX)
    unseen = [f"{name} ({_OBSERVED[path]})"
              for ((name, path, _), _), flag in zip(searches.items(), seen.tolist()) if not flag]
    if unseen:
        raise ValueError(
            f"calibration clips never reached these layer inputs: {', '.join(unseen)}; "
            "residual quantizers need clips of at least 2 frames"
        )
    for search in searches.values():
        search.thresholds()


def _unsigned_where_non_negative(qm: ResQModel, targets: dict[tuple[str, str, int], Any],
                                 searches: dict[tuple[str, str, int], StreamingLineSearch]
                                 ) -> None:
    """``act_signedness="auto"``: keyframe quantizers whose inputs never went below zero (over
    every rank) become unsigned, and their search scores the unsigned grid. Residuals, which are
    signed by nature, stay signed."""
    for key, search in searches.items():
        if key[1] != "keyframe":
            continue
        search.thresholds()  # the all-reduced range (pass 1 ended on every rank)
        if search.global_min >= 0:
            search.signed = False
            qm.use_unsigned_input(key[0])


def _range_key(name: str, path: str, slot: int) -> str:
    return f"{name}/{path}/{slot}"


def activation_ranges(qm: ResQModel, paths: Collection[str] = PATHS) -> dict[str, float]:
    """The calibrated thresholds ``max(r_max, -r_min)`` of ``qm``'s activation quantizers.

    Args:
        qm: A ResQ model.
        paths: ``"keyframe"`` and/or ``"residual"``.

    Returns:
        ``"layer/path/slot" -> threshold`` (JSON-serialisable).
    """
    if not isinstance(qm, ResQModel):
        raise TypeError(f"qm must be a ResQModel, got {type(qm).__name__}")
    return {_range_key(*key): act_threshold(target.proxy)
            for key, target in _targets(qm, paths).items()}


def set_activation_ranges(qm: ResQModel, ranges: Mapping[str, float]) -> None:
    """Set thresholds from :func:`activation_ranges` (of this or an equally built model).

    Raises:
        ValueError: A key that names no activation quantizer of ``qm``.
    """
    targets = {_range_key(*key): t for key, t in _targets(qm, PATHS).items()}
    unknown = sorted(set(ranges) - set(targets))
    if unknown:
        raise ValueError(f"ranges name quantizers qm does not have: {unknown}")
    for key, threshold in ranges.items():
        set_act_threshold(targets[key].proxy, float(threshold))


def copy_ranges(source: ResQModel, target: ResQModel,
                paths: Collection[str] = ("keyframe",)) -> ResQModel:
    """Copy calibrated ranges from ``source`` to ``target`` (e.g. keyframe ranges across a sweep
    of periods or residual schemes with the same keyframe precision).

    ``target`` counts as calibrated afterwards when every one of its quantizers got a range (a
    frame-quantization target needs only keyframe ranges).

    Returns:
        ``target``.

    Raises:
        ValueError: If the two models' layers or the copied quantizers' bit widths differ.
    """
    src, dst = _targets(source, paths), _targets(target, paths)
    mismatched = sorted(_range_key(*k) for k in dst if k not in src or src[k].bits != dst[k].bits)
    if mismatched:
        raise ValueError(f"source has no quantizer of the same bits for {mismatched}")
    if "keyframe" in paths:  # an unsigned range only means something on an unsigned grid
        for name in source.unsigned_inputs:
            target.use_unsigned_input(name)
    for key, dst_target in dst.items():
        copy_act_threshold(src[key].proxy, dst_target.proxy)
    if set(_targets(target, PATHS)) <= set(dst):
        target.calibrated = True
    return target

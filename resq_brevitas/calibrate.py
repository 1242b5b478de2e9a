"""``calibrate``: set every activation range of a :class:`ResQModel` with the line search (eq. 8).

Keyframe quantizers are calibrated on frame inputs, residual quantizers on residuals with respect
to the keyframe, each with its own quantized weight. The model runs in floating point with its
temporal decomposition (:func:`quantization_disabled`) in two streaming passes over the same
``c`` frames: pass 1 reduces min/max, pass 2 accumulates the per-candidate output SSE. Memory does
not grow with ``c``; under ``torch.distributed`` both reductions are all-reduced.

Dynamic-ResQ: every quantizer of a residual pool is calibrated on the same residuals like the
static one (eq. 8 at its own bit width). RRM's error-budget refresh: after the ranges are set, a
third pass runs the quantized model on the same frames (fixed schedule) and fits RRM eq. 8's
polynomial from each stream's accumulated truncated energy to its relative output error against
the keyframe path (what a refresh would give on that frame).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Iterable, Iterator

import torch
from torch import Tensor
from tqdm.auto import tqdm

from resq_brevitas.bn_fold import fold_batch_norms, warn_unfolded
from resq_brevitas.config import ErrorBudgetRefresh, LineSearch
from resq_brevitas.policy.refresh import fit_error_polynomial, relative_output_error
from resq_brevitas.quant.control import quantization_disabled
from resq_brevitas.quant.line_search import (
    StreamingLineSearch,
    set_act_threshold,
)
from resq_brevitas.quant.line_search import (
    distributed_initialized as _distributed,
)
from resq_brevitas.temporal.model import ResQModel

__all__ = ["calibrate", "iter_clip_frames", "fit_refresh_polynomial"]


def _as_batched_clip(clip: object, index: int) -> Tensor:
    if not isinstance(clip, Tensor):
        raise TypeError(f"clips[{index}] must be a torch.Tensor, got {type(clip).__name__}")
    if clip.dim() == 4:  # [T, C, H, W]: one unbatched image clip
        return clip.unsqueeze(0)
    if clip.dim() < 3:
        raise ValueError(
            f"clips[{index}] must be [T, C, H, W] or [B, T, C, ...], got shape {tuple(clip.shape)}"
        )
    return clip


def iter_clip_frames(qm: ResQModel, clips: Iterable[Tensor], samples: int
                     ) -> Iterator[tuple[bool, Tensor]]:
    """Yield ``(starts_clip, frame)`` until ``samples`` frames (counted per batch row) were seen."""
    seen = 0
    for index, clip in enumerate(clips):
        clip = _as_batched_clip(clip, index)
        for t in range(clip.shape[1]):
            if seen >= samples:
                return
            frame = clip[:, t]
            yield t == 0, frame
            seen += frame.shape[0]
    if seen == 0:
        raise ValueError("clips must contain at least one frame, got none")


def _run_pass(qm: ResQModel, clips: Iterable[Tensor], samples: int,
              observer: Callable[[str, str, Tensor], None], desc: str, progress: bool) -> None:
    bar = tqdm(total=samples, desc=desc, disable=not progress, leave=False)
    try:
        for starts_clip, frame in iter_clip_frames(qm, clips, samples):
            if starts_clip:
                qm.reset()
            qm.check_frame(frame, name="calibration frame")
            qm.run_step(frame, detach=True, observer=observer, adaptive=False)
            bar.update(frame.shape[0])
    finally:
        bar.close()
        qm.reset()


_PATHS = ("keyframe", "residual")


def _fold_on_first_frame(qm: ResQModel, clips: Iterable[Tensor]) -> None:
    first = next(iter_clip_frames(qm, clips, 1))[1]
    qm.check_frame(first, name="calibration frame")
    try:
        with quantization_disabled(qm):
            folded = fold_batch_norms(qm.model, first)
    except Exception as err:  # the eager trace runs user code: report, keep BN in float
        warn_unfolded(qm.model, f"the eager trace failed ({err})")
    else:
        if folded is None:
            warn_unfolded(qm.model, "the model could not be traced")
    qm.bn_fold_pending = False


def calibrate(qm: ResQModel, clips: Iterable[Tensor], *, samples: int | None = None,
              candidates: int | None = None, paths: Collection[str] = _PATHS,
              progress: bool = True) -> ResQModel:
    """Calibrate all activation ranges of ``qm`` in place (eq. 8, streaming).

    Args:
        qm: A model from :func:`resq_brevitas.convert`.
        clips: A re-iterable collection (list, Dataset-like, DataLoader without shuffling) of
            clips ``[T, C, H, W]`` or ``[B, T, C, ...]``; it is read twice, in the same order.
        samples: Calibration frames ``c`` (default: ``qm.config.calibration.samples``).
        candidates: Line-search points ``r`` (default: ``qm.config.calibration.candidates``).
        paths: Which quantizers to calibrate: ``"keyframe"`` (on frame inputs) and/or
            ``"residual"`` (on residuals). Keyframe ranges do not depend on the period or the
            residual scheme, so a sweep can calibrate them once and copy them.
        progress: Show tqdm progress bars.

    Returns:
        ``qm`` (calibrated, reset).

    Raises:
        TypeError: If ``qm`` is not a ResQModel or ``clips`` is a one-shot iterator.
        ValueError: If ``clips`` holds no frame or a malformed clip.
    """
    if not isinstance(qm, ResQModel):
        raise TypeError(f"qm must be a ResQModel (from resq.convert), got {type(qm).__name__}")
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
    if isinstance(paths, str) or not set(paths) <= set(_PATHS) or not paths:
        raise ValueError(f"paths must be a non-empty subset of {_PATHS}, got {paths!r}")
    settings = LineSearch(
        candidates=candidates if candidates is not None else qm.config.calibration.candidates,
        samples=samples if samples is not None else qm.config.calibration.samples,
    )
    if qm.bn_fold_pending:
        _fold_on_first_frame(qm, clips)
    scheme = qm.scheme
    layers = dict(qm.resq_layers())
    # One line search per (layer, kind, quantizer): the keyframe quantizer on frame inputs, the
    # residual quantizer (or each pool quantizer) on residuals.
    searches: dict[tuple[str, str, int], StreamingLineSearch] = {}
    weights: dict[tuple[str, str, int], tuple[Tensor, Tensor]] = {}
    proxies: dict[tuple[str, str, int], torch.nn.Module] = {}
    for name, layer in layers.items():
        todo: list[tuple[str, int, int | None, torch.nn.Module, torch.nn.Module]] = []
        if "keyframe" in paths:
            bits = scheme.keyframe.act_bits[0] if scheme.keyframe.act_bits else None
            todo.append(("frame", 0, bits, layer, layer.input_quant))
        # period 1 never runs residuals: nothing to calibrate them on
        if "residual" in paths and scheme.residual is not None and qm.period > 1:
            if layer.residual_pool is not None:
                for i, (bits, quant) in enumerate(zip(layer.pool_bits, layer.residual_pool)):
                    todo.append(("residual", i, bits, layer.residual, quant.act_quant))
            else:
                res_bits = scheme.residual.act_bits[0] if scheme.residual.act_bits else None
                todo.append(("residual", 0, res_bits, layer.residual,
                             layer.residual.input_quant))
        for kind, slot, bits, path, proxy in todo:
            if not bits:  # fp32 or 0-bit: nothing to search
                continue
            searches[(name, kind, slot)] = StreamingLineSearch(bits, settings.candidates)
            with torch.no_grad():
                qweight = path.quant_weight()
            qweight = getattr(qweight, "value", qweight).detach()
            weights[(name, kind, slot)] = (layer.weight.detach(), qweight)
            proxies[(name, kind, slot)] = proxy
    by_input: dict[tuple[str, str], list[tuple[str, str, int]]] = {}
    for key in searches:
        by_input.setdefault(key[:2], []).append(key)
    budget = qm.config.refresh_of(ErrorBudgetRefresh)
    fit_refresh = (budget is not None and budget.coefficients is None and "residual" in paths
                   and qm.period > 1)
    if not searches and not fit_refresh:
        qm.calibrated = True
        return qm

    def observe_range(name: str, kind: str, x: Tensor) -> None:
        for key in by_input.get((name, kind), ()):
            searches[key].observe_range(x)

    def accumulate(name: str, kind: str, x: Tensor) -> None:
        for key in by_input.get((name, kind), ()):
            weight, qweight = weights[key]
            searches[key].accumulate(x, layers[name].linear_op, weight, qweight)

    modes = [(m, m.training) for m in qm.modules()]  # restored one by one: modes may be mixed
    qm.eval()
    try:
        if searches:
            with torch.no_grad(), quantization_disabled(qm):
                _run_pass(qm, clips, settings.samples, observe_range, "calibration ranges",
                          progress)
                _run_pass(qm, clips, settings.samples, accumulate, "calibration line search",
                          progress)
            unseen = [f"{name} ({kind})" for (name, kind, _), s in searches.items()
                      if not s.observed]
            if unseen and not _distributed():
                raise ValueError(
                    f"calibration clips never reached these layer inputs: {', '.join(unseen)}; "
                    "residual quantizers need clips of at least 2 frames"
                )
            for key, search in searches.items():
                threshold, _, _ = search.result()
                set_act_threshold(proxies[key], threshold)
        if fit_refresh:
            assert budget is not None
            qm.error_polynomial = fit_refresh_polynomial(qm, clips, settings.samples,
                                                         budget.degree, progress)
    finally:
        for module, mode in modes:
            module.training = mode
        qm.reset()
    qm.calibrated = True
    return qm


def fit_refresh_polynomial(qm: ResQModel, clips: Iterable[Tensor], samples: int,
                           degree: int = 4, progress: bool = False) -> tuple[float, ...]:
    """Fit RRM eq. 8's polynomial on calibration clips (the model's ranges must be set).

    Each calibration frame runs through the quantized model with the fixed keyframe schedule;
    every stream contributes the pair (accumulated truncated energy since its keyframe, RRM eq. 7;
    relative error of the model output against the keyframe path on the same frame).

    Args:
        qm: The model; its state is reset afterwards.
        clips: Calibration clips (as for :func:`calibrate`).
        samples: Frames to use (per batch row, across clips).
        degree: Polynomial degree.
        progress: Show a progress bar.

    Returns:
        ``(c_1, ..., c_degree)`` (zeros, with a warning, when nothing was truncated).
    """
    energies: list[Tensor] = []
    errors: list[Tensor] = []
    bar = tqdm(total=samples, desc="calibration refresh fit", disable=not progress, leave=False)
    try:
        with torch.no_grad():
            for starts_clip, frame in iter_clip_frames(qm, clips, samples):
                if starts_clip:
                    qm.reset()
                qm.check_frame(frame, name="calibration frame")
                out, _ = qm.run_step(frame, detach=True, adaptive=False)
                # Layers have no temporal slot outside a step: this is the keyframe path.
                reference = qm.model(frame)
                assert qm._truncation is not None
                energies.append(qm._truncation.clone())
                errors.append(relative_output_error(out, reference))
                bar.update(frame.shape[0])
    finally:
        bar.close()
        qm.reset()
    energy = torch.cat(energies)
    if not bool((energy > 0).any()):
        warnings.warn(
            "ErrorBudgetRefresh: the calibration clips truncated nothing (threshold too small or "
            "clips static); the fitted polynomial is zero and the refresh never fires",
            stacklevel=3,
        )
    return fit_error_polynomial(energy, torch.cat(errors), degree)

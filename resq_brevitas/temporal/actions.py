"""The per-frame action executor of family schemes (VideoIQ, and its use on ResQ residuals).

A :class:`~resq_brevitas.ResQModel` converted with a family scheme (``{W8A8,W4A4,W2A2,skip}`` or
``W8A8->{W8A4,W4A4,skip,key}``) and a :class:`~resq_brevitas.LearnedFramePolicy` runs every
frame through :class:`ActionExecutor`, an object it chooses once:

1. the policy network (:class:`~resq_brevitas.policy.learned.FramePolicyNetwork`) reads the
   frame of every stream (batch row) and its LSTM state and picks one action per row
   (straight-through Gumbel-Softmax in training, argmax in eval);
2. each *option* runs the model on the rows that take it, with a per-layer executor that
   applies the option at every ResQ layer:

   - a precision of a frame family: the member's path (:meth:`~resq_brevitas.nn.family.
     FamilyPaths.frame_forward`; the highest member is the keyframe path);
   - a precision of a residual family: ``z = q(x - x_ref) * W_b + z_ref`` through the member's
     residual path (eq. 4-5, :func:`~resq_brevitas.temporal.step.residual_step`);
   - ``key`` (the policy's, or the schedule's: a stream's first frame and every ``period``-th
     frame after its last keyframe): the keyframe path, which becomes the row's reference;
   - ``skip``: nothing runs; the row's output is its previous output, at zero cost (it may not
     be chosen before a stream has an output);

3. the outputs are put together per row. In eval each row takes its option's output; in
   training every allowed option runs on every row and the outputs are mixed with the
   straight-through one-hot weights, whose forward value is the chosen option's output and whose
   gradient reaches the policy (the paper trains the policy through the recognition loss the
   same way).

The BOPs of a row are the chosen option's layers (``MACs * b_w * b_a`` at its precision, 0 for
``skip``) plus the policy network's own BOPs on every frame; ``qm.last_cost`` reports them and
``qm.last_actions`` holds the chosen action per stream and frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from resq_brevitas.config import Precision, Scheme
from resq_brevitas.nn.cost import CostReport, precision_bops
from resq_brevitas.nn.layers import ResQLayerMixin
from resq_brevitas.temporal.context import attached
from resq_brevitas.temporal.step import Reference, ResidualMode, residual_step

__all__ = ["SCHEDULED_KEYFRAME", "ActionExecutor", "Option", "PolicyRecord",
           "recognition_average"]

#: ``last_actions`` value of a row the schedule made a keyframe (not the policy's choice).
SCHEDULED_KEYFRAME = -1


@dataclass(frozen=True)
class Option:
    """One way a row can run: a precision (``index`` into the family), ``key`` or ``skip``."""

    kind: str
    index: int | None = None
    precision: Precision | None = None


class PolicyRecord(NamedTuple):
    """The policy's outputs over the last call, for the losses of eq. 10-13.

    Attributes:
        logits: ``[B, T, |Omega|]`` (``softmax`` is eq. 4's ``pi``).
        samples: ``[B, T, |Omega|]`` the (straight-through) one-hot samples.
        action_bops: ``[|Omega|]`` mean BOPs per frame of each action in the last call (skip 0;
            ``key`` at the keyframe's), for eq. 10.
    """

    logits: Tensor
    samples: Tensor
    action_bops: Tensor


def recognition_average(outputs: Tensor, actions: Tensor, skip_index: int | None) -> Tensor:
    """TSN-style clip prediction: the mean of the frame predictions of the frames that were not
    skipped (VideoIQ section 3.2).

    Args:
        outputs: ``[B, T, ...]`` frame predictions.
        actions: Long ``[B, T]`` chosen actions (``qm.last_actions``).
        skip_index: The family's ``skip`` action, or ``None``.
    """
    if skip_index is None:
        return outputs.mean(1)
    kept = (actions != skip_index).to(outputs.dtype)
    weights = kept.view(*kept.shape, *([1] * (outputs.dim() - 2)))
    return (outputs * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class _Pass(NamedTuple):
    """One option's run of the model on some rows: their indices, the output leaves, the option's
    column, and per layer ``(MACs, BOPs per row, input, output)``."""

    rows: Tensor
    leaves: list[Tensor]
    column: int
    calls: dict[str, tuple[int, float, Tensor, Tensor]]

    @property
    def bops(self) -> float:
        """BOPs of one row of this option (every layer)."""
        return sum(call[1] for call in self.calls.values())


class _Stream:
    """The executor's per-stream state: phases, the policy's state, the last outputs."""

    def __init__(self) -> None:
        self.phase: Tensor | None = None
        #: The policy network's per-stream state (LSTM ``(h, c)``, the previous downsampled
        #: frame if its inputs need it); ``None`` before a stream's first frame.
        self.policy_state: tuple[Tensor, ...] | None = None
        self.last_out: list[Tensor] | None = None
        self.spec: Any = None

    def snapshot(self) -> tuple[Any, ...]:
        return self.phase, self.policy_state, self.last_out, self.spec

    def restore(self, saved: tuple[Any, ...]) -> None:
        self.phase, self.policy_state, self.last_out, self.spec = saved


class _OptionLayer:
    """Applies one option at one ResQ layer, on the rows ``rows`` of the streams."""

    def __init__(self, name: str, executor: ActionExecutor, ref: Reference | None,
                 rows: Tensor, option: Option, calls: dict[str, Any]) -> None:
        self.name = name
        self.executor = executor
        self.ref = ref
        self.rows = rows
        self.option = option
        self.calls = calls

    def forward(self, layer: ResQLayerMixin, x: Tensor, **kwargs: Any) -> Tensor:
        if self.name in self.calls:
            raise RuntimeError(f"ResQ layer {self.name!r} was called twice in one frame")
        if x.shape[0] != self.rows.numel():
            raise RuntimeError(
                f"ResQ layer {self.name!r} sees {x.shape[0]} rows for {self.rows.numel()} "
                "streams: a family scheme needs one row per stream at every layer"
            )
        option, family = self.option, layer.family
        assert family is not None
        if option.kind == "key" or (option.kind == "precision" and family.side == "frame"
                                    and option.index in family.own):
            z = layer.keyframe_forward(x, **kwargs)
            precision = layer.keyframe_precision
        elif family.side == "frame":
            assert option.index is not None
            z = family.frame_forward(layer, option.index, x, **kwargs)
            precision = family.precisions[option.index]
        else:
            assert option.index is not None and self.ref is not None
            path = layer.residual if option.index in family.own else family.path(option.index)
            ref = Reference(self.ref.x.index_select(0, self.rows),
                            self.ref.z.index_select(0, self.rows))
            z = residual_step(path, x, ref, self.executor.mode, **kwargs).z
            precision = path.precision
        macs = layer.macs(tuple(x.shape[1:]), tuple(z.shape[1:]))
        self.calls[self.name] = (macs, float(precision_bops(macs, precision)), x, z)
        # The model may modify a layer's output in place; the reference must not change.
        return z.clone() if option.kind == "key" else z


class ActionExecutor:
    """Runs the frames of a family-scheme model one action per stream (see the module doc).

    Args:
        scheme: The family scheme.
        period: The longest run of residual frames between keyframes (residual families).
        mode: The residual mode (``reference="keyframe"``).
    """

    def __init__(self, scheme: Scheme, period: int, mode: ResidualMode) -> None:
        self.scheme = scheme
        self.side = scheme.family_side
        self.period = period if self.side == "residual" else 1
        self.mode = mode
        actions = scheme.family
        self.num_actions = len(actions)
        self.skip_index = next((i for i, a in enumerate(actions) if a.kind == "skip"), None)
        self.key_index = next((i for i, a in enumerate(actions) if a.kind == "key"), None)
        #: The options that run the model (``skip`` runs nothing); column ``j`` of the mixing
        #: matrix. A residual family always has ``key`` (the schedule needs it).
        self.options: list[Option] = [Option("precision", i, a.precision)
                                      for i, a in enumerate(actions) if a.kind == "precision"]
        if self.side == "residual":
            self.options.append(Option("key", self.key_index))
        #: The highest precision member (what a row runs when it may not take its action).
        self.top_index = next(i for i, a in enumerate(actions)
                              if a.precision == (scheme.keyframe if self.side == "frame"
                                                 else scheme.residual))
        self.stream = _Stream()

    # ------------------------------------------------------------------ state
    def reset(self, rows: Tensor | None = None) -> None:
        """Forget the streams (``rows``: a bool ``[B]`` mask of the streams to restart)."""
        if rows is None or self.stream.phase is None:
            self.stream = _Stream()
            return
        stream = self.stream
        stream.phase = torch.where(rows, torch.zeros_like(stream.phase), stream.phase)
        if stream.policy_state is not None:
            # Zeros are a fresh stream in every entry of the policy state (LSTM h, c and the
            # previous downsampled frame alike).
            keep = (~rows).to(stream.policy_state[0].dtype)
            stream.policy_state = tuple(t * keep.view(-1, *([1] * (t.dim() - 1)))
                                        for t in stream.policy_state)

    # ------------------------------------------------------------------ running
    def forward(self, qm: Any, video: Tensor, fresh: bool = True) -> Any:
        """A clip ``[B, T, ...]``; outputs stacked on dim 1. ``fresh``: a new clip (state reset
        first, autograd kept across its frames, references detached at the end), else the
        clip continues the streams frame by frame as :meth:`step` does (``step_clip``)."""
        saved = self.stream.snapshot()
        refs = {n: s.ref for n, s in qm._states.items()}
        if fresh:
            for state in qm._states.values():
                state.reset()
            self.stream = _Stream()
        try:
            outs, records = [], []
            for t in range(video.shape[1]):
                out, record = self._frame(qm, video[:, t], detach=not fresh)
                outs.append(out)
                records.append(record)
        except BaseException:
            self.stream.restore(saved)
            for name, state in qm._states.items():
                state.ref = refs[name]
            raise
        self._record(qm, records)
        self._detach(qm)
        # Each output leaf stacked on a new time dim 1, in the model's output structure.
        per_frame = [tree_flatten(out)[0] for out in outs]
        stacked = [torch.stack(leaves, 1) for leaves in zip(*per_frame)]
        return tree_unflatten(stacked, tree_flatten(outs[0])[1])

    def step(self, qm: Any, frame: Tensor) -> Any:
        """Continue every stream with one frame ``[B, ...]``."""
        saved = self.stream.snapshot()
        refs = {n: s.ref for n, s in qm._states.items()}
        try:
            out, record = self._frame(qm, frame, detach=True)
        except BaseException:
            self.stream.restore(saved)
            for name, state in qm._states.items():
                state.ref = refs[name]
            raise
        self._record(qm, [record])
        return out

    def _detach(self, qm: Any) -> None:
        for state in qm._states.values():
            state.detach()
        stream = self.stream
        if stream.policy_state is not None:
            stream.policy_state = tuple(t.detach() for t in stream.policy_state)  # type: ignore
        if stream.last_out is not None:
            stream.last_out = [t.detach() for t in stream.last_out]

    def _frame(self, qm: Any, frame: Tensor, detach: bool) -> tuple[Any, dict[str, Any]]:
        """One frame of every stream; commits the state on success."""
        policy = qm.frame_policy
        stream = self.stream
        rows = frame.shape[0]
        device = frame.device
        phase = stream.phase if stream.phase is not None else torch.zeros(rows, dtype=torch.long)
        scheduled = ((phase == 0) | (phase >= self.period)).to(device)
        if self.side == "frame":  # frame quantization: every frame runs its chosen precision
            scheduled = torch.zeros_like(scheduled)
        seen = (phase > 0).to(device)
        logits, policy_state = policy(frame, stream.policy_state)
        allowed = torch.ones(rows, self.num_actions, dtype=torch.bool, device=device)
        if self.skip_index is not None:
            allowed[:, self.skip_index] = seen
        samples = policy.sample(logits, allowed)
        refused = (samples.detach() * (~allowed).to(samples.dtype)).sum(-1) > 0
        if bool(refused.any()):  # a forced action a row may not take: its highest member
            fallback = torch.zeros_like(samples)
            fallback[:, self.top_index] = 1.0
            samples = torch.where(refused.unsqueeze(1), fallback, samples)
        chosen = samples.detach().argmax(-1)
        # The mixing weights of the options that run the model, and of skip.
        weights = self._option_weights(samples, scheduled)
        run = weights.detach() != 0 if not policy.training else self._allowed_options(
            allowed, scheduled, seen)
        passes: list[_Pass] = []
        spec = stream.spec
        for j, option in enumerate(self.options):
            idx = run[:, j].nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            calls: dict[str, Any] = {}
            executors = {name: _OptionLayer(name, self, qm._states[name].ref, idx, option,
                                            calls) for name in qm._states}
            with attached(qm.resq_layers(), executors.__getitem__):
                out = qm.model(frame.index_select(0, idx).clone())
            leaves, spec = tree_flatten(out)
            passes.append(_Pass(idx, leaves, j, calls))
        mixed = self._mix(passes, weights, rows)
        # ---- commit (nothing above changed the state)
        key_rows = self._key_rows(chosen, scheduled)
        self._commit_references(qm, passes, key_rows, detach)
        stream.phase = torch.where(key_rows.cpu(), torch.ones_like(phase), phase + 1)
        stream.policy_state = (tuple(t.detach() for t in policy_state) if detach  # type: ignore
                               else policy_state)
        stream.last_out = [t.detach() for t in mixed] if detach else mixed
        stream.spec = spec
        policy_key = (chosen == self.key_index if self.key_index is not None
                      else torch.zeros_like(scheduled))
        record = {"passes": passes, "chosen": chosen, "forced": scheduled & ~policy_key,
                  "key": key_rows, "logits": logits, "samples": samples,
                  "policy_bops": float(policy.bops(tuple(frame.shape[1:])))}
        return tree_unflatten(mixed, spec), record

    def _option_of_action(self) -> dict[int, int]:
        """Family action index -> option column (skip has none)."""
        return {o.index: j for j, o in enumerate(self.options) if o.index is not None}

    def _option_weights(self, samples: Tensor, scheduled: Tensor) -> Tensor:
        """``[B, options + 1]``: the samples' weights per option (last column: skip); rows the
        schedule makes keyframes run ``key`` with weight 1."""
        rows = samples.shape[0]
        columns = []
        for option in self.options:
            if option.kind == "key" and option.index is None:
                columns.append(samples.new_zeros(rows))
            else:
                columns.append(samples[:, option.index])
        columns.append(samples[:, self.skip_index] if self.skip_index is not None
                       else samples.new_zeros(rows))
        weights = torch.stack(columns, 1)
        if self.side == "residual":
            forced = torch.zeros_like(weights)
            forced[:, len(self.options) - 1] = 1.0
            weights = torch.where(scheduled.unsqueeze(1), forced, weights)
        return weights

    def _allowed_options(self, allowed: Tensor, scheduled: Tensor, seen: Tensor) -> Tensor:
        """Training: every option a row can compute runs on it (residuals need a reference)."""
        run = []
        for option in self.options:
            if option.kind == "key":
                run.append(torch.ones_like(scheduled))
            elif self.side == "residual":
                run.append(seen & ~scheduled & allowed[:, option.index])
            else:
                run.append(allowed[:, option.index])
        return torch.stack(run, 1)

    def _mix(self, passes: list[_Pass], weights: Tensor, rows: int) -> list[Tensor]:
        """Each row's output: the options' outputs weighted (one-hot in value), skip taking the
        previous output."""
        # Every row may skip (then nothing ran): the previous outputs give the shapes.
        first = passes[0].leaves if passes else self.stream.last_out
        assert first is not None, "a stream's first frame cannot skip"
        mixed = [leaf.new_zeros((rows, *leaf.shape[1:])) for leaf in first]
        for run in passes:
            idx = run.rows
            w = weights[:, run.column].index_select(0, idx)
            for k, leaf in enumerate(run.leaves):
                if leaf.dim() == 0 or leaf.shape[0] != idx.numel():
                    raise RuntimeError("a family scheme needs model outputs with one row per "
                                       f"stream, got an output of shape {tuple(leaf.shape)}")
                scale = w.view(-1, *([1] * (leaf.dim() - 1))).to(leaf.dtype)
                mixed[k] = mixed[k].index_add(0, idx, leaf * scale)
        if self.skip_index is not None and self.stream.last_out is not None:
            w_skip = weights[:, -1]
            for k, prev in enumerate(self.stream.last_out):
                scale = w_skip.view(-1, *([1] * (prev.dim() - 1))).to(prev.dtype)
                # Rows that cannot skip have weight 0 and a previous output of the same shape.
                mixed[k] = mixed[k] + prev * scale
        return mixed

    def _key_rows(self, chosen: Tensor, scheduled: Tensor) -> Tensor:
        """Bool ``[B]``: rows run as keyframes (frame family: every row that ran)."""
        if self.side == "frame":
            if self.skip_index is None:
                return torch.ones_like(scheduled)
            return chosen != self.skip_index
        policy_key = (chosen == self.key_index) if self.key_index is not None else (
            torch.zeros_like(scheduled))
        return scheduled | policy_key

    def _commit_references(self, qm: Any, passes: list[_Pass], key_rows: Tensor,
                           detach: bool) -> None:
        """Residual families: the keyframe rows' layer inputs and outputs become their
        references."""
        if self.side != "residual":
            return
        key_option = len(self.options) - 1
        for run in passes:
            if run.column != key_option:
                continue
            idx = run.rows
            take = key_rows.index_select(0, idx).nonzero().squeeze(1)
            rows = idx.index_select(0, take)
            for name, state in qm._states.items():
                _, _, x, z = run.calls[name]
                x, z = x.index_select(0, take), z.index_select(0, take)
                if detach:
                    x, z = x.detach(), z.detach()
                if state.ref is None or rows.numel() == key_rows.numel():
                    if rows.numel() != key_rows.numel():
                        raise RuntimeError(f"ResQ layer {name!r} has no reference for the "
                                           "streams that did not take a keyframe")
                    state.ref = Reference(x.index_select(0, torch.argsort(rows)),
                                          z.index_select(0, torch.argsort(rows)))
                else:
                    state.ref = Reference(state.ref.x.index_copy(0, rows, x),
                                          state.ref.z.index_copy(0, rows, z))

    # ------------------------------------------------------------------ reports
    def _record(self, qm: Any, records: list[dict[str, Any]]) -> None:
        """``last_cost``, ``last_actions``, ``last_keyframes``, ``last_refreshes``,
        ``last_row_bops`` and ``last_policy``."""
        names = [n for n, _ in qm.resq_layers()]
        per_frame, per_frame_policy, row_bops = [], [], []
        per_layer = dict.fromkeys(names, 0.0)
        macs: dict[str, int] = {}
        option_of = self._option_of_action()
        option_bops: dict[int, float] = {}
        actions = []
        for record in records:
            chosen = record["chosen"].cpu()
            scheduled = record["forced"].cpu()
            rows = chosen.numel()
            # The option each row ran: its chosen action's, or key where the schedule said so.
            column = torch.tensor([option_of.get(int(a), -1) for a in chosen])
            if self.side == "residual":
                column = torch.where(scheduled, torch.full_like(column, len(self.options) - 1),
                                     column)
            bops = torch.zeros(rows, dtype=torch.float64)
            for run in record["passes"]:
                option_bops[run.column] = run.bops
                mine = (column == run.column).double()
                for name, (layer_macs, layer_bops, _, _) in run.calls.items():
                    macs[name] = layer_macs
                    bops += mine * layer_bops
                    per_layer[name] += float(mine.mean()) * layer_bops
            policy = record["policy_bops"]
            total = bops + policy
            row_bops.append(total)
            per_frame.append(float(total.mean()))
            per_frame_policy.append(policy)
            actions.append(torch.where(scheduled, torch.full_like(chosen, SCHEDULED_KEYFRAME),
                                       chosen))
        frames = len(records)
        key = torch.stack([r["key"].cpu() for r in records], 1)
        qm.last_cost = CostReport(
            notation=qm.notation, per_frame=per_frame,
            per_layer={n: v / frames for n, v in per_layer.items()}, macs=macs,
            keyframe_share=float(key.double().mean()), per_frame_policy=per_frame_policy)
        qm.last_actions = torch.stack(actions, 1)
        qm.last_keyframes = key
        qm.last_refreshes = torch.stack(
            [(r["chosen"].cpu() == self.key_index) & ~r["forced"].cpu()
             if self.key_index is not None else torch.zeros_like(r["key"].cpu())
             for r in records], 1)
        qm.last_row_bops = torch.stack(row_bops, 1)
        qm.last_bit_maps = {}
        # Eq. 10's cost of each action: its option's BOPs per row (NaN if it never ran).
        action_bops = torch.full((self.num_actions,), float("nan"), dtype=torch.float64)
        for action, column in option_of.items():
            if column in option_bops:
                action_bops[action] = option_bops[column]
        if self.skip_index is not None:
            action_bops[self.skip_index] = 0.0
        qm.last_policy = PolicyRecord(torch.stack([r["logits"] for r in records], 1),
                                      torch.stack([r["samples"] for r in records], 1),
                                      action_bops)

"""The host loop of a family-scheme export: the policy graph, then the chosen action's graph.

:class:`PolicyOnnxStream` drives what :func:`resq_brevitas.deploy.policy_export.export_family`
wrote, frame by frame, as :class:`~resq_brevitas.temporal.actions.ActionExecutor` runs the
PyTorch model in eval::

    stream = OnnxStream("out/videoiq")       # a PolicyOnnxStream: the manifest has a policy
    y = stream.run(video)                    # [B, T, ...]
    stream.last_actions                      # [B, T] chosen action per row and frame

Each frame of each stream (batch row):

1. the policy graph reads the frame and the row's LSTM state ``(h, c)`` (zeros at the start)
   and returns the logits and the next state, which is carried to the next frame;
2. the action is the argmax of the logits, with ``skip`` masked out until the row has an
   output (or the exported ``forced_action``); an action the row may not take becomes the
   highest precision member, as in PyTorch;
3. the row runs its action's graph: a frame family's member graph; for a residual family the
   keyframe graph when the schedule says so (the stream's first frame, or ``period`` frames
   after the row's last keyframe; recorded as action ``-1``, like
   :data:`~resq_brevitas.temporal.actions.SCHEDULED_KEYFRAME`, unless the policy chose
   ``key`` itself) or for ``key``, else the
   member's residual graph on the row's ResQ state; ``skip`` reuses the row's last output and
   state.

Graphs have the static batch of the export. When the rows of one call take different actions,
each graph needed runs on the whole batch and every row keeps the rows of its own action (a
row's result does not depend on the other rows: quantizer ranges are calibrated constants).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from resq_brevitas.deploy.runtime import DEFAULT_OPTIMIZATION, OnnxStream

__all__ = ["SCHEDULED_KEYFRAME", "PolicyOnnxStream"]

#: ``last_actions`` of a row the schedule made a keyframe (the policy did not choose it); the
#: value of :data:`resq_brevitas.temporal.actions.SCHEDULED_KEYFRAME`.
SCHEDULED_KEYFRAME = -1


class PolicyOnnxStream(OnnxStream):
    """Run an export with a learned frame policy over frames (see the module doc).

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

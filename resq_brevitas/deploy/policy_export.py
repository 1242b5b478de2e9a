"""Export of a family-scheme model with a learned frame policy (VideoIQ, issue 10 item 7).

:func:`resq_brevitas.export` hands a model whose scheme is a family (``{W8A8,W4A4,W2A2,skip}``
or ``W8A8->{W8A4,W4A4,skip,key}``) to :func:`export_family`, which writes the policy network as
its own graph next to one step graph per action::

    out_dir/policy.onnx            policy(frame, policy.h, policy.c[, policy.previous])
                                       -> (logits, policy.h_out, policy.c_out
                                           [, policy.previous_out])
    frame family ({W8A8,W4A4,W2A2,skip}):
    out_dir/keyframe.onnx          the highest member: keyframe(frame) -> output
    out_dir/frame_W4A4.onnx        every other member: frame(frame) -> output
    residual family (W8A8->{W8A4,W4A4,skip,key}):
    out_dir/keyframe.onnx          keyframe(frame) -> (output, *state)         (also "key")
    out_dir/residual.onnx          the highest residual member, as a fixed export's
    out_dir/residual_W4A4.onnx     every other member: residual(frame, *state)
                                       -> (output, *state_out)
    out_dir/manifest.json          ``actions`` (logit order, the graph of each, ``null`` for
                                   skip), ``policy`` (its graph, state, the choice rule)

Frame-family graphs carry no state (every frame is computed from the frame alone), so they
output the model output only. The policy's state is the LSTM's ``(h, c)`` and, when its
``inputs`` use the difference to the previous frame, the previous downsampled frame
``policy.previous`` ``[B, C, s, s]``; zeros in every entry start a stream. ``skip`` has no
graph: the host reuses the previous output. The host loop
(:class:`~resq_brevitas.deploy.runtime.PolicyOnnxStream`, which ``OnnxStream(out_dir)`` opens
for such a folder) runs the policy graph, then the chosen action's graph, each frame, as
:class:`~resq_brevitas.temporal.actions.ActionExecutor` does.

Weights. A lower member's any-precision weight (VideoIQ section 3.4: the keyframe's ``b_1``-bit
integer truncated by ``k`` bits, then mean-aligned) is ``s_1 2^k q_b + offset``: the offset puts
it off the ``b``-bit grid, so neither QCDQ's ``DequantizeLinear`` of an integer nor a QONNX
``Quant`` node at ``b`` bits can express it (Brevitas's handlers refuse it, or would re-quantize
it from float). Each action graph therefore stores its own float32 copy of its truncated
weights, exact to PyTorch (``manifest.actions[i].weights`` says so per action); the keyframe
graph and separately quantized residual weights keep their integer form. A deployed model that
wants one integer copy of ``q_1`` computes the views on the device.

The policy network is float (its cost is counted at fp32, like the PyTorch model reports it);
its graph is plain ONNX in either format. ``opset`` and the formats are those of
:func:`resq_brevitas.export`; the FINN rewrite applies to the step graphs of ``qonnx``, not to
the policy (a host-side float network).
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from resq_brevitas.deploy import graph_writer as ox
from resq_brevitas.deploy.manifest import ActionEntry, GraphIO, Manifest, PolicyEntry
from resq_brevitas.deploy.outputs import FlatOutputs, flatten_output, leaf_names
from resq_brevitas.deploy.steps import step_modules
from resq_brevitas.quant.any_precision import TruncatedIntQuant
from resq_brevitas.temporal.model import ResQModel

__all__ = [
    "LOGITS_NAME",
    "POLICY_GRAPH",
    "POLICY_STATE",
    "PREVIOUS_FRAME_STATE",
    "PolicyStep",
    "export_family",
    "freeze_truncated_weights",
]

#: ``files`` key (and file stem) of the policy graph.
POLICY_GRAPH = "policy"
#: Names of the policy's LSTM state in its graph (outputs: ``name + "_out"``).
POLICY_STATE = ("policy.h", "policy.c")
#: Name of the previous downsampled frame, the policy state's third entry when its inputs need it.
PREVIOUS_FRAME_STATE = "policy.previous"
#: The policy graph's first output.
LOGITS_NAME = "logits"


class PolicyStep(nn.Module):
    """The policy network as a graph with explicit state:
    ``(frame, *state) -> (logits, *state')``, the state of
    :data:`~resq_brevitas.policy.learned.PolicyState` (``h, c`` and, if the inputs need it, the
    previous downsampled frame), named by :meth:`state_names`.

    Zeros in every state entry are a fresh stream (``nn.LSTMCell``'s default state, and a black
    previous frame, as the PyTorch policy assumes).

    Args:
        network: A :class:`~resq_brevitas.policy.learned.FramePolicyNetwork`.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def state_names(self) -> tuple[str, ...]:
        """Graph names of the state inputs (outputs: ``name + "_out"``)."""
        previous = (PREVIOUS_FRAME_STATE,) if self.network.inputs.keeps_previous else ()
        return (*POLICY_STATE, *previous)

    def forward(self, frame: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        logits, state_next = self.network(frame, tuple(state))
        return (logits, *state_next)


class _OutputOnly(nn.Module):
    """A keyframe step module without its state: ``x -> (output,)`` (frame-family graphs)."""

    def __init__(self, step: nn.Module) -> None:
        super().__init__()
        self.step = step

    def forward(self, x: Tensor) -> tuple[Any]:
        return (self.step(x)[0],)


def freeze_truncated_weights(module: nn.Module) -> list[str]:
    """Replace every truncated any-precision weight in ``module`` by a float copy of its value.

    For a private export copy only: each layer whose weight quantizer is a
    :class:`~resq_brevitas.quant.any_precision.TruncatedIntQuant` gets its own ``Parameter``
    holding the truncated, mean-aligned weight it computes now, and that quantizer is disabled,
    so the exported graph stores the weight PyTorch uses, bit for bit (see the module doc for
    why no integer form exists). The layer's tie to the keyframe weight is cut in the copy.

    Returns:
        The names of the layers changed.
    """
    changed = []
    for name, layer in module.named_modules():
        proxy = getattr(layer, "weight_quant", None)
        if not isinstance(getattr(proxy, "tensor_quant", None), TruncatedIntQuant):
            continue
        with torch.no_grad():
            value = layer.quant_weight().value.detach().clone()
        layer.weight = nn.Parameter(value, requires_grad=False)
        proxy.disable_quant = True
        changed.append(name)
    return changed


def _weights_note(action: Any, frozen: list[str], key_bits: int) -> str:
    if frozen:
        bits = action.precision.weight_bits
        return (f"float32 copy of the {bits}-bit any-precision weights (the keyframe's "
                f"{key_bits}-bit integer truncated by {key_bits - bits} LSBs, mean-aligned; off "
                f"the {bits}-bit grid, so stored as float) in {len(frozen)} layers; the "
                "other layers' own integer weights")
    return "the layers' own quantized weights (integer, as in a fixed-precision export)"


def _recipe(side: str, period: int, outputs: list[str], policy_names: tuple[str, ...]
            ) -> list[str]:
    feeds = ", ".join(f"'{name}': {name.split('.')[-1]}" for name in policy_names)
    lines = [
        "Keep per stream (batch row) a phase p (0 at the start), the policy state "
        f"{list(policy_names)} (zeros at the start), the ResQ state S and the last output.",
        f"Each frame: first run {POLICY_GRAPH}.onnx with {{'frame': frame, {feeds}}}; the "
        "policy state = its state outputs.",
        "Choose per row: forced_action if set, else argmax(logits) with skip masked out while "
        "p == 0 (no output yet); a chosen action that is not allowed becomes top_index.",
    ]
    if side == "frame":
        lines.append("Run the chosen action's graph on the frame (skip: reuse the row's last "
                     "output); p = 1 after a row ran a graph, p + 1 after a skip.")
    else:
        lines += [
            f"If p == 0 or p >= {period}: the row runs keyframe.onnx whatever the policy chose "
            "(the schedule; reported as action -1).",
            "Else: 'key' runs keyframe.onnx, a precision its residual graph with the row's "
            "state S, 'skip' reuses the row's last output and keeps S.",
            "Rows that ran keyframe.onnx take its state outputs as S and set p = 1; the others "
            "p + 1.",
        ]
    lines += [
        f"The output of a frame is {outputs}; rows of one call may run different graphs (each "
        "graph then runs on the whole batch and every row takes its own action's rows).",
        "resq_brevitas.deploy.OnnxStream(out_dir) does exactly this.",
    ]
    return lines


def export_family(qm: ResQModel, frame: Tensor, out: Path, format: str, *, finn: bool,
                  opset: int | None, check: bool) -> Manifest:
    """Write the policy graph, one step graph per action and ``manifest.json``.

    Called by :func:`resq_brevitas.export` once it has checked its arguments.

    Args:
        qm: A calibrated ResQ model with a family scheme (``qm.frame_policy`` set).
        frame: The example frame ``[B, C, H, W]`` on the model's device.
        out: The output directory.
        format: ``"qcdq"`` or ``"qonnx"``.
        finn: ``qonnx``: rewrite the step graphs for FINN's builder.
        opset: As :func:`resq_brevitas.export`.
        check: Compare every graph with PyTorch on the example frame (``manifest.parity``).

    Returns:
        The manifest (also written).

    Raises:
        ValueError: The policy or a step graph does not run on ``frame``, or has no ONNX form
            (e.g. the policy's ``input_size`` does not divide the frame's height and width).
    """
    scheme = qm.scheme
    side = scheme.family_side
    actions = scheme.family
    network = qm.frame_policy
    assert network is not None and side is not None
    # The member the layers' own paths serve (ActionExecutor's fallback for a refused action).
    top_precision = scheme.keyframe if side == "frame" else scheme.residual
    top = next(i for i, a in enumerate(actions) if a.precision == top_precision)
    size = network.settings.input_size
    if frame.dim() == 4 and (frame.shape[-2] % size or frame.shape[-1] % size):
        # torch's ONNX form of adaptive average pooling is an AvgPool: whole windows only.
        raise ValueError(
            f"example_frame: the frame policy's input_size={size} must divide the frame's height "
            f"and width to export its downsampling (an AvgPool of whole windows); got a frame "
            f"of shape {tuple(frame.shape)}"
        )
    policy = PolicyStep(copy.deepcopy(network)).eval()
    policy_names = policy.state_names()
    zeros = network.initial_state(frame)
    try:
        with torch.no_grad():
            logits, *policy_state = policy(frame, *zeros)
    except Exception as err:
        raise ValueError(f"example_frame of shape {tuple(frame.shape)} does not run through "
                         f"the frame policy: {err}") from err

    base = step_modules(qm, frame)
    # graph kind -> a private copy of its step module; action index -> graph kind (None: skip)
    modules: dict[str, nn.Module] = {}
    frozen: dict[str, list[str]] = {}
    graph_of: dict[int, str | None] = {}
    for i, action in enumerate(actions):
        if action.kind == "skip":
            graph_of[i] = None
        elif action.kind == "key":
            graph_of[i] = "keyframe"
        elif side == "frame":
            kind = "keyframe" if i == top else f"frame_{action.precision}"
            step = base.keyframe if i == top else step_modules(qm, frame, member=i).keyframe
            modules[kind] = _OutputOnly(copy.deepcopy(step)).eval()
            graph_of[i] = kind
        else:
            kind = "residual" if i == top else f"residual_{action.precision}"
            step = base.residual if i == top else step_modules(qm, frame, member=i).residual
            modules[kind] = copy.deepcopy(step).eval()
            graph_of[i] = kind
    if side == "residual":
        modules["keyframe"] = copy.deepcopy(base.keyframe).eval()
    for kind, module in modules.items():
        frozen[kind] = freeze_truncated_weights(module)
        ox.exportable_attention(module)  # as the fixed export: no fused attention fast path

    state_names = [spec.name for spec in base.state] if side == "residual" else []
    out_names = [n + ox.STATE_OUT_SUFFIX for n in state_names]
    try:
        with torch.no_grad():
            results = {"keyframe": modules["keyframe"](frame)}
            key_state = results["keyframe"][1:] if side == "residual" else ()
            for kind, module in modules.items():
                if kind != "keyframe":
                    results[kind] = module(frame, *key_state) if side == "residual" else (
                        module(frame))
    except Exception as err:
        raise ValueError(
            f"example_frame of shape {tuple(frame.shape)} does not run through the model: {err}"
        ) from err
    leaves, structure = flatten_output(results["keyframe"][0])
    outputs = leaf_names(structure)

    files = {POLICY_GRAPH: f"{POLICY_GRAPH}.onnx", **{kind: f"{kind}.onnx" for kind in modules}}
    ios: dict[str, GraphIO] = {POLICY_GRAPH: GraphIO(
        [ox.FRAME_NAME, *policy_names],
        [LOGITS_NAME, *(n + ox.STATE_OUT_SUFFIX for n in policy_names)])}
    for kind in modules:
        if side == "frame":
            ios[kind] = GraphIO([ox.FRAME_NAME], list(outputs))
        elif kind == "keyframe":
            ios[kind] = GraphIO([ox.FRAME_NAME], [*outputs, *state_names])
        else:
            ios[kind] = GraphIO([ox.FRAME_NAME, *state_names], [*outputs, *out_names])
    policy_job = (policy, (frame, *zeros), out / files[POLICY_GRAPH],
                  ios[POLICY_GRAPH].inputs, ios[POLICY_GRAPH].outputs)
    jobs = []
    for kind, module in modules.items():
        args = (frame,) if side == "frame" or kind == "keyframe" else (frame, *key_state)
        jobs.append((FlatOutputs(module), args, out / files[kind], ios[kind].inputs,
                     ios[kind].outputs))

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    reports: dict[str, Any] = {}
    try:
        used_opset = ox.export_graphs(format, jobs, opset)
        # The policy has no Brevitas layers: exported without the QONNX domain (which it would
        # not use), at the step graphs' opset.
        ox.export_graphs("qcdq", [policy_job], used_opset)
        for kind, name in files.items():
            if format == "qonnx":
                ox.cleanup_qonnx(out / name)
                if finn and kind != POLICY_GRAPH:
                    reports[kind] = ox.prepare_graph_for_finn(out / name)
            else:
                ox.check_onnx(out / name)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    ios = {kind: GraphIO(io.inputs, io.outputs, reports.get(kind, {}).get("aliases", {}))
           for kind, io in ios.items()}

    key_bits = scheme.keyframe.weight_bits
    entries = []
    for i, action in enumerate(actions):
        kind = graph_of[i]
        note = (None if kind is None else "the keyframe's weights" if action.kind == "key"
                else _weights_note(action, frozen[kind], key_bits))
        entries.append(ActionEntry(i, str(action), action.kind, kind,
                                   files[kind] if kind is not None else None, note))
    skip = next((i for i, a in enumerate(actions) if a.kind == "skip"), None)
    key = next((i for i, a in enumerate(actions) if a.kind == "key"), None)
    manifest = Manifest(
        format=format,
        period=qm.period if side == "residual" else 1,
        files=files,
        config=qm.config.to_dict(),
        scheme=qm.notation,
        input=ox.tensor_entry(ox.FRAME_NAME, frame),
        output=ox.tensor_entry(outputs[0], leaves[0]),
        outputs=[ox.tensor_entry(name, leaf) for name, leaf in zip(outputs, leaves)],
        output_structure=structure,
        state=[ox.tensor_entry(spec.name, t, spec.layer, spec.kind)
               for spec, t in zip(base.state, key_state)],
        keyframe=ios["keyframe"],
        residual=ios.get("residual"),
        reference=qm.config.reference,
        threshold=qm.mode.threshold,
        opset=used_opset,
        exporter="torch.onnx.export(dynamo=False) + Brevitas "
                 + ("QONNXManager handlers, qonnx cleanup" if format == "qonnx"
                    else "StdQCDQONNXManager handlers")
                 + "; policy graph: plain ONNX (float)",
        graph_source=base.source,
        how_to_drive=_recipe(side, qm.period, outputs, policy_names),
        finn={kind: {k: v for k, v in report.items() if k != "aliases"}
              for kind, report in reports.items()},
        actions=entries,
        policy=PolicyEntry(
            graph=POLICY_GRAPH, side=side,
            logits=ox.tensor_entry(LOGITS_NAME, logits),
            state=[ox.tensor_entry(name, t) for name, t in zip(policy_names, policy_state)],
            skip_index=skip, key_index=key, top_index=top,
            forced_action=network.forced_action,
            how_to_choose=_recipe(side, qm.period, outputs, policy_names)[2:3]),
        graphs={kind: io for kind, io in ios.items() if kind not in ("keyframe", "residual")},
    )
    manifest.write(out)
    if check:
        manifest.parity = _check(out, manifest, policy, (frame, *zeros), modules, frame,
                                 key_state)
        manifest.write(out)
    return manifest


def _check(out: Path, manifest: Manifest, policy: nn.Module, policy_args: tuple[Tensor, ...],
           modules: dict[str, nn.Module], frame: Tensor, key_state: tuple[Tensor, ...]
           ) -> dict[str, Any]:
    """Every graph against its PyTorch module: the policy and the keyframe graph on the example
    frame, the other step graphs on the next frame (:func:`~resq_brevitas.deploy.parity.
    next_frame`) from the keyframe's state (residual family) or alone (frame family)."""
    from resq_brevitas.deploy.parity import _flat, check_graphs, next_frame

    second = next_frame(frame)
    names = manifest.state_names
    cases = {}
    with torch.no_grad():
        cases[POLICY_GRAPH] = (
            [t.cpu().numpy() for t in policy(*policy_args)],
            dict(zip(manifest.io(POLICY_GRAPH).inputs, (t.cpu().numpy() for t in policy_args))))
        for kind, module in modules.items():
            x = frame if kind == "keyframe" else second
            args = (x,) if kind == "keyframe" or not names else (x, *key_state)
            feeds = {manifest.input.name: x.cpu().numpy(),
                     **({n: t.cpu().numpy() for n, t in zip(names, key_state)}
                        if kind != "keyframe" else {})}
            cases[kind] = (_flat(module(*args)), feeds)
    return {"frames": "policy and keyframe graphs on example_frame; the other action graphs on "
                      "example_frame shifted by one pixel along the last dim (residual graphs "
                      "from the keyframe's state)",
            **check_graphs(out, manifest, cases)}

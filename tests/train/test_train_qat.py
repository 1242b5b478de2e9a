"""``train_qat``: distillation, the user's loss, schedule/history/checkpoints, pools, RRM chunks."""

from __future__ import annotations

import pytest
import torch

import resq_brevitas as resq
from resq_brevitas.train import FloatTeacher, build_optimizer, distillation_loss, qat_step
from tests.helpers import make_clip, make_tiny_segnet


def _clip(batch: int, frames: int, seed: int) -> torch.Tensor:
    return make_clip(batch, frames, size=8, seed=seed, drift=0.4)


def _model(scheme: str = "W8A8->W2A2", **config: object) -> tuple[torch.nn.Module,
                                                                  resq.ResQModel]:
    float_model = make_tiny_segnet(0)
    qm = resq.convert(float_model, resq.ResQConfig(scheme=scheme, period=4, **config))
    resq.calibrate(qm, [_clip(2, 8, seed=s) for s in range(2)], samples=16, progress=False)
    return float_model, qm


def _sqnr(qm: resq.ResQModel, float_model: torch.nn.Module, clips: list[torch.Tensor]) -> float:
    signal = noise = 0.0
    with torch.no_grad():
        for clip in clips:
            ref = float_model(clip.flatten(0, 1)).unflatten(0, clip.shape[:2])
            out = qm(clip)
            signal += float(ref.square().sum())
            noise += float((out - ref).square().sum())
    return 10 * torch.log10(torch.tensor(signal / noise)).item()


def _distillation(qm: resq.ResQModel, float_model: torch.nn.Module,
                  clips: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return sum(float(distillation_loss(
            qm(c), float_model(c.flatten(0, 1)).unflatten(0, c.shape[:2]))) for c in clips)


def test_float_teacher_is_the_float_model() -> None:
    float_model, qm = _model()
    clip = _clip(2, 5, seed=9)
    expected = float_model(clip.flatten(0, 1)).unflatten(0, (2, 5))
    torch.testing.assert_close(FloatTeacher(qm)(clip), expected, rtol=1e-5, atol=1e-5)


def test_distillation_lowers_the_loss_and_raises_held_out_sqnr() -> None:
    float_model, qm = _model()
    train = [_clip(2, 8, seed=20 + s) for s in range(4)]
    held_out = [_clip(2, 8, seed=40 + s) for s in range(2)]
    loss_before = _distillation(qm, float_model, train)
    sqnr_before = _sqnr(qm, float_model, held_out)
    history = resq.train_qat(qm, train, steps=60, lr=1e-3, scale_lr=3e-2, progress=False)
    assert history.steps == 60 and not qm.training and qm.training_phase == "zero"
    assert _distillation(qm, float_model, train) < 0.95 * loss_before
    # a tiny model at 2-bit residuals: a small but real gain on clips it never saw
    assert _sqnr(qm, float_model, held_out) > sqnr_before + 0.1


def test_user_loss_with_labels_and_checkpoints() -> None:
    float_model, qm = _model("W8A8->W4A4")
    torch.manual_seed(3)
    clips = [(c, torch.randint(0, 3, (2, 8, 8, 8))) for c in
             (_clip(2, 8, seed=50 + s) for s in range(3))]
    seen: list[tuple[int, int]] = []

    def loss_fn(outputs: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(outputs.flatten(0, 1), batch[1].flatten(0, 1))

    def evaluate() -> float:
        with torch.no_grad():
            return sum(float(loss_fn(qm(c), (c, y))) for c, y in clips)

    before = evaluate()
    history = resq.train_qat(qm, clips, loss_fn=loss_fn, steps=12, lr=1e-2, warmup=2,
                             checkpoint=lambda step, m, h: seen.append((step, h.steps)),
                             checkpoint_every=5, progress=False)
    assert evaluate() < before
    assert seen == [(5, 5), (10, 10), (12, 12)]
    # warm-up, then a cosine decay to 0: increasing, then decreasing, same shape for both groups
    assert history.lr[0] < history.lr[2] == pytest.approx(1e-2)
    assert all(a >= b for a, b in zip(history.lr[2:], history.lr[3:]))
    assert history.scale_lr == history.lr


def test_chunks_that_start_with_keyframes_give_the_whole_clip_gradient() -> None:
    _, qm = _model("W8A8->W4A4")
    qm.train()
    clip = _clip(2, 8, seed=60)
    teacher = FloatTeacher(qm)
    target = teacher(clip)
    grads = []
    for chunk in (None, 4):
        model = __import__("copy").deepcopy(qm)
        optimiser = build_optimizer(model, lr=0.0)
        qat_step(model, clip, optimiser,
                 lambda out, span: distillation_loss(out, target[:, span]),
                 max_grad_norm=None, chunk_frames=chunk)
        grads.append([p.grad.clone() for p in model.parameters()])
    for whole, chunked in zip(*grads):
        torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("config", [
    {"scheme": "W8A8->W4A{0,4,8}", "policy": resq.ErrorBoundPolicy(tau=1e-4)},
    {"scheme": "W8A8->W4A4", "reference": "previous"},
])
def test_pools_and_rrm_train(config: dict) -> None:
    float_model, qm = _model(**config)
    train = [_clip(2, 8, seed=70 + s) for s in range(3)]
    before = _distillation(qm, float_model, train)
    resq.train_qat(qm, train, steps=12, lr=3e-5, scale_lr=3e-3, chunk_frames=4, progress=False)
    # starting from good 4-bit PTQ ranges, small learning rates: a small, real improvement
    assert _distillation(qm, float_model, train) < before


def test_bad_arguments_are_reported() -> None:
    _, qm = _model("W8A8->W4A4")
    clips = [_clip(1, 4, seed=1)]
    with pytest.raises(ValueError, match="steps"):
        resq.train_qat(qm, clips, steps=0)
    with pytest.raises(ValueError, match="loss_fn or teacher"):
        resq.train_qat(qm, clips, steps=1, loss_fn=lambda o, b: o.sum(), teacher=FloatTeacher(qm))
    with pytest.raises(ValueError, match="distill"):
        resq.train_qat(qm, clips, steps=1, distill="l1")
    with pytest.raises(TypeError, match="qm"):
        resq.train_qat(qm.model, clips, steps=1)
    with pytest.raises(ValueError, match="clips"):
        resq.train_qat(qm, [], steps=1, progress=False)

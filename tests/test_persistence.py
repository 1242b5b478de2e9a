"""Persistence (issue 12 item 8): ``torch.save(qm)`` / ``torch.load(..., weights_only=False)``
round trips (Brevitas's run-time injectors do not pickle upstream; ResQ layers' proxies do), the
loaded model continues the saved stream, and ``state_dict`` round trips keep working."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from torch import nn

import resq_brevitas as resq
from resq_brevitas.quant.quantizers import InjectorRecipe, act_quant
from tests.helpers import make_all_layers_net, make_clip


def _round_trip(qm: resq.ResQModel) -> resq.ResQModel:
    buffer = io.BytesIO()
    torch.save(qm, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _calibrated(config: resq.ResQConfig, net: nn.Module | None = None) -> resq.ResQModel:
    qm = resq.convert(net if net is not None else make_all_layers_net(), config)
    resq.calibrate(qm, [make_clip(batch=1, frames=6, seed=1)], samples=6, candidates=4,
                   progress=False)
    return qm


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        return self.attn(t, t, t)[0]



CONFIGS = {
    "static-unsigned": resq.ResQConfig(period=3, act_signedness="auto"),
    "dynamic": resq.ResQConfig(scheme="W8A8->W8A{0,4,8}", period=3,
                               policy=resq.ErrorBoundPolicy(tau=1.0)),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_saved_model_loads_with_equal_outputs_and_continues_the_stream(name: str) -> None:
    qm = _calibrated(CONFIGS[name])
    clip = make_clip(batch=2, frames=7, seed=2)
    with torch.no_grad():
        qm(clip[:, :4])  # mid-stream: rows are between keyframes
        loaded = _round_trip(qm)
        assert loaded.in_stream and loaded.unsigned_inputs == qm.unsigned_inputs
        for t in range(4, 7):  # the stream continues identically (residual frames included)
            a, b = qm.step(clip[:, t]), loaded.step(clip[:, t])
            for key in a:
                torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)
        fresh = qm(clip)
        again = loaded(clip)
    for key in fresh:
        torch.testing.assert_close(again[key], fresh[key], rtol=0, atol=0)
    assert loaded.last_cost.per_frame == qm.last_cost.per_frame
    # The copy is independent: stepping one does not move the other.
    with torch.no_grad():
        loaded.step(clip[:, 0])
    assert not torch.equal(loaded.truncated_energy, qm.truncated_energy) or not torch.equal(
        loaded._stream.phase, qm._stream.phase)


def test_attention_model_pickles() -> None:
    torch.manual_seed(0)

    qm = _calibrated(resq.ResQConfig(period=2), Tokens().eval())
    clip = make_clip(batch=1, frames=3, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(_round_trip(qm)(clip), qm(clip), rtol=0, atol=0)


def test_saving_leaves_brevitas_proxy_types_exact() -> None:
    """Brevitas's export handlers match proxy types exactly: neither the saved model nor the
    loaded one may keep the picklable subclasses."""
    from brevitas.proxy.quant_proxy import QuantProxyFromInjector

    qm = resq.convert(make_all_layers_net())
    before = [type(m) for m in qm.modules() if isinstance(m, QuantProxyFromInjector)]
    loaded = _round_trip(qm)
    assert [type(m) for m in qm.modules() if isinstance(m, QuantProxyFromInjector)] == before
    assert [type(m) for m in loaded.modules() if isinstance(m, QuantProxyFromInjector)] == before
    assert all(t.__module__.startswith("brevitas.") for t in before)


def test_state_dict_round_trip_still_works() -> None:
    config = CONFIGS["static-unsigned"]
    qm = _calibrated(config)
    rebuilt = resq.convert(make_all_layers_net(), resq.ResQModel.config_from_state_dict(
        qm.state_dict()))
    rebuilt.load_state_dict(qm.state_dict())
    clip = make_clip(batch=1, frames=4, seed=4)
    with torch.no_grad():
        a, b = qm(clip), rebuilt(clip)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)


def test_injector_recipe_rebuilds_the_run_time_class() -> None:
    injector = act_quant(4).let(signed=False)
    recipe = pickle.loads(pickle.dumps(InjectorRecipe.of(injector)))
    rebuilt = recipe.build()
    assert rebuilt is not injector
    assert rebuilt.bit_width == 4 and rebuilt.signed is False
    with pytest.raises(pickle.PicklingError):
        pickle.dumps(injector)  # the upstream limitation the recipe works around

"""The configuration: scheme notation, validation, and serialisation round trips."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import resq_brevitas as resq
from tests.helpers import make_all_layers_net, make_clip


@pytest.mark.parametrize(
    "text,key,residual",
    [
        ("W8A8->W4A4", (8, (8,)), (4, (4,))),
        ("w8a8 -> w8a4", (8, (8,)), (8, (4,))),
        ("W4A4", (4, (4,)), None),
        ("fp32", (None, None), None),
        ("W8A8->W8A{0,4,8}", (8, (8,)), (8, (0, 4, 8))),
        ("fp32->W4A4", (None, None), (4, (4,))),
    ],
)
def test_scheme_notation_parses(text: str, key, residual) -> None:
    scheme = resq.Scheme.parse(text)
    assert (scheme.keyframe.weight_bits, scheme.keyframe.act_bits) == key
    if residual is None:
        assert scheme.residual is None and scheme.is_frame_quantization
    else:
        assert (scheme.residual.weight_bits, scheme.residual.act_bits) == residual
    assert resq.Scheme.parse(scheme.notation) == scheme


@pytest.mark.parametrize(
    "text",
    ["", "W8", "A8W8", "W8A8->", "->W4A4", "W8A8->W4A4->W2A2", "W1A1", "W8A17", "W8A{4,0}",
     "W8A{4,4}", "int8", "W0A8", "W8A0", "W08A8", "W8A8->W4A04", "W8A8->W8A{00,4}"],
)
def test_invalid_scheme_strings_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="scheme"):
        resq.ResQConfig(scheme=text)


def test_config_validation_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="period must be >= 1, got 0"):
        resq.ResQConfig(period=0)
    with pytest.raises(TypeError, match="period must be an int"):
        resq.ResQConfig(period=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="weight_granularity"):
        resq.ResQConfig(weight_granularity="row")
    with pytest.raises(ValueError,
                       match=r"execution must be one of \('dense', 'sparse'\), got 'fast'"):
        resq.ResQConfig(execution="fast")
    with pytest.raises(ValueError, match="reference"):
        resq.ResQConfig(reference="next")
    with pytest.raises(TypeError, match="scheme"):
        resq.ResQConfig(scheme=8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="candidates"):
        resq.LineSearch(candidates=1)
    with pytest.raises(TypeError, match="config"):
        resq.convert(make_all_layers_net(), "W8A8->W4A4")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="model"):
        resq.convert("not a model")  # type: ignore[arg-type]



def test_boolean_fields_refuse_non_booleans() -> None:
    for name in ("fold_bn", "strict", "error_feedback"):
        with pytest.raises(TypeError, match=f"{name} must be a bool, got str 'no'"):
            resq.ResQConfig(**{name: "no"})


def test_overrides_are_validated_and_matched_in_order() -> None:
    config = resq.ResQConfig("W8A8->W4A4", overrides=(
        resq.LayerOverride(("stem", "se.*"), "W8A8->W8A8"),
        resq.LayerOverride("se.fc2", "fp32")))
    assert config.scheme_of("stem").notation == "W8A8->W8A8"
    assert config.scheme_of("se.fc2").notation == "W8A8->W8A8"  # the first match wins
    assert config.scheme_of("head") == config.scheme
    assert config.notation == "W8A8->W4A4 [stem,se.*: W8A8->W8A8; se.fc2: fp32]"
    with pytest.raises(TypeError, match="layers must be a name pattern"):
        resq.LayerOverride((), "W8A8")
    with pytest.raises(ValueError, match="every frame a keyframe"):
        resq.ResQConfig("W8A8", overrides=(resq.LayerOverride("stem", "W8A8->W4A4"),))
    with pytest.raises(ValueError, match="needs a policy"):
        resq.ResQConfig(overrides=(resq.LayerOverride("stem", "W8A8->W8A{0,8}"),))
    with pytest.raises(TypeError, match="overrides must be a tuple"):
        resq.ResQConfig(overrides=("stem",))


precisions = st.sampled_from(["W8A8", "W6A6", "W4A4", "fp32"])
residuals = st.sampled_from(["W4A4", "W8A4", "W6A0", "W2A2", "fp32"])
refresh = st.lists(st.sampled_from([resq.FixedPeriodRefresh(), resq.SceneCutRefresh(0.3),
                                    resq.ErrorBudgetRefresh(0.05, degree=3),
                                    resq.ErrorBudgetRefresh(0.1, coefficients=(1.0, -2.5))]),
                   max_size=2, unique_by=type)


@st.composite
def configs(draw) -> resq.ResQConfig:
    """Every field and kind of value the test suite builds configs with."""
    key = draw(precisions)
    kind = draw(st.sampled_from(["frame", "static", "pool"]))
    policy = None
    if kind == "frame":
        scheme = key
    elif kind == "static":
        scheme = f"{key}->{draw(residuals)}"
    else:
        scheme = f"{key}->W8A{{0,4,8}}"
        policy = resq.ErrorBoundPolicy(draw(st.floats(0, 30)),
                                       draw(st.sampled_from(["pixel", "region", "frame"])),
                                       draw(st.integers(1, 8)))
    residual = kind != "frame"
    threshold = draw(st.sampled_from([0.0, 0.05])) if residual else 0.0
    chosen = draw(refresh) if residual else []
    if threshold == 0:
        chosen = [r for r in chosen if not isinstance(r, resq.ErrorBudgetRefresh)]
    overrides = ()
    if draw(st.booleans()):
        overrides = (resq.LayerOverride(("stem", "head*"), "W8A8->W8A8" if residual else "W8A8"),)
    return resq.ResQConfig(
        scheme=scheme, period=draw(st.integers(1, 64)),
        weight_granularity=draw(st.sampled_from(["tensor", "channel"])),
        reference=draw(st.sampled_from(["keyframe", "previous"])) if residual else "keyframe",
        policy=policy,
        calibration=resq.LineSearch(draw(st.integers(2, 40)), draw(st.integers(1, 256))),
        fold_bn=draw(st.booleans()), strict=draw(st.booleans()), threshold=threshold,
        refresh=tuple(chosen), error_feedback=draw(st.booleans()), overrides=overrides,
        act_signedness=draw(st.sampled_from(["signed", "auto"])),
        execution=draw(st.sampled_from(["dense", "sparse"])))


@settings(max_examples=150, deadline=None)
@given(configs())
def test_config_round_trips_through_a_dict(config: resq.ResQConfig) -> None:
    import json

    data = json.loads(json.dumps(config.to_dict()))  # strict JSON on the way
    assert resq.ResQConfig.from_dict(data) == config


def test_from_dict_refuses_other_versions_and_unknown_fields() -> None:
    data = resq.ResQConfig().to_dict()
    with pytest.raises(ValueError, match="config version 99"):
        resq.ResQConfig.from_dict({**data, "version": 99})
    with pytest.raises(ValueError, match=r"unknown ResQConfig fields \['colour'\]"):
        resq.ResQConfig.from_dict({**data, "colour": "red"})
    with pytest.raises(TypeError, match="mapping"):
        resq.ResQConfig.from_dict([("version", 1)])  # type: ignore[arg-type]


def test_saved_state_dict_restores_the_config_and_the_model() -> None:
    config = resq.ResQConfig("W8A8->W8A{0,4,8}", period=3, weight_granularity="channel",
                             policy=resq.ErrorBoundPolicy(tau=0.5, granularity="region", k=2),
                             overrides=(resq.LayerOverride("head", "W8A8->W8A8"),))
    net = make_all_layers_net()
    qm = resq.calibrate(resq.convert(net, config), [make_clip(batch=1, frames=4)[0]],
                        samples=4, candidates=4, progress=False)
    state = qm.state_dict()
    restored = resq.ResQModel.config_from_state_dict(state)
    assert restored == config
    rebuilt = resq.convert(net, restored)
    rebuilt.load_state_dict(state)
    clip = make_clip(frames=4, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(clip)["seg"], qm(clip)["seg"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="no ResQModel config"):
        resq.ResQModel.config_from_state_dict({})

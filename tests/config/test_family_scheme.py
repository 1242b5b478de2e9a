"""Family schemes (DESIGN section 4): ``{W8A8,W4A4,W2A2,skip}`` and ``W8A8->{...,skip,key}``."""

from __future__ import annotations

import pytest

import resq_brevitas as resq
from resq_brevitas.config import FrameAction, Precision, Scheme


def test_frame_family_parses_into_typed_actions():
    scheme = Scheme.parse("{W8A8,W4A4,W2A2,skip}")
    assert scheme.family == (FrameAction("precision", Precision(8, (8,))),
                             FrameAction("precision", Precision(4, (4,))),
                             FrameAction("precision", Precision(2, (2,))),
                             FrameAction("skip"))
    assert scheme.family_side == "frame" and scheme.is_frame_quantization
    assert scheme.keyframe == Precision(8, (8,)) and scheme.residual is None
    assert scheme.notation == "{W8A8,W4A4,W2A2,skip}"


def test_residual_family_parses_into_typed_actions():
    scheme = Scheme.parse(" W8A8 -> { W8A4, W4A4 ,W2A2,skip,KEY } ")
    assert [a.kind for a in scheme.family] == ["precision"] * 3 + ["skip", "key"]
    assert [str(a) for a in scheme.family] == ["W8A4", "W4A4", "W2A2", "skip", "key"]
    assert scheme.family_side == "residual"
    assert scheme.keyframe == Precision(8, (8,))
    assert scheme.residual == Precision(8, (4,))  # the highest member
    assert scheme.notation == "W8A8->{W8A4,W4A4,W2A2,skip,key}"
    assert Scheme.parse(scheme.notation) == scheme


def test_fixed_schemes_have_no_family():
    for text in ("W8A8->W4A4", "W4A4", "W8A8->W8A{0,4,8}", "fp32"):
        scheme = Scheme.parse(text)
        assert scheme.family == () and scheme.family_side is None and not scheme.is_family


@pytest.mark.parametrize("text,match", [
    ("{}", "between braces"),
    ("{W8A8,,W4A4}", "between braces"),
    ("{W8A8,W4A4", "precision must look like"),
    ("{skip,key}", "'key' needs residual frames|at least one precision"),
    ("{skip}", "at least one precision"),
    ("{W8A8,key}", "'key' needs residual frames"),
    ("{W8A8,W8A8}", "repeat"),
    ("{W8A8,W4A{0,4}}", "cannot be a pool"),
    ("{W8A8,fp32}", "quantized static precision"),
    ("{W8A8,W4A0}", "quantized static precision"),
    ("{W8A8,jump}", "precision must look like"),
    ("{W8A8}->W4A4", "whole scheme or its residual side"),
    ("W4A4->{W8A4,skip}", "more weight bits"),
    ("fp32->{W4A4,skip}", "quantized keyframe weights"),
    ("W8A8->{W4A4}->W2A2", "PREC->PREC"),
])
def test_malformed_families_raise_clear_value_errors(text, match):
    with pytest.raises(ValueError, match=match):
        Scheme.parse(text)


def test_family_config_round_trips_through_to_dict():
    for text in ("{W8A8,W4A4,W2A2,skip}", "W8A8->{W8A4,W4A4,W2A2,skip,key}"):
        cfg = resq.ResQConfig(scheme=text, period=6,
                              policy=resq.LearnedFramePolicy(channels=(4, 8), hidden=16))
        data = cfg.to_dict()
        assert data["scheme"] == text
        again = resq.ResQConfig.from_dict(data)
        assert again == cfg and again.scheme.family == cfg.scheme.family
        assert again.policy.channels == (4, 8)


def test_family_needs_the_per_frame_policy_and_the_policy_a_family():
    with pytest.raises(ValueError, match="per-frame policy"):
        resq.ResQConfig(scheme="{W8A8,W4A4,skip}")
    with pytest.raises(ValueError, match="per-frame policy"):
        resq.ResQConfig(scheme="{W8A8,W4A4,skip}", policy=resq.ErrorBoundPolicy())
    with pytest.raises(ValueError, match="family scheme"):
        resq.ResQConfig(scheme="W8A8->W4A4", policy=resq.LearnedFramePolicy())
    with pytest.raises(ValueError, match="reference='keyframe'"):
        resq.ResQConfig(scheme="W8A8->{W4A4,key}", reference="previous",
                        policy=resq.LearnedFramePolicy())
    with pytest.raises(ValueError, match="overrides"):
        resq.ResQConfig(scheme="W8A8->{W4A4,key}", policy=resq.LearnedFramePolicy(),
                        overrides=(resq.LayerOverride("head", "W8A8->W8A8"),))


@pytest.mark.parametrize("field,value,error", [
    ("channels", (), TypeError), ("channels", (4, 0), ValueError), ("hidden", 0, ValueError),
    ("temperature", 0.0, ValueError), ("input_size", 0, ValueError),
])
def test_learned_frame_policy_settings_are_checked(field, value, error):
    with pytest.raises(error, match=field):
        resq.LearnedFramePolicy(**{field: value})

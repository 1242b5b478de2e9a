"""Policies: Dynamic-ResQ's error-bound precision policy (eq. 9-11) and keyframe refresh (RRM)."""

from resq_brevitas.policy.base import (
    PrecisionPolicy,
    RefreshTrigger,
    StreamStatus,
    build_policy,
    build_refresh,
)
from resq_brevitas.policy.error_bound import (
    ErrorBoundSelector,
    aggregate_errors,
    error_maps_eq10,
    expand_units,
    policy_bops,
    select_eq11,
)
from resq_brevitas.policy.refresh import (
    ErrorBudgetTrigger,
    SceneCutTrigger,
    fit_error_polynomial,
    predict_error_rrm_eq8,
    relative_output_error,
    scene_cut_rows,
    truncated_energy_rrm_eq7,
)

__all__ = [
    "ErrorBoundSelector",
    "ErrorBudgetTrigger",
    "PrecisionPolicy",
    "RefreshTrigger",
    "SceneCutTrigger",
    "StreamStatus",
    "aggregate_errors",
    "build_policy",
    "build_refresh",
    "error_maps_eq10",
    "expand_units",
    "fit_error_polynomial",
    "policy_bops",
    "predict_error_rrm_eq8",
    "relative_output_error",
    "scene_cut_rows",
    "select_eq11",
    "truncated_energy_rrm_eq7",
]

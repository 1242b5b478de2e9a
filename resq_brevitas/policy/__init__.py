"""Policies: Dynamic-ResQ's error-bound precision policy (eq. 9-11) and keyframe refresh (RRM)."""

from resq_brevitas.policy.error_bound import (
    ErrorBoundPolicy,
    aggregate_errors,
    apply_error_bound_policy,
    error_maps_eq10,
    expand_units,
    mix_pool,
    policy_bops,
    select_eq11,
)
from resq_brevitas.policy.refresh import (
    ErrorBudgetRefresh,
    FixedPeriodRefresh,
    SceneCutRefresh,
    fit_error_polynomial,
    predict_error_eq8,
    relative_output_error,
    scene_cut_rows,
    truncated_energy_eq7,
)

__all__ = [
    "ErrorBoundPolicy",
    "ErrorBudgetRefresh",
    "FixedPeriodRefresh",
    "SceneCutRefresh",
    "aggregate_errors",
    "apply_error_bound_policy",
    "error_maps_eq10",
    "expand_units",
    "fit_error_polynomial",
    "mix_pool",
    "policy_bops",
    "predict_error_eq8",
    "relative_output_error",
    "scene_cut_rows",
    "select_eq11",
    "truncated_energy_eq7",
]

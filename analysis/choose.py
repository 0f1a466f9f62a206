"""Which frontier model to ship: a named strategy under optional bounds."""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from analysis.pareto import ConstraintError, best_under_constraints, knee_point, nondominated_ranks, within_bounds

STRATEGIES = ("knee", "max-accuracy", "min-latency", "max-sparsity")
_TARGET = {"max-accuracy": ("accuracy", "max"), "min-latency": ("latency_ms", "min"),
           "max-sparsity": ("param_sparsity", "max")}


def make_bounds(max_latency_ms: float | None = None, min_accuracy: float | None = None,
                min_sparsity: float | None = None) -> dict[str, tuple[str, float]]:
    """Bounds from the command-line options, checked: accuracy and sparsity are fractions."""
    b: dict[str, tuple[str, float]] = {}
    if max_latency_ms is not None:
        if not max_latency_ms > 0:
            raise ConstraintError(f"--max-latency-ms must be > 0, got {max_latency_ms:g}")
        b["latency_ms"] = ("<=", float(max_latency_ms))
    for name, col, v in (("--min-accuracy", "accuracy", min_accuracy), ("--min-sparsity", "param_sparsity",
                                                                          min_sparsity)):
        if v is None:
            continue
        if not 0.0 <= v <= 1.0:
            raise ConstraintError(f"{name} is a fraction between 0 and 1 (0.9 for 90 %), got {v:g}")
        b[col] = (">=", float(v))
    return b


def choose(df: pd.DataFrame, objectives: Mapping[str, str], strategy: str = "knee",
           bounds: Mapping[str, tuple[str, float]] | None = None) -> pd.Series:
    """The chosen complete trial. ``knee``: the knee of the front of the trials within the bounds;
    the others: the best trial for one objective within the bounds (ties: the better Pareto rank)."""
    if strategy not in STRATEGIES:
        raise ConstraintError(f"unknown selection {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    rows = df[df["status"] == "complete"] if "status" in df.columns else df
    rows = rows.dropna(subset=list(objectives))
    if rows.empty:
        raise ConstraintError("the sweep has no complete trial with all objectives to choose from")
    rows = within_bounds(rows, bounds)
    if strategy == "knee":
        return knee_point(rows, objectives)
    target, mode = _TARGET[strategy]
    if target not in rows.columns:
        raise ConstraintError(f"the sweep's trials have no {target!r} to select by")
    ranked = rows.assign(_rank=nondominated_ranks(rows, objectives)).sort_values("_rank", kind="stable")
    return best_under_constraints(ranked, target, mode).drop("_rank")

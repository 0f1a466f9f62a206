"""Which frontier model to ship: a named strategy under optional bounds.

Selection uses the validation accuracy (``val_accuracy``) wherever the trials report it: the test
accuracy (``accuracy``) is reported next to it, never chosen on. Sweeps from before the
validation split have only ``accuracy``, and are chosen on it.
"""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from analysis.pareto import ConstraintError, best_under_constraints, knee_point, nondominated_ranks, within_bounds

STRATEGIES = ("knee", "max-accuracy", "min-latency", "max-sparsity")
_TARGET = {"max-accuracy": ("accuracy", "max"), "min-latency": ("latency_ms", "min"),
           "max-sparsity": ("param_sparsity", "max")}
VAL = "val_accuracy"


def accuracy_column(df: pd.DataFrame) -> str:
    """The accuracy to choose on: ``val_accuracy`` when every complete trial reports it, else
    ``accuracy`` (a sweep from before the validation split)."""
    if VAL not in df.columns:
        return "accuracy"
    rows = df[df["status"] == "complete"] if "status" in df.columns else df
    vals = rows[VAL] if len(rows) else df[VAL]
    return VAL if len(vals) and vals.notna().all() else "accuracy"


def selection_objectives(objectives: Mapping[str, str], df: pd.DataFrame) -> dict[str, str]:
    """The objectives fronts and choices are built on: a test-accuracy objective (``accuracy``) is
    replaced by ``val_accuracy`` where the trials report it (in place, the order kept)."""
    objs = dict(objectives)
    if "accuracy" not in objs or VAL in objs or accuracy_column(df) != VAL:
        return objs
    return {(VAL if k == "accuracy" else k): v for k, v in objs.items()}


def selection_bounds(bounds: Mapping[str, tuple[str, float]] | None, df: pd.DataFrame
                     ) -> dict[str, tuple[str, float]]:
    """``bounds`` with an accuracy bound (``--min-accuracy``) on the accuracy chosen on."""
    col = accuracy_column(df)
    return {(col if k == "accuracy" else k): v for k, v in (bounds or {}).items()}


def make_bounds(max_latency_ms: float | None = None, min_accuracy: float | None = None,
                min_sparsity: float | None = None) -> dict[str, tuple[str, float]]:
    """Bounds from the command-line options, checked: accuracy and sparsity are fractions. The
    accuracy bound applies to ``val_accuracy`` where the trials report it (see :func:`choose`)."""
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
    the others: the best trial for one objective within the bounds (ties: the better Pareto rank).
    Accuracy (objective, max-accuracy, --min-accuracy) means ``val_accuracy`` where the trials
    report it, the test accuracy only for sweeps without it."""
    if strategy not in STRATEGIES:
        raise ConstraintError(f"unknown selection {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    objectives = selection_objectives(objectives, df)
    bounds = selection_bounds(bounds, df)
    rows = df[df["status"] == "complete"] if "status" in df.columns else df
    # no trial reported one of the objectives (all errored, say): nothing to choose from
    rows = rows.dropna(subset=list(objectives)) if all(k in rows.columns for k in objectives) else rows.iloc[0:0]
    if rows.empty:
        counts = df["status"].value_counts().to_dict() if "status" in df.columns else {}
        seen = ", ".join(f"{v} {k}" for k, v in counts.items()) or "no trials"
        raise ConstraintError(f"the sweep has no complete trial with all objectives to choose from ({seen})")
    rows = within_bounds(rows, bounds)
    if strategy == "knee":
        return knee_point(rows, objectives)
    target, mode = _TARGET[strategy]
    if target == "accuracy":
        target = accuracy_column(df)
    if target not in rows.columns:
        raise ConstraintError(f"the sweep's trials have no {target!r} to select by")
    ranked = rows.assign(_rank=nondominated_ranks(rows, objectives)).sort_values("_rank", kind="stable")
    return best_under_constraints(ranked, target, mode).drop("_rank")

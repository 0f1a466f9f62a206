"""Pareto maths for sweep results: small, pure numpy/pandas functions.

Every function takes ``objectives``: a mapping of column name to ``"max"`` or ``"min"``
(default: accuracy max, param_sparsity max, latency_ms min). Internally every objective is turned
into one to minimise. Rows with NaN in any objective take part in nothing.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

DEFAULT_OBJECTIVES: dict[str, str] = {"accuracy": "max", "param_sparsity": "max", "latency_ms": "min"}

__all__ = [
    "DEFAULT_OBJECTIVES",
    "ConstraintError",
    "best_under_constraints",
    "hypervolume",
    "hypervolume_history",
    "knee_point",
    "nondominated_ranks",
    "pareto_front",
    "within_bounds",
]


class ConstraintError(ValueError):
    """No row satisfies the bounds; the message names the bound that excluded everything."""


def _objectives(objectives: Mapping[str, str] | None) -> dict[str, str]:
    objs = dict(objectives or DEFAULT_OBJECTIVES)
    if not objs:
        raise ValueError("at least one objective is needed")
    for k, v in objs.items():
        if v not in ("max", "min"):
            raise ValueError(f"objective {k!r}: {v!r} must be 'max' or 'min'")
    return objs


def to_minimisation(df: pd.DataFrame, objectives: Mapping[str, str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(values to minimise for the valid rows, boolean mask of valid rows in df)."""
    objs = _objectives(objectives)
    missing = [k for k in objs if k not in df.columns]
    if missing:
        raise KeyError(f"objective columns not in the table: {missing}")
    vals = df[list(objs)].to_numpy(dtype=float)
    signs = np.array([-1.0 if objs[k] == "max" else 1.0 for k in objs])
    valid = ~np.isnan(vals).any(axis=1)
    return vals[valid] * signs, valid


def _nondominated_mask(points: np.ndarray) -> np.ndarray:
    """True for points no other point dominates (all ≤ and one <). Equal points do not dominate
    each other, so duplicates of a front point are all on the front."""
    n = len(points)
    mask = np.ones(n, dtype=bool)
    for i in range(n):
        if not mask[i]:
            continue
        le = (points <= points[i]).all(axis=1)
        lt = (points < points[i]).any(axis=1)
        if (le & lt).any():
            mask[i] = False
    return mask


def pareto_front(df: pd.DataFrame, objectives: Mapping[str, str] | None = None) -> pd.DataFrame:
    """The non-dominated rows of ``df`` (NaN rows excluded), in their original order."""
    pts, valid = to_minimisation(df, objectives)
    idx = np.flatnonzero(valid)[_nondominated_mask(pts)]
    return df.iloc[idx]


def nondominated_ranks(df: pd.DataFrame, objectives: Mapping[str, str] | None = None) -> pd.Series:
    """Non-dominated sorting: rank 0 is the front, rank 1 the front once rank 0 is removed, ...
    NaN rows get rank -1."""
    pts, valid = to_minimisation(df, objectives)
    ranks = np.full(len(df), -1, dtype=int)
    remaining = np.flatnonzero(valid)
    local = np.arange(len(pts))
    r = 0
    while len(local):
        front = _nondominated_mask(pts[local])
        ranks[remaining[local[front]]] = r
        local = local[~front]
        r += 1
    return pd.Series(ranks, index=df.index, name="rank")


def hypervolume(points: np.ndarray, reference: np.ndarray) -> float:
    """Volume dominated by ``points`` (to minimise) and bounded by ``reference``, for 1–3 objectives.

    Points that do not strictly dominate the reference in every objective add nothing.
    """
    pts = np.asarray(points, dtype=float)
    ref = np.asarray(reference, dtype=float)
    if pts.size == 0:
        return 0.0
    pts = pts.reshape(-1, ref.shape[0])
    pts = pts[(pts < ref).all(axis=1)]
    if len(pts) == 0:
        return 0.0
    pts = pts[_nondominated_mask(pts)]
    d = ref.shape[0]
    if d == 1:
        return float(ref[0] - pts[:, 0].min())
    if d == 2:
        return _hv2(pts, ref)
    if d == 3:
        # slice along the third objective: between consecutive z levels the dominated area is the
        # 2-D hypervolume of the points at or below that level
        order = np.argsort(pts[:, 2])
        pts = pts[order]
        zs = np.append(pts[:, 2], ref[2])
        total = 0.0
        for i in range(len(pts)):
            height = zs[i + 1] - zs[i]
            if height > 0:
                total += height * _hv2(pts[: i + 1, :2], ref[:2])
        return float(total)
    raise ValueError("hypervolume is implemented for 1, 2 and 3 objectives")


def _hv2(pts: np.ndarray, ref: np.ndarray) -> float:
    pts = pts[np.lexsort((pts[:, 1], pts[:, 0]))]
    total, best_y = 0.0, ref[1]
    for x, y in pts:
        if y < best_y:
            total += (ref[0] - x) * (best_y - y)
            best_y = y
    return float(total)


def default_reference(df: pd.DataFrame, objectives: Mapping[str, str] | None = None) -> np.ndarray:
    """A stated reference point in minimisation space: accuracy and sparsity at 0 (as −0), any
    other objective at 1.1 × its worst value in the table."""
    objs = _objectives(objectives)
    pts, _ = to_minimisation(df, objs)
    ref = []
    for j, (k, mode) in enumerate(objs.items()):
        if mode == "max" and k in ("accuracy", "val_accuracy", "param_sparsity", "gate_sparsity"):
            ref.append(0.0)
        else:
            worst = pts[:, j].max() if len(pts) else 0.0
            ref.append(worst * 1.1 if worst > 0 else worst * 0.9 + 1e-12)
    return np.array(ref)


def hypervolume_history(df: pd.DataFrame, objectives: Mapping[str, str] | None = None,
                        reference: np.ndarray | None = None, order: str | None = None) -> pd.Series:
    """Hypervolume of the front after each finished trial (rows in ``order`` column order, or as
    given). NaN rows add nothing but still count as a finished trial."""
    objs = _objectives(objectives)
    data = df.sort_values(order) if order else df
    ref = default_reference(data, objs) if reference is None else np.asarray(reference, dtype=float)
    vals = data[list(objs)].to_numpy(dtype=float) * np.array([-1.0 if objs[k] == "max" else 1.0 for k in objs])
    hv = []
    for i in range(1, len(data) + 1):
        v = vals[:i]
        v = v[~np.isnan(v).any(axis=1)]
        hv.append(hypervolume(v, ref))
    return pd.Series(hv, index=np.arange(1, len(data) + 1), name="hypervolume")


def knee_point(df: pd.DataFrame, objectives: Mapping[str, str] | None = None) -> pd.Series:
    """The front row closest to the ideal point once each objective is scaled to [0, 1] over the
    front (ties: the first such row)."""
    front = pareto_front(df, objectives)
    if front.empty:
        raise ValueError("no valid rows: the front is empty")
    pts, _ = to_minimisation(front, objectives)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    dist = np.linalg.norm((pts - lo) / span, axis=1)
    return front.iloc[int(np.argmin(dist))]


_OPS = {"<=": np.less_equal, ">=": np.greater_equal, "<": np.less, ">": np.greater}


def within_bounds(df: pd.DataFrame, bounds: Mapping[str, tuple[str, float]] | None = None) -> pd.DataFrame:
    """The rows within every bound, e.g. ``{"latency_ms": ("<=", 2), "param_sparsity": (">=", 0.5)}``.

    An empty result raises ConstraintError naming the bound that excluded everything (the first
    bound, in the order given, after which no row was left).
    """
    rows = df
    for col, (op, value) in (bounds or {}).items():
        if op not in _OPS:
            raise ValueError(f"bound on {col!r}: operator {op!r} must be one of {', '.join(_OPS)}")
        if col not in rows.columns:
            raise KeyError(f"bound on unknown column {col!r}")
        kept = rows[_OPS[op](rows[col].to_numpy(dtype=float), value)]
        if kept.empty:
            have = rows[col].dropna()
            seen = f"{have.min():.4g} to {have.max():.4g}" if len(have) else "no values"
            raise ConstraintError(
                f"no trial has {col} {op} {value:g} (among the {len(rows)} left, {col} ranges {seen})")
        rows = kept
    return rows


def best_under_constraints(df: pd.DataFrame, target: str, mode: str = "max",
                           bounds: Mapping[str, tuple[str, float]] | None = None) -> pd.Series:
    """The best row for ``target`` among rows within every bound, e.g.
    ``best_under_constraints(df, "accuracy", "max", {"latency_ms": ("<=", 2), "param_sparsity": (">=", 0.5)})``.

    An empty feasible set raises ConstraintError naming the bound that excluded everything (the
    first bound, in the order given, after which no row was left).
    """
    if mode not in ("max", "min"):
        raise ValueError("mode must be 'max' or 'min'")
    rows = df[df[target].notna()]
    if rows.empty:
        raise ConstraintError(f"no row has a value for {target!r}")
    rows = within_bounds(rows, bounds)
    pos = rows[target].to_numpy(dtype=float)
    i = int(np.argmax(pos) if mode == "max" else np.argmin(pos))
    return rows.iloc[i]

import itertools

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis.pareto import (
    ConstraintError,
    best_under_constraints,
    hypervolume,
    hypervolume_history,
    knee_point,
    nondominated_ranks,
    pareto_front,
)

OBJ = {"accuracy": "max", "param_sparsity": "max", "latency_ms": "min"}


def brute_front(pts):
    """Oracle: i is on the front iff no j is ≤ everywhere and < somewhere (maximise cols 0, 1)."""
    m = np.column_stack([-pts[:, 0], -pts[:, 1], pts[:, 2]])
    out = []
    for i in range(len(m)):
        if not any((m[j] <= m[i]).all() and (m[j] < m[i]).any() for j in range(len(m)) if j != i):
            out.append(i)
    return out


def frame(pts):
    return pd.DataFrame(pts, columns=list(OBJ))


@pytest.mark.parametrize("seed", range(40))
def test_front_matches_brute_force_oracle(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    pts = rng.integers(0, 6, size=(n, 3)).astype(float)  # small grid: many ties and duplicates
    front = pareto_front(frame(pts), OBJ)
    assert list(front.index) == brute_front(pts)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0.01, 5)), min_size=1, max_size=40))
def test_front_properties(rows):
    df = frame(np.array(rows))
    front = pareto_front(df, OBJ)
    m = np.column_stack([-df.accuracy, -df.param_sparsity, df.latency_ms])
    fi = set(front.index)

    def dominates(a, b):
        return (m[a] <= m[b]).all() and (m[a] < m[b]).any()

    for i in fi:  # no front row is dominated
        assert not any(dominates(j, i) for j in range(len(df)))
    for i in set(range(len(df))) - fi:  # every other row is dominated by a front row
        assert any(dominates(j, i) for j in fi)
    ranks = nondominated_ranks(df, OBJ)
    assert set(ranks[ranks == 0].index) == fi


def test_nan_rows_are_excluded_and_ranked_minus_one():
    df = frame([[0.9, 0.5, 1.0], [np.nan, 0.9, 0.1], [0.8, 0.4, 2.0]])
    assert list(pareto_front(df, OBJ).index) == [0]
    assert list(nondominated_ranks(df, OBJ)) == [0, -1, 1]


def test_duplicates_are_all_on_the_front():
    df = frame([[0.9, 0.5, 1.0], [0.9, 0.5, 1.0], [0.1, 0.1, 9.0]])
    assert list(pareto_front(df, OBJ).index) == [0, 1]


def test_hypervolume_of_known_shapes():
    ref2 = np.array([1.0, 1.0])
    assert hypervolume(np.array([[0.0, 0.0]]), ref2) == pytest.approx(1.0)
    assert hypervolume(np.array([[0.5, 0.5]]), ref2) == pytest.approx(0.25)
    # staircase of 3 points: 0.5 + 0.25 + 0.125... computed by hand
    stair = np.array([[0.0, 0.5], [0.5, 0.0], [0.25, 0.25]])
    assert hypervolume(stair, ref2) == pytest.approx(0.5 * 1 + 0.5 * 0.5 - 0.0 + 0.0625)
    assert hypervolume(np.array([[2.0, 0.0]]), ref2) == 0.0  # beyond the reference
    ref3 = np.array([1.0, 1.0, 1.0])
    assert hypervolume(np.array([[0.0, 0.0, 0.0]]), ref3) == pytest.approx(1.0)
    assert hypervolume(np.array([[0.5, 0.5, 0.5]]), ref3) == pytest.approx(0.125)
    two = np.array([[0.0, 0.0, 0.5], [0.5, 0.5, 0.0]])  # union by inclusion–exclusion
    assert hypervolume(two, ref3) == pytest.approx(0.5 + 0.25 - 0.125)


@pytest.mark.parametrize("seed", range(10))
def test_hypervolume_3d_matches_monte_carlo_free_grid_count(seed):
    rng = np.random.default_rng(seed)
    pts = rng.integers(0, 5, size=(8, 3)).astype(float) / 5
    ref = np.ones(3)
    # exact count on a 1/5 grid: a cell is dominated when some point is ≤ its lower corner
    cells = np.array(list(itertools.product(np.arange(5) / 5, repeat=3)))
    dominated = sum(any((p <= c).all() for p in pts) for c in cells)
    assert hypervolume(pts, ref) == pytest.approx(dominated / 125)


def test_hypervolume_history_is_monotone():
    rng = np.random.default_rng(0)
    df = frame(np.column_stack([rng.random(20), rng.random(20), rng.random(20) + 0.1]))
    hv = hypervolume_history(df, OBJ)
    assert len(hv) == 20 and (np.diff(hv.to_numpy()) >= -1e-12).all()


def test_knee_point_is_on_the_front_and_balanced():
    df = pd.DataFrame({"accuracy": [1.0, 0.0, 0.8, 0.3], "param_sparsity": [0.0, 1.0, 0.8, 0.3]})
    obj = {"accuracy": "max", "param_sparsity": "max"}
    knee = knee_point(df, obj)
    assert knee.name == 2


def test_constrained_choice_and_empty_feasible_set():
    df = pd.DataFrame({"accuracy": [0.9, 0.8, 0.7], "latency_ms": [3.0, 1.5, 1.0],
                       "param_sparsity": [0.2, 0.6, 0.7]})
    best = best_under_constraints(df, "accuracy", "max", {"latency_ms": ("<=", 2), "param_sparsity": (">=", 0.5)})
    assert best.name == 1
    with pytest.raises(ConstraintError, match="latency_ms <= 0.5"):
        best_under_constraints(df, "accuracy", "max", {"latency_ms": ("<=", 0.5)})
    with pytest.raises(ConstraintError, match="param_sparsity >= 0.9"):
        best_under_constraints(df, "accuracy", "max", {"latency_ms": ("<=", 2), "param_sparsity": (">=", 0.9)})

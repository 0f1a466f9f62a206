"""The sweep's plots: PNG files (matplotlib, Agg) and one interactive plotly HTML file.

Every function takes the trial table (``analysis.results``) with a ``rank`` column (0 = front,
-1 = not ranked), writes one file and returns its path (or None when there is nothing to draw).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.choose import accuracy_column
from analysis.pareto import pareto_front
from analysis.results import CONFIG_PREFIX, config_columns
from prunevision.fsutil import save_figure

LABELS = {
    "val_accuracy": "validation top-1 accuracy (%)",
    "accuracy": "test top-1 accuracy (%)",
    "param_sparsity": "parameters removed (%)",
    "latency_ms": "latency (ms)",
    "macs_reduction": "MACs reduction (×)",
    "gate_sparsity": "gates closed (%)",
    "size_bytes": "size (bytes)",
}
PERCENT = {"accuracy", "val_accuracy", "param_sparsity", "gate_sparsity"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _scale(col: str, v):
    return np.asarray(v, dtype=float) * (100.0 if col in PERCENT else 1.0)


def label(col: str, latency_note: str = "") -> str:
    base = LABELS.get(col, col.replace("_", " "))
    return f"{base}{latency_note}" if col == "latency_ms" else base


def _dense_points(done: pd.DataFrame, objectives: Mapping[str, str]) -> pd.DataFrame | None:
    """The dense network each trial started from (gates folded in, nothing removed)."""
    need = {"accuracy": "accuracy_dense", "val_accuracy": "val_accuracy_dense", "latency_ms": "latency_ms_dense"}
    cols = {}
    for k in objectives:
        if k == "param_sparsity":
            cols[k] = np.zeros(len(done))
        elif k in need and need[k] in done.columns:
            cols[k] = done[need[k]].to_numpy(dtype=float)
        else:
            return None
    return pd.DataFrame(cols)


def front_2d(df: pd.DataFrame, objectives: Mapping[str, str], path: Path, chosen: pd.Series | None = None,
             latency_note: str = "") -> Path | None:
    """Every pair of objectives: all complete trials coloured by rank, the 2-D front of the
    projection as a step line, the dense networks and the chosen model marked."""
    plt = _plt()
    done = df[(df["status"] == "complete") & (df["rank"] >= 0)]
    objs = list(objectives)
    pairs = [(a, b) for i, a in enumerate(objs) for b in objs[i + 1:]]
    if done.empty or not pairs:
        return None
    dense = _dense_points(done, objectives)
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.2 * len(pairs), 4.6), dpi=110, squeeze=False)
    max_rank = max(int(done["rank"].max()), 1)
    for ax, (x, y) in zip(axes[0], pairs):
        sc = ax.scatter(_scale(x, done[x]), _scale(y, done[y]), c=done["rank"],
                        cmap=plt.get_cmap("viridis_r", max_rank + 1), vmin=-0.5, vmax=max_rank + 0.5, s=36,
                        edgecolors="k", linewidths=0.3, zorder=3)
        if "latency_remeasured" in done.columns and done["latency_remeasured"].any() and "latency_ms" in (x, y):
            rm = done[done["latency_remeasured"].astype(bool)]
            ax.scatter(_scale(x, rm[x]), _scale(y, rm[y]), s=110, facecolors="none", edgecolors="tab:orange",
                       linewidths=1.0, zorder=2, label="latency re-measured")
        f2 = pareto_front(done, {x: objectives[x], y: objectives[y]}).sort_values(x)
        ax.step(_scale(x, f2[x]), _scale(y, f2[y]), where="post", color="crimson", lw=1.2, zorder=4,
                label="front of this projection")
        if dense is not None:
            ax.scatter(_scale(x, dense[x]), _scale(y, dense[y]), marker="x", color="0.35", s=30, zorder=2,
                       label="dense network (before pruning)")
        if chosen is not None:
            ax.scatter(_scale(x, [chosen[x]]), _scale(y, [chosen[y]]), marker="*", s=260, color="red",
                       edgecolors="k", zorder=5, label=f"chosen: {chosen['trial_id']}")
        ax.set_xlabel(label(x))
        ax.set_ylabel(label(y))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.colorbar(sc, ax=axes[0].tolist(), label="Pareto rank (0 = front)", shrink=0.85,
                 ticks=range(0, max_rank + 1))
    fig.suptitle(f"{len(done)} complete trials: " + ", ".join(f"{k} ({v})" for k, v in objectives.items())
                 + (f"\nlatency{latency_note}" if "latency_ms" in objectives and latency_note else ""), fontsize=10)
    save_figure(fig, path, bbox_inches="tight")
    plt.close(fig)
    return path


def _hover(df: pd.DataFrame) -> list[str]:
    cfg = config_columns(df)
    out = []
    for _, r in df.iterrows():
        parts = [f"trial {r['trial_id']} (rank {int(r['rank'])})"]
        parts += [f"{c[len(CONFIG_PREFIX):]} = {r[c]:.4g}" if isinstance(r[c], float) else
                  f"{c[len(CONFIG_PREFIX):]} = {r[c]}" for c in cfg if pd.notna(r[c])]
        out.append("<br>".join(parts))
    return out


def front_3d(df: pd.DataFrame, objectives: Mapping[str, str], path: Path, chosen: pd.Series | None = None,
             latency_note: str = "") -> Path | None:
    """Interactive 3-D view (plotly, self-contained HTML) of the first three objectives."""
    import plotly.graph_objects as go

    objs = list(objectives)[:3]
    done = df[(df["status"] == "complete") & (df["rank"] >= 0)]
    if len(objs) < 3 or done.empty:
        return None
    x, y, z = objs
    front, rest = done[done["rank"] == 0], done[done["rank"] != 0]
    fig = go.Figure()
    for part, name, color, size in ((rest, "dominated trials", "#9aa5b1", 4), (front, "Pareto front", "#d62728", 6)):
        if len(part):
            fig.add_trace(go.Scatter3d(x=_scale(x, part[x]), y=_scale(y, part[y]), z=_scale(z, part[z]), mode="markers",
                                       name=name, marker={"size": size, "color": color}, text=_hover(part),
                                       hoverinfo="text"))
    dense = _dense_points(done, objectives)
    if dense is not None:
        fig.add_trace(go.Scatter3d(x=_scale(x, dense[x]), y=_scale(y, dense[y]), z=_scale(z, dense[z]), mode="markers",
                                   name="dense network (before pruning)",
                                   marker={"size": 3, "color": "#333", "symbol": "x"}))
    if chosen is not None:
        fig.add_trace(go.Scatter3d(x=_scale(x, [chosen[x]]), y=_scale(y, [chosen[y]]), z=_scale(z, [chosen[z]]),
                                   mode="markers", name=f"chosen: {chosen['trial_id']}",
                                   marker={"size": 10, "color": "gold", "symbol": "diamond",
                                           "line": {"color": "black", "width": 1}}))
    fig.update_layout(scene={"xaxis_title": label(x), "yaxis_title": label(y), "zaxis_title": label(z, latency_note)},
                      title="Sweep trials in objective space (drag to rotate)", height=640,
                      margin={"l": 0, "r": 0, "t": 40, "b": 0})
    fig.write_html(path, include_plotlyjs=True, full_html=True)
    return path


def parallel_coordinates(df: pd.DataFrame, objectives: Mapping[str, str], path: Path) -> Path | None:
    """One line per complete trial across its hyperparameters and objectives, coloured by rank
    (categorical values on evenly spaced levels, numeric ones min–max scaled, log where they span
    more than two decades)."""
    plt = _plt()
    done = df[(df["status"] == "complete") & (df["rank"] >= 0)]
    cols = [c for c in config_columns(done) if done[c].notna().any()] + list(objectives)
    if done.empty or len(cols) < 2:
        return None
    fig, ax = plt.subplots(figsize=(max(7.0, 1.6 * len(cols)), 4.8), dpi=110)
    scaled = np.zeros((len(done), len(cols)))
    ticks = []
    for j, c in enumerate(cols):
        v = done[c]
        have = v.notna().to_numpy()  # conditional parameters are unset in some trials: drawn below the axis
        scaled[~have, j] = -0.1
        num = pd.to_numeric(v[have], errors="coerce")
        if num.notna().all() and v[have].map(lambda a: not isinstance(a, (bool, str))).all():
            a = _scale(c, num.to_numpy(dtype=float))
            log = c not in objectives and a.min() > 0 and a.max() / a.min() > 100
            t = np.log10(a) if log else a
            lo, hi = t.min(), t.max()
            scaled[have, j] = (t - lo) / (hi - lo) if hi > lo else 0.5
            ticks.append((f"{a.min():.3g}", f"{a.max():.3g}" + (" (log)" if log else "")))
        else:
            txt = v[have].astype(str)
            levels = sorted(txt.unique())
            pos = {s: (i / (len(levels) - 1) if len(levels) > 1 else 0.5) for i, s in enumerate(levels)}
            scaled[have, j] = txt.map(pos).to_numpy(dtype=float)
            ticks.append((levels[0], levels[-1]))
    max_rank = max(int(done["rank"].max()), 1)
    cmap = plt.get_cmap("viridis_r", max_rank + 1)
    order = np.argsort(-done["rank"].to_numpy())  # the front drawn last, on top
    for i in order:
        r = int(done["rank"].iloc[i])
        ax.plot(range(len(cols)), scaled[i], color=cmap(r / max_rank), lw=2.2 if r == 0 else 1.0,
                alpha=0.95 if r == 0 else 0.55)
    for j, (lo, hi) in enumerate(ticks):
        ax.axvline(j, color="0.7", lw=0.8)
        ax.annotate(lo, (j, -0.03), ha="center", va="top", fontsize=7)
        ax.annotate(hi, (j, 1.04), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([c[len(CONFIG_PREFIX):] if c.startswith(CONFIG_PREFIX) else label(c) for c in cols],
                       rotation=20, ha="right", fontsize=8)
    ax.set_yticks([])
    ax.set_ylim(-0.15, 1.15)
    if (scaled < 0).any():
        ax.annotate("(unset)", (-0.45, -0.1), ha="left", va="center", fontsize=7, color="0.4")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(-0.5, max_rank + 0.5))
    fig.colorbar(sm, ax=ax, label="Pareto rank (0 = front)", ticks=range(0, max_rank + 1))
    ax.set_title("Hyperparameters and objectives of the complete trials")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def importance(study_db: Path, study_name: str, objectives: Mapping[str, str], path: Path) -> tuple[Path | None, str]:
    """Hyperparameter importance per objective from the Optuna study (Optuna's default
    evaluator). Returns the path (None if it cannot be computed) and a note."""
    import warnings

    import optuna

    plt = _plt()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{study_db}")
    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if len(done) < 2:
        return None, f"hyperparameter importance needs at least 2 complete trials (the study has {len(done)})"
    imp: dict[str, dict[str, float]] = {}
    for i, (k, mode) in enumerate(objectives.items()):
        sign = -1.0 if mode == "max" else 1.0  # the evaluator rates what leads to low target values
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                imp[k] = optuna.importance.get_param_importances(
                    study, target=lambda t, i=i, s=sign: s * t.values[i])
        except (ValueError, RuntimeError) as e:
            return None, f"hyperparameter importance could not be computed: {e}"
    params = sorted({p for v in imp.values() for p in v})
    if not params:
        return None, "no hyperparameter varied"
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(params) * len(imp) / 1.5 + 1.8), dpi=110)
    h = 0.8 / len(imp)
    for j, (k, v) in enumerate(imp.items()):
        ax.barh(np.arange(len(params)) + j * h, [v.get(p, 0.0) for p in params], height=h, label=label(k))
    ax.set_yticks(np.arange(len(params)) + 0.4 - h / 2)
    ax.set_yticklabels(params)
    ax.set_xlabel("importance (share, Optuna's default evaluator)")
    ax.set_title(f"Hyperparameter importance over {len(done)} complete trials")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    note = "" if len(done) >= 10 else f"only {len(done)} complete trials: treat these importances as rough"
    return path, note


def hypervolume_history(hv: pd.Series, reference: np.ndarray, path: Path) -> Path | None:
    plt = _plt()
    if hv.empty:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
    ax.plot(hv.index, hv.to_numpy(), marker="o", ms=3)
    ax.set_xlabel("complete trials (in the order they finished)")
    ax.set_ylabel("hypervolume")
    ax.set_title("Hypervolume of the front as trials finish\nreference point " +
                 ", ".join(f"{v:.4g}" for v in reference) + " (minimisation space)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def per_class_accuracy(metrics: dict, path: Path) -> Path | None:
    """The chosen model's accuracy per class against its dense network's (from metrics.json)."""
    plt = _plt()
    pc, pcd = metrics.get("per_class_accuracy") or {}, metrics.get("per_class_accuracy_dense") or {}
    if not pc:
        return None
    names = list(pc)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(names) + 2), 4), dpi=110)
    if pcd:
        ax.bar(x - 0.2, [100 * pcd.get(n, np.nan) for n in names], 0.4, label="dense", color="0.6")
    ax.bar(x + (0.2 if pcd else 0.0), [100 * pc[n] for n in names], 0.4, label="pruned", color="tab:red")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Per-class accuracy of the chosen model (test set)")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def copy_trial_image(output_dir: str | Path | None, name: str, path: Path) -> Path | None:
    """Copy one of the chosen trial's own PNG files (gate histogram, filter grid, ...) if it has it."""
    src = Path(output_dir) / name if output_dir else None
    if src is None or not src.is_file():
        return None
    shutil.copyfile(src, path)
    return path


def leaderboard(df: pd.DataFrame, objectives: Mapping[str, str], path: Path, by: str = "config/prune.method"
                ) -> Path | None:
    """Across pruning methods (or another categorical column) of a sweep: each method's best
    accuracy, and the best speed-up and parameter sparsity among its trials within 2 points of
    that accuracy. Drawn when the sweep compares at least two methods. Accuracy: the validation
    accuracy where the trials report it (the test accuracy for older sweeps)."""
    plt = _plt()
    done = df[df["status"] == "complete"]
    acc = accuracy_column(done)
    if by not in done.columns or done[by].nunique() < 2 or acc not in done.columns:
        return None
    rows = []
    for method, g in done.groupby(by):
        best = g[acc].max()
        near = g[g[acc] >= best - 0.02]
        rows.append({"method": str(method), "accuracy": best, "trials": len(g),
                     "speedup": near["latency_speedup"].max() if "latency_speedup" in near else np.nan,
                     "sparsity": near["param_sparsity"].max() if "param_sparsity" in near else np.nan})
    rows.sort(key=lambda r: -r["accuracy"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 0.45 * len(rows) + 2.2), dpi=110, sharey=True)
    y = np.arange(len(rows))
    for ax, key, lab, scale in ((axes[0], "accuracy", f"best {label(acc).replace('top-1 ', '')}", 100),
                                (axes[1], "speedup", "best speed-up within 2 points (×)", 1),
                                (axes[2], "sparsity", "parameters removed within 2 points (%)", 100)):
        vals = [r[key] * scale for r in rows]
        ax.barh(y, vals, color=plt.get_cmap("tab10")(np.arange(len(rows)) % 10))
        for yi, v in zip(y, vals):
            if np.isfinite(v):
                ax.annotate(f"{v:.1f}" if scale == 100 else f"{v:.2f}", (v, yi), va="center", fontsize=7,
                            xytext=(2, 0), textcoords="offset points")
        ax.set_xlabel(lab)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y)
    axes[0].set_yticklabels([f"{r['method']} ({r['trials']})" for r in rows])
    axes[0].invert_yaxis()
    fig.suptitle(f"Leaderboard by {by.replace(CONFIG_PREFIX, '')} (complete trials per method in brackets)",
                 fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def read_metrics(output_dir: str | Path | None) -> dict:
    p = Path(output_dir) / "metrics.json" if output_dir else None
    if p is None or not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except ValueError:
        return {}

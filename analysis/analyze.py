"""`prunevision analyze SWEEP_DIR`: the sweep's front, re-measured latency, plots and a report.

Writes into ``--out`` (default ``<sweep>/analysis``): ``trials.csv`` (every trial, status and
rank), ``pareto.csv`` (the front, full config), ``configs/<trial>.yaml`` (what
``prunevision train`` needs to reproduce a front point), the plots, ``report.md`` and one
self-contained ``report.html``; then logs them to the sweep's MLflow parent run.

With ``int8`` (``--int8``), each front trial also gets an INT8 variant (:func:`analysis.int8.int8_front`):
``pareto.csv`` holds one row per trial and precision (``precision`` fp32 or int8; the INT8 models
in ``int8/``), ``front_with_int8`` marks what is on the front once INT8 variants may join it, and
the report has a section and ``int8_front.png`` showing where quantization moves each trial.

Fronts and the choice use the validation accuracy (``val_accuracy``) where the trials report it;
the test accuracy (``accuracy``) is shown next to it as the reported figure, never chosen on.
Sweeps from before the validation split are analysed on ``accuracy``.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis import plots
from analysis.choose import accuracy_column, choose, selection_bounds, selection_objectives
from analysis.pareto import (
    default_reference,
    hypervolume,
    hypervolume_history,
    nondominated_ranks,
    to_minimisation,
    within_bounds,
)
from analysis.remeasure import remeasure
from analysis.report import Report, plain
from analysis.results import STUDY_FILE, SweepDataError, config_columns, load_sweep, read_state, status_counts
from prunevision.fsutil import atomic_write

DIAGNOSTICS = {
    "gate_histograms_over_training": "Gate values per layer over the chosen trial's training",
    "first_conv_filters": "The chosen model's first conv filters: which went (crossed out)",
    "prune_steps": "Accuracy, sparsity and latency over the chosen trial's pruning steps",
    "ratio_curve": "The chosen trial's pruning ratios from one training",
}
SUMMARY_COLS = ["trial_id", "val_accuracy", "accuracy", "param_sparsity", "latency_ms", "latency_remeasured",
                "latency_speedup", "latency_speedup_lo", "latency_speedup_hi",
                "macs_reduction", "target_macs", "macs_share", "target_latency_ms", "val_accuracy_dense",
                "accuracy_dense"]


def rank_trials(df: pd.DataFrame, objectives: Mapping[str, str]) -> pd.DataFrame:
    """``rank`` column: non-dominated rank among complete trials, -1 for every other row."""
    df = df.copy()
    df["rank"] = -1
    done = df[(df["status"] == "complete")]
    if not done.empty and all(k in df.columns for k in objectives):
        df.loc[done.index, "rank"] = nondominated_ranks(done, objectives)
    return df


def analyze(sweep_dir: str | Path, out: str | Path | None = None, *, source: str = "ray", select: str = "knee",
            bounds: Mapping[str, tuple[str, float]] | None = None, remeasure_latency: bool = True,
            target: str = "onnxruntime-cpu", batch: int = 1, threads: int = 1, runs: int = 50,
            log_to_mlflow: bool = True, int8: Mapping[str, Any] | None = None,
            log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """The sweep's front, the chosen trial, tables, plots and the report in ``out`` (default
    ``SWEEP_DIR/analysis``). ``int8``: add INT8 variants of the front (calibration_size, max_drop, method)."""
    sweep_dir = Path(sweep_dir).resolve()
    state = read_state(sweep_dir)
    sweep_objectives: dict[str, str] = dict(state["run"]["objectives"])  # what the search optimised
    settings = state["settings"]
    if log_to_mlflow:  # an unreachable server stops us before any work, not after it
        from sweeps.tracking import check_reachable

        check_reachable(settings["tracking_uri"])
    df, objectives = _complete_trials(sweep_dir, source, sweep_objectives, bounds)
    out = Path(out) if out else sweep_dir / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    remeasured = False
    if remeasure_latency and "latency_ms" in objectives and "output_dir" in df.columns:
        df = _remeasure_front(df, objectives, {"target": target, "batch": batch, "threads": threads, "runs": runs,
                                               "log": log})
        remeasured = bool(df["latency_remeasured"].any())
    df = rank_trials(df, objectives)
    done = df[df["status"] == "complete"]
    front = done[done["rank"] == 0]
    chosen = choose(df, objectives, select, bounds)
    reproduce = _copy_configs(pd.concat([front, chosen.to_frame().T]).drop_duplicates("trial_id"), out / "configs")
    df.to_csv(out / "trials.csv", index=False)
    front_csv = front.assign(reproduce=front["trial_id"].map(reproduce), precision="fp32")
    int8_rows, int8_info = pd.DataFrame(), None
    if int8 is not None:
        from analysis.int8 import int8_front

        int8_rows, int8_info = int8_front(front, objectives, out / "int8", batch=batch, threads=threads, runs=runs,
                                          log=log, **int8)
        front_csv = _with_int8(front_csv, int8_rows, int8_info)
    _write_pareto(front_csv, out / "pareto.csv")
    ref = default_reference(done, objectives)
    hv_hist = (hypervolume_history(done, objectives, reference=ref, order="finished_at")
               if len(objectives) <= 3 else pd.Series(dtype=float))
    lat_note = f" ({target} b{batch}, re-measured)" if remeasured else " (as measured in the trials)"
    chosen_metrics = plots.read_metrics(chosen.get("output_dir"))
    files = _plots(df, objectives, chosen, chosen_metrics, hv_hist, ref, out, lat_note)
    if int8_info is not None:
        from analysis.int8 import int8_plot

        files["int8_front"] = int8_plot(int8_rows, accuracy_column(df), out / "int8_front.png",
                                        int8_info["front_with_int8"])
    imp_note = "no Optuna study in the sweep folder: no hyperparameter importance"
    if (sweep_dir / STUDY_FILE).is_file():
        files["importance"], imp_note = plots.importance(sweep_dir / STUDY_FILE, state["name"], sweep_objectives,
                                                         out / "importance.png")
    pts, _ = to_minimisation(done, objectives)
    summary = {
        "sweep": state["name"], "sweep_dir": str(sweep_dir), "out": str(out), "source": source,
        "objectives": objectives, "sweep_objectives": sweep_objectives, "selection_accuracy": accuracy_column(df),
        "trials": status_counts(df), "front_size": int(len(front)),
        "hypervolume": hypervolume(pts, ref) if len(objectives) <= 3 else float("nan"),
        "reference_point": ref.tolist(), "latency_remeasured": remeasured,
        "latency_target": f"{target} batch {batch}, {threads} thread(s)" if remeasured else "trial measurements",
        "chosen": {"trial_id": chosen["trial_id"], "select": select, "bounds": {k: list(v) for k, v in
                                                                               (bounds or {}).items()},
                   **{k: plain(chosen.get(k)) for k in SUMMARY_COLS[1:]}},
        "files": {k: str(v) for k, v in files.items() if v},
    }
    if int8_info is not None:
        summary["int8"] = int8_info
    md, page = _write_report(out, state, df, front, chosen, chosen_metrics, summary, files, reproduce, imp_note,
                             hv_hist, int8_rows)
    summary["files"].update({"report_md": str(md), "report_html": str(page), "pareto_csv": str(out / "pareto.csv"),
                             "trials_csv": str(out / "trials.csv")})
    atomic_write(out / "summary.json", json.dumps(summary, indent=2, default=str))
    summary["elapsed_s"] = time.perf_counter() - t0
    if log_to_mlflow:
        _log_to_parent(settings, out, summary)
    return summary


def _complete_trials(sweep_dir: Path, source: str, sweep_objectives: Mapping[str, str],
                     bounds: Mapping[str, tuple[str, float]] | None) -> tuple[pd.DataFrame, dict[str, str]]:
    """The sweep's trials and the objectives fronts and the choice use (val_accuracy in place of a
    test-accuracy objective when reported); one-line errors when there is nothing to analyse."""
    df = load_sweep(sweep_dir, source)
    objectives = selection_objectives(sweep_objectives, df)
    done = df[df["status"] == "complete"] if len(df) else df
    if done.empty:
        counts = status_counts(df)
        raise SweepDataError(f"{sweep_dir}: no complete trial yet ({_counts_text(counts) or 'no trials'})")
    missing = [k for k in objectives if k not in df.columns]
    if missing:
        raise SweepDataError(f"the trials report no {', '.join(missing)}: cannot build the front")
    # bounds that re-measurement cannot change are checked before it runs
    within_bounds(done.dropna(subset=list(objectives)),
                  {k: v for k, v in selection_bounds(bounds, df).items() if k != "latency_ms"})
    return df, objectives


def _remeasure_front(df: pd.DataFrame, objectives: Mapping[str, str], kw: dict[str, Any]) -> pd.DataFrame:
    """Re-measure the latency of the front's candidates, one at a time, until the front holds still."""
    df = remeasure(df, objectives, **kw)
    for _ in range(3):  # new figures can move a trial that was not a candidate onto the front
        ranked = rank_trials(df, objectives)
        todo = ranked[(ranked["rank"] == 0) & ~ranked["latency_remeasured"].astype(bool)
                      & ranked["output_dir"].notna()].index.tolist()
        if not todo:
            break
        df = remeasure(df, objectives, rows=todo, **kw)
    return df


def _copy_configs(rows: pd.DataFrame, cfg_dir: Path) -> dict[str, str]:
    """Each row's config.yaml into ``cfg_dir``; trial id → the command that trains it again."""
    cfg_dir.mkdir(exist_ok=True)
    reproduce = {}
    for _, r in rows.iterrows():
        src = Path(r["output_dir"]) / "config.yaml" if isinstance(r.get("output_dir"), str) else None
        if src is not None and src.is_file():
            shutil.copyfile(src, cfg_dir / f"{r['trial_id']}.yaml")
            tid = str(r["trial_id"])
            reproduce[tid] = f"prunevision train {cfg_dir / (tid + '.yaml')} --out runs/{tid}"
    return reproduce


def _write_pareto(front_csv: pd.DataFrame, path: Path) -> None:
    # the accuracy chosen on, then the test accuracy (the reported figure), first
    lead = [c for c in SUMMARY_COLS[:3] + ["precision"] + SUMMARY_COLS[3:] if c in front_csv.columns]
    front_csv[lead + [c for c in front_csv.columns if c not in lead]].to_csv(path, index=False)


def _plots(df: pd.DataFrame, objectives: Mapping[str, str], chosen: pd.Series, chosen_metrics: dict,
           hv_hist: pd.Series, ref: Any, out: Path, lat_note: str) -> dict[str, Any]:
    """The report's figures; name → file (None where there was nothing to draw)."""
    trial_dir = chosen.get("output_dir")
    files = {
        "front_2d": plots.front_2d(df, objectives, out / "front_2d.png", chosen, lat_note),
        "front_3d": plots.front_3d(df, objectives, out / "front_3d.html", chosen, lat_note),
        "parallel": plots.parallel_coordinates(df, objectives, out / "parallel_coordinates.png"),
        "hypervolume": plots.hypervolume_history(hv_hist, ref, out / "hypervolume.png"),
        "gates": plots.copy_trial_image(trial_dir, "gate_histogram.png", out / "chosen_gate_histogram.png"),
        "per_class": plots.per_class_accuracy(chosen_metrics, out / "chosen_per_class_accuracy.png"),
        "leaderboard": plots.leaderboard(df, objectives, out / "leaderboard.png"),
    }
    for name in DIAGNOSTICS:  # the chosen trial's own diagnostics, when it wrote them
        files[name] = plots.copy_trial_image(trial_dir, f"{name}.png", out / f"chosen_{name}.png")
    return files


def _with_int8(front_csv: pd.DataFrame, int8_rows: pd.DataFrame, info: dict[str, Any]) -> pd.DataFrame:
    """The fp32 front rows with their ONNX file's size and place on the front with INT8, then the INT8 rows."""
    from prunevision.quantize import file_sizes

    fp32 = front_csv.copy()
    sizes = [file_sizes(Path(d) / "model.onnx") if isinstance(d, str) and (Path(d) / "model.onnx").is_file()
             else {"bytes": None, "gzip_bytes": None} for d in fp32.get("output_dir", pd.Series([None] * len(fp32)))]
    fp32["onnx_bytes"] = [s["bytes"] for s in sizes]
    fp32["onnx_gzip_bytes"] = [s["gzip_bytes"] for s in sizes]
    on = info.get("front_with_int8") or {}
    fp32["front_with_int8"] = [on.get(f"{t}/fp32") for t in fp32["trial_id"]]
    fp32["int8_error"] = [info["failed"].get(str(t)) for t in fp32["trial_id"]]
    if int8_rows.empty:
        return fp32
    return pd.concat([fp32, int8_rows.assign(reproduce=fp32.set_index("trial_id")["reproduce"]
                                             .reindex(int8_rows["trial_id"]).to_numpy())], ignore_index=True)


def _counts_text(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{v} {k}" for k, v in counts.items())


def _write_report(out: Path, state: dict, df: pd.DataFrame, front: pd.DataFrame, chosen: pd.Series,
                  chosen_metrics: dict, summary: dict, files: dict, reproduce: dict, imp_note: str,
                  hv_hist: pd.Series, int8_rows: pd.DataFrame) -> tuple[Path, Path]:
    run, settings = state["run"], state["settings"]
    objectives = summary["objectives"]
    rep = Report(f"prunevision sweep report: {state['name']}", out)
    rep.heading("Summary")
    excluded = {k: v for k, v in summary["trials"].items() if k != "complete"}
    rep.bullets([
        f"Sweep folder: {summary['sweep_dir']} (results read from {summary['source']})",
        f"Search: Optuna {run.get('sampler', '?')} sampler, seed {run.get('seed', '?')}, {run['num_samples']} "
        f"trials planned, {run.get('max_concurrent', '?')} at a time"
        + (f", scheduler {run['scheduler']}" if run.get("scheduler") else ""),
        "Objectives: " + ", ".join(f"{k} ({v})" for k, v in objectives.items())
        + (f" (the sweep searched on {', '.join(summary['sweep_objectives'])}; fronts use val_accuracy in place "
           "of the test accuracy)" if list(objectives) != list(summary["sweep_objectives"]) else ""),
        ("Accuracy: fronts and the choice use val_accuracy, measured on the validation split held out of the "
         "training images (data.val_split); accuracy is the test accuracy, measured once per trial and reported "
         "alongside, never chosen on" if summary["selection_accuracy"] == "val_accuracy" else
         "Accuracy: the trials report no val_accuracy (a sweep from before the validation split): fronts and the "
         "choice use the test accuracy"),
        f"Trials: {_counts_text(summary['trials'])}. Only complete trials take part in the front"
        + (f"; left out: {_counts_text(excluded)}." if excluded else "."),
        f"Front: {summary['front_size']} trial(s). Hypervolume {summary['hypervolume']:.6g} with reference point "
        f"({', '.join(f'{v:.4g}' for v in summary['reference_point'])}) in minimisation space "
        "(maximised objectives negated; accuracy and sparsity referenced at 0, latency at 1.1 × the worst).",
        "Latency: " + (f"front and next rank re-measured one model at a time on {summary['latency_target']}, "
                       "each next to its dense network (median of interleaved runs); other trials keep the "
                       "figure measured during the sweep" if summary["latency_remeasured"]
                       else "as measured inside the trials (not re-measured)"),
        f"MLflow: {settings['tracking_uri']}, experiment {settings['experiment_id']}, parent run "
        f"{settings['parent_run_id']}",
    ])
    rep.heading("Chosen model against its dense network")
    sel = summary["chosen"]
    bounds = ", ".join(f"{k} {op} {v:g}" for k, (op, v) in sel["bounds"].items()) or "no bounds"
    rep.para(f"Trial {chosen['trial_id']}, selected by '{sel['select']}' ({bounds}). Ship it with: "
             f"prunevision export {summary['sweep_dir']} --select {sel['select']} --out model.onnx "
             "(add --int8 for a verified INT8 model beside it)")
    cm = chosen_metrics
    rows = [
        {"what": "top-1 accuracy (test, reported)", "dense": chosen.get("accuracy_dense"),
         "pruned": chosen.get("accuracy"), "_acc": True},
        {"what": "parameters", "dense": cm.get("params_dense"), "pruned": cm.get("params")},
        {"what": "MACs per image", "dense": cm.get("macs_dense"), "pruned": cm.get("macs")},
        {"what": "weights on disk (bytes)", "dense": cm.get("size_bytes_dense"), "pruned": cm.get("size_bytes")},
        {"what": "latency (ms)" + (" re-measured" if summary["latency_remeasured"] else ""),
         "dense": chosen.get("latency_ms_dense"), "pruned": chosen.get("latency_ms")},
    ]
    if summary["selection_accuracy"] == "val_accuracy":
        rows.insert(0, {"what": "top-1 accuracy (validation, chosen on)", "dense": chosen.get("val_accuracy_dense"),
                        "pruned": chosen.get("val_accuracy"), "_acc": True})
    for r in rows:
        d, p = r.get("dense"), r.get("pruned")
        if r.get("_acc"):
            r["dense"], r["pruned"] = _pct(d), _pct(p)
            r["ratio"] = f"{100 * (p - d):+.2f} points" if _ok(d) and _ok(p) else None
        else:
            r["ratio"] = f"{d / p:.2f}×" if _ok(d) and _ok(p) and p else None
            r["dense"], r["pruned"] = _plain(d), _plain(p)
    rep.table(rows, ["what", "dense", "pruned", "ratio"], ["", "dense", "pruned", "dense / pruned"])
    rep.para("The dense network is the trained gated network with its gates folded in and nothing removed; "
             "the pruned one had its closed channels removed and was fine-tuned.", note=True)
    rep.image(files.get("gates"), "Gate values of the chosen trial after training, with its threshold")
    rep.image(files.get("per_class"), "Per-class test accuracy of the chosen model and its dense network")
    for name, caption in DIAGNOSTICS.items():
        rep.image(files.get(name), caption)

    rep.heading("Pareto front")
    cfg_cols = config_columns(front)
    rows = [dict(r) for _, r in front.iterrows()]
    cols = [c for c in SUMMARY_COLS if c in front.columns] + cfg_cols
    rep.table(rows, cols, [_header(c) for c in cols])
    rep.para("Reproduce a front point (its full resolved config is in configs/):", note=True)
    rep.code("\n".join(reproduce[t] for t in front["trial_id"] if t in reproduce) or "(no configs on disk)")
    rep.image(files.get("front_2d"), "Objective pairs: all complete trials by Pareto rank, the front of each "
                                     "projection, dense networks (x) and the chosen model (star)")
    rep.embed_html(files.get("front_3d"), "Interactive 3-D view of the objectives (hover for each trial's config)")
    rep.image(files.get("parallel"), "Hyperparameters and objectives of each complete trial, coloured by rank")
    rep.image(files.get("importance"), "Hyperparameter importance per objective (Optuna study)")
    if imp_note:
        rep.para(imp_note, note=True)
    rep.image(files.get("hypervolume"), "Hypervolume after each finished trial")
    rep.image(files.get("leaderboard"), "Pruning methods compared: best accuracy, and the best speed-up and "
                                        "sparsity within 2 points of it")

    if "int8" in summary:
        _int8_section(rep, front, int8_rows, summary, files)

    rep.heading("All trials")
    others = df[df["status"] != "complete"]
    cols = ["trial_id", "status", "rank"] + [c for c in ("val_accuracy", "accuracy", "param_sparsity", "latency_ms",
                                                          "epochs_done", "num_failures") if c in df.columns]
    rep.table([dict(r) for _, r in df.sort_values(["rank"]).iterrows()], cols, [_header(c) for c in cols])
    if len(others):
        rep.para(f"{len(others)} trial(s) are not complete (stopped early by the scheduler, errored or still "
                 "running) and are kept out of every front.", note=True)
    return rep.write()


def _int8_section(rep: Report, front: pd.DataFrame, int8_rows: pd.DataFrame, summary: dict, files: dict) -> None:
    from prunevision.metrics import format_speedup  # lazily: prunevision imports torch

    info = summary["int8"]
    split = "validation" if summary["selection_accuracy"] == "val_accuracy" else "test"
    rep.heading("The front in INT8")
    rep.para(f"Each front trial's model.onnx statically quantized with ONNX Runtime (QDQ, per-channel INT8 weights, "
             f"uint8 activations, {info['calibration_method']} calibration on {info['calibration_size']} training "
             "images, a seeded sample), then verified: top-1 accuracy of the fp32 and INT8 files under ONNX Runtime "
             "on the trial's validation and test images, top-1 agreement, file size, and latency measured in one "
             f"run next to the fp32 model and its dense network ({info['latency']}). Variants losing more than "
             f"{info['max_drop_points']:g} point(s) of {split} accuracy are marked; none is refused here (export "
             "refuses).")
    rows = []
    for _, r in int8_rows.iterrows():
        t = str(r["trial_id"])
        f = front[front["trial_id"].astype(str) == t].iloc[0]
        rows.append({"trial": t, "val32": _pct(r.get("val_accuracy_fp32_onnx")), "val8": _pct(r.get("val_accuracy")),
                     "test32": _pct(r.get("accuracy_fp32_onnx")), "test8": _pct(r.get("accuracy")),
                     "drop": f"{r['int8_drop_points']:+.2f}" + ("" if r["int8_within_limit"] else " (over)"),
                     "agree": f"{100 * r['int8_agreement']:.2f} %",
                     "size": f"{_mb(info['results'][t]['size']['fp32']['bytes'])} → {_mb(r['onnx_bytes'])}",
                     "gzip": f"{_mb(info['results'][t]['size']['fp32']['gzip_bytes'])} → {_mb(r['onnx_gzip_bytes'])}",
                     "lat32": f"{r['latency_ms_fp32_same_run']:.3f}", "lat8": f"{r['latency_ms']:.3f} "
                     f"[{r['latency_ms_p10']:.3f}–{r['latency_ms_p90']:.3f}]",
                     "speedup": format_speedup(r["int8_speedup_vs_fp32"], r.get("int8_speedup_vs_fp32_lo"),
                                               r.get("int8_speedup_vs_fp32_hi")),
                     "front": ("fp32 " if info["front_with_int8"].get(f"{t}/fp32") else "")
                     + ("INT8" if r.get("front_with_int8") else ""), "sparsity": _pct(f.get("param_sparsity"))})
    cols = ["trial", "sparsity", "val32", "val8", "test32", "test8", "drop", "agree", "size", "gzip", "lat32", "lat8",
            "speedup", "front"]
    rep.table(rows, cols, ["trial", "params removed", "val fp32", "val INT8", "test fp32", "test INT8",
                           "drop (points)", "top-1 agreement", "ONNX MB fp32 → INT8", "gzip MB", "fp32 ms",
                           "INT8 ms [p10–p90]", "INT8 speed-up", "on the front with INT8"])
    for t, e in info["failed"].items():
        rep.para(f"Trial {t}: no INT8 variant: {e}", note=True)
    rep.para("Accuracies here are ONNX Runtime's on the exported files (they match the trials' PyTorch figures to "
             "the export tolerance). 'On the front with INT8': not dominated by any fp32 or INT8 variant of the front "
             "on the sweep's objectives, with this run's latencies. pareto.csv holds the INT8 rows (precision int8).",
             note=True)
    rep.image(files.get("int8_front"), "Accuracy against latency of each front trial in fp32 (circle) and INT8 "
                                       "(triangle), measured in the same run")


def _mb(v: Any) -> str:
    return f"{v / 1e6:.2f}" if _ok(v) else "–"


def _header(col: str) -> str:
    """Table header: config keys without their prefix; the test accuracy says it is one."""
    return {"accuracy": "accuracy (test)", "accuracy_dense": "accuracy_dense (test)"}.get(col, col.replace(
        "config/", ""))


def _ok(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and np.isnan(v))


def _pct(v: Any) -> str | None:
    return f"{100 * float(v):.2f} %" if _ok(v) else None


def _plain(v: Any) -> str | None:
    if not _ok(v):
        return None
    return f"{v:.4f}" if isinstance(v, float) and v < 100 else f"{int(v):,}"


def _log_to_parent(settings: dict, out: Path, summary: dict) -> None:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(settings["tracking_uri"])
    run_id = settings["parent_run_id"]
    for name in ("report.html", "report.md", "pareto.csv", "trials.csv", "summary.json"):
        if (out / name).is_file():
            c.log_artifact(run_id, str(out / name), "analysis")
    for p in sorted(out.glob("*.png")) + sorted(out.glob("*.html")):
        if p.name != "report.html":
            c.log_artifact(run_id, str(p), "analysis/plots")
    metrics = {"analysis.front_size": summary["front_size"], "analysis.trials_complete":
               summary["trials"].get("complete", 0)}
    if np.isfinite(summary["hypervolume"]):
        metrics["analysis.hypervolume"] = summary["hypervolume"]
    for k, v in metrics.items():
        c.log_metric(run_id, k, float(v))
    c.set_tag(run_id, "prunevision.chosen_trial", str(summary["chosen"]["trial_id"]))
    summary["mlflow_parent_run"] = run_id

"""A sweep as one pandas DataFrame: one row per trial, sampled config and final metrics as columns.

Three sources give the same columns where they can:

- ``load_ray(sweep_dir)``: Ray Tune's files in the sweep folder (``*/params.json``,
  ``*/result.json`` and the trial statuses in ``experiment_state-*.json``, read as JSON; nothing
  is unpickled). Only this source knows where each trial's outputs (pruned model, ONNX files,
  metrics.json) are.
- ``load_mlflow(tracking_uri, parent_run_id=... | experiment=...)``: the child runs in MLflow.
- ``load_optuna(storage, study_name, objectives)``: the trials of the Optuna study.

Columns: ``trial_id``, ``status`` (one of STATUSES), ``finished_at`` (unix seconds, orders the
hypervolume history), ``config/<key>`` for each sampled parameter, every final metric
(``val_accuracy`` on the validation split, ``accuracy`` on the test split, ``param_sparsity``,
``latency_ms``, ``accuracy_dense``, ...), and for Ray
``trial_dir`` and ``output_dir``. Only ``complete`` rows take part in fronts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from sweeps.folder import (  # noqa: F401  (the sweep folder's format; re-exported for analysis modules)
    FINAL_KEY,
    STATE_FILE,
    STUDY_FILE,
    SweepDataError,
    last_result,
    ray_statuses,
    ray_trial_id,
    read_state,
    trial_status,
)

STATUSES = ("complete", "stopped", "error", "running", "pending")
CONFIG_PREFIX = "config/"
# Ray's bookkeeping in every result: not metrics of the trial
_RAY_KEYS = {"timestamp", "checkpoint_dir_name", "done", "training_iteration", "trial_id", "date", "time_this_iter_s",
             "time_total_s", "pid", "hostname", "node_ip", "config", "time_since_restore", "iterations_since_restore",
             "node_id", "mlflow_unsent", FINAL_KEY}


def trial_outputs(trial_dir: Path) -> Path | None:
    """The folder holding a trial's outputs: its newest checkpoint with a metrics.json (how the
    sweep persists them), else the ``artifacts`` working folder of a local run."""
    ckpts = sorted((p for p in trial_dir.glob("checkpoint_*") if (p / "metrics.json").is_file()),
                   key=lambda p: p.name)
    if ckpts:
        return ckpts[-1]
    if (trial_dir / "artifacts" / "metrics.json").is_file():
        return trial_dir / "artifacts"
    return None


def _metrics(record: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if k not in _RAY_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def load_ray(sweep_dir: str | Path) -> pd.DataFrame:
    """Every trial Ray has started in the sweep folder (finished or not)."""
    sweep_dir = Path(sweep_dir)
    read_state(sweep_dir)
    statuses = ray_statuses(sweep_dir)
    rows = []
    for params_file in sorted(sweep_dir.glob("*/params.json")):
        tdir = params_file.parent
        try:
            params = json.loads(params_file.read_text())
        except ValueError:
            params = {}
        last = last_result(tdir / "result.json")
        tid = ray_trial_id(last, statuses, tdir)
        status = trial_status(last, (statuses.get(tid) or {}).get("status"))
        out = trial_outputs(tdir)
        row = {"trial_id": tid or tdir.name, "status": status, "finished_at": last.get("timestamp", math.nan),
               "epochs_done": last.get("epoch", math.nan),
               "num_failures": (statuses.get(tid) or {}).get("num_failures", 0),
               "trial_dir": str(tdir), "output_dir": str(out) if out else None}
        row.update({CONFIG_PREFIX + k: v for k, v in params.items() if not k.startswith("_")})
        row.update(_metrics(last) if status == "complete" else
                   {k: v for k, v in _metrics(last).items()
                    if k in ("epoch", "val_accuracy", "test_accuracy", "score")})
        rows.append(row)
    return _frame(rows)


def load_optuna(storage: str, study_name: str, objectives: Mapping[str, str]) -> pd.DataFrame:
    """The Optuna study's trials; objective values named after ``objectives`` (in order)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        raise SweepDataError(f"no Optuna study {study_name!r} in {storage}") from None
    names = list(objectives)
    state_map = {"COMPLETE": "complete", "PRUNED": "stopped", "FAIL": "error", "RUNNING": "running",
                 "WAITING": "pending"}
    rows = []
    for t in study.get_trials(deepcopy=False):
        row: dict[str, Any] = {"trial_id": f"optuna-{t.number}", "optuna_number": t.number,
                               "status": state_map.get(t.state.name, t.state.name.lower()),
                               "finished_at": t.datetime_complete.timestamp() if t.datetime_complete else math.nan}
        row.update({CONFIG_PREFIX + k: v for k, v in t.params.items()})
        if t.values is not None and len(t.values) == len(names):
            row.update(dict(zip(names, map(float, t.values))))
        rows.append(row)
    return _frame(rows)


def load_mlflow(tracking_uri: str, *, parent_run_id: str | None = None, experiment: str | None = None,
                config_keys: list[str] | None = None) -> pd.DataFrame:
    """Trial runs from MLflow: the children of ``parent_run_id``, or every run of ``experiment``
    that has a trial id. ``config_keys``: which params become ``config/`` columns (default: the
    params whose values differ between runs)."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri)
    if parent_run_id:
        try:
            exp_ids = [c.get_run(parent_run_id).info.experiment_id]
        except Exception as e:
            raise SweepDataError(f"MLflow run {parent_run_id} not found at {tracking_uri}: {str(e)[:200]}") from None
        flt = f"tags.mlflow.parentRunId = '{parent_run_id}'"
    elif experiment:
        exp = c.get_experiment_by_name(experiment)
        if exp is None:
            raise SweepDataError(f"no MLflow experiment {experiment!r} at {tracking_uri}")
        exp_ids, flt = [exp.experiment_id], "tags.`prunevision.trial_id` != ''"
    else:
        raise SweepDataError("load_mlflow needs parent_run_id or experiment")
    runs = []
    token = None
    while True:
        page = c.search_runs(exp_ids, flt, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            break
    # `prunevision export` logs its export-<trial> runs under the parent too: they are not trials
    runs = [r for r in runs if "prunevision.source_trial" not in r.data.tags]
    if config_keys is None:
        seen: dict[str, set] = {}
        for r in runs:
            for k, v in r.data.params.items():
                seen.setdefault(k, set()).add(v)
        config_keys = sorted(k for k, v in seen.items() if len(v) > 1)
    rows = []
    for r in runs:
        m = r.data.metrics
        final = bool(m.get(FINAL_KEY))
        status = ("complete" if final else "error" if r.info.status in ("FAILED", "KILLED")
                  else "running" if r.info.status == "RUNNING" else "stopped")
        row = {"trial_id": r.data.tags.get("prunevision.trial_id", r.info.run_id), "status": status,
               "run_id": r.info.run_id,
               "finished_at": (r.info.end_time or math.nan) / 1000 if r.info.end_time else math.nan}
        row.update({CONFIG_PREFIX + k: _number(r.data.params.get(k)) for k in config_keys})
        row.update({k: v for k, v in m.items() if k not in _RAY_KEYS} if final else {})
        rows.append(row)
    return _frame(rows)


def _number(v: str | None) -> Any:
    if v is None:
        return None
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    if df.empty:
        df = pd.DataFrame(columns=["trial_id", "status", "finished_at"])
    return df.sort_values("finished_at", kind="stable", na_position="last").reset_index(drop=True)


def load_sweep(sweep_dir: str | Path, source: str = "ray") -> pd.DataFrame:
    """The sweep in ``sweep_dir`` from ``source`` (ray, mlflow or optuna). Rows from MLflow and
    Optuna get the Ray trial's folders where they can be matched (by trial id, or by config)."""
    sweep_dir = Path(sweep_dir)
    state = read_state(sweep_dir)
    if source == "ray":
        return load_ray(sweep_dir)
    space = list((state.get("source") or {}).get("space") or {})
    if source == "mlflow":
        s = state["settings"]
        df = load_mlflow(s["tracking_uri"], parent_run_id=s["parent_run_id"])
        ray = load_ray(sweep_dir)
        if not ray.empty and not df.empty:
            df = df.merge(ray[["trial_id", "trial_dir", "output_dir"]], on="trial_id", how="left")
        return df
    if source == "optuna":
        db = sweep_dir / STUDY_FILE
        if not db.is_file():
            raise SweepDataError(f"{sweep_dir} has no Optuna study ({STUDY_FILE})")
        df = load_optuna(f"sqlite:///{db}", state["name"], state["run"]["objectives"])
        ray = load_ray(sweep_dir)
        keys = [c for c in (CONFIG_PREFIX + k for k in space) if c in df.columns and c in ray.columns]
        if keys and not ray.empty and not df.empty:  # a sampled config identifies its Ray trial
            by_cfg = {tuple(map(repr, r[keys])): r for _, r in ray.iterrows()}
            for col in ("trial_dir", "output_dir"):
                df[col] = [by_cfg.get(tuple(map(repr, r[keys])), {}).get(col) for _, r in df.iterrows()]
        return df
    raise SweepDataError(f"unknown source {source!r} (ray, mlflow or optuna)")


def status_counts(df: pd.DataFrame) -> dict[str, int]:
    return {s: int((df["status"] == s).sum()) for s in STATUSES if (df["status"] == s).any()} if len(df) else {}


def config_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith(CONFIG_PREFIX)]

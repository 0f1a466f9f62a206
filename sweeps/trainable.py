"""The Ray Tune trainable: a plain function of the trial's config.

It turns the sampled parameters (dotted config keys) into prunevision's dataclasses, runs the
trial pipeline, reports every epoch with ``ray.tune.report`` and a checkpoint, and reports the
final metrics once pruning, measurement and export are done (marked ``trial_final``), with the
trial's output folder as its final checkpoint. A trial
restarted after a failure or a restore goes on from its last checkpoint without repeating
finished epochs, and keeps logging to the same MLflow child run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import ray
from ray import tune

from prunevision.config import from_dict
from prunevision.pipeline import run_training
from sweeps.run import FINAL_KEY
from sweeps.spec import scalar_score
from sweeps.tracking import TrialLogger

# metrics reported at the end (besides the objectives): what the analysis step reads. val_accuracy
# (validation split) is what the sweep optimises; accuracy (test split) is reported alongside.
FINAL_METRICS = ("val_accuracy", "val_accuracy_dense", "accuracy", "accuracy_dense", "accuracy_before_finetune",
                 "params", "params_dense", "macs", "macs_dense", "param_sparsity", "macs_reduction", "gate_sparsity",
                 "zero_fraction", "size_bytes", "size_gzip_bytes", "latency_ms", "latency_ms_p90", "latency_ms_dense",
                 "latency_speedup", "onnx_max_abs_diff", "train_time_s", "mean_gate", "gates_below_threshold",
                 "macs_share", "target_macs")


def sweep_trial(config: dict[str, Any], *, base: dict[str, Any], settings: dict[str, Any]) -> None:
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # TrialLogger retries itself
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    params = {k: v for k, v in config.items() if not k.startswith("_")}
    cfg = from_dict(base, params)
    ctx = tune.get_context()
    trial_dir = Path(ctx.get_trial_dir())
    out = trial_dir / "artifacts"
    logger = TrialLogger(settings["tracking_uri"], settings["experiment_id"], settings["parent_run_id"],
                         ctx.get_trial_id(), ctx.get_trial_name(), trial_dir)
    logger.start(cfg.flat())

    resume = None
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume = out / "resume.pt"
            out.mkdir(parents=True, exist_ok=True)
            shutil.copy(Path(d) / "checkpoint.pt", resume)

    weights = settings["score"]
    node_id = ray.get_runtime_context().get_node_id()  # where this attempt runs (several nodes)
    # test hook: fail every trial once, mid-run (markers in a folder every attempt can see)
    fail_once = settings.get("_fail_once_after_epoch")
    marker = Path(settings.get("_fail_marker_dir") or trial_dir) / f"{ctx.get_trial_id()}.failed_once"

    def report(record: dict[str, Any], save) -> None:
        metrics = dict(record, score=scalar_score(record, weights), node_id=node_id)
        logger.log_metrics(metrics, step=record["epoch"])
        with tempfile.TemporaryDirectory() as tmp:
            save(Path(tmp) / "checkpoint.pt")
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
        if fail_once and record["epoch"] == fail_once and not marker.exists():
            marker.touch()
            raise RuntimeError("injected failure (test)")

    try:
        metrics = run_training(cfg, out, resume=resume, reporter=report, log=None)
    except BaseException:
        logger.finish("FAILED")
        raise
    final = {k: metrics[k] for k in FINAL_METRICS if isinstance(metrics.get(k), (int, float))}
    last = metrics["history"][-1] if metrics.get("history") else {}
    final.update({"epoch": cfg.train.epochs, "score": scalar_score(last, weights), FINAL_KEY: 1})
    logger.log_metrics(final, step=cfg.train.epochs + 1)
    for name in ("metrics.json", "config.yaml", "gate_history.json"):
        logger.log_artifact(out / name)
    for png in sorted(out.glob("*.png")):  # gate histograms, filter grid, pruning steps, ratio curve
        logger.log_artifact(png, "plots")
    if settings.get("log_models"):
        for name in ("pruned.safetensors", "model.onnx"):
            logger.log_artifact(out / name, "model")
    final["mlflow_unsent"] = logger.finish("FINISHED")
    final["node_id"] = node_id
    # The trial's outputs (metrics.json, pruned.safetensors, model.onnx, ...) travel to the sweep's
    # storage as its final checkpoint: the one place Ray persists reliably on any node.
    if resume is not None:
        resume.unlink(missing_ok=True)
    tune.report(final, checkpoint=tune.Checkpoint.from_directory(out))

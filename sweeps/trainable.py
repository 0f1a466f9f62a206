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
import time
from pathlib import Path
from typing import Any

from ray import tune

from prunevision.config import from_dict
from prunevision.metrics import FINAL_METRICS  # reported at the end: what the analysis step reads
from prunevision.pipeline import run_training
from sweeps.folder import FINAL_KEY, MLFLOW_TRIAL_KEY, RESUME_KEY, interrupted_checkpoint
from sweeps.placement import current_placement
from sweeps.spec import scalar_score
from sweeps.tracking import PENDING_FILE, TrialLogger, dataset_record


def sweep_trial(config: dict[str, Any], *, base: dict[str, Any], settings: dict[str, Any]) -> None:
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # TrialLogger retries itself
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    params = {k: v for k, v in config.items() if not k.startswith("_")}
    cfg = from_dict(base, params)
    ctx = tune.get_context()
    # where this attempt runs: node, the GPUs Ray assigned (CUDA_VISIBLE_DEVICES) and the device
    # it trains on, in every result, metrics.json and the child run's params (first attempt's)
    where = current_placement(cfg.train.device)
    placed = {k: where[k] for k in ("node_id", "gpu_ids", "device")}
    # when this attempt ran (unix seconds; nested, so that neither MLflow nor the analysis takes
    # the times for metrics): which trials ran side by side
    started_at = time.time()
    trial_dir = Path(ctx.get_trial_dir())
    out = trial_dir / "artifacts"
    # a trial `sweep resume` queued again goes on in the MLflow child run of the trial it replaces,
    # from that trial's newest checkpoint (unless Ray already restored one of its own)
    logger = TrialLogger(settings["tracking_uri"], settings["experiment_id"], settings["parent_run_id"],
                         config.get(MLFLOW_TRIAL_KEY) or ctx.get_trial_id(), ctx.get_trial_name(), trial_dir)
    logger.start({**cfg.flat(), **placed})

    def resume_from(checkpoint: Path) -> Path:  # a copy the trial may delete once it has finished
        out.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(checkpoint, out / "resume.pt"))

    resume = None
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume = resume_from(Path(d) / "checkpoint.pt")
            # what the attempt before could not send to MLflow (its node may be gone): sent first
            logger.adopt(Path(d) / PENDING_FILE)
    elif config.get(RESUME_KEY) and settings.get("sweep_dir"):
        prior = interrupted_checkpoint(settings["sweep_dir"], config[RESUME_KEY])
        if prior is not None:
            resume = resume_from(prior)

    weights = settings["score"]

    def report(record: dict[str, Any], save) -> None:
        metrics = dict(record, score=scalar_score(record, weights), **placed)
        logger.log_metrics(metrics, step=record["epoch"])
        with tempfile.TemporaryDirectory() as tmp:
            save(Path(tmp) / "checkpoint.pt")
            logger.carry(tmp)  # what MLflow has not had yet outlives this node
            tune.report(dict(metrics, span={"started_at": started_at}), checkpoint=tune.Checkpoint.from_directory(tmp))

    try:
        metrics = run_training(cfg, out, resume=resume, reporter=report, log=None, device=where["device"],
                               placement={k: where[k] for k in ("node_id", "gpu_ids", "cuda_visible_devices")})
    except BaseException:
        logger.finish("FAILED")
        raise
    final = {k: metrics[k] for k in FINAL_METRICS if isinstance(metrics.get(k), (int, float))}
    last = metrics["history"][-1] if metrics.get("history") else {}
    final.update({"epoch": cfg.train.epochs, "score": scalar_score(last, weights), FINAL_KEY: 1})
    logger.log_metrics(final, step=cfg.train.epochs + 1)
    logger.log_dataset(dataset_record(cfg.to_dict()["data"], cfg.seed, metrics.get("dataset") or {}))
    for name in ("metrics.json", "config.yaml", "gate_history.json"):
        logger.log_artifact(out / name)
    for png in sorted(out.glob("*.png")):  # gate histograms, filter grid, pruning steps, ratio curve
        logger.log_artifact(png, "plots")
    if settings.get("log_models"):
        for name in ("pruned.safetensors", "model.onnx"):
            logger.log_artifact(out / name, "model")
        logger.log_model(out / "model.onnx", step=cfg.train.epochs + 1)  # linked to the final metrics
    final["mlflow_unsent"] = logger.finish("FINISHED")
    final.update(placed, span={"started_at": started_at, "finished_at": time.time()})
    # The trial's outputs (metrics.json, pruned.safetensors, model.onnx, ...) travel to the sweep's
    # storage as its final checkpoint: the one place Ray persists reliably on any node.
    if resume is not None:
        resume.unlink(missing_ok=True)
    logger.carry(out, outputs=out)  # the driver sends it at the end of the sweep
    tune.report(final, checkpoint=tune.Checkpoint.from_directory(out))

"""`prunevision export SWEEP_DIR --select ...`: ship the chosen frontier model.

Loads the chosen trial's pruned checkpoint (retraining the trial from its config only when the
sweep did not keep it, and saying so), exports ONNX, verifies it against PyTorch with ONNX
Runtime, writes a model card next to it (``model.json``) and registers the ONNX model in the
MLflow model registry with the alias ``champion``.

With ``int8``, a statically quantized INT8 model (``model.int8.onnx``) is made and verified
(:mod:`analysis.int8`) before anything is registered; it is registered as its own model,
``<name>-int8``, logged in the same export run, with the alias ``champion`` too. A refused or
failed INT8 model stops the export before registration: the fp32 file and its card stay.
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.choose import accuracy_column, choose, selection_objectives
from analysis.report import config_of
from analysis.results import SweepDataError, load_sweep, read_state
from prunevision.fsutil import atomic_write
from prunevision.quantize import sha256_of

CHAMPION = "champion"
INT8_SUFFIX = "-int8"  # the INT8 model's registered name: <name>-int8


def _retrain(row: pd.Series, work: Path, log: Callable[[str], None] | None) -> Path:
    """Run the trial again from its saved config (same seed) when its pruned model is gone."""
    from prunevision.config import load_config
    from prunevision.pipeline import run_training

    cfg_path = Path(row["output_dir"]) / "config.yaml" if isinstance(row.get("output_dir"), str) else None
    if cfg_path is None or not cfg_path.is_file():
        raise SweepDataError(f"trial {row['trial_id']}: neither its pruned model nor its config.yaml is on disk; "
                             "it cannot be exported or retrained")
    cfg = load_config(cfg_path, {"measure.latency": False})
    if log:
        log(f"trial {row['trial_id']}: the sweep did not keep its pruned model; RETRAINING it from {cfg_path} "
            f"({cfg.train.epochs} epochs, seed {cfg.seed}) — its metrics may differ slightly from the sweep's")
    run_training(cfg, work, log=log)
    return work / "pruned.safetensors"


def _trial_run_id(settings: dict, trial_id: str) -> str | None:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(settings["tracking_uri"])
    runs = c.search_runs([settings["experiment_id"]],
                         filter_string=f"tags.`prunevision.trial_id` = '{trial_id}' and "
                                       f"tags.`mlflow.parentRunId` = '{settings['parent_run_id']}'", max_results=1)
    return runs[0].info.run_id if runs else None


def _check_images(meta: dict, output_dir: Path | None, n: int = 16):
    """Real test images for the ONNX check when the trial's dataset can be read quickly, else None."""
    try:
        from prunevision.config import load_config
        from prunevision.data import DeviceLoader, load_dataset

        cfg = load_config(output_dir / "config.yaml")
        data = load_dataset(cfg.data, seed=cfg.seed)
        x, y = data.test_x[:n].cpu(), data.test_y[:n].cpu()
        return next(iter(DeviceLoader(x, y, n, data.mean, data.std, train=False)))[0]
    except Exception:
        return None


def card_path_for(out: Path) -> Path:
    """``model.onnx`` → ``model.json``; ``other.onnx`` → ``other.json``."""
    return out.with_name("model.json") if out.stem == "model" else out.with_name(out.stem + ".json")


def _card_metrics(keep: tuple[str, ...], metrics: Mapping[str, Any], row: Mapping[str, Any],
                  analysed: bool) -> dict[str, Any]:
    """The model card's figures: the trial's own, except latency where the analysis re-measured it
    (the card then shows the figures the report chose on)."""
    out = {}
    for k in keep:
        v = metrics.get(k, row.get(k))
        if analysed and k.startswith("latency_") and row.get(k) is not None and not pd.isna(row.get(k)):
            v = float(row[k])
        if v is not None:
            out[k] = v
    if analysed and row.get("latency_target") is not None:
        out["latency_measured_by"] = str(row["latency_target"])
    return out


def export_chosen(sweep_dir: str | Path, out: str | Path, *, select: str = "knee",
                  bounds: Mapping[str, tuple[str, float]] | None = None, exporter: str = "dynamo",
                  register: bool = True, registered_model: str | None = None,
                  int8: Mapping[str, Any] | None = None,
                  log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """``int8``: make and verify an INT8 model too (the keyword arguments of
    :func:`analysis.int8.ship_int8`: calibration_size, max_drop, force, method, data_root)."""
    from prunevision.checkpoint import load_pruned, read_pruned
    from prunevision.export import export_onnx

    sweep_dir = Path(sweep_dir).resolve()
    state = read_state(sweep_dir)
    settings = state["settings"]
    out = Path(out)
    if out.suffix != ".onnx":
        raise SweepDataError(f"--out must name an .onnx file, got {out}")
    if register:  # before any work: an unreachable registry must not cost an export first
        from sweeps.tracking import check_reachable

        check_reachable(settings["tracking_uri"])
    df = load_sweep(sweep_dir, "ray")
    # val_accuracy in place of a test-accuracy objective where the trials report it (as choose does)
    objectives = selection_objectives(state["run"]["objectives"], df)
    row = choose(df, objectives, select, bounds)
    analysed = analysis_choice(sweep_dir, df, select, bounds)
    chosen_by = "trial latencies"
    if analysed is not None:  # the report re-measured latency: ship the trial it chose
        if str(analysed["trial_id"]) != str(row["trial_id"]) and log:
            log(f"the analysis ({ANALYSIS_SUMMARY.as_posix()}, re-measured latency) chose trial "
                f"{analysed['trial_id']}; the trials' own latencies would have chosen {row['trial_id']}")
        row, chosen_by = analysed, f"analysis ({ANALYSIS_SUMMARY.as_posix()}, re-measured latency)"
    tid = str(row["trial_id"])
    output_dir = Path(row["output_dir"]) if isinstance(row.get("output_dir"), str) else None
    ckpt = output_dir / "pruned.safetensors" if output_dir else None
    retrained = False
    with tempfile.TemporaryDirectory(prefix="prunevision-retrain-") as tmp:
        if ckpt is None or not ckpt.is_file():
            ckpt = _retrain(row, Path(tmp), log)
            retrained = True
        meta, _ = read_pruned(ckpt)
        model = load_pruned(ckpt)
        size = int(meta["image_size"])
        real = _check_images(meta, output_dir) if output_dir else None
        check = export_onnx(model, out, size, check_inputs=[real] if real is not None else [], exporter=exporter)
        metrics = json.loads((ckpt.parent / "metrics.json").read_text()) if (ckpt.parent / "metrics.json").is_file() \
            else {}
        config_yaml = (ckpt.parent / "config.yaml").read_text() if (ckpt.parent / "config.yaml").is_file() else None
        cfg = _config(ckpt.parent / "config.yaml") if int8 is not None else None
    keep = ("val_accuracy", "val_accuracy_dense", "accuracy", "accuracy_dense", "accuracy_before_finetune",
            "param_sparsity", "params", "params_dense", "macs", "macs_dense", "macs_reduction", "size_bytes",
            "size_bytes_dense", "latency_ms", "latency_ms_dense", "latency_speedup", "latency_speedup_lo",
            "latency_speedup_hi", "per_class_accuracy")
    card: dict[str, Any] = {
        "name": registered_model or f"prunevision-{state['name']}",
        "file": str(out.resolve()), "sha256": sha256_of(out), "size_bytes": out.stat().st_size,
        "input": metrics.get("input") or {"size": size, "mean": meta["extra"].get("mean"),
                                          "std": meta["extra"].get("std"), "layout": "NCHW float32"},
        "output": {"name": "logits", "classes": meta["extra"].get("classes")},
        "metrics": _card_metrics(keep, metrics, row, analysed is not None),
        "sweep_metrics": {k: (None if pd.isna(row.get(k)) else float(row[k])) for k in objectives if k in row},
        "selection": {"strategy": select, "bounds": {k: list(v) for k, v in (bounds or {}).items()},
                      "objectives": objectives, "accuracy": accuracy_column(df), "chosen_by": chosen_by},
        "source": {"sweep": state["name"], "sweep_dir": str(sweep_dir), "trial_id": tid,
                   "trial_dir": row.get("trial_dir"), "checkpoint": None if retrained else str(ckpt),
                   "retrained": retrained, "mlflow_run_id": None, "tracking_uri": settings["tracking_uri"]},
        "config": config_of(row),
        "full_config": _yaml(config_yaml),
        "verification": _verification(check, real is not None),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": platform.node(),
    }
    card_path = card_path_for(out)
    if int8 is not None:  # before anything is registered: a refused INT8 model registers nothing
        from analysis.int8 import export_int8

        export_int8(out, card, card_path, cfg, size, registered=register, log=log, **int8)
    else:  # an INT8 file left by an earlier `export --int8` to the same place is not this model's
        from prunevision.quantize import int8_path

        int8_path(out).unlink(missing_ok=True)
    if register:
        card["source"]["mlflow_run_id"] = _trial_run_id(settings, tid)
        card["registry"] = _register(out, card, settings, size)
    return _write_card(card, card_path)


def _write_card(card: dict[str, Any], card_path: Path) -> dict[str, Any]:
    """The model card, written all at once (a reader never sees half of it), and where it is."""
    atomic_write(card_path, json.dumps(card, indent=2, default=str))
    card["card"] = str(card_path)
    return card


ANALYSIS_SUMMARY = Path("analysis") / "summary.json"  # what `prunevision analyze SWEEP_DIR` writes


def analysis_choice(sweep_dir: Path, df: pd.DataFrame, select: str,
                    bounds: Mapping[str, tuple[str, float]] | None) -> pd.Series | None:
    """The trial the sweep's analysis chose (on re-measured latency), when it made the same
    selection (strategy and bounds) over the same complete trials; else None. The summary is read
    as untrusted JSON: anything off and the export chooses by itself."""
    p = sweep_dir / ANALYSIS_SUMMARY
    try:
        summary = json.loads(p.read_text()) if p.is_file() else None
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or not isinstance(summary.get("chosen"), dict):
        return None
    chosen = summary["chosen"]
    same = (chosen.get("select") == select
            and chosen.get("bounds") == {k: list(v) for k, v in (bounds or {}).items()}
            and isinstance(summary.get("trials"), dict)
            and summary["trials"].get("complete") == int((df["status"] == "complete").sum()))
    rows = df[(df["trial_id"].astype(str) == str(chosen.get("trial_id"))) & (df["status"] == "complete")]
    return rows.iloc[0] if same and len(rows) == 1 else None


def _verification(check: dict[str, Any], real_images: bool) -> dict[str, Any]:
    """The fp32 export's check against PyTorch, as the model card records it."""
    import onnxruntime
    import torch

    from prunevision.export import TOLERANCE

    return {"engine": f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider",
            "reference": f"PyTorch {torch.__version__} eager, CPU fp32", "max_abs_diff": check["max_abs_diff"],
            "tolerance": TOLERANCE, "batches": check["checked_batches"], "real_images": real_images,
            "exporter": check["exporter"], "passed": True}


def export_checkpoint_int8(checkpoint: str | Path, out: str | Path, check: dict[str, Any], size: int, *,
                           int8: Mapping[str, Any], log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """The INT8 model of a checkpoint just exported to ``out`` (``prunevision export CHECKPOINT --int8``),
    calibrated and verified on the images its config names, and a model card (``model.json``)
    holding the fp32 export's check and the ``int8`` section. Nothing is registered (no sweep)."""
    from analysis.int8 import export_int8, model_config

    checkpoint, out = Path(checkpoint), Path(out)
    mean = std = classes = None
    if checkpoint.suffix == ".safetensors":
        from prunevision.checkpoint import read_pruned

        extra = read_pruned(checkpoint)[0].get("extra") or {}
        mean, std, classes = extra.get("mean"), extra.get("std"), extra.get("classes")
    cfg = model_config(checkpoint)
    card: dict[str, Any] = {
        "file": str(out.resolve()), "sha256": sha256_of(out), "size_bytes": out.stat().st_size,
        "input": {"size": size, "mean": mean, "std": std, "layout": "NCHW float32"},
        "output": {"name": "logits", "classes": classes},
        "source": {"checkpoint": str(checkpoint.resolve())},
        "full_config": cfg.to_dict() if cfg is not None else None,
        "verification": _verification(check, False),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": platform.node(),
    }
    card_path = card_path_for(out)
    report = export_int8(out, card, card_path, cfg, size, registered=False, log=log, **int8)
    for k in ("mean", "std"):  # a training checkpoint: normalised as its dataset is
        card["input"][k] = card["input"][k] or report["calibration"]["normalisation"][k]
    return _write_card(card, card_path)


def _config(path: Path):
    """The trial's experiment config (what INT8 calibrates and verifies on), None if it is gone."""
    from prunevision.config import load_config

    return load_config(path) if path.is_file() else None


def _yaml(text: str | None) -> Any:
    if not text:
        return None
    import yaml

    return yaml.safe_load(text)


def _register(onnx_path: Path, card: dict, settings: dict, size: int) -> dict[str, Any]:
    """Log the ONNX model in an export run under the sweep's parent run, register it and point the
    ``champion`` alias at the new version. With an INT8 model in the card, log it in the same run
    and register it as its own model, ``<name>-int8``, with its own ``champion`` alias. Versions
    made before a failure are deleted again: a failed registration leaves nothing registered."""
    import mlflow
    import numpy as np
    import onnx
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient

    name = card["name"]
    q = card.get("int8") if (card.get("int8") or {}).get("shipped") else None
    from sweeps.tracking import use_tracking_uri

    c = MlflowClient(settings["tracking_uri"])
    x = np.zeros((1, 3, size, size), dtype=np.float32)
    n_classes = len(card["output"]["classes"] or []) or 1
    sig = infer_signature(x, np.zeros((1, n_classes), dtype=np.float32))
    run = c.create_run(settings["experiment_id"], run_name=f"export-{card['source']['trial_id']}", tags={
        "mlflow.parentRunId": settings["parent_run_id"], "prunevision.source_trial": card["source"]["trial_id"],
        "prunevision.source_run_id": card["source"]["mlflow_run_id"] or "",
        **({"prunevision.int8": "forced" if q["forced"] else "verified"} if q else {})})
    made: list[tuple[str, str]] = []
    try:
        # the process-wide tracking URI is restored afterwards: a library call must not leave it changed
        with use_tracking_uri(settings["tracking_uri"]), mlflow.start_run(run_id=run.info.run_id):
            info = mlflow.onnx.log_model(onnx.load(str(onnx_path)), name="model", registered_model_name=name,
                                         signature=sig)
            made.append((name, str(info.registered_model_version)))
            if q:
                info8 = mlflow.onnx.log_model(onnx.load(q["file"]), name="model_int8",
                                              registered_model_name=name + INT8_SUFFIX, signature=sig)
                made.append((name + INT8_SUFFIX, str(info8.registered_model_version)))
            mlflow.log_dict({k: v for k, v in card.items() if k != "full_config"}, "model_card.json")
            mlflow.log_metrics({f"model.{k}": float(v) for k, v in card["metrics"].items()
                                if isinstance(v, (int, float))})
            if q:
                from analysis.int8 import int8_metrics

                mlflow.log_metrics(int8_metrics(q))
        version = made[0][1]
        c.set_registered_model_alias(name, CHAMPION, version)
        c.set_model_version_tag(name, version, "prunevision.source_trial", card["source"]["trial_id"])
        c.set_model_version_tag(name, version, "prunevision.sha256", card["sha256"])
        c.set_model_version_tag(name, version, "precision", "fp32")
        reg: dict[str, Any] = {"name": name, "version": version, "alias": CHAMPION, "run_id": run.info.run_id,
                               "uri": f"models:/{name}@{CHAMPION}", "model_uri": info.model_uri}
        if q:
            name8, v8 = made[1]
            c.set_registered_model_alias(name8, CHAMPION, v8)
            for k, v in {"precision": "int8", "prunevision.source_trial": card["source"]["trial_id"],
                         "prunevision.sha256": q["sha256"], "prunevision.fp32_model": f"{name}/{version}",
                         "prunevision.int8_drop_points": f"{q['drop_points']:.4f}",
                         "prunevision.int8_forced": str(q["forced"]).lower()}.items():
                c.set_model_version_tag(name8, v8, k, v)
            c.set_model_version_tag(name, version, "prunevision.int8_model", f"{name8}/{v8}")
            reg["int8"] = {"name": name8, "version": v8, "alias": CHAMPION, "uri": f"models:/{name8}@{CHAMPION}",
                           "model_uri": info8.model_uri}
    except Exception:
        for n, v in made:
            try:
                c.delete_model_version(n, v)
            except Exception:  # the original error is the one to report
                pass
        c.set_terminated(run.info.run_id, status="FAILED")
        raise
    return reg

"""INT8 for the command line and sweeps: `prunevision export ... --int8` and `prunevision analyze
--int8`, around the library's quantization core (:mod:`prunevision.quantize`).

The calibration and verification images come from the dataset the model was trained on, as its
config says (``config.yaml`` beside the checkpoint, or inside a training checkpoint): the same
subset, seed and validation split, so INT8 accuracy is measured on the images the fp32 figures
were. Calibration uses a seeded sample of the training images (the validation split is held out of
them), normalised with the mean and std the model was trained with.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from prunevision.fsutil import atomic_write, save_figure
from prunevision.metrics import speedup
from prunevision.quantize import (
    CALIBRATION_METHODS,
    DEFAULT_CALIBRATION_SIZE,
    DEFAULT_MAX_DROP,
    LATENCY_BATCHES,
    Int8Refused,
    QuantizeError,
    calibration_images,
    int8_path,
    quantize_and_verify,
    split_batches,
)

MAX_CALIBRATION_SIZE = 10_000


def model_config(checkpoint: str | Path):
    """The experiment config a model was trained with: ``config.yaml`` beside the checkpoint, or the
    one inside a training checkpoint; None when neither exists."""
    from prunevision.config import load_config

    p = Path(checkpoint)
    if p.is_dir():
        p = p / "checkpoint.pt"
    if (p.parent / "config.yaml").is_file():
        return load_config(p.parent / "config.yaml")
    if p.suffix == ".pt" and p.is_file():
        from prunevision.train import load_checkpoint

        return load_checkpoint(p)["config"]
    return None


def load_int8_data(cfg, data_root: str | None = None):
    """The dataset of ``cfg`` (``data_root`` in place of its data.root), split as in training."""
    from prunevision.data import DatasetError, load_dataset

    if data_root:
        cfg = cfg.replace(**{"data.root": str(Path(data_root).expanduser().resolve())})
    try:
        return load_dataset(cfg.data, seed=cfg.seed)
    except DatasetError as e:
        raise QuantizeError(f"cannot load the images INT8 calibration and verification need: {e}") from e


def ship_int8(fp32: Path, cfg, image_size: int, *, mean=None, std=None,
              calibration_size: int = DEFAULT_CALIBRATION_SIZE, max_drop: float | None = DEFAULT_MAX_DROP,
              force: bool = False, method: str = "minmax", data_root: str | None = None, data=None,
              dst: Path | None = None, latency_batches=None,
              runs: int | None = None, threads: int | None = None, latency_extra: Mapping[str, Path] | None = None,
              log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Quantize and verify ``fp32`` on ``cfg``'s dataset; write ``dst`` (default ``model.int8.onnx``
    beside it) when it passes. Latency: batch 1 and ``measure.batch`` of the config, ``measure.runs``
    timed runs, ``measure.threads`` threads. Returns the report with its calibration described."""
    data = data if data is not None else load_int8_data(cfg, data_root)
    available = len(data.train_y)
    calib = calibration_images(data, calibration_size, seed=cfg.seed, mean=mean, std=std)
    if log and len(calib) < calibration_size:
        log(f"INT8: only {available} training image(s): calibrating on all of them (asked for {calibration_size})")
    bs = cfg.data.eval_batch_size
    splits = {"val": split_batches(data, "val", bs, mean, std), "test": split_batches(data, "test", bs, mean, std)}
    batches = latency_batches or (1, int(cfg.measure.batch) if cfg.measure.batch > 1 else LATENCY_BATCHES[-1])
    report = quantize_and_verify(fp32, calib, splits, image_size, dst=dst, max_drop=max_drop, force=force,
                                 method=method, latency_batches=batches, runs=runs or cfg.measure.runs,
                                 warmup=cfg.measure.warmup, threads=threads or cfg.measure.threads,
                                 latency_extra=latency_extra, log=log)
    report["calibration"] = {"split": "train (validation split held out)", "requested": int(calibration_size),
                             "images": int(len(calib)), "seed": int(cfg.seed), "dataset": data.name,
                             "source": data.source, "normalisation": {"mean": list(mean or data.mean),
                                                                      "std": list(std or data.std)}}
    return report


def export_int8(fp32: Path, card: dict[str, Any], card_path: Path, cfg, image_size: int, *, registered: bool,
                log: Callable[[str], None] | None = print, **kw) -> dict[str, Any]:
    """:func:`ship_int8` for an export: on success the card gets the ``int8`` section. On any
    failure the card is written with the reason (and every figure measured, when refused), an INT8
    file left by an earlier export of the same path is removed (it belongs to the fp32 model just
    replaced), and :class:`QuantizeError` says in one line what happened and what still stands."""
    from prunevision.data import DatasetError

    inp = card.get("input") or {}
    try:
        if cfg is None:
            raise QuantizeError(f"no config.yaml beside the checkpoint says which images {fp32.name} was trained on: "
                                "INT8 calibration needs them")
        report = ship_int8(fp32, cfg, image_size, mean=inp.get("mean"), std=inp.get("std"), log=log, **kw)
    except (QuantizeError, DatasetError) as e:
        stale = int8_path(fp32)
        if stale.is_file():
            stale.unlink()
        card["int8"] = {**getattr(e, "report", {}), "shipped": False, "error": str(e)}
        atomic_write(card_path, json.dumps(card, indent=2, default=str))
        stands = ("nothing registered, " if registered else "") + f"the fp32 model {fp32} and its card " \
                                                                   f"{card_path.name} stand"
        what = (f"{e} (--max-int8-drop); {stands}; --force-int8 ships it anyway" if isinstance(e, Int8Refused)
                else f"{e}; {stands}")
        err = Int8Refused(what, card["int8"]) if isinstance(e, Int8Refused) else QuantizeError(what)
        raise err from e
    card["int8"] = report
    return report


def int8_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """The INT8 report as flat MLflow metrics (``int8.*`` and the fp32 model's ``fp32_onnx.*``)."""
    m: dict[str, float] = {"int8.drop_points": report["drop_points"],
                           "int8.size_bytes": report["size"]["int8"]["bytes"],
                           "int8.gzip_bytes": report["size"]["int8"]["gzip_bytes"],
                           "fp32_onnx.size_bytes": report["size"]["fp32"]["bytes"],
                           "fp32_onnx.gzip_bytes": report["size"]["fp32"]["gzip_bytes"]}
    for split, a in report["accuracy"].items():
        if a is None:
            continue
        name = "val_accuracy" if split == "val" else "accuracy"
        m[f"int8.{name}"], m[f"fp32_onnx.{name}"] = a["int8"], a["fp32"]
        m[f"int8.agreement_{split}"] = a["agreement"]
    for key, r in report["latency"].items():
        b = key.split("_", 1)[1]
        for prec in ("fp32", "int8"):
            pre = "int8" if prec == "int8" else "fp32_onnx"
            for stat in ("median", "p10", "p90"):
                m[f"{pre}.latency_ms_b{b}{'' if stat == 'median' else '_' + stat}"] = r[prec][f"{stat}_ms"]
        m[f"int8.speedup_b{b}"] = r["speedup"]
    return {k: float(v) for k, v in m.items() if v is not None and np.isfinite(v)}


def check_int8_options(calibration_size: int | None, max_drop: float | None) -> None:
    """The INT8 flags' values: one line (:class:`QuantizeError`) for anything out of range."""
    import math

    if calibration_size is not None and not 1 <= calibration_size <= MAX_CALIBRATION_SIZE:
        what = "an empty calibration set" if calibration_size == 0 else f"got {calibration_size}"
        raise QuantizeError(f"--calibration-size must be a whole number of training images in [1, "
                            f"{MAX_CALIBRATION_SIZE}] ({what})")
    if max_drop is not None and not (math.isfinite(max_drop) and 0 <= max_drop <= 100):
        raise QuantizeError(f"--max-int8-drop must be a finite number of accuracy points in [0, 100] "
                            f"(1 = one point), got {max_drop}")


# --------------------------------------------------------------------------- the front in INT8


def _pruned_normalisation(output_dir: Path) -> tuple[Any, Any]:
    from prunevision.checkpoint import read_pruned

    p = output_dir / "pruned.safetensors"
    if not p.is_file():
        return None, None
    extra = read_pruned(p)[0].get("extra") or {}
    return extra.get("mean"), extra.get("std")


def int8_front(front: pd.DataFrame, objectives: Mapping[str, str], out: Path, *,
               calibration_size: int = DEFAULT_CALIBRATION_SIZE, max_drop: float = DEFAULT_MAX_DROP,
               method: str = "minmax", batch: int = 1, threads: int = 1, runs: int = 50,
               log: Callable[[str], None] | None = print) -> tuple[pd.DataFrame, dict[str, Any]]:
    """An INT8 variant of each front trial, measured as its export would be: accuracy of both
    files under ONNX Runtime on the trial's validation and test images, and latency re-measured
    in one run next to the fp32 model and its dense network (ONNX Runtime CPU, ``batch``,
    ``threads``). Returns the INT8 rows (a copy of each trial's row with ``precision`` int8 and
    its own figures) and per-trial results; a trial that fails is reported, not fatal.

    ``front_with_int8`` marks the variants (fp32 and INT8, each with the figures of this one run)
    that no other variant dominates on ``objectives``."""
    from analysis.pareto import nondominated_ranks
    from analysis.remeasure import trial_image_size
    from prunevision.config import load_config

    out.mkdir(parents=True, exist_ok=True)
    datasets: dict[str, Any] = {}
    rows, results, points = [], {}, []
    for _, row in front.iterrows():
        tid = str(row["trial_id"])
        d = Path(row["output_dir"]) if isinstance(row.get("output_dir"), str) else None
        try:
            if d is None or not (d / "model.onnx").is_file() or not (d / "config.yaml").is_file():
                raise QuantizeError("its model.onnx or config.yaml is not on disk")
            cfg = load_config(d / "config.yaml")
            key = json.dumps([cfg.to_dict()["data"], cfg.seed], sort_keys=True, default=str)
            if key not in datasets:
                datasets[key] = load_int8_data(cfg)
            mean, std = _pruned_normalisation(d)
            extra = {"dense": d / "dense.onnx"} if (d / "dense.onnx").is_file() else None
            if log:
                log(f"INT8 variant of trial {tid}")
            rep = ship_int8(d / "model.onnx", cfg, trial_image_size(d), mean=mean, std=std,
                            calibration_size=calibration_size, max_drop=None, method=method, data=datasets[key],
                            dst=out / f"{tid}.int8.onnx", latency_batches=(batch,), runs=runs, threads=threads,
                            latency_extra=extra, log=None)
        except Exception as e:  # one trial's failure is reported in its row, the analysis goes on
            msg = " ".join(str(e).split())[:300]
            results[tid] = {"error": msg}
            if log:
                log(f"INT8 variant of trial {tid} failed: {msg}")
            continue
        results[tid] = rep
        lat = rep["latency"][f"batch_{batch}"]
        acc = rep["accuracy"]
        val, test = acc.get("val"), acc.get("test")
        first = val or test
        within = first["drop_points"] <= max_drop + 1e-9
        r8 = row.copy()
        r8["precision"] = "int8"
        if val is not None:
            r8["val_accuracy"], r8["val_accuracy_fp32_onnx"] = val["int8"], val["fp32"]
        if test is not None:
            r8["accuracy"], r8["accuracy_fp32_onnx"] = test["int8"], test["fp32"]
        r8["int8_drop_points"], r8["int8_agreement"], r8["int8_within_limit"] = (first["drop_points"],
                                                                                first["agreement"], within)
        r8["latency_ms"], r8["latency_ms_p90"] = lat["int8"]["median_ms"], lat["int8"]["p90_ms"]
        r8["latency_ms_p10"] = lat["int8"]["p10_ms"]
        r8["latency_ms_fp32_same_run"], r8["int8_speedup_vs_fp32"] = lat["fp32"]["median_ms"], lat["speedup"]
        r8["int8_speedup_vs_fp32_lo"], r8["int8_speedup_vs_fp32_hi"] = lat.get("speedup_lo"), lat.get("speedup_hi")
        if "dense" in lat:
            sp = speedup(lat["dense"], lat["int8"])
            r8["latency_ms_dense"] = lat["dense"]["median_ms"]
            r8["latency_speedup"], r8["latency_speedup_lo"], r8["latency_speedup_hi"] = sp["median"], sp["lo"], sp["hi"]
        r8["latency_remeasured"] = True
        r8["latency_target"] = f"onnxruntime-cpu b{batch} t{threads} (INT8 run, next to fp32 and dense)"
        r8["onnx_bytes"], r8["onnx_gzip_bytes"] = rep["size"]["int8"]["bytes"], rep["size"]["int8"]["gzip_bytes"]
        r8["int8_file"] = rep["file"]
        rows.append(r8)
        # both variants with this run's figures, for the front they make together
        p32 = {k: row.get(k) for k in objectives}
        p8 = {k: r8.get(k) for k in objectives}
        if val is not None and "val_accuracy" in p32:
            p32["val_accuracy"] = val["fp32"]
        if test is not None and "accuracy" in p32:
            p32["accuracy"] = test["fp32"]
        if "latency_ms" in p32:
            p32["latency_ms"] = lat["fp32"]["median_ms"]
        points += [{"trial_id": tid, "precision": "fp32", **p32}, {"trial_id": tid, "precision": "int8", **p8}]
    int8_rows = pd.DataFrame(rows)
    combined: dict[tuple[str, str], bool] = {}
    if points:
        pts = pd.DataFrame(points).assign(status="complete")
        ranks = nondominated_ranks(pts, objectives)
        combined = {(t, p): bool(r == 0) for t, p, r in zip(pts["trial_id"], pts["precision"], ranks)}
        int8_rows["front_with_int8"] = [combined[(str(t), "int8")] for t in int8_rows["trial_id"]]
    info = {"variants": len(rows), "failed": {k: v["error"] for k, v in results.items() if "error" in v},
            "calibration_size": calibration_size, "calibration_method": method, "max_drop_points": max_drop,
            "latency": f"onnxruntime-cpu batch {batch}, {threads} thread(s), {runs} runs", "results": results,
            "front_with_int8": {f"{t}/{p}": v for (t, p), v in combined.items()}}
    return int8_rows, info


def int8_plot(int8_rows: pd.DataFrame, acc: str, path: Path, on_front: Mapping[str, bool] | None = None
              ) -> Path | None:
    """Accuracy against latency of each front trial in fp32 and INT8, measured in the same run
    (an arrow from each fp32 model to its INT8 variant; filled: on the front with INT8)."""
    if int8_rows.empty or acc not in int8_rows.columns:
        return None
    from analysis.plots import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=110)
    ref = f"{acc}_fp32_onnx"
    for _, r in int8_rows.iterrows():
        x32, y32 = r["latency_ms_fp32_same_run"], 100 * r.get(ref, np.nan)
        x8, y8 = r["latency_ms"], 100 * r[acc]
        ax.annotate("", (x8, y8), (x32, y32), arrowprops={"arrowstyle": "->", "color": "0.55", "lw": 0.8})
        on32 = bool((on_front or {}).get(f"{r['trial_id']}/fp32"))
        ax.scatter([x32], [y32], c="tab:blue" if on32 else "none", edgecolors="tab:blue", s=28, zorder=3)
        on = bool(r.get("front_with_int8"))
        ax.scatter([x8], [y8], c="tab:red" if on else "none", edgecolors="tab:red", marker="^", s=40, zorder=3)
        ax.annotate(str(r["trial_id"]), (x8, y8), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.scatter([], [], c="tab:blue", s=28, label="fp32")
    ax.scatter([], [], c="tab:red", marker="^", s=40, label="INT8")
    ax.scatter([], [], c="none", edgecolors="0.4", s=28, label="hollow: dominated once INT8 joins the front")
    ax.set_xlabel(f"latency (ms), {int8_rows['latency_target'].iloc[0]}")
    ax.set_ylabel(("validation" if acc == "val_accuracy" else "test") + " top-1 accuracy (%, ONNX Runtime)")
    ax.set_title("Where INT8 moves the front's trials", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


__all__ = ["CALIBRATION_METHODS", "DEFAULT_CALIBRATION_SIZE", "DEFAULT_MAX_DROP", "MAX_CALIBRATION_SIZE",
           "check_int8_options", "export_int8", "int8_front", "int8_metrics", "int8_plot", "load_int8_data",
           "model_config", "ship_int8"]

"""After training: prune (one-shot or iterative), fine-tune, measure dense against pruned in the
same run, export both to verified ONNX, save the pruned model as data."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from prunevision.checkpoint import save_pruned
from prunevision.config import ExperimentConfig
from prunevision.console import echo
from prunevision.data import Dataset, DeviceLoader
from prunevision.diagnostics import (
    first_conv,
    plot_first_conv_filters,
    plot_prune_steps,
    plot_ratio_curve,
)
from prunevision.export import export_onnx
from prunevision.fsutil import ensure_dir, save_figure
from prunevision.gates import ChannelGate, gate_values, iter_gates
from prunevision.measure import macs_and_params, onnx_latency, size_on_disk, torch_latency
from prunevision.prune import (
    PruneReport,
    keep_zeros,
    prune_step,
    remove_masks,
    step_ratio,
    strip_gates,
    zero_fraction,
)
from prunevision.train import evaluate, fit


@torch.no_grad()
def gate_sparsity(model: nn.Module, threshold: float) -> float:
    """Share of channel gates under τ (weight gates when the model has no channel gates)."""
    chan = [m.values().detach().reshape(-1) for _, m in iter_gates(model) if isinstance(m, ChannelGate)]
    vals = chan or [m.values().detach().reshape(-1) for _, m in iter_gates(model)]
    if not vals:
        return 0.0
    v = torch.cat(vals)
    return float((v < threshold).float().mean())


def finetune(model: nn.Module, data: Dataset, cfg: ExperimentConfig, epochs: int, *, penalty: bool, phase: str,
             log: Callable[[str], None] | None, teacher: nn.Module | None = None) -> list[dict[str, Any]]:
    """Train a (pruned) model for a few epochs: under the gate penalty (or the budget, held at its
    final value) between iterative gate steps, without it (and without gates) after the last step.
    ``teacher`` (the dense network) is distilled into the model when ``prune.distill`` > 0."""
    over: dict[str, Any] = {
        "train.epochs": epochs, "train.lr": cfg.prune.finetune_lr, "train.lr_schedule": "cosine",
        "gates.schedule": "constant", "gates.lam": cfg.gates.lam if penalty else 0.0,
        "gates.temperature_final": None,
    }
    if penalty and cfg.gates.target_macs is not None:
        over.update({"gates.warmup_epochs": 0.0, "gates.ramp_epochs": 1e-6})
    ft = cfg.replace(**over)
    state = fit(model, data, ft, log=(lambda m: log(f"[{phase}] {m}")) if log else None,
                teacher=teacher if cfg.prune.distill > 0 else None)
    return [dict(r, phase=phase) for r in state.history]


def calibration_batches(data: Dataset, cfg: ExperimentConfig):
    loader = DeviceLoader(data.train_x, data.train_y, cfg.data.batch_size, data.mean, data.std, train=True,
                          augment=False, seed=cfg.seed + 7)
    return lambda: [b for _, b in zip(range(cfg.prune.calibration_batches), loader)]


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Add the time the block takes to ``timings[key]``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[key] += time.perf_counter() - t0


def ratio_for_budget(model: nn.Module, example: torch.Tensor, cfg: ExperimentConfig, calibration,
                     iterations: int = 12) -> float:
    """Baselines under a MACs budget: the pruning ratio whose one-shot pruned network keeps
    ``gates.target_macs`` of the MACs, by bisection on copies of the model."""
    p, budget = cfg.prune, cfg.gates.target_macs
    size = example.shape[-1]
    dense = macs_and_params(copy.deepcopy(model).cpu(), size)[0]
    lo, hi = 0.0, 0.95
    for _ in range(iterations):
        mid = (lo + hi) / 2
        m = copy.deepcopy(model)
        prune_step(m, example, p.method, threshold=cfg.tau, ratio=mid, round_to=p.round_to,
                   min_channels=p.min_channels, max_layer_sparsity=p.max_layer_sparsity, calibration=calibration,
                   skip_first=p.skip_first)
        share = macs_and_params(m.cpu(), size)[0] / dense
        if share > budget:
            lo = mid
        else:
            hi = mid
    return hi


def prune_at_ratios(model: nn.Module, data: Dataset, cfg: ExperimentConfig, out: Path,
                    log: Callable[[str], None] | None) -> list[dict[str, Any]]:
    """Each of prune.ratios from a copy of the one trained model: its own pruned model, ONNX files
    and metrics in ``out/ratios/rNN/``; one summary row per ratio."""
    from prunevision.pipeline import write_json  # pipeline imports this module

    rows = []
    for r in cfg.prune.ratios or ():
        sub = cfg.replace(**{"prune.target_sparsity": r, "prune.ratios": None})
        d = ensure_dir(out / "ratios" / f"r{int(round(r * 100)):02d}")
        if log:
            log(f"ratio {r:g}: pruning a copy of the trained model ({cfg.prune.method})")
        m = prune_and_measure(copy.deepcopy(model), data, sub, d, log=log)
        write_json(d / "metrics.json", m)
        rows.append({"ratio": r, "dir": str(d), **{k: m[k] for k in (
            "accuracy", "accuracy_before_finetune", "accuracy_dense", "val_accuracy", "val_accuracy_dense",
            "param_sparsity", "macs_reduction",
            "latency_ms", "latency_speedup", "size_bytes") if k in m}})
    return rows


def prune_and_measure(model: nn.Module, data: Dataset, cfg: ExperimentConfig, out: Path,
                      log: Callable[[str], None] | None = echo) -> dict[str, Any]:
    ratio_rows = prune_at_ratios(model, data, cfg, out, log) if cfg.prune.ratios else None
    p, m_cfg = cfg.prune, cfg.measure
    size = data.image_size
    tm = {"prune_s": 0.0, "finetune_s": 0.0, "evaluate_s": 0.0, "measure_s": 0.0, "export_s": 0.0}
    dev = data.train_x.device
    test = DeviceLoader(data.test_x, data.test_y, cfg.data.eval_batch_size, data.mean, data.std, train=False)
    # the validation split (None without one: val_accuracy is then the test accuracy)
    val = DeviceLoader(data.val_x, data.val_y, cfg.data.eval_batch_size, data.mean, data.std,
                       train=False) if data.has_val else None
    model = model.to(memory_format=torch.contiguous_format)
    write_gate_histogram(model, cfg.tau, out / "gate_histogram.png")
    g_sparsity = gate_sparsity(model, cfg.tau)

    dense = strip_gates(copy.deepcopy(model))  # the trained network, gates folded in, nothing removed
    with _timed(tm, "evaluate_s"):
        ev_dense = evaluate(dense, test, data.num_classes)
        val_dense = evaluate(dense, val, data.num_classes)["accuracy"] if val is not None else ev_dense["accuracy"]

    pruned = model
    conv0 = first_conv(model)
    w0 = conv0.weight.detach().clone() if conv0 is not None else None
    name0 = next((n for n, m in model.named_modules() if m is conv0), None)
    alive = list(range(w0.shape[0])) if w0 is not None else []  # original indices still there
    steps_rec = []
    if p.steps > 1:
        steps_rec.append(_step_record(0, dense, ev_dense["accuracy"], None, size))
    example = torch.zeros(1, 3, size, size, device=dev)
    history: list[dict[str, Any]] = []
    report = PruneReport(p.method)
    if p.method != "gate":
        strip_gates(pruned)
    target = p.target_sparsity
    if p.method != "gate" and target is None and cfg.gates.target_macs is not None:
        with _timed(tm, "prune_s"):
            target = ratio_for_budget(pruned, example, cfg, calibration_batches(data, cfg))
        if log:
            log(f"{p.method}: pruning ratio {target:.3f} meets the MACs budget {cfg.gates.target_macs:g}")
    ratio = step_ratio(target, p.steps) if target is not None else 0.0
    for step in range(p.steps):
        if p.method == "gate" and step > 0 and p.finetune_epochs > 0:
            with _timed(tm, "finetune_s"):
                history += finetune(pruned, data, cfg, p.finetune_epochs, penalty=True, teacher=dense,
                                    phase=f"gate-step{step + 1}", log=log)
        with _timed(tm, "prune_s"):
            rep = prune_step(pruned, example, p.method, threshold=cfg.tau, ratio=ratio, round_to=p.round_to,
                             min_channels=p.min_channels, max_layer_sparsity=p.max_layer_sparsity,
                             calibration=calibration_batches(data, cfg), skip_first=p.skip_first)
        report.merge(rep)
        gone = set(rep.removed_idxs.get(name0, []))
        alive = [a for i, a in enumerate(alive) if i not in gone]
        if p.steps > 1:
            with _timed(tm, "evaluate_s"):
                acc = evaluate(pruned, test, data.num_classes)["accuracy"]
                steps_rec.append(_step_record(step + 1, pruned, acc, steps_rec[0]["params"], size))
        if log:
            log(f"prune step {step + 1}/{p.steps} ({p.method}): {rep.channels_removed} channels/weights removed")
        if p.method != "gate" and step < p.steps - 1 and p.finetune_epochs > 0:
            with _timed(tm, "finetune_s"):
                history += finetune(pruned, data, cfg, p.finetune_epochs, penalty=False, teacher=dense,
                                    phase=f"finetune-step{step + 1}", log=log)
    if p.method == "gate":
        with _timed(tm, "prune_s"):
            strip_gates(pruned, cfg.tau)
            keep_zeros(pruned)  # closed weight gates stay zero through fine-tuning
    if w0 is not None:
        kept = np.zeros(w0.shape[0], dtype=bool)
        kept[alive] = True
        plot_first_conv_filters(w0, kept, out / "first_conv_filters.png")
    with _timed(tm, "evaluate_s"):
        acc_before_ft = evaluate(pruned, test, data.num_classes)["accuracy"]
    if p.finetune_epochs > 0:
        with _timed(tm, "finetune_s"):
            history += finetune(pruned, data, cfg, p.finetune_epochs, penalty=False, phase="finetune", log=log,
                                teacher=dense)
    remove_masks(pruned)
    with _timed(tm, "evaluate_s"):
        ev = evaluate(pruned, test, data.num_classes)
        val_acc = evaluate(pruned, val, data.num_classes)["accuracy"] if val is not None else ev["accuracy"]

    dense, pruned = dense.cpu().eval(), pruned.cpu().eval()
    with _timed(tm, "measure_s"):
        macs_d, params_d = macs_and_params(dense, size)
        macs_p, params_p = macs_and_params(pruned, size)
        size_d, gz_d = size_on_disk(dense)
        size_p, gz_p = size_on_disk(pruned)
        save_pruned(pruned, out / "pruned.safetensors", cfg.model, data.num_classes, size,
                    extra={"method": p.method, "mean": list(data.mean), "std": list(data.std),
                           "classes": list(data.classes), "accuracy": ev["accuracy"], "val_accuracy": val_acc})
        metrics: dict[str, Any] = {
            "method": p.method,
            "accuracy": ev["accuracy"],  # test split: reported, never chosen on
            "accuracy_dense": ev_dense["accuracy"],
            "val_accuracy": val_acc,  # validation split (the test split when data.val_split is 0)
            "val_accuracy_dense": val_dense,
            "accuracy_before_finetune": acc_before_ft,
            "per_class_accuracy": data.per_class(ev["per_class_accuracy"]),
            "per_class_accuracy_dense": data.per_class(ev_dense["per_class_accuracy"]),
            "params": params_p, "params_dense": params_d,
            "macs": macs_p, "macs_dense": macs_d,
            "param_sparsity": 1.0 - params_p / params_d,
            "macs_reduction": macs_d / max(macs_p, 1),
            "macs_share": macs_p / max(macs_d, 1),  # achieved budget
            "target_macs": cfg.gates.target_macs,  # requested budget (None: λ mode or a baseline ratio)
            "gate_kind": cfg.gates.kind,
            "gate_sparsity": g_sparsity,
            "zero_fraction": zero_fraction(pruned),
            "size_bytes": size_p, "size_gzip_bytes": gz_p,
            "size_bytes_dense": size_d, "size_gzip_bytes_dense": gz_d,
            "channels_removed": report.removed,
            "prune_history": history,
            "input": {"size": size, "mean": list(data.mean), "std": list(data.std), "layout": "NCHW float32"},
        }
        if getattr(pruned, "backbones_remaining", None) is not None:  # the hybrid: which backbones still run
            metrics["hybrid_backbones"] = list(pruned.backbones_remaining)
    if m_cfg.export:
        with _timed(tm, "export_s"):
            # real test images, normalised by the same loader that feeds evaluation
            real = [next(iter(DeviceLoader(data.test_x[:8].cpu(), data.test_y[:8].cpu(), 8, data.mean, data.std,
                                           train=False)))[0]]
            e_p = export_onnx(pruned, out / "model.onnx", size, check_inputs=real, exporter=m_cfg.exporter)
            e_d = export_onnx(dense, out / "dense.onnx", size, check_inputs=real, exporter=m_cfg.exporter)
            metrics["onnx_max_abs_diff"] = max(e_p["max_abs_diff"], e_d["max_abs_diff"])
            metrics["onnx_size_bytes"] = e_p["size_bytes"]
            metrics["onnx_size_bytes_dense"] = e_d["size_bytes"]
    if m_cfg.latency:
        with _timed(tm, "measure_s"):
            paths = {"dense": out / "dense.onnx", "pruned": out / "model.onnx"}
            lat = {}
            for b in sorted({1, m_cfg.batch}):
                lat[f"onnxruntime_cpu_b{b}"] = onnx_latency(paths, size, batch=b, runs=m_cfg.runs, warmup=m_cfg.warmup,
                                                            threads=m_cfg.threads)
            if m_cfg.torch_latency:
                tdev = dev if dev.type == "cuda" else torch.device("cpu")
                for b in sorted({1, m_cfg.batch}):
                    lat[f"torch_{tdev.type}_b{b}"] = torch_latency(
                        {"dense": dense, "pruned": pruned}, size, tdev, batch=b, runs=m_cfg.runs, warmup=m_cfg.warmup,
                        threads=m_cfg.threads)
            b1 = lat["onnxruntime_cpu_b1"]
            metrics.update({
                "latency_ms": b1["pruned"]["median_ms"], "latency_ms_p90": b1["pruned"]["p90_ms"],
                "latency_ms_dense": b1["dense"]["median_ms"], "latency_ms_dense_p90": b1["dense"]["p90_ms"],
                "latency_speedup": b1["dense"]["median_ms"] / b1["pruned"]["median_ms"],
                "latency": lat,
            })
    metrics["timings"] = tm
    if steps_rec:
        metrics["prune_steps"] = steps_rec
        plot_prune_steps(steps_rec, out / "prune_steps.png")
    if ratio_rows is not None:
        metrics["ratio_curve"] = ratio_rows
        plot_ratio_curve(ratio_rows + [{"ratio": p.target_sparsity, **{k: metrics.get(k) for k in (
            "accuracy", "accuracy_before_finetune", "latency_speedup")}}], p.method, out / "ratio_curve.png")
    if log:
        msg = (f"pruned ({p.method}): val accuracy {val_acc:.4f} (dense {val_dense:.4f}), test accuracy "
               f"{ev['accuracy']:.4f} (dense {ev_dense['accuracy']:.4f}), "
               f"params {params_p / 1e6:.3f} M of {params_d / 1e6:.3f} M, MACs {macs_p / 1e6:.1f} M of "
               f"{macs_d / 1e6:.1f} M")
        if "latency_speedup" in metrics:
            msg += (f", ONNX Runtime CPU b1 {metrics['latency_ms']:.3f} ms vs {metrics['latency_ms_dense']:.3f} ms "
                    f"({metrics['latency_speedup']:.2f}x)")
        log(msg)
    return metrics


def _step_record(step: int, model: nn.Module, accuracy: float, params_dense: int | None, size: int) -> dict:
    """Accuracy, parameter sparsity and PyTorch CPU latency (batch 1) of the model after a step."""
    m = copy.deepcopy(model).cpu().eval()
    params = sum(q.numel() for name, q in m.named_parameters() if not name.endswith("score"))
    lat = torch_latency({"m": m}, size, "cpu", batch=1, runs=30, warmup=3, threads=1)["m"]["median_ms"]
    return {"step": step, "accuracy": accuracy, "params": params,
            "param_sparsity": 0.0 if params_dense is None else 1 - params / params_dense, "latency_ms": lat}


def write_gate_histogram(model: nn.Module, threshold: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vals = gate_values(model)
    chan = [v.reshape(-1) for n, v in vals.items() if isinstance(model.get_submodule(n), ChannelGate)]
    weight = [v.reshape(-1) for n, v in vals.items() if not isinstance(model.get_submodule(n), ChannelGate)]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    bins = torch.linspace(0, 1, 51).numpy()
    if chan:
        ax.hist(torch.cat(chan).numpy(), bins=bins, alpha=0.75, label=f"channel gates ({sum(map(len, chan))})")
    if weight:
        ax.hist(torch.cat(weight).numpy(), bins=bins, alpha=0.5, label=f"weight gates ({sum(map(len, weight))})")
    ax.axvline(threshold, color="crimson", linestyle="--", label=f"threshold τ = {threshold:g}")
    ax.set_yscale("log")
    ax.set_xlabel("gate value sigmoid(score / T)")
    ax.set_ylabel("number of gates (log scale)")
    ax.set_title("Gate values after training")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)

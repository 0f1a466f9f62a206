"""After training: prune (one-shot or iterative), fine-tune, measure dense against pruned in the
same run, export both to verified ONNX, save the pruned model as data."""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from prunevision.budget import BUDGET_TOLERANCE
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
from prunevision.fsutil import ensure_dir, save_figure, write_json
from prunevision.gates import ChannelGate, gate_values, iter_gates
from prunevision.measure import macs_and_params, onnx_latency, size_on_disk, torch_latency
from prunevision.metrics import format_speedup, speedup
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
    if penalty and cfg.gates.budgeted:
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
                     iterations: int = 12) -> tuple[float, float | None]:
    """Baselines under a MACs budget: the smallest pruning ratio whose one-shot pruned network keeps
    at most ``gates.target_macs`` of the MACs, by bisection on copies of the model; with the MACs
    share that ratio gives (None when even the largest ratio tried stays over the budget). One
    ratio for every layer, rounded to ``prune.round_to``, can land well under the budget: the
    caller says so."""
    p, budget = cfg.prune, cfg.gates.target_macs
    size = example.shape[-1]
    dense = macs_and_params(copy.deepcopy(model).cpu(), size)[0]
    lo, hi, hi_share = 0.0, 0.95, None
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
            hi, hi_share = mid, share
    return hi, hi_share


def prune_at_ratios(model: nn.Module, data: Dataset, cfg: ExperimentConfig, out: Path,
                    log: Callable[[str], None] | None) -> list[dict[str, Any]]:
    """Each of prune.ratios from a copy of the one trained model: its own pruned model, ONNX files
    and metrics in ``out/ratios/rNN/``; one summary row per ratio."""
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
    """Prune the trained gated ``model`` (cfg.prune), fine-tune it, and measure it against the dense
    network in the same run: accuracy, MACs, size, ONNX export and latency. Writes its files to ``out``."""
    ratio_rows = prune_at_ratios(model, data, cfg, out, log) if cfg.prune.ratios else None
    tm = {"prune_s": 0.0, "finetune_s": 0.0, "evaluate_s": 0.0, "measure_s": 0.0, "export_s": 0.0}
    ev = _Evaluator(data, cfg, tm)
    model = model.to(memory_format=torch.contiguous_format)
    write_gate_histogram(model, cfg.tau, out / "gate_histogram.png")
    g_sparsity = gate_sparsity(model, cfg.tau)
    dense = strip_gates(copy.deepcopy(model))  # the trained network, gates folded in, nothing removed
    test_dense, val_dense = ev.both(dense)
    run = _PruneRun(model, dense, data, cfg, ev, tm, log)
    run.prune(out, test_dense["accuracy"])
    acc_before_ft = ev.test(run.pruned)["accuracy"]
    run.finetune_last()
    test_p, val_acc = ev.both(run.pruned)

    dense, pruned = dense.cpu().eval(), run.pruned.cpu().eval()
    with _timed(tm, "measure_s"):
        save_pruned(pruned, out / "pruned.safetensors", cfg.model, data.num_classes, data.image_size,
                    extra={"method": cfg.prune.method, "mean": list(data.mean), "std": list(data.std),
                           "classes": list(data.classes), "accuracy": test_p["accuracy"], "val_accuracy": val_acc})
        metrics: dict[str, Any] = {
            "method": cfg.prune.method,
            "accuracy": test_p["accuracy"],  # test split: reported, never chosen on
            "accuracy_dense": test_dense["accuracy"],
            "val_accuracy": val_acc,  # validation split (the test split when data.val_split is 0)
            "val_accuracy_dense": val_dense,
            "accuracy_before_finetune": acc_before_ft,
            "per_class_accuracy": data.per_class(test_p["per_class_accuracy"]),
            "per_class_accuracy_dense": data.per_class(test_dense["per_class_accuracy"]),
            **_structure_metrics(dense, pruned, data.image_size),
            "target_macs": cfg.gates.target_macs,  # requested budget (None: λ mode or a baseline ratio)
            "gate_kind": cfg.gates.resolved_kind,
            "gate_sparsity": g_sparsity,
            "channels_removed": run.report.removed,
            "prune_history": run.history,
            "input": {"size": data.image_size, "mean": list(data.mean), "std": list(data.std),
                      "layout": "NCHW float32"},
        }
        if cfg.gates.target_latency_ms is not None:  # requested latency budget, beside the measured latency_ms
            metrics["target_latency_ms"] = cfg.gates.target_latency_ms
        if getattr(pruned, "backbones_remaining", None) is not None:  # the hybrid: which backbones still run
            metrics["hybrid_backbones"] = list(pruned.backbones_remaining)
    if cfg.measure.export:
        with _timed(tm, "export_s"):
            metrics.update(_export_pair(dense, pruned, data, cfg, out))
    if cfg.measure.latency:
        with _timed(tm, "measure_s"):
            metrics.update(_latency_pair(dense, pruned, data, cfg, out))
        if cfg.gates.target_latency_ms is not None:  # the request against what was measured, not predicted
            metrics["latency_budget_error"] = metrics["latency_ms"] / cfg.gates.target_latency_ms - 1
    metrics["timings"] = tm
    if run.steps:
        metrics["prune_steps"] = run.steps
        plot_prune_steps(run.steps, out / "prune_steps.png")
    if ratio_rows is not None:
        metrics["ratio_curve"] = ratio_rows
        plot_ratio_curve(ratio_rows + [{"ratio": cfg.prune.target_sparsity, **{k: metrics.get(k) for k in (
            "accuracy", "accuracy_before_finetune", "latency_speedup")}}], cfg.prune.method, out / "ratio_curve.png")
    if log:
        log(_summary_line(cfg.prune.method, metrics))
    return metrics


class _Evaluator:
    """Test (and validation) accuracy of a model, timed into ``timings["evaluate_s"]``."""

    def __init__(self, data: Dataset, cfg: ExperimentConfig, timings: dict[str, float]) -> None:
        bs = cfg.data.eval_batch_size
        self.n_classes, self.timings = data.num_classes, timings
        self.test_loader = DeviceLoader(data.test_x, data.test_y, bs, data.mean, data.std, train=False)
        # the validation split (None without one: val_accuracy is then the test accuracy)
        self.val_loader = DeviceLoader(data.val_x, data.val_y, bs, data.mean, data.std,
                                       train=False) if data.has_val else None

    def test(self, model: nn.Module) -> dict[str, Any]:
        with _timed(self.timings, "evaluate_s"):
            return evaluate(model, self.test_loader, self.n_classes)

    def both(self, model: nn.Module) -> tuple[dict[str, Any], float]:
        """The test evaluation and the validation accuracy."""
        test = self.test(model)
        if self.val_loader is None:
            return test, test["accuracy"]
        with _timed(self.timings, "evaluate_s"):
            return test, evaluate(model, self.val_loader, self.n_classes)["accuracy"]


class _PruneRun:
    """One-shot or iterative pruning of a trained gated model (in place), with fine-tuning between
    and after the steps; keeps the removal report, the fine-tuning history and per-step records."""

    def __init__(self, model: nn.Module, dense: nn.Module, data: Dataset, cfg: ExperimentConfig,
                 ev: _Evaluator, timings: dict[str, float], log: Callable[[str], None] | None) -> None:
        self.pruned, self.dense, self.data, self.cfg = model, dense, data, cfg
        self.ev, self.tm, self.log = ev, timings, log
        self.report = PruneReport(cfg.prune.method)
        self.history: list[dict[str, Any]] = []
        self.steps: list[dict[str, Any]] = []
        self.example = torch.zeros(1, 3, data.image_size, data.image_size, device=data.train_x.device)

    def prune(self, out: Path, dense_accuracy: float) -> None:
        p, cfg = self.cfg.prune, self.cfg
        conv0 = first_conv(self.pruned)
        w0 = conv0.weight.detach().clone() if conv0 is not None else None
        name0 = next((n for n, m in self.pruned.named_modules() if m is conv0), None)
        alive = list(range(w0.shape[0])) if w0 is not None else []  # original indices still there
        if p.steps > 1:
            self.steps.append(_step_record(0, self.dense, dense_accuracy, None, self.data.image_size))
        if p.method != "gate":
            strip_gates(self.pruned)
        ratio = self._step_ratio()
        for step in range(p.steps):
            if p.method == "gate" and step > 0:
                self._finetune(penalty=True, phase=f"gate-step{step + 1}")
            with _timed(self.tm, "prune_s"):
                rep = prune_step(self.pruned, self.example, p.method, threshold=cfg.tau, ratio=ratio,
                                 round_to=p.round_to, min_channels=p.min_channels,
                                 max_layer_sparsity=p.max_layer_sparsity,
                                 calibration=calibration_batches(self.data, cfg), skip_first=p.skip_first)
            self.report.merge(rep)
            gone = set(rep.removed_idxs.get(name0, []))
            alive = [a for i, a in enumerate(alive) if i not in gone]
            if p.steps > 1:
                acc = self.ev.test(self.pruned)["accuracy"]
                self.steps.append(_step_record(step + 1, self.pruned, acc, self.steps[0]["params"],
                                               self.data.image_size))
            if self.log:
                self.log(f"prune step {step + 1}/{p.steps} ({p.method}): {rep.channels_removed} channels/weights "
                         "removed")
            if p.method != "gate" and step < p.steps - 1:
                self._finetune(penalty=False, phase=f"finetune-step{step + 1}")
        if p.method == "gate":
            with _timed(self.tm, "prune_s"):
                strip_gates(self.pruned, cfg.tau)
                keep_zeros(self.pruned)  # closed weight gates stay zero through fine-tuning
        if w0 is not None:
            kept = np.zeros(w0.shape[0], dtype=bool)
            kept[alive] = True
            plot_first_conv_filters(w0, kept, out / "first_conv_filters.png")

    def finetune_last(self) -> None:
        """Fine-tuning after the last step (without gates), then the pruning masks made permanent."""
        self._finetune(penalty=False, phase="finetune")
        remove_masks(self.pruned)

    def _step_ratio(self) -> float:
        """The share each step removes; baselines under a MACs budget find their ratio first."""
        p, cfg = self.cfg.prune, self.cfg
        target = p.target_sparsity
        if p.method != "gate" and target is None and cfg.gates.target_macs is not None:
            budget = cfg.gates.target_macs
            with _timed(self.tm, "prune_s"):
                target, share = ratio_for_budget(self.pruned, self.example, cfg, calibration_batches(self.data, cfg))
            if share is None or abs(share / budget - 1) > BUDGET_TOLERANCE:
                got = f"the nearest under it keeps {share:.3f}" if share is not None else "none gets under it"
                print(f"prunevision: warning: no single {p.method} pruning ratio meets the MACs budget {budget:g} "
                      f"within ±{BUDGET_TOLERANCE * 100:g} % ({got}, with prune.round_to {p.round_to}); pruning at "
                      f"ratio {target:.3f}. Gates (prune.method gate) meet budgets layer by layer",
                      file=sys.stderr, flush=True)
            elif self.log:
                self.log(f"{p.method}: pruning ratio {target:.3f} meets the MACs budget {budget:g} "
                         f"(keeps {share:.3f})")
        return step_ratio(target, p.steps) if target is not None else 0.0

    def _finetune(self, *, penalty: bool, phase: str) -> None:
        if self.cfg.prune.finetune_epochs <= 0:
            return
        with _timed(self.tm, "finetune_s"):
            self.history += finetune(self.pruned, self.data, self.cfg, self.cfg.prune.finetune_epochs,
                                     penalty=penalty, phase=phase, log=self.log, teacher=self.dense)


def _structure_metrics(dense: nn.Module, pruned: nn.Module, size: int) -> dict[str, Any]:
    """MACs, parameters and on-disk size of the pruned network against the dense one."""
    macs_d, params_d = macs_and_params(dense, size)
    macs_p, params_p = macs_and_params(pruned, size)
    size_d, gz_d = size_on_disk(dense)
    size_p, gz_p = size_on_disk(pruned)
    return {
        "params": params_p, "params_dense": params_d,
        "macs": macs_p, "macs_dense": macs_d,
        "param_sparsity": 1.0 - params_p / params_d,
        "macs_reduction": macs_d / max(macs_p, 1),
        "macs_share": macs_p / max(macs_d, 1),  # achieved budget
        "zero_fraction": zero_fraction(pruned),
        "size_bytes": size_p, "size_gzip_bytes": gz_p,
        "size_bytes_dense": size_d, "size_gzip_bytes_dense": gz_d,
    }


def _export_pair(dense: nn.Module, pruned: nn.Module, data: Dataset, cfg: ExperimentConfig,
                 out: Path) -> dict[str, Any]:
    """model.onnx and dense.onnx, each verified against PyTorch on real test images."""
    # real test images, normalised by the same loader that feeds evaluation
    real = [next(iter(DeviceLoader(data.test_x[:8].cpu(), data.test_y[:8].cpu(), 8, data.mean, data.std,
                                   train=False)))[0]]
    size, exporter = data.image_size, cfg.measure.exporter
    e_p = export_onnx(pruned, out / "model.onnx", size, check_inputs=real, exporter=exporter)
    e_d = export_onnx(dense, out / "dense.onnx", size, check_inputs=real, exporter=exporter)
    return {"onnx_max_abs_diff": max(e_p["max_abs_diff"], e_d["max_abs_diff"]),
            "onnx_size_bytes": e_p["size_bytes"], "onnx_size_bytes_dense": e_d["size_bytes"]}


def _latency_pair(dense: nn.Module, pruned: nn.Module, data: Dataset, cfg: ExperimentConfig,
                  out: Path) -> dict[str, Any]:
    """Dense against pruned latency, interleaved in one run: ONNX Runtime CPU (and PyTorch eager)."""
    m, size = cfg.measure, data.image_size
    paths = {"dense": out / "dense.onnx", "pruned": out / "model.onnx"}
    lat = {}
    for b in sorted({1, m.batch}):
        lat[f"onnxruntime_cpu_b{b}"] = onnx_latency(paths, size, batch=b, runs=m.runs, warmup=m.warmup,
                                                    threads=m.threads)
    if m.torch_latency:
        dev = data.train_x.device
        tdev = dev if dev.type == "cuda" else torch.device("cpu")
        for b in sorted({1, m.batch}):
            lat[f"torch_{tdev.type}_b{b}"] = torch_latency({"dense": dense, "pruned": pruned}, size, tdev, batch=b,
                                                           runs=m.runs, warmup=m.warmup, threads=m.threads)
    b1 = lat["onnxruntime_cpu_b1"]
    sp = speedup(b1["dense"], b1["pruned"])
    return {"latency_ms": b1["pruned"]["median_ms"], "latency_ms_p90": b1["pruned"]["p90_ms"],
            "latency_ms_dense": b1["dense"]["median_ms"], "latency_ms_dense_p90": b1["dense"]["p90_ms"],
            "latency_speedup": sp["median"], "latency_speedup_lo": sp["lo"], "latency_speedup_hi": sp["hi"],
            "latency": lat}


def _summary_line(method: str, m: dict[str, Any]) -> str:
    msg = (f"pruned ({method}): val accuracy {m['val_accuracy']:.4f} (dense {m['val_accuracy_dense']:.4f}), "
           f"test accuracy {m['accuracy']:.4f} (dense {m['accuracy_dense']:.4f}), "
           f"params {m['params'] / 1e6:.3f} M of {m['params_dense'] / 1e6:.3f} M, MACs {m['macs'] / 1e6:.1f} M of "
           f"{m['macs_dense'] / 1e6:.1f} M")
    if "latency_speedup" in m:
        msg += (f", ONNX Runtime CPU b1 {m['latency_ms']:.3f} ms vs {m['latency_ms_dense']:.3f} ms "
                f"({format_speedup(m['latency_speedup'], m.get('latency_speedup_lo'), m.get('latency_speedup_hi'))})")
    if "latency_budget_error" in m:
        msg += (f"; latency budget {m['target_latency_ms']:.4g} ms, measured {m['latency_ms']:.4g} ms "
                f"({100 * m['latency_budget_error']:+.1f} %)")
    return msg


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

"""What a trial reports: the one list of metric names, their meaning and direction, that the
training loop, the sweep (objectives, ASHA's score, MLflow) and the analysis agree on."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Optional


@dataclass(frozen=True)
class Metric:
    meaning: str
    better: Optional[Literal["max", "min"]] = None  # None: descriptive, not something to optimise
    per_epoch: bool = False  # in every epoch's record (what a sweep's score, and so ASHA, can use)
    final: bool = False  # in the trial's final result (what objectives and the analysis use)


METRICS: dict[str, Metric] = {
    # every epoch (prunevision.train.fit's record)
    "epoch": Metric("epochs trained so far", per_epoch=True),
    "task_loss": Metric("training cross-entropy, epoch mean", "min", per_epoch=True),
    "penalty": Metric("gate penalty (λ mode) or budget term, epoch mean", "min", per_epoch=True),
    "lam": Metric("λ, the penalty weight (budget mode: the Lagrange multiplier)", per_epoch=True),
    "lr": Metric("learning rate at the end of the epoch", per_epoch=True),
    "temperature": Metric("gate temperature", per_epoch=True),
    "train_accuracy": Metric("accuracy on the training batches", "max", per_epoch=True),
    "val_accuracy": Metric("accuracy on the validation split (the pruned model's, finally)", "max",
                           per_epoch=True, final=True),
    "val_loss": Metric("loss on the validation split", "min", per_epoch=True),
    "test_accuracy": Metric("gated network's test accuracy (reported, never chosen on)", "max", per_epoch=True),
    "test_loss": Metric("gated network's test loss", "min", per_epoch=True),
    "mean_gate": Metric("mean gate value", per_epoch=True, final=True),
    "gates_below_threshold": Metric("share of gates under τ", "max", per_epoch=True, final=True),
    "channel_mean_gate": Metric("mean channel-gate value", per_epoch=True),
    "channel_gates_below_threshold": Metric("share of channel gates under τ", "max", per_epoch=True),
    "epoch_time_s": Metric("seconds of training in the epoch", "min", per_epoch=True),
    "images_per_s": Metric("training throughput", "max", per_epoch=True),
    "macs_share": Metric("budget mode: the network's MACs share (per epoch: its gates')", "min",
                         per_epoch=True, final=True),
    "target_macs_now": Metric("budget mode: the MACs share the ramp asks for now", per_epoch=True),
    "latency_share": Metric("latency budget: the latency model's share of the dense latency", "min",
                            per_epoch=True),
    "target_latency_now": Metric("latency budget: the share of the dense latency the ramp asks for now",
                                 per_epoch=True),
    "latency_ms_predicted": Metric("latency budget: the latency model's prediction for the network now, ms",
                                   per_epoch=True),
    "latency_ms_measured": Metric("latency budget: the measured latency of the structure the gates were put on "
                                  "(when the final budget is first in force, and at the end), ms", per_epoch=True),
    # final only (prunevision.trial.prune_and_measure's metrics, pruned against dense)
    "val_accuracy_dense": Metric("dense network's validation accuracy", final=True),
    "accuracy": Metric("pruned model's test accuracy (reported, never chosen on)", "max", final=True),
    "accuracy_dense": Metric("dense network's test accuracy", final=True),
    "accuracy_before_finetune": Metric("pruned model's test accuracy before fine-tuning", "max", final=True),
    "params": Metric("pruned model's parameters", "min", final=True),
    "params_dense": Metric("dense network's parameters", final=True),
    "macs": Metric("pruned model's multiply-accumulates per image", "min", final=True),
    "macs_dense": Metric("dense network's multiply-accumulates per image", final=True),
    "param_sparsity": Metric("share of parameters removed", "max", final=True),
    "macs_reduction": Metric("dense MACs / pruned MACs", "max", final=True),
    "gate_sparsity": Metric("share of channel gates closed at the end of training", "max", final=True),
    "zero_fraction": Metric("share of zero weights left in the pruned model", final=True),
    "size_bytes": Metric("pruned model's size on disk", "min", final=True),
    "size_gzip_bytes": Metric("pruned model's size, gzip-compressed", "min", final=True),
    "latency_ms": Metric("pruned model's ONNX Runtime CPU latency, batch 1, median", "min", final=True),
    "latency_ms_p90": Metric("the same, 90th percentile", "min", final=True),
    "latency_ms_dense": Metric("dense network's latency, measured in the same run", final=True),
    "latency_speedup": Metric("dense latency / pruned latency (ratio of the medians)", "max", final=True),
    "latency_speedup_lo": Metric("the lowest ratio of one round's medians (dense and pruned interleaved)",
                                 final=True),
    "latency_speedup_hi": Metric("the highest ratio of one round's medians", final=True),
    "onnx_max_abs_diff": Metric("largest ONNX-vs-PyTorch output difference on real images", final=True),
    "train_time_s": Metric("seconds of gated training", "min", final=True),
    "target_macs": Metric("budget mode: the MACs share asked for", final=True),
    "target_latency_ms": Metric("latency budget: the latency_ms asked for", final=True),
    "latency_budget_error": Metric("latency budget: measured latency_ms / target_latency_ms − 1", final=True),
}

EPOCH_METRICS = tuple(k for k, m in METRICS.items() if m.per_epoch)
FINAL_METRICS = tuple(k for k, m in METRICS.items() if m.final)
# what a sweep may optimise: final metrics with a direction
OBJECTIVE_METRICS = ("val_accuracy", "accuracy", "param_sparsity", "latency_ms", "macs", "params", "size_bytes",
                     "size_gzip_bytes", "gate_sparsity", "latency_speedup", "macs_reduction")


def speedup(reference: dict[str, Any], model: dict[str, Any]) -> dict[str, float]:
    """How many times faster ``model`` ran than ``reference`` (two results of one interleaved run):
    the ratio of the medians, and its spread, the lowest and highest ratio of the rounds' medians
    (each round timed both models one after the other, so a noisy neighbour slows both alike)."""
    ratios = [r / m for r, m in zip(reference.get("round_medians_ms") or [], model.get("round_medians_ms") or [])
              if m > 0]
    mid = reference["median_ms"] / model["median_ms"]
    return {"median": mid, "lo": min(ratios, default=mid), "hi": max(ratios, default=mid), "rounds": len(ratios)}


def format_speedup(median: float, lo: float | None = None, hi: float | None = None) -> str:
    """'1.96× (1.80–2.10)': the median speed-up and the spread over rounds when known."""
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{median:.2f}×"
    return f"{median:.2f}× ({lo:.2f}–{hi:.2f})"

"""Visual diagnostics of one trial (PNG, matplotlib Agg): which first-layer filters went, metrics
over the pruning steps, gate-value histograms per layer over training, and the ratio curve of a
multi-ratio run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from prunevision.fsutil import save_figure
from prunevision.gates import ChannelGate, gate_values

GATE_BINS = np.linspace(0.0, 1.0, 21)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def first_conv(model: nn.Module) -> nn.Conv2d | None:
    return next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)


def plot_first_conv_filters(weight: torch.Tensor, kept: np.ndarray, path: Path, title: str = "") -> Path:
    """The first conv layer's filters as an image grid; removed ones crossed out and faded."""
    plt = _plt()
    w = weight.detach().float().cpu()
    n = w.shape[0]
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9 + 0.5, rows * 0.9 + 0.9), dpi=110, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= n:
            ax.axis("off")
            continue
        f = w[i]
        f = (f - f.min()) / (f.max() - f.min() + 1e-8)
        img = f.permute(1, 2, 0).numpy() if f.shape[0] == 3 else f.mean(0).numpy()
        ax.imshow(img, cmap=None if f.shape[0] == 3 else "gray", alpha=1.0 if kept[i] else 0.25,
                  interpolation="nearest")
        if not kept[i]:
            ax.plot([0, 1], [0, 1], transform=ax.transAxes, color="crimson", lw=1.5)
            ax.plot([0, 1], [1, 0], transform=ax.transAxes, color="crimson", lw=1.5)
        for sp in ax.spines.values():
            sp.set_edgecolor("0.3" if kept[i] else "crimson")
    fig.suptitle(title or f"First conv layer: {int(kept.sum())} of {n} filters kept (removed: crossed out)",
                 fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def plot_prune_steps(steps: list[dict[str, Any]], path: Path) -> Path | None:
    """Accuracy, parameter sparsity and latency after each pruning step (step 0: before)."""
    if len(steps) < 2:
        return None
    plt = _plt()
    x = [s["step"] for s in steps]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), dpi=110)
    for ax, key, lab, scale in ((axes[0], "accuracy", "top-1 accuracy (%)", 100),
                                (axes[1], "param_sparsity", "parameters removed (%)", 100),
                                (axes[2], "latency_ms", "PyTorch CPU latency, batch 1 (ms)", 1)):
        ax.plot(x, [s[key] * scale for s in steps], marker="o")
        ax.set_xlabel("pruning step (0 = before pruning)")
        ax.set_ylabel(lab)
        ax.set_xticks(x)
        ax.grid(alpha=0.3)
    fig.suptitle("Metrics over the pruning steps (before each step's fine-tuning)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def gate_snapshot(model: nn.Module) -> dict[str, list[int]]:
    """Histogram counts (20 bins over [0, 1]) of each channel gate layer's values."""
    out = {}
    for name, v in gate_values(model).items():
        if isinstance(model.get_submodule(name), ChannelGate):
            out[name] = np.histogram(v.reshape(-1).float().cpu().numpy(), bins=GATE_BINS)[0].tolist()
    return out


def plot_gate_history(history: list[dict[str, list[int]]], threshold: float, path: Path,
                      max_layers: int = 16) -> Path | None:
    """Per layer: a heat map of gate values (rows: 20 bins over [0, 1]) by epoch."""
    if not history or not history[0]:
        return None
    plt = _plt()
    layers = list(history[0])
    if len(layers) > max_layers:  # evenly spaced layers, first and last included
        pick = np.unique(np.linspace(0, len(layers) - 1, max_layers).round().astype(int))
        layers = [layers[i] for i in pick]
    cols = min(4, len(layers))
    rows = int(np.ceil(len(layers) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows + 0.6), dpi=110, squeeze=False)
    for ax, name in zip(axes.flat, layers):
        m = np.array([h.get(name, [0] * (len(GATE_BINS) - 1)) for h in history], dtype=float).T
        m = m / np.maximum(m.sum(axis=0, keepdims=True), 1)
        ax.imshow(m, origin="lower", aspect="auto", cmap="magma", extent=(0.5, len(history) + 0.5, 0, 1),
                  vmin=0, vmax=1)
        ax.axhline(threshold, color="cyan", lw=0.8, ls="--")
        ax.set_title(name, fontsize=7)
        ax.set_xlabel("epoch", fontsize=7)
        ax.set_ylabel("gate value", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    fig.suptitle(f"Gate values per layer over training (share of the layer's gates per bin; τ = {threshold:g} "
                 "dashed)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def plot_ratio_curve(rows: list[dict[str, Any]], method: str, path: Path) -> Path | None:
    """Accuracy and speed-up against the pruning ratio, from one trained model."""
    if not rows:
        return None
    plt = _plt()
    rows = sorted(rows, key=lambda r: r["ratio"])
    x = [100 * r["ratio"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
    ax.plot(x, [100 * r["accuracy"] for r in rows], marker="o", color="tab:blue", label="accuracy (fine-tuned)")
    if all("accuracy_before_finetune" in r for r in rows):
        ax.plot(x, [100 * r["accuracy_before_finetune"] for r in rows], marker=".", ls=":", color="tab:blue",
                label="accuracy before fine-tuning")
    ax.set_xlabel(f"pruning ratio ({method}, % of channels)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    if all(r.get("latency_speedup") for r in rows):
        ax2 = ax.twinx()
        ax2.plot(x, [r["latency_speedup"] for r in rows], marker="s", color="tab:red", label="speed-up")
        ax2.set_ylabel("ONNX Runtime CPU b1 speed-up (×)", color="tab:red")
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title("One trained model, several pruning ratios")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path

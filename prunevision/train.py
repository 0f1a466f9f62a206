"""Gated training: loss = task loss + λ(t) · penalty(gates).

``fit`` trains an instrumented model on a :class:`~prunevision.data.Dataset` that already lives
on the training device. Weights use SGD (Nesterov) or AdamW with a one-cycle or cosine learning
rate; gate scores use their own Adam optimiser. Why Adam for the scores: in ``mean`` mode each
gate's penalty gradient is λ/N, so under SGD the speed at which gates close would depend on the
model's size; Adam's per-parameter step makes closing speed depend only on the balance between
the task gradient and the penalty, whatever the model.

A ``reporter`` callback receives every epoch's record and a function that writes a checkpoint,
so a caller (the Ray Tune layer) can report and checkpoint without this library importing Ray.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn import functional as F

from prunevision.config import ExperimentConfig, from_dict
from prunevision.data import Dataset, DeviceLoader
from prunevision.gates import gate_parameters, gate_stats, penalty, set_temperature
from prunevision.schedules import lam_at, lr_at, temperature_at

CHECKPOINT_FORMAT = "prunevision-train-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not match the configuration."""


class Reporter(Protocol):
    def __call__(self, record: dict[str, Any], save_checkpoint: Callable[[str | Path], Path]) -> None: ...


@dataclass
class TrainState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    gate_optimizer: torch.optim.Optimizer | None
    cfg: ExperimentConfig
    epoch: int = 0  # completed epochs
    image_size: int = 32
    history: list[dict[str, Any]] = field(default_factory=list)

    def save(self, path: str | Path) -> Path:
        """Write a checkpoint (tensors and plain values only: ``torch.load(weights_only=True)``)."""
        path = Path(path)
        if path.suffix != ".pt":
            path.mkdir(parents=True, exist_ok=True)
            path = path / "checkpoint.pt"
        payload = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "config": json.dumps(self.cfg.to_dict()),
            "epoch": self.epoch,
            "image_size": self.image_size,
            "history": json.dumps(self.history),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "gate_optimizer": self.gate_optimizer.state_dict() if self.gate_optimizer else None,
            "rng": torch.get_rng_state(),
        }
        tmp = path.with_suffix(".pt.tmp")
        torch.save(payload, tmp)
        tmp.replace(path)  # a crash mid-write never leaves a half checkpoint behind
        return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and check a training checkpoint. Never unpickles code."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"cannot read checkpoint {path}: corrupt, or not a plain-tensor prunevision checkpoint "
            f"({' '.join(str(e).split())[:200]})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a prunevision training checkpoint")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint version {ckpt.get('version')}")
    try:
        ckpt["config"] = from_dict(json.loads(ckpt["config"]))
        ckpt["history"] = json.loads(ckpt["history"])
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: damaged config or history: {e}") from None
    return ckpt


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name} but no CUDA device is available")
    return torch.device(name)


def make_optimizers(
    model: nn.Module, cfg: ExperimentConfig
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer | None]:
    gates = {id(p) for p in gate_parameters(model)}
    decay, no_decay = [], []
    for p in model.parameters():
        if id(p) in gates or not p.requires_grad:
            continue
        (decay if p.ndim > 1 else no_decay).append(p)  # no weight decay on norms and biases
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.train.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.train.lr, momentum=cfg.train.momentum, nesterov=cfg.train.momentum > 0)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.train.lr)
    gate_params = gate_parameters(model)
    gate_opt = torch.optim.Adam(gate_params, lr=cfg.gates.lr) if gate_params else None
    return opt, gate_opt


@torch.no_grad()
def evaluate(model: nn.Module, loader: DeviceLoader, num_classes: int, amp: bool = False) -> dict[str, Any]:
    """Top-1 accuracy, per-class accuracy and mean loss."""
    model.eval()
    dev = loader.x.device
    correct = torch.zeros(num_classes, device=dev)
    count = torch.zeros(num_classes, device=dev)
    loss_sum = torch.zeros((), device=dev)
    for x, y in loader:
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        loss_sum += F.cross_entropy(out.float(), y, reduction="sum")
        hit = (out.argmax(1) == y).float()
        correct.index_add_(0, y, hit)
        count.index_add_(0, y, torch.ones_like(hit))
    n = count.sum().item()
    per_class = (correct / count.clamp_min(1)).tolist()
    return {
        "accuracy": correct.sum().item() / max(n, 1),
        "loss": loss_sum.item() / max(n, 1),
        "per_class_accuracy": per_class,
        "n": int(n),
    }


def fit(
    model: nn.Module,
    data: Dataset,
    cfg: ExperimentConfig,
    *,
    reporter: Reporter | None = None,
    resume: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainState:
    """Train ``model`` under the gate penalty for ``cfg.train.epochs`` epochs.

    ``resume`` is a checkpoint from :func:`load_checkpoint`: training goes on after its last
    completed epoch with the same optimiser state, so no finished epoch is repeated.
    """
    dev = data.train_x.device
    amp = cfg.train.amp if cfg.train.amp is not None else dev.type == "cuda"
    channels_last = cfg.train.channels_last if cfg.train.channels_last is not None else dev.type == "cuda"
    model.to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    opt, gate_opt = make_optimizers(model, cfg)
    state = TrainState(model, opt, gate_opt, cfg, image_size=data.image_size)
    if resume is not None:
        _restore(state, resume)
    g_cfg, t_cfg = cfg.gates, cfg.train
    train_loader = DeviceLoader(data.train_x, data.train_y, cfg.data.batch_size, data.mean, data.std, train=True,
                                augment=cfg.data.augment, seed=cfg.seed, channels_last=channels_last)
    test_loader = DeviceLoader(data.test_x, data.test_y, cfg.data.eval_batch_size, data.mean, data.std,
                               train=False, channels_last=channels_last)
    steps = len(train_loader)
    total_steps = steps * t_cfg.epochs
    interactive = sys.stderr.isatty()
    for epoch in range(state.epoch, t_cfg.epochs):
        model.train()
        train_loader.set_epoch(epoch)
        t0 = time.perf_counter()
        task_sum = torch.zeros((), device=dev)
        pen_sum = torch.zeros((), device=dev)
        correct = torch.zeros((), device=dev)
        seen = 0
        batches = _progress(train_loader, interactive, f"epoch {epoch + 1}/{t_cfg.epochs}")
        for step, (x, y) in enumerate(batches):
            t_epoch = epoch + step / steps
            lam = lam_at(g_cfg, t_epoch, t_cfg.epochs)
            lr = lr_at(t_cfg, epoch * steps + step, total_steps)
            for group in opt.param_groups:
                group["lr"] = lr
            if g_cfg.temperature_final is not None:
                set_temperature(model, temperature_at(g_cfg, t_epoch, t_cfg.epochs))
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
                out = model(x)
            task = F.cross_entropy(out.float(), y, label_smoothing=t_cfg.label_smoothing)
            pen = penalty(model, g_cfg.penalty) if gate_opt is not None else torch.zeros((), device=dev)
            loss = task + lam * pen
            opt.zero_grad(set_to_none=True)
            if gate_opt is not None:
                gate_opt.zero_grad(set_to_none=True)
            loss.backward()
            if t_cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), t_cfg.grad_clip)
            opt.step()
            if gate_opt is not None:
                gate_opt.step()
            task_sum += task.detach() * len(y)
            pen_sum += pen.detach() * len(y)
            correct += (out.argmax(1) == y).sum()
            seen += len(y)
        if not math.isfinite(task_sum.item()):
            raise FloatingPointError(f"training diverged in epoch {epoch + 1} (loss is not finite); lower train.lr")
        train_time = time.perf_counter() - t0
        ev = evaluate(model, test_loader, data.num_classes, amp=amp)
        stats = gate_stats(model, cfg.prune.threshold)
        record = {
            "epoch": epoch + 1,
            "task_loss": task_sum.item() / max(seen, 1),
            "penalty": pen_sum.item() / max(seen, 1),
            "lam": lam_at(g_cfg, epoch + 1, t_cfg.epochs),
            "lr": lr,
            "temperature": temperature_at(g_cfg, epoch + 1, t_cfg.epochs),
            "train_accuracy": correct.item() / max(seen, 1),
            "test_accuracy": ev["accuracy"],
            "test_loss": ev["loss"],
            "mean_gate": stats["all"]["mean"],
            "gates_below_threshold": stats["all"]["below_threshold"],
            "channel_mean_gate": stats["channel"]["mean"],
            "channel_gates_below_threshold": stats["channel"]["below_threshold"],
            "epoch_time_s": train_time,
            "images_per_s": seen / train_time if train_time > 0 else float("nan"),
        }
        state.epoch = epoch + 1
        state.history.append(record)
        if log:
            gates = (f"mean gate {record['mean_gate']:.3f}  closed {record['gates_below_threshold']:.1%}  "
                     f"λ {record['lam']:.3g}  ") if gate_opt is not None else ""
            log(
                f"epoch {epoch + 1}/{t_cfg.epochs}  loss {record['task_loss']:.3f}  "
                f"acc {record['test_accuracy']:.4f}  {gates}{record['images_per_s']:.0f} img/s"
            )
        if reporter is not None:
            reporter(dict(record), state.save)
    return state


def _progress(loader: DeviceLoader, interactive: bool, desc: str):
    if not interactive:
        return loader
    from tqdm.auto import tqdm

    return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)


def _restore(state: TrainState, ckpt: dict[str, Any]) -> None:
    saved_cfg: ExperimentConfig = ckpt["config"]
    if saved_cfg.model != state.cfg.model:
        raise CheckpointError("the checkpoint was trained with another model configuration")
    try:
        state.model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint does not fit the model: {' '.join(str(e).split())[:300]}") from None
    state.optimizer.load_state_dict(ckpt["optimizer"])
    if state.gate_optimizer is not None and ckpt.get("gate_optimizer") is not None:
        state.gate_optimizer.load_state_dict(ckpt["gate_optimizer"])
    state.epoch = int(ckpt["epoch"])
    state.history = list(ckpt["history"])
    if isinstance(ckpt.get("rng"), torch.Tensor):
        torch.set_rng_state(ckpt["rng"])
    if state.cfg.gates.temperature_final is not None:
        set_temperature(state.model, temperature_at(state.cfg.gates, state.epoch, state.cfg.train.epochs))

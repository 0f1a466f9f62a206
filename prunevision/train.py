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

import io
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

from prunevision.budget import BudgetController, budget_for
from prunevision.config import ExperimentConfig, from_dict
from prunevision.data import Dataset, DeviceLoader
from prunevision.fsutil import atomic_write, require_file
from prunevision.gates import clamp_scores, gate_parameters, gate_stats, penalty, set_temperature
from prunevision.latency import land, measure_pruned_ms
from prunevision.schedules import budget_in_force, budget_warmup, lam_at, lr_at, target_at, temperature_at

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
    budget: BudgetController | None = None

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
            "budget": self.budget.state_dict() if self.budget is not None else None,
            "rng": torch.get_rng_state(),
        }
        buf = io.BytesIO()
        torch.save(payload, buf)
        return atomic_write(path, buf.getvalue())  # a crash or full disk never leaves a half checkpoint


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and check a training checkpoint. Never unpickles code."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    require_file(path, "checkpoint", CheckpointError)
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
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise CheckpointError(f"{path}: damaged config or history: {' '.join(str(e).split())[:200]}") from None
    problem = _checkpoint_problem(ckpt)
    if problem:
        raise CheckpointError(f"{path}: damaged or edited checkpoint: {problem}")
    return ckpt


def _checkpoint_problem(ckpt: dict[str, Any]) -> str | None:
    """What a rebuild reads, against types and the same bounds as a pruned checkpoint's metadata:
    a model is built from these sizes before any tensor is loaded."""
    from prunevision.checkpoint import MAX_BACKBONES, MAX_CLASSES, MAX_FUSION_CHANNELS, MAX_IMAGE_SIZE

    m = ckpt["config"].model
    whole = {"epoch": (ckpt.get("epoch"), 0, 1 << 31), "image_size": (ckpt.get("image_size", 32), 8, MAX_IMAGE_SIZE),
             "model.num_classes": (m.num_classes or 2, 2, MAX_CLASSES),
             "model.fusion_channels": (m.fusion_channels, 1, MAX_FUSION_CHANNELS)}
    for key, (v, low, high) in whole.items():
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
            return f"{key} {str(v)[:40]!r} is not a whole number in [{low}, {high}]"
    if len(m.backbones) > MAX_BACKBONES:
        return f"model.backbones: {len(m.backbones)} backbones (at most {MAX_BACKBONES})"
    if not isinstance(ckpt["history"], list):
        return "history is not a list"
    for key in ("model", "optimizer"):
        if not isinstance(ckpt.get(key), dict):
            return f"no {key} state"
    if not all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in ckpt["model"].items()):
        return "the model state is not a mapping of names to tensors"
    return None


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
    if not gate_params:
        return opt, None
    if cfg.gates.resolved_kind == "sigmoid":
        return opt, torch.optim.Adam(gate_params, lr=cfg.gates.lr)
    return opt, NormalizedSGD(gate_params, lr=cfg.gates.lr)


class NormalizedSGD(torch.optim.Optimizer):
    """SGD with momentum on the gradient divided by its root mean square over *all* gate scores.

    Hard gates need the size of each gate's gradient to matter: a channel stays open when what it
    is worth to the task outweighs λ times what it costs, the economics of a Lagrangian. Adam
    normalises every score by its own history, so under a common budget pressure every gate moves
    at the same speed and they close together; one global scale keeps the comparison between
    gates and still makes the step size independent of the model (``lr`` = the mean step).
    """

    def __init__(self, params, lr: float, momentum: float = 0.9):
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return None
        n = sum(gr.numel() for gr in grads)
        rms = torch.sqrt(sum((gr.float() ** 2).sum() for gr in grads) / n).clamp_min(1e-12)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                buf = state.get("momentum_buffer")
                d = p.grad / rms
                if buf is None:
                    buf = state["momentum_buffer"] = d.clone()
                else:
                    buf.mul_(group["momentum"]).add_(d)
                p.add_(buf, alpha=-group["lr"] * (1 - group["momentum"]))
        return None


RECALIBRATION_BATCHES = 32  # training batches a norm's running statistics are re-estimated on


@torch.no_grad()
def recalibrate_norms(model: nn.Module, loader, batches: int = RECALIBRATION_BATCHES, amp: bool = False) -> None:
    """Re-estimate every BatchNorm's running mean and variance on ``batches`` batches of ``loader`` (a cumulative
    average; every other layer in evaluation mode, so no dropout draws from the random stream and no weight
    moves). Budgeted training moves the structure while it trains, and each channel that closes or opens
    changes what the next norms see; their running statistics, an exponential average over the last steps,
    then describe a mix of structures: mobilenet_v2 at 0.25 of the MACs (Fisher scores) scored 23.6 % on
    held-out images against 33.5 % on its training batches, and 32.3 % once recalibrated."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return
    was_training = model.training
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for i, (x, _) in enumerate(loader):
            if i >= batches:
                break
            with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=amp):
                model(x)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)


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
    teacher: nn.Module | None = None,
) -> TrainState:
    """Train ``model`` under the gate penalty for ``cfg.train.epochs`` epochs.

    ``resume`` is a checkpoint from :func:`load_checkpoint`: training goes on after its last
    completed epoch with the same optimiser state, so no finished epoch is repeated.
    ``teacher``: a network whose softened outputs the model learns too (``prune.distill``).
    """
    dev = data.train_x.device
    amp = cfg.train.amp if cfg.train.amp is not None else dev.type == "cuda"
    channels_last = cfg.train.channels_last if cfg.train.channels_last is not None else dev.type == "cuda"
    model.to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    opt, gate_opt = make_optimizers(model, cfg)
    # budget mode: λ is a Lagrange multiplier that training adjusts (raises BudgetError before any
    # training when the width floor alone is over budget)
    budget = budget_for(model, cfg, data.image_size, dev) if gate_opt is not None else None
    try:  # from here on the controller's hooks are on the model: they leave it however fit ends
        state = TrainState(model, opt, gate_opt, cfg, image_size=data.image_size, budget=budget)
        if resume is not None:
            _restore(state, resume)
        g_cfg, t_cfg = cfg.gates, cfg.train
        train_loader = DeviceLoader(data.train_x, data.train_y, cfg.data.batch_size, data.mean, data.std, train=True,
                                    augment=cfg.data.augment, seed=cfg.seed, channels_last=channels_last)
        test_loader = DeviceLoader(data.test_x, data.test_y, cfg.data.eval_batch_size, data.mean, data.std,
                                   train=False, channels_last=channels_last)
        # the validation split is what selection sees; without one (data.val_split 0) the test split stands in
        val_loader = DeviceLoader(data.val_x, data.val_y, cfg.data.eval_batch_size, data.mean, data.std,
                                  train=False, channels_last=channels_last) if data.has_val else None
        # budgeted runs re-estimate the norms (recalibrate_norms) on a shuffle of their own, so that the training
        # stream stays as it is
        calib_loader = DeviceLoader(data.train_x, data.train_y, cfg.data.batch_size, data.mean, data.std, train=True,
                                    augment=cfg.data.augment, seed=cfg.seed + 7919,
                                    channels_last=channels_last) if budget is not None else None
        steps = len(train_loader)
        total_steps = steps * t_cfg.epochs
        follow_every = max(1, steps // BudgetController.FOLLOW_EVERY)
        warmup = budget_warmup(g_cfg, t_cfg.epochs)
        # when the final budget is first in force, and at the end (the hold epochs may have moved the structure)
        landing_epochs = {max(1, math.ceil(budget_in_force(g_cfg, t_cfg.epochs) - 1e-9)), t_cfg.epochs}
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
                if isinstance(gate_opt, NormalizedSGD):  # hard gates settle as the learning rate anneals
                    for group in gate_opt.param_groups:
                        group["lr"] = g_cfg.lr * lr / t_cfg.lr
                if g_cfg.temperature_final is not None:
                    set_temperature(model, temperature_at(g_cfg, t_epoch, t_cfg.epochs))
                with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
                    out = model(x)
                task = F.cross_entropy(out.float(), y, label_smoothing=t_cfg.label_smoothing)
                if teacher is not None:
                    task = distill_loss(task, out, teacher, x, cfg.prune.distill, cfg.prune.distill_temperature, amp)
                in_force = budget is not None and t_epoch >= warmup  # the warm-up trains dense
                if in_force:
                    pen = budget.loss(target_at(g_cfg, t_epoch, t_cfg.epochs, budget.target))
                    loss = task + pen
                    budget.zero_grad()
                elif budget is not None:
                    pen, loss = torch.zeros((), device=dev), task
                else:
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
                    clamp_scores(model)
                    if budget is not None:
                        budget.macs.open_floor()  # what pruning keeps in any case trains open
                if in_force:
                    budget.step()
                if budget is not None and ((step + 1) % follow_every == 0 or step + 1 == steps):
                    # the structure follows the budget in force (1 in the warm-up, then the ramp)
                    budget.follow(target_at(g_cfg, epoch + (step + 1) / steps, t_cfg.epochs, budget.target))
                task_sum += task.detach() * len(y)
                pen_sum += pen.detach() * len(y)
                correct += (out.argmax(1) == y).sum()
                seen += len(y)
            if not math.isfinite(task_sum.item()):
                raise FloatingPointError(f"training diverged in epoch {epoch + 1} (loss is not finite); "
                                         "lower train.lr or set train.grad_clip")
            train_time = time.perf_counter() - t0
            landed = None
            if budget is not None and budget.calibration is not None and epoch + 1 in landing_epochs:
                # latency budgets: the structure is put where its measured latency is nearest the request
                # (the model's prediction is steps away from it, prunevision.latency.land), and the budget
                # is held there from now on
                landed = land(budget.macs, cfg.latency_budget, lambda: measure_pruned_ms(
                    model, budget.macs, data.image_size, threads=cfg.measure.threads))
                budget.target = budget.macs.hard_share()
                budget.macs.open_floor()
            if budget is not None and epoch + 1 > warmup:  # the budget was in force: the structure moved
                recalibrate_norms(model, calib_loader, amp=amp)
            ev = evaluate(model, test_loader, data.num_classes, amp=amp)
            ev_val = evaluate(model, val_loader, data.num_classes, amp=amp) if val_loader is not None else ev
            stats = gate_stats(model, cfg.tau)
            record = {
                "epoch": epoch + 1,
                "task_loss": task_sum.item() / max(seen, 1),
                "penalty": pen_sum.item() / max(seen, 1),
                "lam": budget.lam if budget is not None else lam_at(g_cfg, epoch + 1, t_cfg.epochs),
                "lr": lr,
                "temperature": temperature_at(g_cfg, epoch + 1, t_cfg.epochs),
                "train_accuracy": correct.item() / max(seen, 1),
                "val_accuracy": ev_val["accuracy"],
                "val_loss": ev_val["loss"],
                "test_accuracy": ev["accuracy"],  # reported, never chosen on
                "test_loss": ev["loss"],
                "mean_gate": stats["all"]["mean"],
                "gates_below_threshold": stats["all"]["below_threshold"],
                "channel_mean_gate": stats["channel"]["mean"],
                "channel_gates_below_threshold": stats["channel"]["below_threshold"],
                "epoch_time_s": train_time,
                "images_per_s": seen / train_time if train_time > 0 else float("nan"),
            }
            if budget is not None:
                kind = "macs" if budget.calibration is None else "latency"
                record[f"{kind}_share"] = budget.macs.hard_share()
                record[f"target_{kind}_now"] = target_at(g_cfg, epoch + 1, t_cfg.epochs, budget.target)
                if budget.calibration is not None:
                    record["latency_ms_predicted"] = record["latency_share"] * budget.macs.reference
                    if landed is not None:
                        record["latency_ms_measured"] = landed["measured_ms"]
            state.epoch = epoch + 1
            state.history.append(record)
            if log:
                gates = (f"mean gate {record['mean_gate']:.3f}  closed {record['gates_below_threshold']:.1%}  "
                         f"λ {record['lam']:.3g}  ") if gate_opt is not None else ""
                if budget is not None and budget.calibration is None:
                    gates += f"MACs {record['macs_share']:.3f} (budget {record['target_macs_now']:.3f})  "
                elif budget is not None:
                    ref = budget.macs.reference
                    measured = (f", {record['latency_ms_measured']:.3g} measured" if "latency_ms_measured" in record
                                else "")
                    gates += (f"latency {record['latency_ms_predicted']:.3g} ms predicted{measured} "
                              f"(budget {record['target_latency_now'] * ref:.3g} ms)  ")
                acc = f"val acc {record['val_accuracy']:.4f}  " if val_loader is not None else ""
                log(
                    f"epoch {epoch + 1}/{t_cfg.epochs}  loss {record['task_loss']:.3f}  "
                    f"{acc}test acc {record['test_accuracy']:.4f}  {gates}{record['images_per_s']:.0f} img/s"
                )
            if reporter is not None:
                reporter(dict(record), state.save)
    finally:
        if budget is not None:
            budget.close()  # fisher: its hooks leave the model, also when training raises (estimates stay in the state)
    return state


def distill_loss(task: torch.Tensor, out: torch.Tensor, teacher: nn.Module, x: torch.Tensor, alpha: float,
                 temperature: float, amp: bool) -> torch.Tensor:
    """(1 − α)·CE(labels) + α·T²·KL(softmax(teacher/T) ‖ softmax(student/T)) (Hinton et al.)."""
    teacher.eval()
    with torch.no_grad(), torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=amp):
        t_out = teacher(x)
    kd = F.kl_div(F.log_softmax(out.float() / temperature, dim=1), F.softmax(t_out.float() / temperature, dim=1),
                  reduction="batchmean") * temperature ** 2
    return (1.0 - alpha) * task + alpha * kd


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
    try:
        state.optimizer.load_state_dict(ckpt["optimizer"])
        if state.gate_optimizer is not None and ckpt.get("gate_optimizer") is not None:
            state.gate_optimizer.load_state_dict(ckpt["gate_optimizer"])
        if state.budget is not None and ckpt.get("budget") is not None:
            state.budget.load_state_dict(ckpt["budget"])
        if isinstance(ckpt.get("rng"), torch.Tensor):
            torch.set_rng_state(ckpt["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise CheckpointError(f"checkpoint's optimiser or random state does not fit: "
                              f"{' '.join(str(e).split())[:300]}") from None
    state.epoch = int(ckpt["epoch"])
    state.history = list(ckpt["history"])
    if state.cfg.gates.temperature_final is not None:
        set_temperature(state.model, temperature_at(state.cfg.gates, state.epoch, state.cfg.train.epochs))

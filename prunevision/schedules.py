"""Schedules as pure functions of (fractional) epoch: λ(t), gate temperature T(t), learning rate.

Pure functions keep resuming exact: the state of every schedule is the epoch counter.
"""

from __future__ import annotations

import math

from prunevision.config import GateConfig, TrainConfig


def lam_at(cfg: GateConfig, epoch: float, total_epochs: int) -> float:
    """λ at a fractional epoch ``epoch`` in [0, total_epochs].

    constant — λ throughout.
    linear   — linear warm-up from 0 to λ over ``warmup_epochs``, then λ.
    staged   — no penalty for ``warmup_epochs``, then λ in ``stages`` equal steps spread
               evenly over the remaining epochs (λ/stages, 2λ/stages, ..., λ).
    cubic    — Zhu & Gupta (2017): 0 until ``warmup_epochs``, then
               λ·(1 − (1 − t)³) with t rising from 0 to 1 over ``ramp_epochs``
               (default: the rest of training).
    """
    lam = cfg.lam if cfg.lam is not None else 1.0
    w = cfg.warmup_epochs or 0.0
    if cfg.schedule == "constant":
        return lam
    if cfg.schedule == "linear":
        return lam if w <= 0 else lam * min(1.0, epoch / w)
    if epoch < w:
        return 0.0
    rest = max(total_epochs - w, 1e-9)
    if cfg.schedule == "staged":
        stage = math.floor((epoch - w) / (rest / cfg.stages)) + 1
        return lam * min(stage, cfg.stages) / cfg.stages
    if cfg.schedule == "cubic":
        ramp = cfg.ramp_epochs if cfg.ramp_epochs is not None else rest
        t = min(1.0, (epoch - w) / ramp)
        return lam * (1.0 - (1.0 - t) ** 3)
    raise ValueError(f"unknown λ schedule {cfg.schedule!r}")


def target_at(cfg: GateConfig, epoch: float, total_epochs: int, final: float | None = None) -> float:
    """The budget in force at ``epoch`` (budget mode), as a share of the dense network's MACs (or, with
    ``final`` given, of whatever ``final`` is a share of: a latency budget's share of the dense latency):
    1 (dense) during the warm-up (:func:`budget_warmup`), then a linear ramp to ``final`` (default
    ``target_macs``) over ``ramp_epochs`` (default: half the remaining epochs), then ``final`` until
    the end, so the last epochs train the final structure."""
    final = cfg.target_macs if final is None else final
    if final is None:
        return 1.0
    w = budget_warmup(cfg, total_epochs)
    ramp = budget_in_force(cfg, total_epochs) - w
    t = min(1.0, max(0.0, (epoch - w) / max(ramp, 1e-9)))
    return 1.0 - (1.0 - final) * t


def budget_warmup(cfg: GateConfig, total_epochs: int) -> float:
    """Dense epochs before a budget's ramp starts: ``warmup_epochs``, by default a third of training
    (the ramp then takes the next third, and the last third trains the final structure)."""
    return cfg.warmup_epochs if cfg.warmup_epochs is not None else total_epochs / 3.0


def budget_in_force(cfg: GateConfig, total_epochs: int) -> float:
    """The epoch from which ``target_at`` holds the final budget."""
    w = budget_warmup(cfg, total_epochs)
    ramp = cfg.ramp_epochs if cfg.ramp_epochs is not None else max(total_epochs - w, 1e-9) / 2
    return w + ramp


def temperature_at(cfg: GateConfig, epoch: float, total_epochs: int) -> float:
    """Gate temperature, annealed geometrically from ``temperature`` to ``temperature_final``."""
    if cfg.temperature_final is None:
        return cfg.temperature
    t = min(1.0, max(0.0, epoch / total_epochs))
    return cfg.temperature * (cfg.temperature_final / cfg.temperature) ** t


def lr_at(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """Learning rate at optimiser step ``step`` of ``total_steps``.

    onecycle — linear warm-up from lr/25 over the first 25 % of steps, then cosine to lr/1e4.
    cosine   — cosine from lr to 0.
    constant — lr.
    """
    t = min(1.0, step / max(total_steps, 1))
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * t))
    if cfg.lr_schedule == "onecycle":
        start, end, pct = cfg.lr / 25.0, cfg.lr / 1e4, 0.25
        if t < pct:
            return start + (cfg.lr - start) * t / pct
        u = (t - pct) / (1.0 - pct)
        return end + (cfg.lr - end) * 0.5 * (1.0 + math.cos(math.pi * u))
    raise ValueError(f"unknown lr schedule {cfg.lr_schedule!r}")

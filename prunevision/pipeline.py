"""One trial, end to end: config → data → gated model → training → pruning (iterative) →
fine-tuning → measurement → export.

Used by ``prunevision train`` and by the sweep layer. Writes, in ``out_dir`` (every file
atomically, see :mod:`prunevision.fsutil`): ``config.yaml`` (the resolved config, written once
the data has loaded and the model is built: a run refused before that writes nothing), ``checkpoint.pt`` (the
training checkpoint: every ``train.checkpoint_every`` epochs and at the end),
``pruned.safetensors`` (the pruned model as data), ``model.onnx`` (pruned) and ``dense.onnx``
(the trained network before pruning), ``gate_histogram.png`` and ``metrics.json``.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from prunevision.config import ConfigError, ExperimentConfig, save_config
from prunevision.console import echo
from prunevision.data import Dataset, DeviceLoader, load_dataset
from prunevision.diagnostics import GATE_BINS, gate_snapshot, plot_gate_history
from prunevision.fsutil import ensure_dir, write_json
from prunevision.gates import gate_stats, iter_gates
from prunevision.models import build_gated_model, create_model
from prunevision.prune import first_convs, kept_whole
from prunevision.train import Reporter, TrainState, evaluate, fit, load_checkpoint, select_device


def resolve_config(cfg: ExperimentConfig, data: Dataset) -> ExperimentConfig:
    """Fill what the data decides (number of classes, small-image stem), ``gates.kind`` and ``gates.importance``
    (decided on the final config) and the layers ``prune.skip_first`` names (gate runs: no gate on them)."""
    if cfg.model.num_classes is not None and cfg.model.num_classes != data.num_classes:
        raise ConfigError(
            f"model.num_classes: {cfg.model.num_classes} but the dataset has {data.num_classes} classes"
        )
    small = cfg.model.small_input if cfg.model.small_input is not None else data.image_size <= 64
    # the gates' kind and what ranks the channels, decided on the final config (recorded with the run)
    cfg = cfg.replace(**{"model.num_classes": data.num_classes, "model.small_input": small,
                         "gates.kind": cfg.gates.resolved_kind, "gates.importance": cfg.gates.resolved_importance})
    if cfg.prune.method == "gate" and cfg.prune.skip_first:
        # the first N convs keep every channel, so they carry no gate either: a gate there would still
        # close channels while training (zeros pruning then keeps; measured: small_cnn at 0.5 MACs,
        # 36 epochs, 56.7 % with the gate against 71.2 % without). With them go the convs whose channels are
        # coupled to theirs (resnet's residual sums): pruning keeps those whole too.
        with torch.random.fork_rng(devices=[]):  # the seeded stream the real model is built from stays as it was
            plain = create_model(cfg.model, data.num_classes, data.image_size, pretrained=False).eval()
        example = torch.zeros(1, 3, data.image_size, data.image_size)
        whole = kept_whole(plain, example, first_convs(plain, cfg.prune.skip_first))
        cfg = cfg.replace(**{"gates.skip": tuple(dict.fromkeys((*cfg.gates.skip, *whole)))})
    return cfg


def run_training(
    cfg: ExperimentConfig,
    out_dir: str | Path,
    *,
    resume: str | Path | None = None,
    reporter: Reporter | None = None,
    log: Callable[[str], None] | None = echo,
    before_write: Callable[[], None] | None = None,
    device: str | torch.device | None = None,
    placement: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train, prune, measure and export one model into ``out_dir``. ``before_write`` is called
    once the run is valid (data loaded, config resolved, model built), just before its first
    file is written (``prunevision train`` clears a replaced run's outputs there). ``device``
    overrides ``train.device`` where a scheduler decided where this process trains (a Ray trial:
    the GPU Ray assigned it, or the CPU when it assigned none); ``placement`` (where the run ran:
    node, GPU ids) is recorded in metrics.json as given."""
    out = Path(out_dir)
    ckpt = load_checkpoint(resume) if resume is not None else None
    torch.manual_seed(cfg.seed)
    device = select_device(str(device) if device is not None else cfg.train.device)
    if device.type == "cuda" and device.index is not None:  # plain "cuda" is the current device already
        torch.cuda.set_device(device)  # what takes the current device (synchronize, caches) uses this one
    t_load = time.perf_counter()
    data = load_dataset(cfg.data, seed=cfg.seed)
    cfg = resolve_config(cfg, data)
    data.to(device)
    t_data = time.perf_counter() - t_load
    if log:
        log(f"data: {data.name} from {data.source}: {len(data.train_y)} train / {len(data.val_y)} validation / "
            f"{len(data.test_y)} test images, "
            f"{data.num_classes} classes, {data.image_size}px (ready in {t_data:.1f}s)")
    t_model = time.perf_counter()
    model = build_gated_model(cfg.model, cfg.gates, data.num_classes, data.image_size,
                              pretrained=False if ckpt is not None else None)
    t_model = time.perf_counter() - t_model
    if before_write is not None:
        before_write()
    ensure_dir(out)
    save_config(cfg, out / "config.yaml")
    n_gates = sum(m.values().numel() for _, m in iter_gates(model))
    if log:
        n_params = sum(p.numel() for p in model.parameters())
        log(f"model: {cfg.model.name}, {n_params / 1e6:.2f} M parameters, {n_gates} gates; device {device}")

    gate_history: list[dict[str, list[int]]] = []

    def report(record: dict[str, Any], save: Callable[[str | Path], Path]) -> None:
        gate_history.append(gate_snapshot(model))
        if record["epoch"] % cfg.train.checkpoint_every == 0:
            save(out / "checkpoint.pt")
        if reporter is not None:
            reporter(record, save)

    t0 = time.perf_counter()
    state = fit(model, data, cfg, reporter=report, resume=ckpt, log=log)
    train_time = time.perf_counter() - t0
    state.save(out / "checkpoint.pt")
    if gate_history and gate_history[0]:
        write_json(out / "gate_history.json", {"bins": GATE_BINS.tolist(), "epochs": gate_history})
        plot_gate_history(gate_history, cfg.tau, out / "gate_histograms_over_training.png")
    metrics = final_metrics(state, data, cfg, train_time, device)
    timings = {"data_load_s": t_data, "model_build_s": t_model, "train_s": train_time}
    if cfg.measure.enabled:
        from prunevision.trial import prune_and_measure

        metrics.update(prune_and_measure(state.model, data, cfg, out, log=log))
        metrics["history"] = state.history + metrics.pop("prune_history")
    metrics["timings"] = {**timings, **metrics.get("timings", {})}
    metrics.update(placement or {})
    write_json(out / "metrics.json", metrics)
    return metrics


def final_metrics(state: TrainState, data: Dataset, cfg: ExperimentConfig, train_time: float,
                  device: torch.device) -> dict[str, Any]:
    model = state.model
    loader = DeviceLoader(data.test_x, data.test_y, cfg.data.eval_batch_size, data.mean, data.std, train=False)
    ev = evaluate(model, loader, data.num_classes)
    ev_val = evaluate(model, DeviceLoader(data.val_x, data.val_y, cfg.data.eval_batch_size, data.mean, data.std,
                                          train=False), data.num_classes) if data.has_val else ev
    stats = gate_stats(model, cfg.tau)
    return {
        "accuracy": ev["accuracy"],  # test split: reported, never chosen on
        "test_loss": ev["loss"],
        "val_accuracy": ev_val["accuracy"],  # validation split (the test split when data.val_split is 0)
        "val_loss": ev_val["loss"],
        "per_class_accuracy": data.per_class(ev["per_class_accuracy"]),
        "mean_gate": stats["all"]["mean"],
        "gates_below_threshold": stats["all"]["below_threshold"],
        "gates": stats,
        "params": sum(p.numel() for p in model.parameters()),
        "epochs": state.epoch,
        "train_time_s": train_time,
        "history": state.history,
        "dataset": {"name": data.name, "source": data.source, "train_images": len(data.train_y),
                    "val_images": len(data.val_y), "test_images": len(data.test_y), "classes": list(data.classes),
                    "image_size": data.image_size},
        "device": str(device),
        "host": {"python": platform.python_version(), "torch": torch.__version__,
                 "threads": torch.get_num_threads(), "machine": platform.machine()},
        "config": cfg.to_dict(),
    }


# what a run writes in its folder (metrics.json marks a finished run): `prunevision train --overwrite`
# removes these, and only these, of the run it replaces
RUN_OUTPUTS = ("metrics.json", "config.yaml", "checkpoint.pt", "pruned.safetensors", "model.onnx", "dense.onnx",
               "gate_history.json", "gate_histogram.png", "gate_histograms_over_training.png",
               "first_conv_filters.png", "prune_steps.png", "ratio_curve.png", "ratios")

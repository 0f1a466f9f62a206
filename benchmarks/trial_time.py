"""Where does a trial's time go? Data loading (cold and warm cache), training epochs, pruning,
fine-tuning, evaluation, measurement and export of one quickstart-sized trial, plus the data
loader's throughput against the rate the model consumes images while training.

The trial is the quickstart sweep's first point (small_cnn, CIFAR-10 10k-image subset, 4 epochs
of gated training, one-shot gate pruning, 1 fine-tuning epoch, measurement and ONNX export),
run in-process by ``prunevision.pipeline.run_training``: the same code a sweep trial runs.

    .venv/bin/python benchmarks/trial_time.py --data ../shared/data/cifar10-jpeg.tar.gz
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS_MD, append_results, machine, md_table, run_main  # noqa: E402
from prunevision.cliargs import add_set_argument  # noqa: E402

TRIAL = {
    "model": {"name": "small_cnn"},
    "data": {"name": "cifar10", "subset": 10000, "test_subset": 2000, "batch_size": 128},
    "gates": {"penalty": "flops", "schedule": "linear", "warmup_epochs": 1, "lr": 0.03, "lam": 2.0},
    "train": {"epochs": 4, "lr": 0.05},
    "prune": {"finetune_epochs": 1, "threshold": 0.5},
    "measure": {"batch": 32, "runs": 30, "warmup": 5, "threads": 1, "torch_latency": False},
}
SMOKE = {"data.name": "synthetic", "data.synthetic_train": 256, "data.synthetic_test": 64, "train.epochs": 1,
         "measure.exporter": "torchscript", "measure.warmup": 1}


def loader_rate(data, batch_size: int, epochs: int = 2) -> float:
    """Images per second the training loader delivers (augmented, normalised, on the device)."""
    import torch

    from prunevision.data import DeviceLoader

    loader = DeviceLoader(data.train_x, data.train_y, batch_size, data.mean, data.std, train=True, augment=True)
    n, t0 = 0, time.perf_counter()
    for e in range(epochs):
        loader.set_epoch(e)
        for x, _ in loader:
            n += len(x)
    if data.train_x.device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=None, help="CIFAR-10 root or archive (data.root)")
    add_set_argument(ap, "extra config overrides")
    ap.add_argument("--out", default="benchmarks/results/trial_time.json")
    ap.add_argument("--results-md", default=str(RESULTS_MD), help="where to append the table ('' for nowhere)")
    ap.add_argument("--smoke-test", action="store_true", help="synthetic data, 1 epoch; appends nothing")
    args = ap.parse_args()

    from prunevision.config import from_dict, parse_overrides
    from prunevision.data import load_dataset
    from prunevision.pipeline import resolve_config, run_training

    overrides = parse_overrides(args.overrides)
    if args.data:
        overrides["data.root"] = args.data
    if args.smoke_test:
        overrides = {**SMOKE, **overrides}
    cfg = from_dict(TRIAL, overrides)
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as out:
        os.environ["PRUNEVISION_CACHE"] = cache  # a cold cache: the first load decodes the images
        t0 = time.perf_counter()
        data = load_dataset(cfg.data, seed=cfg.seed)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        data = load_dataset(cfg.data, seed=cfg.seed)
        warm = time.perf_counter() - t0
        cfg = resolve_config(cfg, data)
        feed = loader_rate(data, cfg.data.batch_size)
        t0 = time.perf_counter()
        m = run_training(cfg, out, log=None)
        total = time.perf_counter() - t0
    tm = m["timings"]
    train_epochs = [r for r in m["history"] if not r.get("phase")]
    consume = sum(len(data.train_y) for _ in train_epochs) / sum(r["epoch_time_s"] for r in train_epochs)
    phases = [("data load, cold cache (decode + cache write)", cold), ("data load, warm cache (in the trial)",
                                                                       tm["data_load_s"]),
              ("build gated model", tm["model_build_s"]),
              (f"gated training ({len(train_epochs)} epochs, incl. per-epoch evaluation)", tm["train_s"]),
              ("pruning (DepGraph)", tm["prune_s"]), ("fine-tuning", tm["finetune_s"]),
              ("evaluation (dense, before and after fine-tuning)", tm["evaluate_s"]),
              ("measurement (MACs, size, ONNX Runtime latency)", tm["measure_s"]),
              ("ONNX export + verification (pruned and dense)", tm["export_s"])]
    accounted = sum(v for _, v in phases[1:])
    rows = [{"phase": k, "s": f"{v:.2f}", "share": f"{v / total:.1%}"} for k, v in phases[1:]]
    rows.append({"phase": "rest (final evaluation, checkpoints, metrics)", "s": f"{total - accounted:.2f}",
                 "share": f"{(total - accounted) / total:.1%}"})
    rows.append({"phase": "**whole trial (run_training)**", "s": f"{total:.2f}", "share": "100%"})
    ratio = feed / consume
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "config": cfg.to_dict(),
              "cold_load_s": cold, "warm_load_s": warm, "timings": tm, "total_s": total,
              "epoch_times_s": [r["epoch_time_s"] for r in train_epochs], "loader_images_per_s": feed,
              "train_images_per_s": consume, "loader_over_consumption": ratio,
              "accuracy": m.get("accuracy"), "accuracy_dense": m.get("accuracy_dense")}
    table = md_table(rows, ["phase", "s", "share"], ["phase", "seconds", "share of the trial"])
    print(f"cold data load {cold:.2f} s (not part of the trial: the sweep decodes once before Ray starts)")
    print(table)
    print(f"\nloader {feed:,.0f} img/s vs training consumption {consume:,.0f} img/s: {ratio:.1f}x "
          f"({'meets' if ratio >= 5 else 'MISSES'} the >= 5x target)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    if not args.smoke_test and args.results_md:
        d = cfg.data
        body = (f"One trial of the quickstart sweep's first point: {cfg.model.name}, {d.name} "
                f"({'CIFAR-10, JPEG copy, ' if d.name == 'cifar10' else ''}{len(data.train_y)} train / "
                f"{len(data.test_y)} test images), {cfg.train.epochs} epochs of gated training, "
                f"{cfg.prune.steps} prune step(s), {cfg.prune.finetune_epochs} fine-tuning epoch(s), device "
                f"{m.get('device')}. Cold data load (JPEG decode + cache write, done once per sweep before Ray "
                f"starts): {cold:.1f} s; warm: {warm:.2f} s.\n\n{table}\n\n"
                f"Training loader (batched augmentation on the device) {feed:,.0f} images/s against "
                f"{consume:,.0f} images/s consumed by training: **{ratio:.1f}×** (target ≥ 5×: "
                f"{'met' if ratio >= 5 else 'not met'}). Raw: `{args.out}`.\n")
        append_results("Where a trial's time goes (`benchmarks/trial_time.py`)", body, args.results_md)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))

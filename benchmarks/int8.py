"""fp32 against INT8: size, latency with its spread and accuracy of statically quantized ONNX models.

Three models on CIFAR-10 (JPEG copy; a 10,000-image subset, 1,000 of it held out for validation, and
2,000 test images):

- ``knee``: the quickstart sweep's kind of trial (small_cnn, straight-through gates trained to a
  MACs budget, gate pruning, one fine-tuning epoch), run in-process by
  ``prunevision.pipeline.run_training`` at one budget (``--knee-budget``, default 0.35, the second
  point the quickstart sweep evaluates); its ``model.onnx`` is the pruned network.
- ``resnet18`` and ``mobilenet_v2``: torchvision networks with the small-image stem, trained from
  scratch (no pretrained weights can be downloaded here) for ``--epochs`` epochs on
  ``--train-images`` of the training images, dense, exported with the project's checked exporter.

Each fp32 model is quantized by ``analysis.int8.ship_int8`` — the code `prunevision export --int8`
runs: ONNX Runtime ``quantize_static`` (QDQ, per-channel INT8 weights, uint8 activations, MinMax
calibration on ``--calibration-size`` training images) — and both files are measured in the same
run: top-1 accuracy under ONNX Runtime on the validation and test images, top-1 agreement, bytes on
disk raw and gzip-compressed, and ONNX Runtime CPU latency (1 thread) at batch 1 and ``--batch``,
``--runs`` timed runs each, interleaved in rounds (median, 10th and 90th percentiles). No model
is refused here: every figure is reported, with whether the drop is within the default 1 point.

    .venv/bin/python benchmarks/int8.py --data ../shared/data/cifar10-jpeg.tar.gz
    .venv/bin/python benchmarks/int8.py --smoke-test --out /tmp/int8.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS_MD, append_results, md_table, run_main, write_raw  # noqa: E402

KNEE = {  # sweeps/configs/quickstart.yaml's base, at one of its budgets
    "model.name": "small_cnn", "data.batch_size": 128, "gates.kind": "ste", "gates.warmup_epochs": 1,
    "gates.lr": 0.05, "train.epochs": 4, "train.lr": 0.05, "prune.finetune_epochs": 1, "prune.round_to": None,
    "prune.distill": 0.0, "measure.runs": 30, "measure.warmup": 5, "measure.threads": 1,
    "measure.torch_latency": False,
}
SMOKE = {"data.name": "synthetic", "data.synthetic_train": 128, "data.synthetic_test": 64, "data.num_classes": 4,
         "data.image_size": 16, "data.batch_size": 32, "train.epochs": 1, "measure.exporter": "torchscript",
         "measure.warmup": 1, "gates.warmup_epochs": 0}


def _data_keys(args: argparse.Namespace) -> dict:
    if args.smoke_test:
        return {k: v for k, v in SMOKE.items() if k.startswith("data.")}
    return {"data.name": "cifar10", "data.root": str(Path(args.data).resolve()), "data.subset": args.subset,
            "data.test_subset": args.test_subset}


def run_knee(args: argparse.Namespace, work: Path) -> tuple[Path, object, dict]:
    from prunevision.config import load_config
    from prunevision.pipeline import run_training

    over = {**KNEE, **_data_keys(args), "gates.target_macs": args.knee_budget, "measure.batch": args.batch,
            **({k: v for k, v in SMOKE.items() if not k.startswith("data.")} if args.smoke_test else {})}
    cfg = load_config(None, over)
    out = work / "knee"
    t0 = time.perf_counter()
    m = run_training(cfg, out, log=None)
    cfg = load_config(out / "config.yaml")  # resolved (classes, stem)
    info = {"what": f"quickstart-like gated small_cnn, MACs budget {args.knee_budget:g}, pruned and fine-tuned",
            "train_s": time.perf_counter() - t0, "param_sparsity": m.get("param_sparsity"),
            "macs_reduction": m.get("macs_reduction"), "val_accuracy_torch": m.get("val_accuracy"),
            "accuracy_torch": m.get("accuracy"), "val_accuracy_dense_torch": m.get("val_accuracy_dense"),
            "params": m.get("params"), "macs": m.get("macs"), "image_size": int(m["input"]["size"])}
    return out / "model.onnx", cfg, info


def run_dense(name: str, args: argparse.Namespace, work: Path) -> tuple[Path, object, dict]:
    """A torchvision network trained from scratch (SGD, one-cycle, augmented), exported dense."""
    import torch

    from prunevision.config import load_config
    from prunevision.data import DeviceLoader, load_dataset
    from prunevision.export import export_onnx
    from prunevision.measure import macs_and_params
    from prunevision.models import create_model
    from prunevision.pipeline import resolve_config
    from prunevision.prune import strip_gates
    from prunevision.train import evaluate

    cfg = load_config(None, {**_data_keys(args), "model.name": name, "measure.batch": args.batch,
                             "measure.runs": max(30, args.runs), "measure.warmup": 5,
                             "measure.exporter": "torchscript" if args.smoke_test else "dynamo"})
    data = load_dataset(cfg.data, seed=cfg.seed)
    cfg = resolve_config(cfg, data)
    torch.manual_seed(cfg.seed)
    model = strip_gates(create_model(cfg.model, data.num_classes, data.image_size, pretrained=False))
    g = torch.Generator().manual_seed(cfg.seed)
    pick = torch.randperm(len(data.train_y), generator=g)[: args.train_images]
    loader = DeviceLoader(data.train_x[pick], data.train_y[pick], 128 if not args.smoke_test else 32, data.mean,
                          data.std, train=True)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=max(1, args.epochs * len(loader)))
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        loader.set_epoch(epoch)
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
        print(f"{name}: epoch {epoch + 1}/{args.epochs} ({time.perf_counter() - t0:.0f} s)", flush=True)
    train_s = time.perf_counter() - t0
    model.eval()
    val = DeviceLoader(data.val_x, data.val_y, 500, data.mean, data.std, train=False)
    out = work / name / "model.onnx"
    export_onnx(model, out, data.image_size, exporter=cfg.measure.exporter)
    macs, params = macs_and_params(model, data.image_size)
    info = {"what": f"torchvision {name}, small-image stem, from scratch: {args.epochs} epoch(s) on "
                    f"{len(pick)} training images, dense", "train_s": train_s, "params": params, "macs": macs,
            "val_accuracy_torch": evaluate(model, val, data.num_classes)["accuracy"], "image_size": data.image_size}
    return out, cfg, info


def measure(fp32: Path, cfg, info: dict, args: argparse.Namespace) -> dict:
    from analysis.int8 import ship_int8
    from prunevision.quantize import DEFAULT_MAX_DROP

    t0 = time.perf_counter()
    rep = ship_int8(fp32, cfg, info.pop("image_size"), calibration_size=args.calibration_size, max_drop=None,
                    latency_batches=(1, args.batch), runs=args.runs, threads=1, log=None)
    rep["seconds"] = time.perf_counter() - t0
    rep["within_default_limit"] = rep["drop_points"] <= DEFAULT_MAX_DROP
    return {**info, "int8": rep}


def _ms(r: dict) -> str:
    return f"{r['median_ms']:.3f} [{r['p10_ms']:.3f}–{r['p90_ms']:.3f}]"


def table(runs: list[dict], batch: int) -> str:
    rows = []
    for r in runs:
        q = r["int8"]
        v, t, s = q["accuracy"]["val"], q["accuracy"]["test"], q["size"]
        b1, bb = q["latency"]["batch_1"], q["latency"][f"batch_{batch}"]
        rows.append({
            "model": r["model"],
            "val fp32 → INT8": f"{100 * v['fp32']:.2f} → {100 * v['int8']:.2f} % ({-q['drop_points'] + 0.0:+.2f})",
            "test fp32 → INT8": f"{100 * t['fp32']:.2f} → {100 * t['int8']:.2f} % "
                                f"({100 * (t['int8'] - t['fp32']) + 0.0:+.2f})",
            "agreement val / test": f"{100 * v['agreement']:.1f} / {100 * t['agreement']:.1f} %",
            "MB fp32 → INT8": f"{s['fp32']['bytes'] / 1e6:.2f} → {s['int8']['bytes'] / 1e6:.2f} ({s['ratio']:.2f}×)",
            "gzip MB": f"{s['fp32']['gzip_bytes'] / 1e6:.2f} → {s['int8']['gzip_bytes'] / 1e6:.2f} "
                       f"({s['gzip_ratio']:.2f}×)",
            "b1 fp32 ms": _ms(b1["fp32"]), "b1 INT8 ms": _ms(b1["int8"]), "b1 speed-up": f"{b1['speedup']:.2f}×",
            f"b{batch} fp32 ms": _ms(bb["fp32"]), f"b{batch} INT8 ms": _ms(bb["int8"]),
            f"b{batch} speed-up": f"{bb['speedup']:.2f}×",
        })
    return md_table(rows, list(rows[0]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/cifar10-jpeg.tar.gz", help="CIFAR-10 root or archive")
    ap.add_argument("--models", default="knee,resnet18,mobilenet_v2")
    ap.add_argument("--subset", type=int, default=10000, help="training images (10 %% held out for validation)")
    ap.add_argument("--test-subset", type=int, default=2000)
    ap.add_argument("--knee-budget", type=float, default=0.35, help="gates.target_macs of the knee run")
    ap.add_argument("--epochs", type=int, default=4, help="epochs of the torchvision models")
    ap.add_argument("--train-images", type=int, default=2000, help="training images of the torchvision models")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--calibration-size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32, help="the larger latency batch (quickstart's measure.batch)")
    ap.add_argument("--runs", type=int, default=30, help="timed runs per model and batch")
    ap.add_argument("--out", default="benchmarks/results/int8.json")
    ap.add_argument("--results-md", default=str(RESULTS_MD), help="where to append the table ('' for nowhere)")
    ap.add_argument("--smoke-test", action="store_true",
                    help="synthetic 16-px data, one short epoch, knee and resnet18; appends nothing")
    args = ap.parse_args()
    models = args.models.split(",")
    if args.smoke_test:
        models = [m for m in models if m in ("knee", "resnet18")] or ["knee"]
        args.train_images, args.epochs, args.runs, args.calibration_size, args.batch = 64, 1, 5, 32, 8
    unknown = [m for m in models if m not in ("knee", "resnet18", "mobilenet_v2")]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}: knee, resnet18, mobilenet_v2")
    runs = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="prunevision-int8-bench-") as tmp:
        for name in models:
            fp32, cfg, info = run_knee(args, Path(tmp)) if name == "knee" else run_dense(name, args, Path(tmp))
            r = {"model": name, **measure(fp32, cfg, info, args)}
            runs.append(r)
            q = r["int8"]
            print(json.dumps({"model": name, "drop_points": q["drop_points"], "size_ratio": q["size"]["ratio"],
                              **{k: v["speedup"] for k, v in q["latency"].items()}}), flush=True)
    total = time.perf_counter() - t0
    tab = table(runs, args.batch)
    print(tab)
    base = {k: v for k, v in vars(args).items() if k not in ("results_md",)}
    write_raw(args.out, {**base, "total_s": total}, runs)
    if not args.smoke_test and args.results_md:
        what = "; ".join(f"**{r['model']}**: {r['what']} (trained in {r['train_s']:.0f} s)" for r in runs)
        body = (f"{what}. CIFAR-10 (JPEG copy), {args.subset} training images ({args.subset // 10} held out for "
                f"validation), {args.test_subset} test images; calibration on {args.calibration_size} training "
                f"images (MinMax); accuracies under ONNX Runtime, the drop in points in brackets; latency ONNX "
                f"Runtime CPU, 1 thread, median [p10–p90] of {args.runs} interleaved runs. Whole run "
                f"{total / 60:.1f} min.\n\n{tab}\n\nRaw: `{args.out}`.\n")
        append_results("INT8 against fp32 (`benchmarks/int8.py`)", body, args.results_md)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))

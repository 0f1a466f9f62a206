"""Latency budgets: how near a network trained to ``gates.target_latency_ms`` lands to the latency asked for.

For each model, the dense network's ONNX Runtime CPU latency (batch 1, ``measure.threads``) is measured
first; each request is a fraction of it. Each run is a whole trial (``run_training``: the latency table
measured before training, gated training to the budget, pruning, fine-tuning, export, and the pruned
network's latency measured interleaved with the dense network's). Reported per run: the request, the
latency model's last prediction, the measured latency (median, 10th–90th percentile) and its error against
the request, and the speed-up over the dense network measured in the same trial. "Landed" is what training
timed at its last measured landing (``prunevision.latency.land``: the structure nearest the request by the
clock, not by the model).

    .venv/bin/python benchmarks/latency_budget.py --data ../shared/data/cifar10-jpeg.tar.gz
    .venv/bin/python benchmarks/latency_budget.py --smoke-test
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS_MD, append_results, md_table, run_main, write_raw  # noqa: E402
from prunevision.cliargs import add_set_argument  # noqa: E402


def dense_latency_ms(base: dict, model: str, runs: int) -> float:
    """The dense (untrained, gate-free) network's ONNX Runtime latency at batch 1, median of ``runs``."""
    import torch

    from prunevision.config import load_config
    from prunevision.data import load_dataset
    from prunevision.latency import onnx_session
    from prunevision.measure import time_sessions
    from prunevision.models import build_gated_model
    from prunevision.pipeline import resolve_config
    from prunevision.prune import strip_gates

    cfg = load_config(None, {**base, "model.name": model, "gates.target_macs": 1.0})
    data = load_dataset(cfg.data, seed=0)
    cfg = resolve_config(cfg, data)
    net = strip_gates(copy.deepcopy(build_gated_model(cfg.model, cfg.gates, data.num_classes, data.image_size)))
    shape = (1, 3, data.image_size, data.image_size)
    sess = onnx_session(net, shape, cfg.measure.threads)
    return float(time_sessions({"d": sess}, {"d": torch.randn(shape).numpy()}, runs, 10)["d"]["median_ms"])


def run_one(base: dict, model: str, target_ms: float, fraction: float, seed: int) -> dict:
    from prunevision.config import load_config
    from prunevision.pipeline import run_training

    cfg = load_config(None, {**base, "model.name": model, "gates.target_latency_ms": target_ms, "seed": seed})
    records: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        m = run_training(cfg, Path(tmp) / "run", log=None, reporter=lambda r, _save: records.append(r))
    last = [r for r in records if "latency_ms_predicted" in r][-1]
    return {"model": model, "seed": seed, "fraction": fraction, "target_ms": target_ms,
            "predicted_ms": last["latency_ms_predicted"], "landed_ms": last.get("latency_ms_measured"),
            "latency_ms": m["latency_ms"],
            "latency_ms_p10": m["latency"]["onnxruntime_cpu_b1"]["pruned"]["p10_ms"],
            "latency_ms_p90": m["latency"]["onnxruntime_cpu_b1"]["pruned"]["p90_ms"],
            "latency_ms_dense": m["latency_ms_dense"], "error": m["latency_ms"] / target_ms - 1,
            "speedup": m["latency_speedup"], "speedup_lo": m.get("latency_speedup_lo"),
            "speedup_hi": m.get("latency_speedup_hi"), "macs_reduction": m["macs_reduction"],
            "accuracy": m["accuracy"], "accuracy_dense": m["accuracy_dense"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/cifar10-jpeg.tar.gz")
    ap.add_argument("--models", default="small_cnn,resnet18")
    ap.add_argument("--fractions", default="0.7,0.5,0.35", help="requests, as fractions of the dense latency")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--subset", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=100, help="timed runs per latency measurement")
    add_set_argument(ap, "extra config overrides")
    ap.add_argument("--out", default="benchmarks/results/latency_budget.json")
    ap.add_argument("--results-md", default=str(RESULTS_MD), help="where to append the table ('' for nowhere)")
    ap.add_argument("--smoke-test", action="store_true", help="synthetic data, 2 epochs, one run; appends nothing")
    args = ap.parse_args()

    from prunevision.config import parse_overrides

    base = {"data.root": args.data, "data.subset": args.subset, "data.test_subset": 2000,
            "train.epochs": args.epochs, "gates.warmup_epochs": 1, "gates.lr": 0.05, "prune.round_to": None,
            "prune.finetune_epochs": 1, "measure.runs": args.runs, "measure.batch": 1, "measure.torch_latency": False,
            "measure.exporter": "torchscript"}
    models, fractions = args.models.split(","), [float(f) for f in args.fractions.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.smoke_test:
        base = {"data.name": "synthetic", "data.synthetic_train": 256, "data.synthetic_test": 64,
                "data.num_classes": 4, "data.batch_size": 32, "data.image_size": 16, "train.epochs": 2,
                "gates.warmup_epochs": 0, "gates.lr": 0.05, "prune.round_to": None, "prune.finetune_epochs": 0,
                "measure.runs": 30, "measure.batch": 1, "measure.torch_latency": False,
                "measure.exporter": "torchscript"}
        models, fractions, seeds = ["small_cnn"], [0.8], seeds[:1]
    base.update(parse_overrides(args.overrides))
    runs = []
    for model in models:
        dense = dense_latency_ms(base, model, args.runs)
        print(f"{model}: dense {dense:.4f} ms", flush=True)
        for fraction in fractions:
            for seed in seeds:
                r = run_one(base, model, fraction * dense, fraction, seed)
                r["dense_ms_before"] = dense
                runs.append(r)
                print(json.dumps(r), flush=True)
    rows = [{"model": r["model"], "seed": r["seed"],
             "requested": f"{r['target_ms']:.4f} ms ({r['fraction']:g} of dense)",
             "predicted": f"{r['predicted_ms']:.4f} ms",
             "landed (timed in training)": f"{r['landed_ms']:.4f} ms" if r.get("landed_ms") else "—",
             "measured": f"{r['latency_ms']:.4f} ms ({r['latency_ms_p10']:.4f}–{r['latency_ms_p90']:.4f})",
             "error": f"{100 * r['error']:+.1f} %",
             "speed-up (same run)": f"{r['speedup']:.2f}× ({r['speedup_lo']:.2f}–{r['speedup_hi']:.2f})",
             "MACs": f"{r['macs_reduction']:.2f}× fewer",
             "accuracy (dense)": f"{100 * r['accuracy']:.2f} % ({100 * r['accuracy_dense']:.2f} %)"} for r in runs]
    table = md_table(rows, list(rows[0]))
    errors = [abs(r["error"]) for r in runs]
    table += (f"\n\nMean |error| {100 * sum(errors) / len(errors):.1f} %, largest {100 * max(errors):.1f} %; "
              f"{sum(e <= 0.1 for e in errors)} of {len(errors)} runs within ±10 %.")
    print(table)
    write_raw(args.out, base, runs)
    if not args.smoke_test and args.results_md:
        body = (f"Base: {json.dumps(base)}. Each request is a fraction of the dense network's latency measured "
                f"just before (ONNX Runtime CPU, batch 1, {args.runs} runs); measured = the trial's own measurement "
                f"of the pruned network, interleaved with the dense one.\n\n{table}\n\nRaw: `{args.out}`.\n")
        append_results("Latency budgets (`benchmarks/latency_budget.py`)", body, args.results_md)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))

"""Frontier quality: a finished sweep's front against dense baselines trained with the same budget.

The dense baseline is the sweep's own trial config with the gate penalty off (λ = 0, nothing
pruned) trained for as many epochs as a trial spends (training + fine-tuning), for each seed
given. The front's models and the baseline's ONNX file are then timed in one interleaved run
(ONNX Runtime CPU, batch 1, 1 thread). Target: a front model at least 2× faster than the dense
baseline within 2 points of its accuracy.

    make quickstart DATA=../shared/data/cifar10-jpeg.tar.gz
    .venv/bin/python benchmarks/frontier_quality.py prunevision-runs/quickstart-<stamp>
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS_MD, append_results, machine, md_table  # noqa: E402


def _count(v: float | None) -> str:
    return "all" if v is None else f"{v:g}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sweep_dir")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--runs", type=int, default=100, help="timed runs per model")
    ap.add_argument("--speedup", type=float, default=2.0)
    ap.add_argument("--points", type=float, default=2.0, help="allowed accuracy loss, in points")
    ap.add_argument("--out", default="benchmarks/results/frontier_quality.json")
    ap.add_argument("--results-md", default=str(RESULTS_MD), help="where to append the table ('' for nowhere)")
    ap.add_argument("--smoke-test", action="store_true", help="one seed, 1 epoch, 10 runs; appends nothing")
    args = ap.parse_args()

    from analysis.pareto import nondominated_ranks
    from analysis.results import load_ray, read_state
    from prunevision.config import load_config
    from prunevision.measure import onnx_latency
    from prunevision.pipeline import run_training

    state = read_state(args.sweep_dir)
    objectives = state["run"]["objectives"]
    df = load_ray(args.sweep_dir)
    done = df[(df["status"] == "complete") & df["output_dir"].notna()].copy()
    if done.empty:
        raise SystemExit(f"{args.sweep_dir}: no complete trial with outputs")
    done["rank"] = nondominated_ranks(done, objectives)
    front = done[done["rank"] == 0].sort_values("accuracy", ascending=False)
    base = load_config(Path(front.iloc[0]["output_dir"]) / "config.yaml")
    budget = base.train.epochs + base.prune.finetune_epochs
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.smoke_test:
        seeds, budget, args.runs = seeds[:1], 1, 10
    baselines = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            cfg = base.replace(**{"seed": seed, "gates.lam": 0.0, "train.epochs": budget, "prune.method": "gate",
                                  "prune.threshold": 1e-6, "prune.steps": 1, "prune.ratios": None,
                                  "prune.finetune_epochs": 0, "measure.latency": False})
            t0 = time.perf_counter()
            m = run_training(cfg, Path(tmp) / f"dense{seed}", log=None)
            baselines.append({"seed": seed, "accuracy": m["accuracy_dense"], "time_s": time.perf_counter() - t0,
                              "onnx": str(Path(tmp) / f"dense{seed}" / "dense.onnx")})
            print(f"dense baseline seed {seed}: accuracy {m['accuracy_dense']:.4f} after {budget} epochs")
        size = base.data.image_size or json.loads((Path(front.iloc[0]["output_dir"]) / "metrics.json").read_text())[
            "input"]["size"]
        paths = {"dense": baselines[0]["onnx"], **{t: str(Path(d) / "model.onnx")
                                                   for t, d in zip(front["trial_id"], front["output_dir"])}}
        lat = onnx_latency(paths, int(size), batch=1, runs=args.runs, warmup=10, threads=1)
    dense_acc = float(np.mean([b["accuracy"] for b in baselines]))
    dense_ms = lat["dense"]["median_ms"]
    rows, hits = [], []
    for _, r in front.iterrows():
        sp = dense_ms / lat[r["trial_id"]]["median_ms"]
        gap = 100 * (r["accuracy"] - dense_acc)
        ok = sp >= args.speedup and gap >= -args.points - 1e-9  # accuracies are counts / test images
        hits += [r["trial_id"]] if ok else []
        rows.append({"trial": r["trial_id"], "accuracy": f"{100 * r['accuracy']:.2f} %", "vs dense": f"{gap:+.2f} pt",
                     "params removed": f"{100 * r['param_sparsity']:.1f} %",
                     "latency ms": f"{lat[r['trial_id']]['median_ms']:.4f}", "speed-up": f"{sp:.2f}×",
                     "MACs reduction": f"{r.get('macs_reduction', float('nan')):.2f}×",
                     "target": "**met**" if ok else ""})
    table = md_table(rows, list(rows[0]))
    print(table)
    verdict = (f"met by {', '.join(hits)}" if hits else "not met")
    print(f"dense baseline {100 * dense_acc:.2f} % ({dense_ms:.4f} ms); target: {verdict}")
    res = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "sweep_dir": str(args.sweep_dir),
           "baselines": baselines, "dense_accuracy_mean": dense_acc, "latency": lat, "rows": rows, "target_met": hits}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2, default=str))
    if not args.smoke_test and args.results_md:
        counts = done["status"].value_counts().to_dict()
        accs = ", ".join(f"{100 * b['accuracy']:.2f} %" for b in baselines)
        body = (f"Sweep `{Path(args.sweep_dir).name}` ({sum(counts.values())} complete trials; base: "
                f"{base.model.name}, {base.data.name} — CIFAR-10, JPEG copy — subset "
                f"{_count(base.data.subset)} train / "
                f"{_count(base.data.test_subset)} test, {base.train.epochs} training + {base.prune.finetune_epochs} "
                f"fine-tuning epochs). Dense baseline: the same config with λ = 0 and nothing pruned, trained "
                f"{budget} epochs (the same budget), seeds {args.seeds}: accuracies "
                f"{accs} (mean {100 * dense_acc:.2f} %). "
                f"Front models and the baseline timed in one interleaved run: ONNX Runtime CPU, batch 1, 1 thread, "
                f"{args.runs} runs; dense {dense_ms:.4f} ms.\n\n{table}\n\n"
                f"Target (≥ {args.speedup:g}× faster within {args.points:g} points of the dense baseline): "
                f"**{verdict}**. Raw: `{args.out}`.\n")
        append_results("Frontier quality on this machine (`benchmarks/frontier_quality.py`)", body, args.results_md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

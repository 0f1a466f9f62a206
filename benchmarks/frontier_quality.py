"""Frontier quality: methods compared at the same MACs budgets, or a finished sweep's front against dense
baselines trained with the same budget.

Budget mode (``--budgets``, no sweep folder): for every model × budget × method × seed, one whole
trial (train, prune, fine-tune, measure) with ``gates.target_macs`` set: budgeted gates against the
structured baselines at the pruning ratio that meets the same budget (and, with ``--distill``, every
method again with distillation while fine-tuning), all with the same epochs; test accuracy on the full test
set, achieved MACs share and ONNX Runtime CPU speed-up (dense and pruned timed interleaved in the
trial's own run). A table per budget with mean ± spread over seeds.

    .venv/bin/python benchmarks/frontier_quality.py --budgets 0.5,0.33,0.25 --models small_cnn \
        --methods gate,taylor,l1_structured --seeds 0 --data ../shared/data/cifar10-jpeg.tar.gz

The dense baseline is the sweep's own trial config with the gate penalty off (λ = 0, nothing
pruned) trained for as many epochs as a trial spends (training + fine-tuning), for each seed
given. The front's models and the baseline's ONNX file are then timed in one interleaved run
(ONNX Runtime CPU, batch 1, 1 thread). Target: the front model chosen on validation accuracy among
those at least 2× faster than the dense baseline is within 2 points of its test accuracy.

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

from benchmarks.common import RESULTS_MD, append_results, machine, md_table, run_main, write_raw  # noqa: E402
from prunevision.cliargs import add_set_argument  # noqa: E402


def _count(v: float | None) -> str:
    return "all" if v is None else f"{v:g}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sweep_dir", nargs="?", help="a finished sweep (else --budgets)")
    ap.add_argument("--budgets", help="budget mode: MACs shares, e.g. 0.5,0.33,0.25")
    ap.add_argument("--models", default="small_cnn")
    ap.add_argument("--methods", default="gate,taylor,l1_structured")
    ap.add_argument("--distill", type=float, default=0.0,
                    help="budget mode: also every method with prune.distill=X (distillation on/off)")
    ap.add_argument("--data", default="../shared/data/cifar10-jpeg.tar.gz")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--subset", type=int, default=10000)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--runs", type=int, default=100, help="timed runs per model")
    ap.add_argument("--speedup", type=float, default=2.0)
    ap.add_argument("--points", type=float, default=2.0, help="allowed accuracy loss, in points")
    ap.add_argument("--out", default="benchmarks/results/frontier_quality.json")
    ap.add_argument("--results-md", default=str(RESULTS_MD), help="where to append the table ('' for nowhere)")
    ap.add_argument("--resume", help="budget mode: the printed rows (one JSON object a line) of an earlier, "
                                     "interrupted run with the same settings; the runs it holds are not repeated")
    add_set_argument(ap, "budget mode: config keys for every run (e.g. gates.warmup_epochs=3)")
    ap.add_argument("--smoke-test", action="store_true", help="one seed, 1 epoch, 10 runs; appends nothing")
    args = ap.parse_args()
    if args.budgets or (args.smoke_test and not args.sweep_dir):
        return budget_mode(args)
    if not args.sweep_dir:
        ap.error("give a sweep folder or --budgets")

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
    # chosen on the validation split, reported on the test split (older sweeps without one: test)
    select = "val_accuracy" if "val_accuracy" in done and done["val_accuracy"].notna().all() else "accuracy"
    front = done[done["rank"] == 0].sort_values(select, ascending=False)
    base = load_config(Path(front.iloc[0]["output_dir"]) / "config.yaml")
    budget = base.train.epochs + base.prune.finetune_epochs
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.smoke_test:
        seeds, budget, args.runs = seeds[:1], 1, 10
    baselines = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            cfg = base.replace(**{"seed": seed, "gates.lam": 0.0, "gates.kind": "sigmoid", "gates.target_macs": None,
                                  "train.epochs": budget, "prune.method": "gate",
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
    rows, chosen = [], None
    for _, r in front.iterrows():  # in order of the selection accuracy
        sp = dense_ms / lat[r["trial_id"]]["median_ms"]
        gap = 100 * (r["accuracy"] - dense_acc)
        if chosen is None and sp >= args.speedup:  # the most accurate (on validation) fast enough
            chosen = (r["trial_id"], sp, gap)
        rows.append({"trial": r["trial_id"], "val accuracy": f"{100 * r[select]:.2f} %",
                     "test accuracy": f"{100 * r['accuracy']:.2f} %", "vs dense (test)": f"{gap:+.2f} pt",
                     "params removed": f"{100 * r['param_sparsity']:.1f} %",
                     "latency ms": f"{lat[r['trial_id']]['median_ms']:.4f}", "speed-up": f"{sp:.2f}×",
                     "MACs reduction": f"{r.get('macs_reduction', float('nan')):.2f}×",
                     "chosen": "yes" if chosen is not None and chosen[0] == r["trial_id"] else ""})
    table = md_table(rows, list(rows[0]))
    print(table)
    hits = [chosen[0]] if chosen and chosen[2] >= -args.points - 1e-9 else []  # accuracies: counts / test images
    verdict = ("no front model is fast enough" if chosen is None else
               f"{'met' if hits else 'not met'}: {chosen[0]}, chosen on {select.replace('_', ' ')} among those "
               f"≥ {args.speedup:g}× faster, is {chosen[2]:+.2f} points from dense on the test set at {chosen[1]:.2f}×")
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


def earlier_runs(path: str) -> dict:
    """The rows an interrupted budget-mode run printed, by (model, budget, method, distill, seed); the
    other lines of its log are skipped."""
    found = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
            found[r["model"], float(r["budget"]), r["method"], float(r["distill"]), int(r["seed"])] = r
        except (ValueError, KeyError, TypeError):
            continue
    print(f"{path}: {len(found)} earlier runs taken as they are", flush=True)
    return found


def budget_mode(args) -> int:
    from prunevision.config import load_config, parse_overrides
    from prunevision.pipeline import run_training

    base = {"data.root": args.data, "data.subset": args.subset, "data.test_subset": None, "data.batch_size": 128,
            "train.epochs": args.epochs, "gates.lr": 0.05, "prune.round_to": None,
            "prune.finetune_epochs": 1, "measure.batch": 32, "measure.runs": args.runs, "measure.threads": 1,
            "measure.torch_latency": False}
    budgets = [float(b) for b in (args.budgets or "0.5").split(",")]
    models, methods = args.models.split(","), args.methods.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.smoke_test:
        base = {"data.name": "synthetic", "data.synthetic_train": 128, "data.synthetic_test": 64,
                "data.num_classes": 4, "data.batch_size": 32, "data.image_size": 16, "train.epochs": 2,
                "gates.warmup_epochs": 0, "prune.round_to": None, "prune.finetune_epochs": 1, "measure.runs": 30,
                "measure.batch": 2, "measure.warmup": 2, "measure.exporter": "torchscript",
                "measure.torch_latency": False}
        budgets, seeds, models = budgets[:1], seeds[:1], models[:1]
    base.update(parse_overrides(args.overrides))
    variants = [(m, 0.0) for m in methods] + ([(m, args.distill) for m in methods] if args.distill > 0 else [])
    earlier = earlier_runs(args.resume) if args.resume else {}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            for budget in budgets:
                for method, distill in variants:
                    for seed in seeds:
                        if (model, budget, method, distill, seed) in earlier:
                            runs.append(earlier[model, budget, method, distill, seed])
                            continue
                        cfg = load_config(None, {**base, "model.name": model, "prune.method": method, "seed": seed,
                                                 "gates.target_macs": budget, "prune.distill": distill})
                        t0 = time.perf_counter()
                        m = run_training(cfg, Path(tmp) / f"{model}-{budget}-{method}-{distill}-{seed}", log=None)
                        r = {"model": model, "budget": budget, "method": method, "distill": distill, "seed": seed,
                             "accuracy": m["accuracy"], "accuracy_dense": m["accuracy_dense"],
                             "accuracy_before_finetune": m["accuracy_before_finetune"],
                             "macs_share": m["macs_share"], "speedup": m.get("latency_speedup"),
                             "time_s": time.perf_counter() - t0}
                        runs.append(r)
                        print(json.dumps(r), flush=True)
    rows = []
    for model in models:
        for budget in budgets:
            for method, distill in variants:
                rs = [r for r in runs if (r["model"], r["budget"], r["method"], r["distill"]) ==
                      (model, budget, method, distill)]

                def ms(key, scale=1.0, fmt=".2f", rs=rs):
                    v = np.array([r[key] for r in rs if r[key] is not None], dtype=float) * scale
                    if not len(v):
                        return "—"
                    return f"{v.mean():{fmt}}" + (f" ± {v.std(ddof=1):{fmt}}" if len(v) > 1 else "")

                rows.append({"model": model, "budget": f"{budget:g}",
                             "method": method + (f" + distill {distill:g}" if distill else ""), "seeds": len(rs),
                             "MACs share": ms("macs_share", fmt=".3f"), "accuracy %": ms("accuracy", 100),
                             "dense %": ms("accuracy_dense", 100), "before fine-tune %":
                             ms("accuracy_before_finetune", 100), "ORT CPU speed-up": ms("speedup")})
    table = md_table(rows, list(rows[0]))
    print(table)
    write_raw(args.out, base, runs)
    if not args.smoke_test and args.results_md:
        body = (f"Same epochs for every method "
                f"({base['train.epochs']} training + {base['prune.finetune_epochs']} fine-tuning); baselines train "
                f"without gates and prune at the ratio that meets the budget; accuracy on the full test set; "
                f"speed-up: ONNX Runtime CPU, batch 1, 1 thread, dense and pruned interleaved in each trial's run, "
                f"{base['measure.runs']} runs. Mean ± standard deviation over seeds.\n\n{table}\n\nRaw: "
                f"`{args.out}`.\n")
        append_results("Methods at the same MACs budget (`benchmarks/frontier_quality.py --budgets`)", body,
                       args.results_md)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))

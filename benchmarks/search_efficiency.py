"""Search efficiency: hypervolume after N trials for Optuna's TPE, NSGA-II and random search,
same budget, several seeds.

Every trial is a real prunevision trial (gated training, gate pruning, fine-tuning, MACs and
parameter counts) run in-process by ``run_training``, on a small model and a data subset so
that many studies fit on a CPU machine. The search space is the quickstart sweep's
(``sweeps/configs/quickstart.yaml``). Objectives: accuracy (max), parameter sparsity (max) and
the share of the dense network's MACs that remain (min) — MACs instead of latency, because
latency measured in studies running side by side is noise, not signal. Hypervolume reference
point, fixed for every run: accuracy 0, sparsity 0, MACs share 1.0 (minimisation space).

    .venv/bin/python benchmarks/search_efficiency.py --data ../shared/data/cifar10-jpeg.tar.gz
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS_MD, ROOT, append_results, machine, md_table, run_main  # noqa: E402
from prunevision.cliargs import add_set_argument  # noqa: E402

# 2,000 images in batches of 32 for 4 epochs: about as many gate updates (250) as a quickstart
# trial (312), so the gates close as they do there; with batches of 128 here no gate closed.
BASE_OVERRIDES = {"data.subset": 2000, "data.test_subset": 1000, "data.image_size": 16, "data.batch_size": 32,
                  "train.epochs": 4, "measure.latency": False, "measure.export": False}
SMOKE = {"data.name": "synthetic", "data.synthetic_train": 128, "data.synthetic_test": 64, "train.epochs": 1,
         "data.num_classes": 4}
REFERENCE = np.array([0.0, 0.0, 1.0])  # -accuracy, -param_sparsity, MACs share


def make_sampler(name: str, seed: int, population: int):
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=population)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise SystemExit(f"unknown sampler {name!r}")


def run_study(job: dict) -> dict:
    """One sampler, one seed, ``trials`` real trials. Runs in a worker process."""
    import optuna
    import torch

    from prunevision.config import from_dict
    from prunevision.pipeline import run_training
    from sweeps.spec import load_sweep, suggest

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = load_sweep(ROOT / "sweeps" / "configs" / "quickstart.yaml", job["overrides"])
    base = spec.base
    study = optuna.create_study(directions=["maximize", "maximize", "minimize"],
                                sampler=make_sampler(job["sampler"], job["seed"], job["population"]))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(job["trials"]):
            trial = study.ask()
            suggest(trial, spec.space)
            cfg = from_dict(base, dict(trial.params, seed=job["seed"] * 1000 + i))
            t0 = time.perf_counter()
            m = run_training(cfg, Path(tmp) / f"t{i}", log=None)
            vals = (m["accuracy"], m["param_sparsity"], m["macs"] / m["macs_dense"])
            study.tell(trial, list(vals))
            rows.append({"params": trial.params, "values": vals, "time_s": time.perf_counter() - t0})
    return {**{k: job[k] for k in ("sampler", "seed")}, "trials": rows}


def hv_curve(values: list[tuple[float, float, float]]) -> list[float]:
    from analysis.pareto import hypervolume

    pts = np.array([[-a, -s, m] for a, s, m in values])
    return [hypervolume(pts[: i + 1], REFERENCE) for i in range(len(pts))]


def summarize(results: list[dict], samplers: list[str], trials: int) -> tuple[dict, dict]:
    """Mean and spread of each sampler's hypervolume at N = 8, 16, 24 (and ``trials``), and the
    *pooled* front: the hypervolume of every trial of every study together. No sampler's N trials can
    beat the pooled front unless it finds points that no study found, so its ratio to random search at
    N bounds what a better sampler could show on this space (``pooled["vs_random"]``)."""
    from analysis.pareto import hypervolume

    checkpoints = sorted({n for n in (8, 16, 24, trials) if n <= trials})
    for r in results:
        r["hypervolume"] = hv_curve([tuple(t["values"]) for t in r["trials"]])
    summary = {}
    for s in samplers:
        runs = [r for r in results if r["sampler"] == s]
        summary[s] = {n: (float(np.mean([r["hypervolume"][n - 1] for r in runs])),
                          float(np.std([r["hypervolume"][n - 1] for r in runs]))) for n in checkpoints}
    pts = np.array([[-a, -s, m] for r in results for a, s, m in (tuple(t["values"]) for t in r["trials"])])
    hv = float(hypervolume(pts, REFERENCE))
    rand = summary.get("random", {}).get(trials, (0.0,))[0]
    pooled = {"trials": len(pts), "hypervolume": hv, "vs_random": hv / rand if rand > 0 else float("nan")}
    return summary, pooled


def print_summary(path: str) -> int:
    """The table and pooled front of a raw results file this script wrote (JSON only, nothing unpickled)."""
    from prunevision.config import ConfigError

    try:
        raw = json.loads(Path(path).read_text())
        runs = raw["runs"]
        samplers = list(dict.fromkeys(r["sampler"] for r in runs))
        trials = min(len(r["trials"]) for r in runs)
        runs = [{**r, "trials": r["trials"][:trials]} for r in runs]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--summarize: {path} is not a search_efficiency results file ({e})") from None
    summary, pooled = summarize(runs, samplers, trials)
    for s, v in summary.items():
        print(s, "  ".join(f"N={k}: {m:.4f} ± {sd:.4f}" for k, (m, sd) in v.items()))
    print(f"pooled front of all {pooled['trials']} trials: hypervolume {pooled['hypervolume']:.4f}, "
          f"{pooled['vs_random']:.2f}x random search's at N = {trials}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=None, help="CIFAR-10 root or archive (data.root)")
    ap.add_argument("--samplers", default="tpe,nsga2,random")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--population", type=int, default=8, help="NSGA-II population size (Optuna's default is 50)")
    ap.add_argument("--jobs", type=int, default=2, help="studies run side by side (one CPU thread each)")
    add_set_argument(ap, "extra config overrides")
    ap.add_argument("--out", default="benchmarks/results/search_efficiency.json")
    ap.add_argument("--results-md", default=str(RESULTS_MD), help="where to append the table ('' for nowhere)")
    ap.add_argument("--smoke-test", action="store_true", help="synthetic data, 3 trials, 1 seed; appends nothing")
    ap.add_argument("--summarize", metavar="JSON", default=None,
                    help="run nothing: print the summary and pooled front of an earlier run's raw results")
    args = ap.parse_args()
    if args.summarize:
        return print_summary(args.summarize)

    from prunevision.config import parse_overrides

    overrides = {**BASE_OVERRIDES, **parse_overrides(args.overrides)}
    if args.data:
        overrides["data.root"] = args.data
    if args.smoke_test:
        overrides.update(SMOKE)
        args.trials, args.seeds, args.population = 3, "0", 2
    # decode the dataset once, before the workers start
    from prunevision.config import from_dict
    from prunevision.data import load_dataset
    from sweeps.spec import load_sweep

    spec = load_sweep(ROOT / "sweeps" / "configs" / "quickstart.yaml", overrides)
    load_dataset(from_dict(spec.base).data, seed=0)
    jobs = [{"sampler": s, "seed": int(seed), "trials": args.trials, "population": args.population,
             "overrides": overrides} for seed in args.seeds.split(",") for s in args.samplers.split(",")]
    t0 = time.perf_counter()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import multiprocessing as mp

    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as ex:
        results = list(ex.map(run_study, jobs))
    wall = time.perf_counter() - t0
    summary, pooled = summarize(results, args.samplers.split(","), args.trials)
    n = args.trials
    checkpoints = sorted(next(iter(summary.values())))
    rows = []
    for s, v in summary.items():
        row = {"sampler": s + (f" (population {args.population})" if s == "nsga2" else "")}
        for k in checkpoints:
            row[f"N={k}"] = f"{v[k][0]:.4f} ± {v[k][1]:.4f}"
        if "random" in summary and summary["random"][n][0] > 0:
            row["vs random at N"] = f"{v[n][0] / summary['random'][n][0]:.2f}×"
        rows.append(row)
    cols = ["sampler", *[f"N={k}" for k in checkpoints], "vs random at N"]
    table = md_table(rows, cols)
    per_trial = float(np.mean([t["time_s"] for r in results for t in r["trials"]]))
    print(table)
    print(f"\n{len(results)} studies x {n} trials in {wall / 60:.1f} min ({per_trial:.1f} s per trial)")
    print(f"pooled front of all {pooled['trials']} trials: hypervolume {pooled['hypervolume']:.4f}, "
          f"{pooled['vs_random']:.2f}x random search's at N = {n}")
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "overrides": overrides,
              "reference": REFERENCE.tolist(), "summary": {s: {str(k): v for k, v in d.items()}
                                                           for s, d in summary.items()},
              "pooled": pooled, "runs": results, "wall_s": wall}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    if not args.smoke_test and args.results_md:
        best = max((s for s in summary if s != "random"), key=lambda s: summary[s][n][0], default=None)
        rand = summary.get("random", {}).get(n, (0.0,))[0]
        ratio = summary[best][n][0] / rand if best and rand > 0 else float("nan")
        body = (f"Hypervolume (mean ± std over seeds {args.seeds}) after N trials; each trial a real prunevision "
                f"trial on small_cnn, CIFAR-10 (JPEG copy) subset of {overrides['data.subset']} train / "
                f"{overrides['data.test_subset']} test images resized to {overrides['data.image_size']} px, "
                f"batches of {overrides['data.batch_size']}, {overrides['train.epochs']} epochs + fine-tuning — "
                f"a small model and data subset, so absolute "
                f"accuracies are low. Search space of `sweeps/configs/quickstart.yaml`. Objectives accuracy (max), "
                f"param_sparsity (max), remaining MACs share (min); reference point (0, 0, 1.0). "
                f"{len(results)} studies, {args.jobs} side by side, {wall / 60:.1f} min.\n\n{table}\n\n"
                f"Best model-based sampler at N = {n}: {best}, **{ratio:.2f}×** random search's hypervolume "
                f"(target ≥ 1.2×: {'met' if ratio >= 1.2 else 'not met'}). The pooled front of all "
                f"{pooled['trials']} trials of every study together has hypervolume {pooled['hypervolume']:.4f}, "
                f"**{pooled['vs_random']:.2f}×** random search's at N = {n}: the most any sampler could show here "
                f"without finding points that no study found. Raw: `{args.out}`.\n")
        append_results("Search efficiency (`benchmarks/search_efficiency.py`)", body, args.results_md)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))

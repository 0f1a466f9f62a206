"""Sweep overhead: the same N trial configs through `prunevision sweep run` (one trial at a time)
and one after another through `prunevision train`, in the same benchmark run.

overhead per trial = (sweep wall time − Ray start-up − Σ standalone trial wall times) / N;
Ray start-up (ray.init) is reported separately.

    .venv/bin/python benchmarks/sweep_overhead.py --trials 4 --epochs 3 --out benchmarks/results/sweep_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS_MD, append_results, md_table  # noqa: E402

BASE = {
    "model": {"name": "small_cnn"},
    "data": {"name": "synthetic", "synthetic_train": 2048, "synthetic_test": 512, "batch_size": 128,
             "num_classes": 10},
    "train": {"epochs": 3},
    "prune": {"finetune_epochs": 1},
    "measure": {"batch": 8, "warmup": 5, "exporter": "dynamo", "torch_latency": False},
}


def configs(n: int) -> list[dict]:
    lams = [0.1 * (3 ** i) for i in range(n)]
    return [{"gates.lam": lam, "prune.threshold": 0.5} for lam in lams]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/sweep_overhead.json")
    ap.add_argument("--results-md", default=str(RESULTS_MD), help="where to append the table ('' for nowhere)")
    ap.add_argument("--smoke-test", action="store_true", help="2 trials of 1 epoch; appends nothing")
    args = ap.parse_args()
    if args.smoke_test:
        args.trials, args.epochs = 2, 1
    base = json.loads(json.dumps(BASE))
    base["train"]["epochs"] = args.epochs
    cfgs = configs(args.trials)
    exe = [sys.executable, "-m", "prunevision_cli"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        import yaml

        (tmp / "base.yaml").write_text(yaml.safe_dump(base))
        standalone = []
        for i, c in enumerate(cfgs):
            sets = [a for k, v in c.items() for a in ("--set", f"{k}={v}")]
            t0 = time.perf_counter()
            subprocess.run([*exe, "train", str(tmp / "base.yaml"), *sets, "--out", str(tmp / f"t{i}")], check=True,
                           cwd=tmp, env=env, stdout=subprocess.DEVNULL)
            standalone.append(time.perf_counter() - t0)
        sweep = {"name": "overhead", "base": base,
                 "space": {"gates.lam": {"type": "loguniform", "low": 0.01, "high": 100},
                           "prune.threshold": {"type": "uniform", "low": 0.1, "high": 0.9}},
                 "points_to_evaluate": cfgs, "search": {"num_samples": len(cfgs), "max_concurrent": 1},
                 "resources": {"cpu": os.cpu_count() or 1}, "mlflow": {"experiment": "overhead"}}
        (tmp / "sweep.yaml").write_text(yaml.safe_dump(sweep))
        code = (
            "import time, sys, ray; from sweeps.spec import load_sweep; from sweeps.run import prepare, build_tuner,"
            " finish\nspec = load_sweep(sys.argv[1]); state = prepare(spec, sys.argv[2])\n"
            "t0 = time.perf_counter(); ray.init(include_dashboard=False); t1 = time.perf_counter()\n"
            "s = finish(state, build_tuner(spec, state).fit()); t2 = time.perf_counter()\n"
            "print('TIMES', t1 - t0, t2 - t1, sum(1 for t in s['trials'] if t['final']))\n"
        )
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", code, str(tmp / "sweep.yaml"), str(tmp / "runs")], cwd=tmp, env=env,
                           capture_output=True, text=True, check=True)
        sweep_wall = time.perf_counter() - t0
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("TIMES")][-1].split()
        ray_start, fit_time, finished = float(line[1]), float(line[2]), int(line[3])
    n = len(cfgs)
    result = {
        "command": f"benchmarks/sweep_overhead.py --trials {args.trials} --epochs {args.epochs}",
        "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "trials": n, "finished_in_sweep": finished,
        "standalone_trial_s": standalone, "standalone_total_s": sum(standalone),
        "sweep_process_wall_s": sweep_wall, "ray_startup_s": ray_start, "sweep_fit_s": fit_time,
        "overhead_per_trial_s": (fit_time - sum(standalone)) / n,
        "overhead_share_of_trial": (fit_time - sum(standalone)) / sum(standalone),
    }
    print(json.dumps(result, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    if not args.smoke_test and args.results_md:
        rows = [{"what": "N standalone `prunevision train` processes, one after another",
                 "s": f"{sum(standalone):.1f}"},
                {"what": "the same N trials in one sweep (`Tuner.fit`, 1 at a time, reused actors)",
                 "s": f"{fit_time:.1f}"},
                {"what": "Ray start-up (`ray.init`, once per sweep)", "s": f"{ray_start:.1f}"},
                {"what": "**overhead per trial** (sweep − standalone) / N",
                 "s": f"**{result['overhead_per_trial_s']:+.1f}** ({result['overhead_share_of_trial']:+.0%})"}]
        body = (f"{n} trials of small_cnn on synthetic data (2,048 train images), {args.epochs} epochs + 1 fine-tuning "
                f"epoch each, measured and exported (dynamo), same configs both ways, MLflow sqlite. "
                f"Raw: `{args.out}`.\n\n{md_table(rows, ['what', 's'], ['', 'seconds'])}\n")
        append_results("Sweep overhead (`benchmarks/sweep_overhead.py`)", body, args.results_md)


if __name__ == "__main__":
    main()

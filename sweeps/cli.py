"""`prunevision sweep run|resume|status` (dispatched from prunevision's CLI; Ray is imported here only)."""

from __future__ import annotations

import argparse
import json
import sys

from prunevision.config import ConfigError, parse_overrides

# seconds-long trials: what CI runs
SMOKE = {"search.num_samples": 4, "search.max_concurrent": 2}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="Ray Tune + Optuna sweeps, tracked in MLflow")
    ss = p.add_subparsers(dest="sweep_command", required=True)
    r = ss.add_parser("run", help="launch a sweep from a sweep file")
    r.add_argument("sweep_file")
    r.add_argument("--address", default=None, help="Ray cluster: auto or ray://host:10001 (default: a local Ray)")
    r.add_argument("--num-samples", type=int, default=None, help="number of trials (overrides search.num_samples)")
    r.add_argument("--storage", default="prunevision-runs", help="Ray storage path: a folder, or s3://... on a cluster")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a base config key (train.epochs=2) or a run setting (search.seed=3)")
    r.add_argument("--smoke-test", action="store_true", help="4 tiny trials, 2 at a time")
    r.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all)")
    s = ss.add_parser("resume", help="continue an interrupted sweep")
    s.add_argument("sweep_dir")
    s.add_argument("--address", default=None)
    s.add_argument("--num-cpus", type=int, default=None)
    t = ss.add_parser("status", help="trial counts and last results of a sweep")
    t.add_argument("sweep_dir")
    t.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from sweeps.run import resume_sweep, run_sweep, sweep_status
    from sweeps.spec import load_sweep

    if args.sweep_command == "run":
        overrides = parse_overrides(args.overrides)
        if args.smoke_test:
            overrides = {**SMOKE, **overrides}
        if args.num_samples is not None:
            if args.num_samples < 1:
                raise ConfigError("--num-samples must be ≥ 1")
            overrides["search.num_samples"] = args.num_samples
        spec = load_sweep(args.sweep_file, overrides)  # every sweep-file problem stops here, before Ray
        summary = run_sweep(spec, args.storage, address=args.address, num_cpus=args.num_cpus)
    elif args.sweep_command == "resume":
        summary = resume_sweep(args.sweep_dir, address=args.address, num_cpus=args.num_cpus)
    else:
        summary = sweep_status(args.sweep_dir)
        if args.json:
            print(json.dumps(summary, indent=2))
            return 0
    print_summary(summary)
    return 1 if summary.get("errors") else 0


def print_summary(s: dict) -> None:
    states = ", ".join(f"{v} {k.lower()}" for k, v in sorted(s["states"].items())) or "no trials"
    print(f"sweep {s['name']}: {states} (Optuna study)")
    for t in s["trials"]:
        objs = ", ".join(f"{k} {v:.4g}" for k, v in t.items()
                         if k not in ("trial_dir", "trial_id", "final", "epoch") and isinstance(v, (int, float)))
        print(f"  {t['trial_id']}: {'complete' if t['final'] else 'stopped at epoch ' + str(t['epoch'])}  {objs}")
    print(f"results:  {s['sweep_dir']}")
    print(f"study:    optuna-dashboard sqlite:///{s['study']}")
    print(f"MLflow:   mlflow ui --backend-store-uri {s['tracking_uri']}  (experiment {s['experiment_id']}, "
          f"parent run {s['parent_run_id']})")


if __name__ == "__main__":  # pragma: no cover
    ap = argparse.ArgumentParser(prog="sweeps")
    add_parser(ap.add_subparsers(dest="command", required=True))
    sys.exit(run(ap.parse_args()))

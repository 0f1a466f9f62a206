"""`prunevision sweep run|resume|status|dashboard` (dispatched from prunevision's CLI; Ray is imported here only)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from pathlib import Path

from prunevision.cliargs import add_set_argument
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
    add_set_argument(r, "override base config keys (train.epochs=2) or run settings (search.seed=3)")
    r.add_argument("--smoke-test", action="store_true", help="4 tiny trials, 2 at a time")
    r.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all)")
    s = ss.add_parser("resume", help="continue an interrupted sweep")
    s.add_argument("sweep_dir")
    s.add_argument("--address", default=None)
    s.add_argument("--num-cpus", type=int, default=None)
    t = ss.add_parser("status", help="trial counts and last results of a sweep")
    t.add_argument("sweep_dir")
    t.add_argument("--json", action="store_true")
    d = ss.add_parser("dashboard", help="optuna-dashboard on a sweep's study",
                      description="Serve optuna-dashboard on the sweep's Optuna study (DIR/optuna.db) until Ctrl-C.")
    d.add_argument("sweep_dir")
    d.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; the dashboard has no login)")
    d.add_argument("--port", type=_port, default=8080, help="port (default 8080; 0: any free port)")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0-65535)")
    return port


def run(args: argparse.Namespace) -> int:
    from sweeps.run import SweepInterrupted

    try:
        return _run(args)
    except SweepInterrupted as e:  # Ctrl-C: the parent run is KILLED and the sweep can go on
        print(f"prunevision: {e}", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from sweeps.run import resume_sweep, run_sweep, sweep_status
    from sweeps.spec import load_sweep

    if args.sweep_command == "dashboard":
        from sweeps.dashboard import serve

        return serve(args.sweep_dir, host=args.host, port=args.port)
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
                         if k not in ("trial_dir", "trial_id", "status", "final", "epoch")
                         and isinstance(v, (int, float)) and not isinstance(v, bool))
        where = t["status"] if t["status"] == "complete" else f"{t['status']} at epoch {t['epoch']}"
        print(f"  {t['trial_id']}: {where}  {objs}")
    print(f"results:  {s['sweep_dir']}")
    print(f"study:    {dashboard_command(s['sweep_dir'])}")
    for head, line in zip(("MLflow:", ""), mlflow_hint(s["tracking_uri"], s["experiment_id"], s.get("experiment"),
                                                     s["parent_run_id"])):
        print(f"{head:<10}{line}")
    if s.get("mlflow_unsent"):
        print(f"{'':<10}{s['mlflow_unsent']} MLflow operation(s) could not be sent (the server was unreachable); "
              "they wait in the trials' final checkpoints (mlflow_pending.jsonl) and go out with "
              f"`prunevision sweep resume {s['sweep_dir']}`")


def console_command(name: str) -> str:
    """How the user's shell runs this install's console script ``name``: the bare name when PATH
    finds this very one, else its path (relative when under the working directory)."""
    exe = Path(sys.executable).parent / name
    if not exe.is_file():
        return name
    found = shutil.which(name)
    if found and Path(found).resolve() == exe.resolve():
        return name
    rel = os.path.relpath(exe)
    return shlex.quote(str(exe) if rel.startswith("..") else rel)


def dashboard_command(sweep_dir: str) -> str:
    return f"{console_command('prunevision')} sweep dashboard {shlex.quote(str(sweep_dir))}"


def mlflow_hint(tracking_uri: str, experiment_id: str, experiment: str | None, parent_run_id: str) -> list[str]:
    """Two lines: how to open the sweep in MLflow's UI, and where it is there. A tracking server is
    opened in the browser (``mlflow ui`` takes a store, not a server's URL); a store (sqlite file,
    folder, database) gets ``mlflow ui``, which listens on 127.0.0.1:5000."""
    page = f"#/experiments/{experiment_id}/runs"
    where = (f"experiment {experiment or experiment_id}, parent run {parent_run_id} with a child run per trial "
             f"(from the UI's home page: switch GenAI to \"Model training\", then Experiments)")
    if tracking_uri.startswith(("http://", "https://")):
        return [f"open {tracking_uri.rstrip('/')}/{page}", where]
    if tracking_uri.startswith("databricks"):
        return [f"open experiment {experiment_id} in the Databricks workspace", where]
    return [f"{console_command('mlflow')} ui --backend-store-uri {shlex.quote(tracking_uri)}",
            f"then open http://127.0.0.1:5000/{page}: {where}"]


if __name__ == "__main__":  # pragma: no cover
    ap = argparse.ArgumentParser(prog="sweeps")
    add_parser(ap.add_subparsers(dest="command", required=True))
    sys.exit(run(ap.parse_args()))

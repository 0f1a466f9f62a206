"""`prunevision analyze SWEEP_DIR` and the sweep form of `prunevision export` (dispatched from
prunevision's CLI)."""

from __future__ import annotations

import argparse
from pathlib import Path

from analysis.choose import STRATEGIES, make_bounds
from analysis.remeasure import TARGETS


def add_selection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--select", choices=STRATEGIES, default="knee",
                   help="which frontier trial: the knee of the front (default) or the best for one objective "
                        "(accuracy: val_accuracy, on the validation split; the test accuracy for older sweeps)")
    p.add_argument("--max-latency-ms", type=float, default=None, metavar="X", help="only trials with latency_ms ≤ X")
    p.add_argument("--min-accuracy", type=float, default=None, metavar="Y",
                   help="only trials with val_accuracy ≥ Y (a fraction: 0.9; the test accuracy for sweeps "
                        "without a validation split)")
    p.add_argument("--min-sparsity", type=float, default=None, metavar="Z",
                   help="only trials with param_sparsity ≥ Z (a fraction: 0.5)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="Pareto front, plots and report of a sweep",
                       description="Build the Pareto front of a sweep, re-measure the candidates' latency, write "
                                   "pareto.csv, plots, report.md and a self-contained report.html, and log them "
                                   "to the sweep's MLflow parent run.")
    p.add_argument("sweep_dir")
    p.add_argument("--out", default=None, help="output folder (default: SWEEP_DIR/analysis)")
    p.add_argument("--source", choices=("ray", "mlflow", "optuna"), default="ray",
                   help="read trials from Ray's result files (default), the MLflow runs or the Optuna study")
    add_selection_args(p)
    p.add_argument("--no-remeasure", action="store_true", help="keep the latencies measured inside the trials")
    p.add_argument("--target", choices=TARGETS, default="onnxruntime-cpu", help="where to re-measure latency")
    p.add_argument("--batch", type=int, default=1, help="batch size for the re-measurement (default 1)")
    p.add_argument("--threads", type=int, default=1, help="threads for the re-measurement (default 1)")
    p.add_argument("--runs", type=int, default=50, help="timed runs per model (default 50)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the report to the sweep's MLflow run")


def is_sweep_dir(path: str) -> bool:
    from analysis.results import STATE_FILE

    return (Path(path) / STATE_FILE).is_file()


def _bounds(args: argparse.Namespace):
    return make_bounds(args.max_latency_ms, args.min_accuracy, args.min_sparsity)


def run_analyze(args: argparse.Namespace) -> int:
    from analysis.analyze import analyze

    bounds = _bounds(args)
    s = analyze(args.sweep_dir, args.out, source=args.source, select=args.select, bounds=bounds,
                remeasure_latency=not args.no_remeasure, target=args.target, batch=args.batch, threads=args.threads,
                runs=args.runs, log_to_mlflow=not args.no_mlflow)
    c = s["chosen"]
    print(f"sweep {s['sweep']}: {', '.join(f'{v} {k}' for k, v in s['trials'].items())}; front of "
          f"{s['front_size']} trial(s), hypervolume {s['hypervolume']:.4g}")
    val = (f"val accuracy {c['val_accuracy']:.4f} (dense {c['val_accuracy_dense']:.4f}), test "
           if c.get("val_accuracy") is not None and c.get("val_accuracy_dense") is not None else "")
    print(f"chosen ({c['select']}): trial {c['trial_id']}: {val}accuracy {c['accuracy']:.4f} (dense "
          f"{c['accuracy_dense']:.4f}), {c['param_sparsity']:.1%} of parameters removed, latency "
          f"{c['latency_ms']:.4f} ms ({c['latency_speedup']:.2f}x faster than dense"
          f"{', re-measured' if c.get('latency_remeasured') else ''})")
    print(f"report:   {s['files']['report_html']}")
    print(f"front:    {s['files']['pareto_csv']}")
    if s.get("mlflow_parent_run"):
        print(f"MLflow:   parent run {s['mlflow_parent_run']} (artifacts under analysis/)")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from analysis.ship import export_chosen

    card = export_chosen(args.checkpoint, args.out, select=args.select, bounds=_bounds(args),
                         exporter=args.exporter, register=not args.no_register,
                         registered_model=args.registered_model)
    v = card["verification"]
    m = card["metrics"]
    val = f"val accuracy {m['val_accuracy']:.4f}, test " if m.get("val_accuracy") is not None else ""
    print(f"trial {card['source']['trial_id']} ({card['selection']['strategy']}"
          f"{', retrained' if card['source']['retrained'] else ''}): {val}accuracy "
          f"{m.get('accuracy', float('nan')):.4f}, "
          f"{m.get('param_sparsity', 0):.1%} of parameters removed")
    real = " (real test images included)" if v["real_images"] else ""
    print(f"wrote {card['file']} ({card['size_bytes'] / 1e6:.2f} MB); ONNX Runtime vs PyTorch max abs diff "
          f"{v['max_abs_diff']:.2e} over {v['batches']} batches{real}")
    print(f"model card: {card['card']}")
    if card.get("registry"):
        r = card["registry"]
        print(f"registered: {r['name']} version {r['version']}, alias @{r['alias']}: "
              f"mlflow.pyfunc.load_model(\"{r['uri']}\")")
    return 0

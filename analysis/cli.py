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


def add_int8_args(p, export: bool = True) -> None:
    """--int8 and its options, for `export` (both forms) and `analyze`."""
    from prunevision.quantize import CALIBRATION_METHODS, DEFAULT_CALIBRATION_SIZE, DEFAULT_MAX_DROP

    g = p.add_argument_group("INT8 (ONNX Runtime static quantization)")
    g.add_argument("--int8", action="store_true",
                   help=("also write a statically quantized INT8 model next to the fp32 one (model.onnx → "
                         "model.int8.onnx): ONNX Runtime, QDQ, per-channel INT8 weights, calibrated on training "
                         "images, then verified against the fp32 model (accuracy on the validation and test images, "
                         "agreement, size, latency) and refused when it loses more than --max-int8-drop")
                   if export else "add an INT8 variant of each front trial, measured the same way (pareto.csv rows "
                                  "with precision int8, a report section and int8_front.png)")
    g.add_argument("--calibration-size", type=int, default=None, metavar="N",
                   help=f"training images to calibrate on, a seeded sample (default {DEFAULT_CALIBRATION_SIZE})")
    g.add_argument("--calibration-method", choices=CALIBRATION_METHODS, default=None,
                   help="how activation ranges are calibrated (default minmax)")
    g.add_argument("--max-int8-drop", type=float, default=None, metavar="POINTS",
                   help=(f"refuse the INT8 model when its validation accuracy is more than this many points below "
                         f"the fp32 model's (default {DEFAULT_MAX_DROP:g}; the test split without a validation split)")
                   if export else f"mark variants that lose more than this many points (default {DEFAULT_MAX_DROP:g})")
    if export:
        g.add_argument("--force-int8", action="store_true", help="ship the INT8 model even over --max-int8-drop")
        g.add_argument("--data", default=None, metavar="ROOT",
                       help="the dataset to calibrate and verify on, in place of the data.root the model's config "
                            "names (same subset, seed and validation split)")


def int8_options(args: argparse.Namespace) -> dict | None:
    """The INT8 keyword arguments of the request (None without --int8), checked: a value out of
    range, or an INT8 option without --int8, stops it with one line before any work."""
    from analysis.int8 import check_int8_options
    from prunevision.quantize import DEFAULT_CALIBRATION_SIZE, DEFAULT_MAX_DROP, QuantizeError

    given = [f for f, v in (("--calibration-size", args.calibration_size), ("--max-int8-drop", args.max_int8_drop),
                            ("--calibration-method", args.calibration_method),
                            ("--force-int8", getattr(args, "force_int8", False) or None),
                            ("--data", getattr(args, "data", None))) if v is not None]
    check_int8_options(args.calibration_size, args.max_int8_drop)
    if not args.int8:
        if given:
            raise QuantizeError(f"{', '.join(given)}: INT8 options, they need --int8")
        return None
    opts = {"calibration_size": args.calibration_size or DEFAULT_CALIBRATION_SIZE,
            "max_drop": DEFAULT_MAX_DROP if args.max_int8_drop is None else args.max_int8_drop,
            "method": args.calibration_method or "minmax"}
    if hasattr(args, "force_int8"):
        opts.update(force=args.force_int8, data_root=args.data)
    return opts


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
    add_int8_args(p, export=False)


def is_sweep_dir(path: str) -> bool:
    from analysis.results import STATE_FILE

    return (Path(path) / STATE_FILE).is_file()


def _bounds(args: argparse.Namespace):
    return make_bounds(args.max_latency_ms, args.min_accuracy, args.min_sparsity)


def run_analyze(args: argparse.Namespace) -> int:
    from analysis.analyze import analyze

    int8 = int8_options(args)
    bounds = _bounds(args)
    s = analyze(args.sweep_dir, args.out, source=args.source, select=args.select, bounds=bounds,
                remeasure_latency=not args.no_remeasure, target=args.target, batch=args.batch, threads=args.threads,
                runs=args.runs, log_to_mlflow=not args.no_mlflow, int8=int8)
    c = s["chosen"]
    print(f"sweep {s['sweep']}: {', '.join(f'{v} {k}' for k, v in s['trials'].items())}; front of "
          f"{s['front_size']} trial(s), hypervolume {s['hypervolume']:.4g}")
    val = (f"val accuracy {c['val_accuracy']:.4f} (dense {c['val_accuracy_dense']:.4f}), test "
           if c.get("val_accuracy") is not None and c.get("val_accuracy_dense") is not None else "")
    from prunevision.metrics import format_speedup  # lazily: prunevision imports torch

    sp = format_speedup(c["latency_speedup"], c.get("latency_speedup_lo"), c.get("latency_speedup_hi"))
    print(f"chosen ({c['select']}): trial {c['trial_id']}: {val}accuracy {c['accuracy']:.4f} (dense "
          f"{c['accuracy_dense']:.4f}), {c['param_sparsity']:.1%} of parameters removed, latency "
          f"{c['latency_ms']:.4f} ms ({sp} faster than dense"
          f"{', re-measured' if c.get('latency_remeasured') else ''})")
    q = s.get("int8")
    if q:
        fails = f"; {len(q['failed'])} failed: {next(iter(q['failed'].values()))}" if q["failed"] else ""
        print(f"INT8:     {q['variants']} variant(s) of the front's trials{fails}")
        r = q["results"].get(str(c["trial_id"])) or {}
        if "accuracy" in r:
            print(f"          chosen trial in INT8: {_int8_line(r)}")
    print(f"report:   {s['files']['report_html']}")
    print(f"front:    {s['files']['pareto_csv']}")
    if s.get("mlflow_parent_run"):
        print(f"MLflow:   parent run {s['mlflow_parent_run']} (artifacts under analysis/)")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from analysis.ship import export_chosen

    int8 = int8_options(args)
    card = export_chosen(args.checkpoint, args.out, select=args.select, bounds=_bounds(args),
                         exporter=args.exporter, register=not args.no_register,
                         registered_model=args.registered_model, int8=int8)
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
    _print_int8(card)
    print(f"model card: {card['card']}")
    if card.get("registry"):
        r = card["registry"]
        for reg in (r, r.get("int8")):
            if reg:
                print(f"registered: {reg['name']} version {reg['version']}, alias @{reg['alias']}: "
                      f"mlflow.pyfunc.load_model(\"{reg['uri']}\")")
    return 0


def _int8_line(q: dict) -> str:
    on = q["drop_split"]
    a = q["accuracy"][on]
    from prunevision.metrics import format_speedup  # lazily: prunevision imports torch

    lat = " ".join(f"b{k.split('_', 1)[1]} {v['int8']['median_ms']:.3f} ms [{v['int8']['p10_ms']:.3f}–"
                   f"{v['int8']['p90_ms']:.3f}] vs {v['fp32']['median_ms']:.3f} ms "
                   f"({format_speedup(v['speedup'], v.get('speedup_lo'), v.get('speedup_hi'))});"
                   for k, v in q["latency"].items())
    rt = q["structure"]["runtime"]
    left = f", {rt['float_weight_ops']} weight layer(s) left in float" if rt["float_weight_ops"] else ""
    return (f"{'val' if on == 'val' else 'test'} accuracy {a['int8']:.4f} (fp32 {a['fp32']:.4f}, "
            f"{0.0 - q['drop_points'] + 0.0:+.2f} points, top-1 agreement {a['agreement']:.2%}); {lat} "
            f"{q['size']['int8']['bytes'] / 1e6:.2f} MB ({q['size']['ratio']:.2f}x smaller); ONNX Runtime runs "
            f"{rt['int8_kernels']} integer kernel(s){left}")


def _print_int8(card: dict) -> None:
    q = card.get("int8")
    if not q:
        return
    forced = " (FORCED past --max-int8-drop)" if q.get("forced") else ""
    print(f"wrote {q['file']}{forced}: {_int8_line(q)}")


def run_checkpoint_int8(args: argparse.Namespace, check: dict, size: int, int8: dict) -> int:
    """`prunevision export CHECKPOINT --out F --int8`, once the fp32 file is written and checked."""
    from analysis.ship import export_checkpoint_int8

    card = export_checkpoint_int8(args.checkpoint, args.out, check, size, int8=int8)
    _print_int8(card)
    print(f"model card: {card['card']}")
    return 0

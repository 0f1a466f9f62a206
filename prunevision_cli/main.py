"""The ``prunevision`` command line: above the library, the sweep layer and the analysis, which
it dispatches to (none of them imports this package)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prunevision.cliargs import add_set_argument
from prunevision.config import ConfigError, ExperimentConfig, load_config, parse_overrides
from prunevision.metrics import format_speedup

# Tiny data and one short epoch: every entry point runs in CI in seconds.
SMOKE_OVERRIDES = {
    "train.epochs": 1,
    "data.batch_size": 32,
    "data.eval_batch_size": 64,
    "data.synthetic_train": 64,
    "data.synthetic_test": 32,
    "prune.finetune_epochs": 1,
    "measure.batch": 4,
    "measure.warmup": 2,
}


OVERWRITE_HELP = ("replace the run already in --out (refused without it); its files are removed only once the "
                  "new run has loaded its data and built its model")


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one gated model",
                       description="Train one gated model; writes metrics.json, checkpoint.pt and config.yaml.")
    p.add_argument("config", nargs="?", help="YAML experiment config")
    add_set_argument(p, "override config keys (dotted paths, e.g. gates.lam=2)")
    p.add_argument("--out", default="runs/train", help="output folder (default: runs/train)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--resume", metavar="CHECKPOINT",
                   help="continue from a checkpoint (its config, with --set overrides on top)")
    p.add_argument("--smoke-test", action="store_true",
                   help="one short epoch on tiny data (synthetic unless data.name/data.root is set)")


def _prune_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="prune, fine-tune, measure and export a trained checkpoint",
                       description="Prune a training checkpoint (from `prunevision train`) and measure it.")
    p.add_argument("checkpoint", help="training checkpoint (checkpoint.pt or its folder)")
    add_set_argument(p, "override prune.*/measure.*/data.* keys, e.g. prune.threshold=0.3")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def _export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint, or a sweep's chosen model, to verified ONNX",
                       description="Export a pruned checkpoint (pruned.safetensors), a training checkpoint "
                                   "(gates folded in), or the chosen frontier trial of a sweep folder to ONNX, "
                                   "checked against PyTorch with ONNX Runtime. For a sweep, also write a model "
                                   "card (model.json) and register the model in MLflow with the alias champion.")
    p.add_argument("checkpoint", help="pruned.safetensors, checkpoint.pt, or a sweep folder")
    p.add_argument("--out", required=True, help="ONNX file to write")
    p.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo")
    from analysis.cli import add_selection_args

    g = p.add_argument_group("sweep folders")
    add_selection_args(g)
    g.add_argument("--registered-model", default=None, metavar="NAME",
                   help="MLflow registered model name (default: prunevision-<sweep name>)")
    g.add_argument("--no-register", action="store_true", help="do not register the model in MLflow")
    from analysis.cli import add_int8_args

    add_int8_args(p)


def _analyze_parser(sub: argparse._SubParsersAction) -> None:
    from analysis.cli import add_parser

    add_parser(sub)


def cmd_analyze(args: argparse.Namespace) -> int:
    from analysis.cli import run_analyze
    from prunevision.fsutil import check_writable_dir

    if args.out or Path(args.sweep_dir).is_dir():  # (not a folder at all: analyze says what it is)
        check_writable_dir(args.out or Path(args.sweep_dir) / "analysis", "--out")

    return run_analyze(args)


def _sweep_parser(sub: argparse._SubParsersAction) -> None:
    # The Ray Tune layer lives in sweeps/; it is imported only when a sweep command runs.
    from sweeps.cli import add_parser

    add_parser(sub)


def cmd_sweep(args: argparse.Namespace) -> int:
    from sweeps.cli import run

    storage = getattr(args, "storage", None)
    if args.sweep_command == "run" and storage and "://" not in storage:
        from prunevision.fsutil import check_writable_dir

        check_writable_dir(storage, "--storage")  # before the sweep file, the dataset or Ray
    return run(args)


def build_config(args: argparse.Namespace) -> ExperimentConfig:
    overrides = parse_overrides(args.overrides)
    if args.resume:
        from prunevision.train import load_checkpoint

        base = load_checkpoint(args.resume)["config"].to_dict()
        if args.config:
            raise ConfigError("give either a config file or --resume, not both")
        from prunevision.config import from_dict

        cfg = from_dict(base, overrides)
    else:
        cfg = load_config(args.config, overrides)
    if args.smoke_test:
        smoke = dict(SMOKE_OVERRIDES)
        user_data = cfg.data.root is not None or "data.name" in overrides
        if user_data and cfg.data.name != "synthetic":
            smoke.update({"data.subset": 128, "data.test_subset": 64})
        else:
            smoke["data.name"] = "synthetic"
        cfg = cfg.replace(**smoke)
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    cfg = build_config(args)  # every config problem is reported here, before any work
    from prunevision.fsutil import claim_run_folder
    from prunevision.pipeline import RUN_OUTPUTS, run_training

    # locked for the run; a finished run there is kept unless --overwrite
    with claim_run_folder(args.out, RUN_OUTPUTS, finished="metrics.json", overwrite=args.overwrite,
                          resume=args.resume, hint=f" (continue it with --resume {args.out})") as folder:
        metrics = run_training(cfg, args.out, resume=args.resume, before_write=folder.begin)
        print_summary(metrics, folder.path)
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from prunevision.config import from_dict
    from prunevision.fsutil import claim_run_folder
    from prunevision.pipeline import RUN_OUTPUTS
    from prunevision.train import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    overrides = parse_overrides(args.overrides)
    bad = [k for k in overrides if k.split(".")[0] in ("model", "gates", "train")]
    if bad:
        raise ConfigError(f"{bad[0]}: prune keeps the trained model; only prune.*, measure.* and data.* can change")
    cfg = from_dict(ckpt["config"].to_dict(), overrides)
    with claim_run_folder(args.out, RUN_OUTPUTS, finished="metrics.json", overwrite=args.overwrite,
                          source=args.checkpoint) as folder:
        return _prune_into(folder, ckpt, cfg)


def _prune_into(folder, ckpt: dict, cfg: ExperimentConfig) -> int:
    from prunevision.config import save_config
    from prunevision.data import load_dataset
    from prunevision.fsutil import write_json
    from prunevision.models import build_gated_model
    from prunevision.train import CheckpointError, select_device
    from prunevision.trial import prune_and_measure

    out = folder.path
    device = select_device(cfg.train.device)
    data = load_dataset(cfg.data, seed=cfg.seed)
    model = build_gated_model(cfg.model, cfg.gates, data.num_classes, data.image_size, pretrained=False)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint does not fit its model: {' '.join(str(e).split())[:300]}") from None
    folder.begin()
    save_config(cfg, out / "config.yaml")
    metrics = prune_and_measure(model.to(device), data.to(device), cfg, out)
    metrics["history"] = ckpt["history"] + metrics.pop("prune_history")
    metrics["config"] = cfg.to_dict()
    write_json(out / "metrics.json", metrics)
    print_summary(metrics, out)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from analysis.cli import is_sweep_dir
    from prunevision.fsutil import check_writable_dir

    check_writable_dir(Path(args.out).parent, "the folder of --out")  # before loading or exporting anything

    if is_sweep_dir(args.checkpoint):
        from analysis.cli import run_export

        return run_export(args)
    from analysis.cli import int8_options

    int8 = int8_options(args)  # checked before any work
    from prunevision.checkpoint import load_pruned, read_pruned
    from prunevision.export import export_onnx

    path = Path(args.checkpoint)
    if path.suffix == ".safetensors":
        model = load_pruned(path)
        size = int(read_pruned(path)[0]["image_size"])
    else:
        from prunevision.models import build_gated_model
        from prunevision.prune import strip_gates
        from prunevision.train import CheckpointError, load_checkpoint

        ckpt = load_checkpoint(path)
        cfg = ckpt["config"]
        if cfg.model.num_classes is None:
            raise ConfigError("the checkpoint's config has no resolved model.num_classes")
        size = int(ckpt.get("image_size", 32))
        model = build_gated_model(cfg.model, cfg.gates, cfg.model.num_classes, size, pretrained=False)
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise CheckpointError(f"{path} does not fit its own model config: {' '.join(str(e).split())[:300]}") \
                from None
        strip_gates(model)
    r = export_onnx(model, args.out, size, exporter=args.exporter)
    print(f"wrote {r['path']} ({r['size_bytes'] / 1e6:.2f} MB); ONNX Runtime vs PyTorch max abs diff "
          f"{r['max_abs_diff']:.2e} over {r['checked_batches']} batches")
    if int8 is not None:
        from analysis.cli import run_checkpoint_int8

        return run_checkpoint_int8(args, r, size, int8)
    return 0


def print_summary(metrics: dict, out: Path) -> None:
    line = f"test accuracy {metrics['accuracy']:.4f}"
    if "val_accuracy" in metrics:
        dense = f" (dense {metrics['val_accuracy_dense']:.4f})" if "val_accuracy_dense" in metrics else ""
        line = f"val accuracy {metrics['val_accuracy']:.4f}{dense}, {line}"
    if "accuracy_dense" in metrics:
        line += (f" (dense {metrics['accuracy_dense']:.4f}), param sparsity {metrics['param_sparsity']:.1%}, "
                 f"MACs reduced {metrics['macs_reduction']:.2f}x")
    if "latency_speedup" in metrics:
        sp = format_speedup(metrics["latency_speedup"], metrics.get("latency_speedup_lo"),
                            metrics.get("latency_speedup_hi"))
        line += f", ONNX Runtime CPU batch-1 speed-up {sp}"
    print(line)
    files = [f for f in ("metrics.json", "model.onnx", "dense.onnx", "pruned.safetensors", "checkpoint.pt",
                         "config.yaml", "gate_histogram.png", "gate_histograms_over_training.png",
                         "first_conv_filters.png", "prune_steps.png", "ratio_curve.png", "ratios")
             if (out / f).exists()]
    print(f"results in {out}/: {', '.join(files)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunevision", description="Learn which channels a CNN can do without.")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _prune_parser(sub)
    _export_parser(sub)
    _sweep_parser(sub)
    _analyze_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from analysis.pareto import ConstraintError
    from analysis.remeasure import RemeasureError
    from analysis.results import SweepDataError
    from prunevision.checkpoint import PrunedCheckpointError
    from prunevision.data import DatasetError
    from prunevision.export import ExportError
    from prunevision.fsutil import OutputError
    from prunevision.models import PretrainedWeightsError
    from prunevision.prune import PruneError
    from prunevision.quantize import QuantizeError
    from prunevision.train import CheckpointError

    try:
        return {"train": cmd_train, "prune": cmd_prune, "export": cmd_export, "sweep": cmd_sweep,
                "analyze": cmd_analyze}[args.command](args)
    except (ConfigError, DatasetError, PretrainedWeightsError, CheckpointError, PrunedCheckpointError, ExportError,
            PruneError, FloatingPointError, SweepDataError, ConstraintError, RemeasureError, OutputError,
            QuantizeError) as e:
        print(f"prunevision: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prunevision: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

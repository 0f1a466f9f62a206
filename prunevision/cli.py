"""The ``prunevision`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prunevision.config import ConfigError, ExperimentConfig, load_config, parse_overrides

# Tiny data and one short epoch: every entry point runs in CI in seconds.
SMOKE_OVERRIDES = {
    "train.epochs": 1,
    "data.batch_size": 32,
    "data.eval_batch_size": 64,
    "data.synthetic_train": 64,
    "data.synthetic_test": 32,
}


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one gated model",
                       description="Train one gated model; writes metrics.json, checkpoint.pt and config.yaml.")
    p.add_argument("config", nargs="?", help="YAML experiment config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (dotted path, e.g. gates.lam=2), repeatable")
    p.add_argument("--out", default="runs/train", help="output folder (default: runs/train)")
    p.add_argument("--resume", metavar="CHECKPOINT",
                   help="continue from a checkpoint (its config, with --set overrides on top)")
    p.add_argument("--smoke-test", action="store_true",
                   help="one short epoch on tiny data (synthetic unless data.name/data.root is set)")


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
    from prunevision.pipeline import run_training

    metrics = run_training(cfg, args.out, resume=args.resume)
    out = Path(args.out)
    print_summary(metrics, out)
    return 0


def print_summary(metrics: dict, out: Path) -> None:
    line = f"accuracy {metrics['accuracy']:.4f}"
    if "accuracy_dense" in metrics:
        line += (f" (dense {metrics['accuracy_dense']:.4f}), param sparsity {metrics['param_sparsity']:.1%}, "
                 f"MACs reduced {metrics['macs_reduction']:.2f}x")
    if "latency_speedup" in metrics:
        line += f", ONNX Runtime CPU batch-1 speed-up {metrics['latency_speedup']:.2f}x"
    print(line)
    files = [f for f in ("metrics.json", "model.onnx", "dense.onnx", "pruned.safetensors", "checkpoint.pt",
                         "config.yaml", "gate_histogram.png") if (out / f).exists()]
    print(f"results in {out}/: {', '.join(files)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prunevision", description="Learn which channels a CNN can do without.")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    args = parser.parse_args(argv)
    from prunevision.data import DatasetError
    from prunevision.models import PretrainedWeightsError
    from prunevision.train import CheckpointError

    try:
        return {"train": cmd_train}[args.command](args)
    except (ConfigError, DatasetError, PretrainedWeightsError, CheckpointError, FloatingPointError) as e:
        print(f"prunevision: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prunevision: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

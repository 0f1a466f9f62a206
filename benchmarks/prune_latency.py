"""Does removing channels make the network faster? Dense vs pruned vs masked, same run.

For each model (small-image stem, 32×32 inputs, 10 classes) the gates of the untrained network
are closed on the same pseudo-random share of channel indices in every layer (so coupled
layers agree and about that share of each layer's channels goes), then the channels are
removed with prunevision's gate pruning (torch-pruning DepGraph). Masked baselines zero the
same share of weights with torch.nn.utils.prune (sparse, same shapes). Weights are untrained:
this measures speed, not accuracy.

Every variant is exported with the default (dynamo) ONNX exporter, verified against PyTorch,
and timed with ONNX Runtime on CPU in one interleaved run (warm-up, then ``--runs`` timed runs
each; medians and 90th percentiles), at batch 1 and a larger batch, with a fixed thread count.

    .venv/bin/python benchmarks/prune_latency.py --out benchmarks/results/prune_latency.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from prunevision.config import GateConfig, ModelConfig
from prunevision.export import export_onnx
from prunevision.gates import ChannelGate, iter_gates
from prunevision.measure import macs_and_params, onnx_latency, size_on_disk
from prunevision.models import build_gated_model
from prunevision.prune import apply_unstructured, prune_by_gates, remove_masks, strip_gates, zero_fraction

SIZE = 32


def close_share(model: torch.nn.Module, share: float) -> None:
    """Close channel c of every gate when frac(c · φ) < share: the same indices in every layer."""
    with torch.no_grad():
        for _, g in iter_gates(model):
            if isinstance(g, ChannelGate):
                c = torch.arange(g.score.numel(), dtype=torch.float64)
                closed = torch.remainder(c * 0.6180339887498949, 1.0) < share
                g.score.copy_(torch.where(closed, -10.0, 6.0).to(g.score.dtype))


def variants(name: str, shares: list[float], round_to: int | None = None) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    base = build_gated_model(ModelConfig(name=name, small_input=True), GateConfig(), 10, SIZE).eval()
    out = {"dense": strip_gates(copy.deepcopy(base))}
    for s in shares:
        m = copy.deepcopy(base)
        close_share(m, s)
        prune_by_gates(m, torch.zeros(1, 3, SIZE, SIZE), 0.5, round_to=round_to)
        out[f"pruned_{int(s * 100)}"] = strip_gates(m, 0.5)
        masked = strip_gates(copy.deepcopy(base))
        apply_unstructured(masked, "l1_unstructured", s)
        remove_masks(masked)
        out[f"masked_{int(s * 100)}"] = masked
    return out


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet18,mobilenet_v2,efficientnet_b0")
    ap.add_argument("--shares", default="0.5,0.75")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--round-to", type=int, default=8, help="kept widths rounded up to a multiple (0: off)")
    ap.add_argument("--exporter", default="dynamo", choices=("dynamo", "torchscript"))
    ap.add_argument("--out", default="benchmarks/results/prune_latency.json")
    ap.add_argument("--smoke-test", action="store_true", help="one small model, batch 1, 30 runs, no warm-up")
    args = ap.parse_args()
    if args.smoke_test:
        args.models, args.shares, args.batches, args.warmup = "mobilenet_v3_small", "0.5", "1", 0
    shares = [float(s) for s in args.shares.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    torch.set_num_threads(args.threads)
    result = {"command": "benchmarks/prune_latency.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "smoke_test")),
              "date": time.strftime("%Y-%m-%d"), "machine": machine(),
              "torch": torch.__version__, "threads": args.threads, "models": {}}
    import onnxruntime

    result["onnxruntime"] = onnxruntime.__version__
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            vs = variants(name, shares, args.round_to or None)
            paths, rows = {}, {}
            for k, m in vs.items():
                macs, params = macs_and_params(m, SIZE)
                raw, gz = size_on_disk(m)
                e = export_onnx(m, Path(tmp) / f"{name}_{k}.onnx", SIZE, exporter=args.exporter)
                paths[k] = e["path"]
                rows[k] = {"macs": macs, "params": params, "size_bytes": raw, "size_gzip_bytes": gz,
                           "zero_fraction": zero_fraction(m), "onnx_max_abs_diff": e["max_abs_diff"]}
            for b in batches:
                lat = onnx_latency(paths, SIZE, batch=b, runs=args.runs, warmup=args.warmup, threads=args.threads)
                for k, v in lat.items():
                    rows[k][f"b{b}"] = v
            d = rows["dense"]
            for r in rows.values():
                r["macs_ratio"] = d["macs"] / r["macs"]
                for b in batches:
                    r[f"speedup_b{b}"] = d[f"b{b}"]["median_ms"] / r[f"b{b}"]["median_ms"]
                    r[f"speedup_over_macs_ratio_b{b}"] = r[f"speedup_b{b}"] / r["macs_ratio"]
            result["models"][name] = rows
            print(f"\n{name}")
            print("| variant | params | MACs | MACs ratio | " + " | ".join(
                f"b{b} median ms (p90) | speed-up b{b}" for b in batches) + " | zeros | gzip MB |")
            for k, r in rows.items():
                cells = " | ".join(f"{r[f'b{b}']['median_ms']:.3f} ({r[f'b{b}']['p90_ms']:.3f}) | "
                                   f"{r[f'speedup_b{b}']:.2f}x" for b in batches)
                print(f"| {k} | {r['params'] / 1e6:.2f} M | {r['macs'] / 1e6:.1f} M | {r['macs_ratio']:.2f}x | "
                      f"{cells} | {r['zero_fraction']:.0%} | {r['size_gzip_bytes'] / 1e6:.2f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

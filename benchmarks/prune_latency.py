"""Does removing channels make the network faster? Dense vs pruned vs masked, same run.

For each model (small-image stem, 32×32 inputs, 10 classes) the gates of the untrained network
are closed on the same pseudo-random share of channel indices in every layer (so coupled
layers agree and about that share of each layer's channels goes), then the channels are
removed with prunevision's gate pruning (torch-pruning DepGraph). Masked baselines zero the
same share of weights with torch.nn.utils.prune (sparse, same shapes). Weights are untrained:
this measures speed, not accuracy.

Every variant is exported with the default (dynamo) ONNX exporter, verified against PyTorch,
and timed with ONNX Runtime on CPU and with PyTorch eager on CPU, each engine in one interleaved
run (warm-up, then ``--runs`` timed runs each at batch 1, ``--runs-large`` at larger batches;
medians and 90th percentiles), with a fixed thread count. The table is appended to
benchmarks/RESULTS.md with the command, machine, date and commit.

    .venv/bin/python benchmarks/prune_latency.py
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS_MD, append_results, machine  # noqa: E402
from prunevision.config import GateConfig, ModelConfig
from prunevision.export import export_onnx
from prunevision.gates import ChannelGate, iter_gates
from prunevision.measure import macs_and_params, onnx_latency, size_on_disk, torch_latency
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


def variants(name: str, shares: list[float], round_to: int | None = None,
             masked_shares: list[float] | None = None) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    base = build_gated_model(ModelConfig(name=name, small_input=True), GateConfig(), 10, SIZE).eval()
    out = {"dense": strip_gates(copy.deepcopy(base))}
    for s in shares:
        m = copy.deepcopy(base)
        close_share(m, s)
        prune_by_gates(m, torch.zeros(1, 3, SIZE, SIZE), 0.5, round_to=round_to)
        out[f"pruned_{int(s * 100)}"] = strip_gates(m, 0.5)
        if masked_shares is not None and s not in masked_shares:
            continue
        masked = strip_gates(copy.deepcopy(base))
        apply_unstructured(masked, "l1_unstructured", s)
        remove_masks(masked)
        out[f"masked_{int(s * 100)}"] = masked
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet18,mobilenet_v2,efficientnet_b0,hybrid")
    ap.add_argument("--shares", default="0.25,0.5,0.75")
    ap.add_argument("--masked-shares", default="0.5,0.75", help="shares that also get a masked baseline")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--runs", type=int, default=30, help="timed runs per variant at batch 1")
    ap.add_argument("--runs-large", type=int, default=10, help="timed runs per variant at larger batches")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--round-to", type=int, default=8, help="kept widths rounded up to a multiple (0: off)")
    ap.add_argument("--exporter", default="dynamo", choices=("dynamo", "torchscript"))
    ap.add_argument("--no-torch", action="store_true", help="ONNX Runtime only")
    ap.add_argument("--out", default="benchmarks/results/prune_latency.json")
    ap.add_argument("--results-md", default=str(RESULTS_MD), help="where to append the table ('' for nowhere)")
    ap.add_argument("--smoke-test", action="store_true", help="one small model, batch 1, 30 runs; appends nothing")
    args = ap.parse_args()
    if args.smoke_test:
        args.models, args.shares, args.masked_shares, args.batches, args.warmup = (
            "mobilenet_v3_small", "0.5", "0.5", "1", 0)
    shares = [float(s) for s in args.shares.split(",")]
    masked_shares = [float(s) for s in args.masked_shares.split(",") if s]
    batches = [int(b) for b in args.batches.split(",")]
    torch.set_num_threads(args.threads)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine(),
              "torch": torch.__version__, "threads": args.threads, "models": {}}
    import onnxruntime

    result["onnxruntime"] = onnxruntime.__version__
    engines = ["ort"] + ([] if args.no_torch else ["torch"])
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            vs = variants(name, shares, args.round_to or None, masked_shares)
            paths, rows = {}, {}
            for k, m in vs.items():
                macs, params = macs_and_params(m, SIZE)
                raw, gz = size_on_disk(m)
                e = export_onnx(m, Path(tmp) / f"{name}_{k}.onnx", SIZE, exporter=args.exporter)
                paths[k] = e["path"]
                rows[k] = {"macs": macs, "params": params, "size_bytes": raw, "size_gzip_bytes": gz,
                           "zero_fraction": zero_fraction(m), "onnx_max_abs_diff": e["max_abs_diff"]}
            for b in batches:
                runs = args.runs if b == 1 else args.runs_large
                lat = onnx_latency(paths, SIZE, batch=b, runs=runs, warmup=args.warmup, threads=args.threads)
                for k, v in lat.items():
                    rows[k][f"ort_b{b}"] = v
                if "torch" in engines:
                    lat = torch_latency(vs, SIZE, "cpu", batch=b, runs=runs, warmup=args.warmup, threads=args.threads)
                    for k, v in lat.items():
                        rows[k][f"torch_b{b}"] = v
            d = rows["dense"]
            for r in rows.values():
                r["macs_ratio"] = d["macs"] / r["macs"]
                for e in engines:
                    for b in batches:
                        r[f"speedup_{e}_b{b}"] = d[f"{e}_b{b}"]["median_ms"] / r[f"{e}_b{b}"]["median_ms"]
            result["models"][name] = rows
            for k, r in rows.items():
                cells = " | ".join(f"{r[f'{e}_b{b}']['median_ms']:.3f} | **{r[f'speedup_{e}_b{b}']:.2f}×**"
                                   if k.startswith("pruned") else
                                   f"{r[f'{e}_b{b}']['median_ms']:.3f} | {r[f'speedup_{e}_b{b}']:.2f}×"
                                   for e in engines for b in batches)
                variant = k.replace("_", " ") + (" %" if k != "dense" else "")
                lines.append(f"| {name} | {variant} | {r['params'] / 1e6:.2f} M | {r['macs'] / 1e6:.1f} M | "
                             f"{r['macs_ratio']:.2f}× | {cells} |")
            print("\n".join(lines[-len(rows):]), flush=True)
    eng_name = {"ort": "ONNX Runtime", "torch": "PyTorch eager"}
    head = ("| model | variant | params | MACs | MACs ratio | " + " | ".join(
        f"{eng_name[e]} b{b} ms | speed-up" for e in engines for b in batches) + " |")
    table = "\n".join([head, "|" + " --- |" * (5 + 2 * len(engines) * len(batches)), *lines])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")
    if not args.smoke_test and args.results_md:
        body = (f"Untrained weights (speed only), small-image stem, 32×32 input, 10 classes; channels removed by "
                f"gate pruning (round_to={args.round_to}); masked = the same share of weights zeroed by "
                f"torch.nn.utils.prune (L1). CPU, {args.threads} thread; ONNX Runtime {onnxruntime.__version__} and "
                f"PyTorch {torch.__version__} eager, each engine interleaved over all variants of a model "
                f"({args.runs} timed runs at batch 1, {args.runs_large} at larger batches, medians). "
                f"Raw: `{args.out}`.\n\n{table}\n")
        append_results("Pruning into speed (`benchmarks/prune_latency.py`)", body, args.results_md)


if __name__ == "__main__":
    main()

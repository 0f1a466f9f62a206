"""Measurement, used by everything downstream: accuracy, parameters and MACs, size on disk,
and latency of dense and pruned networks measured in the same run.

Latency: ONNX Runtime on CPU (the default deployment target) and PyTorch eager on the
training device; warm-up runs, then ``runs`` timed runs per model, interleaved in rounds so that
a noisy neighbour slows both models alike; median, 10th/25th/75th/90th percentiles reported, thread count
fixed and recorded. The speed-up is the ratio of the two medians; its spread is the range of the
ratios of the rounds' medians (:func:`prunevision.metrics.speedup`), shown beside it wherever a speed-up is shown.
"""

from __future__ import annotations

import gzip
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch_pruning as tp
from torch import nn


def macs_and_params(model: nn.Module, image_size: int) -> tuple[int, int]:
    """Multiply-accumulates of one image and the parameter count."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    macs, params = tp.utils.count_ops_and_params(model, torch.zeros(1, 3, image_size, image_size, device=dev))
    model.train(was)
    return int(macs), int(params)


def size_on_disk(model: nn.Module) -> tuple[int, int]:
    """Bytes of the saved weights (safetensors), raw and gzip-compressed (level 6).

    Masked weights stay full size raw; their zeros only show in the compressed size.
    """
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in model.state_dict().items()}
    raw = save(tensors)
    return len(raw), len(gzip.compress(raw, compresslevel=6))


def _summary(times_s: list[float], round_medians_s: list[float]) -> dict[str, Any]:
    a = np.asarray(times_s) * 1000.0
    p10, p25, p75, p90 = (float(v) for v in np.percentile(a, [10, 25, 75, 90]))
    return {"median_ms": float(np.median(a)), "p10_ms": p10, "p25_ms": p25, "p75_ms": p75, "p90_ms": p90,
            "runs": int(len(a)), "round_medians_ms": [1000.0 * float(r) for r in round_medians_s]}


def _interleaved(fns: dict[str, Callable[[], None]], runs: int, warmup: int, rounds: int = 5) -> dict[str, dict]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    per_round_medians: dict[str, list[float]] = {k: [] for k in fns}
    per_round = max(1, -(-runs // rounds))
    for _ in range(rounds):
        for k, fn in fns.items():
            these = []
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                these.append(time.perf_counter() - t0)
            times[k] += these
            per_round_medians[k].append(float(np.median(these)))
    return {k: _summary(v, per_round_medians[k]) for k, v in times.items()}


def ort_timing_session(model: str | Path | bytes, threads: int, quiet: bool = False):
    """An ONNX Runtime CPU session set up as every latency in prunevision is measured (a trial's
    ``latency_ms`` and the latency budgets' table alike, so that the two agree): ``threads`` intra-op
    threads, one inter-op thread, all graph optimisations. ``quiet``: warnings not logged."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if quiet:
        so.log_severity_level = 3
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), so,
                                providers=["CPUExecutionProvider"])


def time_sessions(sessions: dict[str, Any], inputs: dict[str, np.ndarray], runs: int, warmup: int) -> dict[str, dict]:
    """Each ONNX Runtime session run on its own input, interleaved in rounds (:func:`_interleaved`)."""
    fns = {}
    for k, sess in sessions.items():
        name = sess.get_inputs()[0].name
        fns[k] = (lambda s=sess, n=name, x=inputs[k]: s.run(None, {n: x}))
    return _interleaved(fns, runs, warmup)


def onnx_latency(paths: dict[str, str | Path], image_size: int, batch: int = 1, runs: int = 30, warmup: int = 10,
                 threads: int = 1) -> dict[str, dict]:
    """ONNX Runtime CPU latency of each model, measured in the same run."""
    x = np.random.default_rng(0).standard_normal((batch, 3, image_size, image_size)).astype(np.float32)
    out = time_sessions({k: ort_timing_session(p, threads) for k, p in paths.items()}, {k: x for k in paths},
                        runs, warmup)
    for v in out.values():
        v.update({"batch": batch, "threads": threads, "engine": "onnxruntime-cpu"})
    return out


def torch_latency(models: dict[str, nn.Module], image_size: int, device: torch.device | str, batch: int = 1,
                  runs: int = 30, warmup: int = 10, threads: int | None = None) -> dict[str, dict]:
    """PyTorch eager latency on ``device`` (CUDA synchronised around each run)."""
    device = torch.device(device)
    old_threads = torch.get_num_threads()
    if threads and device.type == "cpu":
        torch.set_num_threads(threads)
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fns = {}
    for k, m in models.items():
        m.eval().to(device)

        def run(m=m):
            with torch.inference_mode():
                m(x)
            sync()

        fns[k] = run
    try:
        out = _interleaved(fns, runs, warmup)
    finally:
        torch.set_num_threads(old_threads)
    for v in out.values():
        v.update({"batch": batch, "threads": threads or old_threads, "engine": f"torch-eager-{device.type}"})
    return out

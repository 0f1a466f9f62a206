"""One full gated trial on a CUDA GPU, without Ray: training time, images/s, GPU utilisation and
memory, dense and pruned accuracy, and GPU latency of the dense against the pruned network.

The trial is the self-pruning issue's GPU target: resnet18 on the whole CIFAR-10 training set at
``gates.target_macs=0.33``, trained, pruned, fine-tuned, measured and exported by
``prunevision.pipeline.run_training`` (what a sweep trial runs), on one GPU. Targets (issue 11):
dense ≥ 94 % in ≤ 60 s of training on an H100-class GPU; pruned ≥ 93.5 % at ≥ 2.5× measured speed-up.

    python benchmarks/gpu_trial.py --data ../shared/data/cifar10-jpeg.tar.gz   # a machine with a GPU
    python benchmarks/gpu_trial.py --smoke-test                                # CPU, tiny, seconds

It imports torch, torchvision, onnx, onnxruntime, torch-pruning, safetensors, pyyaml, numpy and
matplotlib (plots) — never Ray, MLflow or pandas — so it runs where Ray is not installed.

- GPU utilisation: sampled every 0.2 s in a thread, through NVML (``pynvml``, from the
  nvidia-ml-py wheel) when it imports, else a streaming ``nvidia-smi --query-gpu ... -lms 200``;
  the result names its source. NVML's figure is the share of each sample period in which at least
  one kernel ran, not how busy the GPU's cores were.
- Memory: ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` over the whole trial (the
  dataset lives on the GPU), and the most the driver reported in use.
- Latency: eager PyTorch on the GPU, timed with CUDA events around each batch (the CPU clock on
  the CPU), after warm-up, dense and pruned interleaved in rounds whose order alternates; median
  with the 10th-90th percentiles. fp32, and bf16 autocast with channels_last where the GPU has
  bf16 (the way training runs). The ONNX Runtime CPU figures come from the trial itself.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS_MD, append_results, md_table, run_main, write_raw  # noqa: E402
from prunevision.cliargs import add_set_argument  # noqa: E402

TRIAL = {
    "model": {"name": "resnet18"},
    "data": {"name": "cifar10", "batch_size": 512, "eval_batch_size": 1024},
    "gates": {"target_macs": 0.33, "warmup_epochs": 2, "lr": 0.05},
    "train": {"epochs": 16, "lr": 0.2, "optimizer": "sgd", "lr_schedule": "onecycle", "label_smoothing": 0.1,
              "device": "cuda"},
    "prune": {"finetune_epochs": 2, "round_to": 8},
    "measure": {"batch": 256, "runs": 50, "warmup": 10, "threads": 1},
}
SMOKE = {"model.name": "small_cnn", "data.name": "synthetic", "data.synthetic_train": 128, "data.synthetic_test": 32,
         "data.image_size": 16, "data.batch_size": 32, "data.eval_batch_size": 32, "train.epochs": 1,
         "train.device": "cpu", "gates.warmup_epochs": 0, "prune.finetune_epochs": 1, "measure.batch": 8,
         "measure.runs": 30, "measure.warmup": 1, "measure.exporter": "torchscript"}
TARGETS = {"dense_accuracy": 0.94, "train_s": 60.0, "pruned_accuracy": 0.935, "speedup": 2.5}


class GpuSampler:
    """Utilisation (%) and memory in use (MiB) of one GPU, sampled in a thread."""

    def __init__(self, device, interval: float = 0.2):
        self.interval, self.samples = interval, []  # (time, utilisation %, memory MiB)
        self.source, self._stop, self._thread, self._proc = "unavailable", threading.Event(), None, None
        self.gpu = _gpu_identity(device)

    def start(self) -> GpuSampler:
        if self.gpu is None:
            return self
        try:
            import pynvml

            pynvml.nvmlInit()
            h = (pynvml.nvmlDeviceGetHandleByUUID(self.gpu) if self.gpu.startswith("GPU-")
                 else pynvml.nvmlDeviceGetHandleByIndex(int(self.gpu)))
            self.source = "NVML (pynvml)"
            self._thread = threading.Thread(target=self._nvml, args=(pynvml, h), daemon=True)
        except Exception:  # no pynvml, or NVML refuses: the nvidia-smi tool
            if shutil.which("nvidia-smi") is None:
                return self
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                 "-i", self.gpu, "-lms", str(int(self.interval * 1000))],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self.source = "nvidia-smi --query-gpu -lms 200"
            self._thread = threading.Thread(target=self._smi, daemon=True)
        self._thread.start()
        return self

    def _nvml(self, pynvml, h) -> None:
        while not self._stop.is_set():
            u, m = pynvml.nvmlDeviceGetUtilizationRates(h), pynvml.nvmlDeviceGetMemoryInfo(h)
            self.samples.append((time.time(), float(u.gpu), m.used / 2**20))
            self._stop.wait(self.interval)

    def _smi(self) -> None:
        for line in self._proc.stdout:
            try:
                util, mem = (float(v) for v in line.split(","))
            except ValueError:
                continue
            self.samples.append((time.time(), util, mem))

    def stop(self) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def summary(self, t0: float, t1: float) -> dict:
        s = [x for x in self.samples if t0 <= x[0] <= t1]
        if not s:
            return {"source": self.source, "samples": 0}
        util = sorted(u for _, u, _ in s)
        return {"source": self.source, "samples": len(s), "mean_util_pct": sum(util) / len(util),
                "median_util_pct": util[len(util) // 2], "max_memory_used_mib": max(m for _, _, m in s)}


def _gpu_identity(device) -> str | None:
    """How NVML and nvidia-smi name the GPU torch calls ``device`` (they ignore CUDA_VISIBLE_DEVICES):
    its UUID where torch gives it, else its index."""
    import torch

    if torch.device(device).type != "cuda":
        return None
    idx = torch.device(device).index or 0
    uuid = str(getattr(torch.cuda.get_device_properties(idx), "uuid", "") or "")
    if uuid:
        return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[idx] if idx < len(visible) else str(idx)


def spread(times_ms: list[float]) -> dict:
    a = sorted(times_ms)

    def q(p: float) -> float:
        return a[min(len(a) - 1, max(0, math.ceil(p * len(a)) - 1))]

    return {"median_ms": q(0.5), "p10_ms": q(0.1), "p90_ms": q(0.9), "runs": len(a)}


def latency(models: dict, size: int, device, batch: int, runs: int, warmup: int, bf16: bool,
            rounds: int = 10, threads: int = 1) -> dict[str, dict]:
    """Per-batch latency of each model, interleaved in ``rounds`` (the order alternates); on the
    CPU with ``threads`` threads (measure.threads, as the trial's own measurements)."""
    import torch

    device = torch.device(device)
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(threads)
    fmt = torch.channels_last if bf16 else torch.contiguous_format
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    for m in models.values():
        m.eval().to(device).to(memory_format=fmt)

    def once(m) -> float:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            if not cuda:
                t0 = time.perf_counter()
                m(x)
                return (time.perf_counter() - t0) * 1000
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            m(x)
            end.record()
            end.synchronize()
            return start.elapsed_time(end)

    for m in models.values():
        for _ in range(warmup):
            once(m)
    times: dict[str, list[float]] = {k: [] for k in models}
    names = list(models)
    for r in range(rounds):
        for k in names if r % 2 == 0 else names[::-1]:
            times[k] += [once(models[k]) for _ in range(max(1, -(-runs // rounds)))]
    return {k: dict(spread(v), batch=batch, precision="bf16 autocast, channels_last" if bf16 else "fp32",
                    timer="CUDA events" if cuda else "perf_counter") for k, v in times.items()}


def dense_and_pruned(out: Path, device):
    """The trained network with its gates folded in (nothing removed) and the pruned one."""
    from prunevision.checkpoint import load_pruned
    from prunevision.models import build_gated_model
    from prunevision.prune import strip_gates
    from prunevision.train import load_checkpoint

    ckpt = load_checkpoint(out / "checkpoint.pt")  # written after gated training, before pruning
    cfg = ckpt["config"]
    dense = build_gated_model(cfg.model, cfg.gates, cfg.model.num_classes, int(ckpt["image_size"]), pretrained=False)
    dense.load_state_dict(ckpt["model"])
    return strip_gates(dense).to(device), load_pruned(out / "pruned.safetensors", device)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=None, help="CIFAR-10 root or archive (data.root)")
    add_set_argument(ap, "override trial config keys (e.g. train.epochs=20)")
    ap.add_argument("--latency-batches", default="1,256", help="batch sizes timed on the GPU (comma-separated)")
    ap.add_argument("--latency-runs", type=int, default=200, help="timed batches per model and batch size")
    ap.add_argument("--latency-warmup", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results/gpu_trial.json")
    ap.add_argument("--results-md", default=str(RESULTS_MD), help="where to append the table ('' for nowhere)")
    ap.add_argument("--smoke-test", action="store_true",
                    help="CPU, synthetic data, small_cnn, 2 epochs, few latency runs; appends nothing")
    args = ap.parse_args()

    import torch

    from prunevision.config import from_dict, parse_overrides
    from prunevision.pipeline import run_training

    overrides = parse_overrides(args.overrides)
    if args.data:
        overrides["data.root"] = args.data
    if importlib.util.find_spec("onnxscript") is None:  # the dynamo ONNX exporter needs it
        overrides.setdefault("measure.exporter", "torchscript")
    batches = [int(b) for b in args.latency_batches.split(",")]
    runs, warmup = args.latency_runs, args.latency_warmup
    if args.smoke_test:
        overrides = {**SMOKE, **overrides}
        batches, runs, warmup = [1, 8], 10, 1
    cfg = from_dict(TRIAL, overrides)
    device = torch.device(cfg.train.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_trial: no CUDA GPU here; --smoke-test runs on the CPU", file=sys.stderr)
        return 2
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    epoch_ends: list[float] = []
    sampler = GpuSampler(device).start()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        t0 = time.time()
        try:
            m = run_training(cfg, out, log=print, reporter=lambda record, save: epoch_ends.append(time.time()))
        finally:
            t_end = time.time()
            sampler.stop()
        peak = {"max_memory_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20,
                "max_memory_reserved_mib": torch.cuda.max_memory_reserved(device) / 2**20} if cuda else {}
        dense, pruned = dense_and_pruned(out, device)
        size = m["input"]["size"]
        lat = {}
        for bf16 in ([False, True] if cuda and torch.cuda.is_bf16_supported() else [False]):
            for b in batches:
                lat[f"{'bf16' if bf16 else 'fp32'}_b{b}"] = latency({"dense": dense, "pruned": pruned}, size, device,
                                                                   b, runs, warmup, bf16, threads=cfg.measure.threads)
    gated = [r for r in m["history"] if not r.get("phase")]
    train_window = (epoch_ends[0] - gated[0]["epoch_time_s"], epoch_ends[len(gated) - 1])
    epoch_s = sum(r["epoch_time_s"] for r in gated)
    result = {
        "device": str(device), "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
        "train_images": m["dataset"]["train_images"], "epochs": len(gated),
        "train_s": m["timings"]["train_s"],  # gated training, per-epoch evaluation included
        "train_epochs_s": epoch_s,  # the training steps alone
        "images_per_s": sum(r["images_per_s"] * r["epoch_time_s"] for r in gated) / epoch_s,
        "trial_s": t_end - t0, "timings": m["timings"],
        "gpu_utilisation_training": sampler.summary(*train_window), "gpu_utilisation_trial": sampler.summary(t0, t_end),
        **peak,
        "accuracy_dense": m["accuracy_dense"], "accuracy_pruned": m["accuracy"],
        "val_accuracy_dense": m["val_accuracy_dense"], "val_accuracy_pruned": m["val_accuracy"],
        "macs_share": m["macs_share"], "target_macs": m.get("target_macs"), "param_sparsity": m["param_sparsity"],
        "ort_cpu_b1_speedup": m.get("latency_speedup"),
        "ort_cpu_b1_ms": [m.get("latency_ms_dense"), m.get("latency_ms")],
        "latency": lat, "speedup": {k: v["dense"]["median_ms"] / v["pruned"]["median_ms"] for k, v in lat.items()},
    }
    table = md_table(report_rows(result), ["figure", "value"])
    print(table)
    write_raw(args.out, m["config"], [result])
    if not args.smoke_test and args.results_md:
        append_results("One gated trial on a GPU, no Ray (`benchmarks/gpu_trial.py`)",
                       f"{table}\n\n{verdict(result)} Raw: `{args.out}`.\n", args.results_md)
    return 0


def _pct(v) -> str:
    return f"{v:.2%}" if isinstance(v, (int, float)) else "—"


def report_rows(r: dict) -> list[dict]:
    u = r["gpu_utilisation_training"]
    util = (f"{u['mean_util_pct']:.0f} % mean, {u['median_util_pct']:.0f} % median ({u['samples']} samples, "
            f"{u['source']})" if u.get("samples") else f"not sampled ({u['source']})")
    rows = [
        {"figure": "device", "value": f"{r['gpu'] or r['device']} (torch {r['torch']}, CUDA {r['cuda']})"},
        {"figure": f"gated training, {r['epochs']} epochs of {r['train_images']:,} images",
         "value": f"{r['train_s']:.1f} s ({r['train_epochs_s']:.1f} s of training steps; whole trial "
                  f"{r['trial_s']:.1f} s)"},
        {"figure": "training throughput", "value": f"{r['images_per_s']:,.0f} images/s"},
        {"figure": "GPU utilisation while training", "value": util},
        {"figure": "peak GPU memory (torch allocated / reserved)",
         "value": (f"{r['max_memory_allocated_mib']:,.0f} / {r['max_memory_reserved_mib']:,.0f} MiB"
                   if "max_memory_allocated_mib" in r else "— (CPU)")},
        {"figure": "test accuracy, dense (gates folded in) → pruned + fine-tuned",
         "value": f"{_pct(r['accuracy_dense'])} → {_pct(r['accuracy_pruned'])}"},
        {"figure": "MACs share (requested → achieved), parameter sparsity",
         "value": f"{r['target_macs']} → {r['macs_share']:.3f}, {_pct(r['param_sparsity'])}"},
    ]
    for k, v in r["latency"].items():
        d, p = v["dense"], v["pruned"]
        rows.append({"figure": f"latency {v['dense']['precision']}, batch {d['batch']} ({d['timer']})",
                     "value": f"dense {d['median_ms']:.3f} ms [{d['p10_ms']:.3f}–{d['p90_ms']:.3f}], pruned "
                              f"{p['median_ms']:.3f} ms [{p['p10_ms']:.3f}–{p['p90_ms']:.3f}]: "
                              f"**{r['speedup'][k]:.2f}×**"})
    if r["ort_cpu_b1_speedup"]:
        rows.append({"figure": "ONNX Runtime CPU, batch 1 (in the trial)",
                     "value": f"{r['ort_cpu_b1_ms'][0]:.3f} → {r['ort_cpu_b1_ms'][1]:.3f} ms: "
                              f"{r['ort_cpu_b1_speedup']:.2f}×"})
    return rows


def verdict(r: dict) -> str:
    """The figures against issue 11's GPU targets."""
    t = TARGETS
    best = max(r["speedup"].values()) if r["speedup"] else float("nan")
    dense_ok = r["accuracy_dense"] >= t["dense_accuracy"] and r["train_s"] <= t["train_s"]
    pruned_ok = r["accuracy_pruned"] >= t["pruned_accuracy"] and best >= t["speedup"]
    return (f"Targets (H100-class GPU): dense ≥ {t['dense_accuracy']:.0%} in ≤ {t['train_s']:.0f} s of training — "
            f"{_pct(r['accuracy_dense'])} in {r['train_s']:.1f} s: **{'met' if dense_ok else 'not met'}**; "
            f"pruned ≥ {t['pruned_accuracy']:.1%} at ≥ {t['speedup']}× — {_pct(r['accuracy_pruned'])} at {best:.2f}× "
            f"(best GPU speed-up measured): **{'met' if pruned_ok else 'not met'}**.")


if __name__ == "__main__":
    sys.exit(run_main(main))

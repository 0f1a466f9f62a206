"""Re-measure the latency of frontier candidates one model at a time.

Latency reported by a trial was measured while other trials shared the machine. Before the final
front is drawn, the candidates (the front and the next ``max_rank`` ranks) are measured again in
this one process, with nothing else of ours running, by the measurement module's method
(warm-up, then timed runs interleaved in rounds, median and 90th percentile), each next to the
dense network it came from. Targets: ONNX Runtime on CPU (the trial's ``model.onnx`` and
``dense.onnx``), or PyTorch eager on cpu/cuda (the pruned safetensors checkpoint; the dense
network rebuilt from the same description).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.pareto import nondominated_ranks

TARGETS = ("onnxruntime-cpu", "torch-cpu", "torch-cuda")


class RemeasureError(RuntimeError):
    pass


def trial_image_size(out: Path) -> int:
    m = json.loads((out / "metrics.json").read_text())
    size = (m.get("input") or {}).get("size") or (m.get("dataset") or {}).get("image_size")
    if not size:
        raise RemeasureError(f"{out}/metrics.json does not say the input size")
    return int(size)


def candidates(df: pd.DataFrame, objectives: Mapping[str, str], max_rank: int = 1, limit: int = 24) -> pd.DataFrame:
    """Complete trials of rank ≤ ``max_rank`` (0 is the front) whose outputs are on disk."""
    done = df[df["status"] == "complete"]
    if done.empty or "output_dir" not in done.columns:
        return done.iloc[0:0]
    ranks = nondominated_ranks(done, objectives)
    pick = done[(ranks >= 0) & (ranks <= max_rank) & done["output_dir"].notna()]
    return pick.loc[ranks[pick.index].sort_values(kind="stable").index].head(limit)


def remeasure(df: pd.DataFrame, objectives: Mapping[str, str], *, target: str = "onnxruntime-cpu", batch: int = 1,
              threads: int = 1, runs: int = 50, warmup: int = 10, max_rank: int = 1, limit: int = 24,
              rows: list | None = None, log=print) -> pd.DataFrame:
    """A copy of ``df`` where the candidates' ``latency_ms`` (and their dense network's) are
    re-measured. The trial's own figures stay in ``latency_ms_trial`` / ``latency_ms_dense_trial``;
    ``latency_remeasured`` says which rows hold new figures, ``latency_target`` on what. ``rows``:
    re-measure these index labels instead of the candidates (on a table re-measured before)."""
    from prunevision.metrics import speedup  # lazily: prunevision imports torch

    if target not in TARGETS:
        raise RemeasureError(f"unknown latency target {target!r}: one of {', '.join(TARGETS)}")
    if batch < 1 or threads < 1 or runs < 1 or warmup < 0:
        raise RemeasureError("batch, threads and runs must be ≥ 1, warmup ≥ 0")
    out = df.copy()
    if "latency_remeasured" not in out.columns:
        for col in ("latency_ms", "latency_ms_p90", "latency_ms_dense", "latency_speedup", "latency_speedup_lo",
                    "latency_speedup_hi"):
            if col in out.columns:
                out[col + "_trial"] = out[col]
        out["latency_remeasured"] = False
        out["latency_target"] = "trial (onnxruntime-cpu b1, shared machine)"
    cand = candidates(df, objectives, max_rank, limit) if rows is None else df.loc[rows]
    if cand.empty:
        return out
    # one dense network per architecture (trials of one model share it)
    dense_of: dict[Any, str] = {}
    groups: dict[str, list] = {}
    for idx, row in cand.iterrows():
        key = row.get("params_dense", np.nan)
        key = "dense" if pd.isna(key) else f"dense-{int(key)}"
        dense_of.setdefault(key, row["output_dir"])
        groups.setdefault(key, []).append(idx)
    for key, rows in groups.items():
        dense_dir = Path(dense_of[key])
        size = trial_image_size(dense_dir)
        if log:
            log(f"re-measuring {len(rows)} candidate(s) and their dense network on {target}, batch {batch}, "
                f"{threads} thread(s), {runs} runs each")
        res = _measure(target, {"dense": dense_dir, **{str(i): Path(cand.at[i, "output_dir"]) for i in rows}},
                       size, batch=batch, threads=threads, runs=runs, warmup=warmup)
        for i in rows:
            out.at[i, "latency_ms"] = res[str(i)]["median_ms"]
            out.at[i, "latency_ms_p90"] = res[str(i)]["p90_ms"]
            out.at[i, "latency_ms_dense"] = res["dense"]["median_ms"]
            sp = speedup(res["dense"], res[str(i)])
            out.at[i, "latency_speedup"] = sp["median"]
            out.at[i, "latency_speedup_lo"], out.at[i, "latency_speedup_hi"] = sp["lo"], sp["hi"]
            out.at[i, "latency_remeasured"] = True
            out.at[i, "latency_target"] = f"{target} b{batch} t{threads} (re-measured)"
    return out


def _measure(target: str, dirs: dict[str, Path], size: int, **kw) -> dict[str, dict]:
    from prunevision.measure import onnx_latency, torch_latency

    if target == "onnxruntime-cpu":
        paths = {k: d / ("dense.onnx" if k == "dense" else "model.onnx") for k, d in dirs.items()}
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            raise RemeasureError(f"ONNX file(s) missing for re-measurement: {', '.join(missing[:3])}")
        return onnx_latency(paths, size, **kw)
    import torch

    from prunevision.checkpoint import load_pruned, read_pruned
    from prunevision.models import create_model
    from prunevision.prune import strip_gates

    device = "cuda" if target == "torch-cuda" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RemeasureError("latency target torch-cuda, but PyTorch sees no CUDA device")
    models = {}
    for k, d in dirs.items():
        if k == "dense":
            meta, _ = read_pruned(d / "pruned.safetensors")
            from prunevision.config import ModelConfig

            mcfg = ModelConfig(**{a: tuple(v) if isinstance(v, list) else v for a, v in meta["model"].items()})
            models[k] = strip_gates(create_model(mcfg, int(meta["num_classes"]), int(meta["image_size"]),
                                                 pretrained=False))
        else:
            models[k] = load_pruned(d / "pruned.safetensors")
    return torch_latency(models, size, device, batch=kw["batch"], runs=kw["runs"], warmup=kw["warmup"],
                         threads=kw["threads"])

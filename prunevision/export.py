"""ONNX export, checked: onnx.checker, then ONNX Runtime against PyTorch.

The file is written under a temporary name and moved into place only after the check passes,
so a failed export leaves nothing half-written behind.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

TOLERANCE = 1e-4  # fp32: ONNX Runtime and PyTorch must agree to this max absolute difference


class ExportError(RuntimeError):
    """Export failed or the exported model does not match PyTorch."""


def export_onnx(
    model: nn.Module,
    path: str | Path,
    image_size: int,
    *,
    check_inputs: Iterable[torch.Tensor] = (),
    exporter: str = "dynamo",
    tolerance: float = TOLERANCE,
    seed: int = 0,
) -> dict:
    """Export ``model`` (input N×3×S×S, dynamic batch) and verify it. Returns the check results."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu().float()
    g = torch.Generator().manual_seed(seed)
    example = torch.randn(2, 3, image_size, image_size, generator=g)
    tmp = path.with_name(path.name + ".tmp.onnx")
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                batch = torch.export.Dim("batch", min=1, max=4096)
                torch.onnx.export(model, (example,), str(tmp), dynamo=True, input_names=["input"],
                                  output_names=["logits"], dynamic_shapes=({0: batch},), verbose=False,
                                  external_data=False)
            elif exporter == "torchscript":
                torch.onnx.export(model, (example,), str(tmp), dynamo=False, input_names=["input"],
                                  output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                                  opset_version=17)
            else:
                raise ExportError(f"unknown exporter {exporter!r} (dynamo or torchscript)")
        import onnx

        onnx.checker.check_model(str(tmp))
        inputs = [torch.randn(1, 3, image_size, image_size, generator=g),
                  torch.randn(5, 3, image_size, image_size, generator=g)] + [x.cpu().float() for x in check_inputs]
        diffs = _compare(model, tmp, inputs)
        max_diff = max(diffs)
        if not np.isfinite(max_diff) or max_diff > tolerance:
            raise ExportError(f"ONNX Runtime output differs from PyTorch by {max_diff:.3g} (> {tolerance:g})")
        os.replace(tmp, path)
    except ExportError:
        _remove(tmp)
        raise
    except Exception as e:
        _remove(tmp)
        raise ExportError(f"ONNX export to {path} failed: {' '.join(str(e).split())[:300]}") from e
    return {"path": str(path), "max_abs_diff": max_diff, "checked_batches": len(inputs), "exporter": exporter,
            "size_bytes": path.stat().st_size}


def _compare(model: nn.Module, onnx_path: Path, inputs: list[torch.Tensor]) -> list[float]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    diffs = []
    with torch.no_grad():
        for x in inputs:
            ref = model(x).numpy()
            got = sess.run(None, {name: x.numpy()})[0]
            if got.shape != ref.shape:
                raise ExportError(f"ONNX output shape {got.shape} != PyTorch {ref.shape}")
            diffs.append(float(np.abs(got - ref).max()))
    return diffs


def _remove(p: Path) -> None:
    for q in (p, p.with_name(p.name + ".data")):
        try:
            q.unlink()
        except FileNotFoundError:
            pass

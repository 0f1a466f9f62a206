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

# fp32: ONNX Runtime and PyTorch must agree to within ATOL + RTOL·max|PyTorch output| (per batch), so
# that the check scales with the logits: a correct export with logits near 4e4 passes, a broken one
# with logits near 1e-6 does not. Within it, ONNX Runtime picks PyTorch's top-1 class wherever that
# class leads its runner-up by more than twice the tolerance.
ATOL = 1e-6
RTOL = 1e-4
TOLERANCE = ATOL  # the absolute part (kept under its old name)


class ExportError(RuntimeError):
    """Export failed or the exported model does not match PyTorch."""


def export_onnx(
    model: nn.Module,
    path: str | Path,
    image_size: int,
    *,
    check_inputs: Iterable[torch.Tensor] = (),
    exporter: str = "dynamo",
    tolerance: float = ATOL,
    rtol: float = RTOL,
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
        check = compare_outputs(model, tmp, inputs, atol=tolerance, rtol=rtol)
        os.replace(tmp, path)
    except ExportError:
        _remove(tmp)
        raise
    except Exception as e:
        _remove(tmp)
        raise ExportError(f"ONNX export to {path} failed: {' '.join(str(e).split())[:300]}") from e
    return {"path": str(path), **check, "checked_batches": len(inputs), "exporter": exporter,
            "size_bytes": path.stat().st_size}


def compare_outputs(model: nn.Module, onnx_path: Path, inputs: list[torch.Tensor], *, atol: float = ATOL,
                    rtol: float = RTOL) -> dict:
    """Run PyTorch and ONNX Runtime on each batch; raise :class:`ExportError` when they differ by
    more than ``atol + rtol·max|ref|``. Within that, the top-1 class can change only where its lead
    over the runner-up is under twice the tolerance. Returns the largest differences, absolute and
    relative to the output's scale, the top-1 agreement and how many images had a clear top-1."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    max_abs, max_rel, agree, sure, total = 0.0, 0.0, 0, 0, 0
    with torch.no_grad():
        for x in inputs:
            ref = model(x).numpy()
            got = sess.run(None, {name: x.numpy()})[0]
            if got.shape != ref.shape:
                raise ExportError(f"ONNX output shape {got.shape} != PyTorch {ref.shape}")
            diff = float(np.abs(got - ref).max())
            scale = float(np.abs(ref).max())
            tol = atol + rtol * scale
            if not np.isfinite(diff) or diff > tol:
                raise ExportError(f"ONNX Runtime output differs from PyTorch by {diff:.3g} (> {tol:.3g}: "
                                  f"{atol:g} + {rtol:g}·{scale:.3g}, the output's scale)")
            max_abs, max_rel = max(max_abs, diff), max(max_rel, diff / scale if scale > 0 else 0.0)
            if ref.ndim == 2 and ref.shape[1] > 1:
                # within the tolerance, only a class whose lead is under 2·tol can change: count
                # those (ties) and the agreement
                top2 = np.sort(ref, axis=1)[:, -2:]
                sure += int(((top2[:, 1] - top2[:, 0]) > 2 * tol).sum())
                agree += int((ref.argmax(1) == got.argmax(1)).sum())
                total += len(ref)
    return {"max_abs_diff": max_abs, "max_rel_diff": max_rel, "atol": atol, "rtol": rtol,
            "top1_agreement": agree / total if total else None, "top1_checked": sure}


def _remove(p: Path) -> None:
    for q in (p, p.with_name(p.name + ".data")):
        try:
            q.unlink()
        except FileNotFoundError:
            pass

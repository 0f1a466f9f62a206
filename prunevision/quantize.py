"""Static INT8 quantization of an exported ONNX model with ONNX Runtime, and its verification.

:func:`quantize_static_int8` runs ``onnxruntime.quantization.quantize_static`` (QDQ format,
per-channel symmetric INT8 weights, 8-bit activations) after ``quant_pre_process`` (shape inference
and ONNX Runtime's graph optimisations, which fold BatchNorm into the convolutions first),
calibrated on images fed exactly as the fp32 model is fed (:func:`calibration_images`: a seeded
sample of training images, normalised). :func:`quantize_and_verify` then checks what came out:
the graph holds quantized layers (:func:`int8_structure`), top-1 accuracy of the fp32 and INT8
files under ONNX Runtime on the validation and test images and their top-1 agreement
(:func:`compare_accuracy`), sizes on disk raw and gzip-compressed, and ONNX Runtime CPU latency of
both at batch 1 and a larger batch, interleaved in rounds (:func:`latency_pair`). The INT8 file is
moved into place only when its accuracy drop (validation split, else the test split) is within
the limit, or when forced; a refused or failed quantization leaves nothing at the destination.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import math
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_CALIBRATION_SIZE = 256
DEFAULT_MAX_DROP = 1.0  # points of top-1 accuracy (percentage points)
LATENCY_BATCHES = (1, 32)
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
# Activations: uint8 (asymmetric) by default. With int8 weights that is ONNX Runtime's U8S8, which its
# x86 CPU kernels fuse into QLinearConv/QLinearAdd throughout; with int8 activations (S8S8) ONNX Runtime
# 1.31 left 12 of resnet18's 20 convolutions and every residual Add in float between Q/DQ pairs, and
# the model was no faster than fp32 (benchmarks/RESULTS.md, 2026-11-22). On x86 CPUs without VNNI,
# U8S8 can saturate (ONNX Runtime's docs); the accuracy check after quantization is what catches it.
ACTIVATION_TYPES = ("uint8", "int8")
_WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_INT8_KERNELS = ("QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
                 "QLinearAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu", "ConvInteger",
                 "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat")


class QuantizeError(RuntimeError):
    """INT8 quantization or its verification failed, or the INT8 model was refused."""


class Int8Refused(QuantizeError):
    """The INT8 model was quantized and measured but loses more accuracy than allowed.
    ``report`` holds every figure measured (as :func:`quantize_and_verify` returns them)."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report


def int8_path(fp32_path: str | Path) -> Path:
    """Where the INT8 model of ``fp32_path`` goes: ``model.onnx`` → ``model.int8.onnx``."""
    p = Path(fp32_path)
    return p.with_name(f"{p.stem}.int8{p.suffix or '.onnx'}")


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sizes(path: str | Path) -> dict[str, int]:
    """Bytes on disk and gzip-compressed (level 6, as :func:`prunevision.measure.size_on_disk`)."""
    raw = Path(path).read_bytes()
    return {"bytes": len(raw), "gzip_bytes": len(gzip.compress(raw, compresslevel=6))}


def _msg(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


# --------------------------------------------------------------------------- calibration data


def calibration_images(data, n: int, seed: int = 0, mean=None, std=None, batch_size: int = 64) -> np.ndarray:
    """``n`` images of ``data``'s training split (a seeded sample without replacement; all of them
    when there are fewer), preprocessed exactly as the model is fed: float32 N×3×S×S, scaled and
    normalised by ``mean``/``std`` (default: the dataset's). The validation split is held out of
    the training images, so calibration never sees an image the INT8 model is verified on."""
    import torch

    from prunevision.data import DeviceLoader

    if n < 1:
        raise QuantizeError(f"empty calibration set: the calibration size is {n}; INT8 calibration needs at least "
                            "one training image")
    total = len(data.train_y)
    if total == 0:
        raise QuantizeError(f"empty calibration set: {data.name} has no training images to calibrate INT8 on")
    idx = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].sort().values
    idx = idx.to(data.train_y.device)
    loader = DeviceLoader(data.train_x[idx], data.train_y[idx], batch_size, mean or data.mean, std or data.std,
                          train=False)
    return np.concatenate([xb.detach().cpu().float().numpy() for xb, _ in loader])


def split_batches(data, split: str, batch_size: int = 256, mean=None, std=None
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The ``val`` or ``test`` split of ``data`` as (images, labels) numpy batches, fed as the model is."""
    from prunevision.data import DeviceLoader

    x, y = {"val": (data.val_x, data.val_y), "test": (data.test_x, data.test_y)}[split]
    if len(y) == 0:
        return iter(())
    loader = DeviceLoader(x, y, batch_size, mean or data.mean, std or data.std, train=False)
    return ((xb.detach().cpu().float().numpy(), yb.detach().cpu().numpy()) for xb, yb in loader)


def _reader(x: np.ndarray, input_name: str, batch_size: int):
    from onnxruntime.quantization import CalibrationDataReader

    class ArrayReader(CalibrationDataReader):
        """Batches of preprocessed images for ONNX Runtime's calibrator."""

        def __init__(self) -> None:
            self.i = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.i >= len(x):
                return None
            b = x[self.i : self.i + batch_size]
            self.i += batch_size
            return {input_name: np.ascontiguousarray(b, dtype=np.float32)}

        def rewind(self) -> None:
            self.i = 0

    return ArrayReader()


# --------------------------------------------------------------------------- quantization


@contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's quantizer logs advice through ``logging`` on every call; keep it to errors."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _input_name(path: Path) -> str:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    names = [i.name for i in m.graph.input if i.name not in inits]
    if len(names) != 1:
        raise QuantizeError(f"{path.name}: expected one image input, found {len(names)} ({', '.join(names[:4])})")
    return names[0]


def quantize_static_int8(fp32_path: str | Path, dst: str | Path, calibration: np.ndarray, *, per_channel: bool = True,
                         method: str = "minmax", activations: str = "uint8", batch_size: int = 32,
                         preprocess: bool = True) -> dict[str, Any]:
    """Write the statically quantized (QDQ, INT8 weights per channel, 8-bit activations) model of
    ``fp32_path`` to ``dst``, calibrated on ``calibration`` (preprocessed images, N×3×S×S float32).
    Returns how it was made. Raises :class:`QuantizeError` when calibration or quantization fails."""
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path, dst = Path(fp32_path), Path(dst)
    if method not in CALIBRATION_METHODS:
        raise QuantizeError(f"unknown calibration method {method!r}: one of {', '.join(CALIBRATION_METHODS)}")
    if activations not in ACTIVATION_TYPES:
        raise QuantizeError(f"unknown activation type {activations!r}: one of {', '.join(ACTIVATION_TYPES)}")
    calibration = np.asarray(calibration)
    if calibration.ndim != 4 or len(calibration) == 0:
        raise QuantizeError(f"empty calibration set: calibration images of shape {calibration.shape}, expected "
                            "N×3×S×S with N ≥ 1")
    if not np.isfinite(calibration).all():
        raise QuantizeError("calibration images hold non-finite values")
    calib = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
             "percentile": CalibrationMethod.Percentile}[method]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="prunevision-int8-") as tmp:
        src, pre_note = fp32_path, None
        if preprocess:
            pre = Path(tmp) / "preprocessed.onnx"
            try:
                with _quiet():
                    quant_pre_process(str(fp32_path), str(pre))
                src = pre
            except Exception as e:  # quantization works without it, only less well: say so
                pre_note = f"pre-processing skipped ({_msg(e)})"
        name = _input_name(src)
        try:
            with _quiet():
                quantize_static(str(src), str(dst), _reader(calibration, name, batch_size),
                                quant_format=QuantFormat.QDQ, per_channel=per_channel,
                                activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
                                weight_type=QuantType.QInt8,
                                calibrate_method=calib, extra_options={"WeightSymmetric": True})
        except Exception as e:
            raise QuantizeError(f"INT8 calibration of {fp32_path.name} failed: {_msg(e)}") from e
    if not dst.is_file():
        raise QuantizeError(f"INT8 quantization of {fp32_path.name} wrote no model")
    return {"tool": f"onnxruntime {onnxruntime.__version__} quantize_static", "format": "QDQ",
            "weights": "int8, symmetric, per channel" if per_channel else "int8, symmetric, per tensor",
            "activations": f"{activations}, asymmetric, per tensor", "calibration_method": method,
            "calibration_images": int(len(calibration)), "preprocessed": pre_note is None,
            **({"preprocess_note": pre_note} if pre_note else {}), "seconds": time.perf_counter() - t0}


def int8_structure(path: str | Path) -> dict[str, Any]:
    """What the graph holds: operator counts, INT8 initializers, and how many weight layers
    (Conv, Gemm, MatMul) take their weights from an INT8 tensor through DequantizeLinear (or are
    QLinear operators)."""
    import onnx
    from onnx import TensorProto, numpy_helper

    m = onnx.load(str(path))
    nodes = list(m.graph.node)
    ops = Counter(n.op_type for n in nodes)
    tensors = {t.name: t for t in m.graph.initializer}
    for n in nodes:  # weights some exporters leave in Constant nodes
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.t is not None:
                    tensors[n.output[0]] = a.t
    int8 = {k: t for k, t in tensors.items() if t.data_type in (TensorProto.INT8, TensorProto.UINT8)}
    producer = {o: n for n in nodes for o in n.output}

    def int8_weight(name: str) -> bool:
        n = producer.get(name)
        return n is not None and n.op_type == "DequantizeLinear" and n.input[0] in int8

    layers = [n for n in nodes if n.op_type in _WEIGHT_OPS and len(n.input) > 1]
    quantized = sum(int8_weight(n.input[1]) for n in layers)
    qlinear = sum(v for k, v in ops.items() if k.startswith("QLinear") or k in ("ConvInteger", "MatMulInteger"))
    return {"ops": dict(sorted(ops.items())), "runtime": runtime_kernels(path),
            "quantize_linear": ops.get("QuantizeLinear", 0),
            "dequantize_linear": ops.get("DequantizeLinear", 0), "qlinear_ops": qlinear,
            "int8_initializers": len(int8),
            "int8_weight_bytes": int(sum(numpy_helper.to_array(t).nbytes for t in int8.values())),
            "weight_layers": len(layers) + qlinear, "quantized_weight_layers": quantized + qlinear,
            "float_weight_layers": len(layers) - quantized}


def runtime_kernels(path: str | Path) -> dict[str, Any]:
    """What ONNX Runtime's CPU provider makes of the graph once it has fused it (``ORT_ENABLE_EXTENDED``,
    the level of its QDQ fusions, below the hardware-specific layouts): how many operators run as
    integer kernels (QLinearConv, QLinearAdd, QGemm, ...) and how many weight layers still run in
    float between Q/DQ pairs."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="prunevision-ort-") as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        ops = Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    return {"int8_kernels": sum(ops[k] for k in _INT8_KERNELS),
            "float_weight_ops": sum(ops[k] for k in _WEIGHT_OPS + ("FusedConv", "FusedGemm")),
            "ops": dict(sorted(ops.items()))}


# --------------------------------------------------------------------------- verification


def _session(path: str | Path, threads: int = 0):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def compare_accuracy(fp32_path: str | Path, int8_path: str | Path, batches: Iterable[tuple[np.ndarray, np.ndarray]],
                     threads: int = 0) -> dict[str, Any] | None:
    """Top-1 accuracy of both models under ONNX Runtime on the same (images, labels) batches, how
    often their top-1 agree, and the INT8 logits' mean absolute error relative to the fp32 logits'
    mean magnitude. None when there are no images."""
    try:
        a, b = _session(fp32_path, threads), _session(int8_path, threads)
    except Exception as e:
        raise QuantizeError(f"the INT8 model does not load in ONNX Runtime: {_msg(e)}") from e
    name = a.get_inputs()[0].name
    n = hit32 = hit8 = agree = 0
    err = mag = 0.0
    for x, y in batches:
        out32 = a.run(None, {name: x})[0]
        try:
            out8 = b.run(None, {b.get_inputs()[0].name: x})[0]
        except Exception as e:
            raise QuantizeError(f"the INT8 model fails in ONNX Runtime: {_msg(e)}") from e
        if out8.shape != out32.shape:
            raise QuantizeError(f"the INT8 model's output shape {out8.shape} != the fp32 model's {out32.shape}")
        if not np.isfinite(out8).all():
            raise QuantizeError("the INT8 model gives non-finite outputs")
        p32, p8 = out32.argmax(1), out8.argmax(1)
        n += len(y)
        hit32 += int((p32 == y).sum())
        hit8 += int((p8 == y).sum())
        agree += int((p32 == p8).sum())
        err += float(np.abs(out8 - out32).sum())
        mag += float(np.abs(out32).sum())
    if n == 0:
        return None
    return {"images": n, "fp32": hit32 / n, "int8": hit8 / n, "drop_points": 100.0 * (hit32 - hit8) / n,
            "agreement": agree / n, "relative_logit_error": err / mag if mag > 0 else float("nan")}


def latency_pair(fp32_path: str | Path, int8_path: str | Path, image_size: int, *,
                 batches: Iterable[int] = LATENCY_BATCHES, runs: int = 30, warmup: int = 10, threads: int = 1,
                 extra: Mapping[str, str | Path] | None = None) -> dict[str, Any]:
    """ONNX Runtime CPU latency of both models (and any ``extra`` ones) at each batch size, measured
    in the same run and interleaved in rounds (:func:`prunevision.measure.onnx_latency`): median,
    10th–90th and 25th–75th percentiles; ``speedup`` is the fp32 median over the INT8 median,
    ``speedup_lo``/``speedup_hi`` its spread over the rounds (:func:`prunevision.metrics.speedup`)."""
    from prunevision.measure import onnx_latency
    from prunevision.metrics import speedup

    out = {}
    for b in batches:
        r = onnx_latency({"fp32": fp32_path, "int8": int8_path, **(extra or {})}, image_size, batch=b, runs=runs,
                         warmup=warmup, threads=threads)
        sp = speedup(r["fp32"], r["int8"])
        out[f"batch_{b}"] = {**r, "speedup": sp["median"], "speedup_lo": sp["lo"], "speedup_hi": sp["hi"]}
    return out


def check_max_drop(max_drop: float | None) -> None:
    if max_drop is not None and not (isinstance(max_drop, (int, float)) and math.isfinite(max_drop)
                                     and 0 <= max_drop <= 100):
        raise QuantizeError(f"the maximum INT8 accuracy drop must be a finite number of points in [0, 100], "
                            f"got {max_drop}")


def quantize_and_verify(fp32_path: str | Path, calibration: np.ndarray,
                        splits: Mapping[str, Iterable[tuple[np.ndarray, np.ndarray]]], image_size: int, *,
                        dst: str | Path | None = None, max_drop: float | None = DEFAULT_MAX_DROP,
                        force: bool = False, per_channel: bool = True, method: str = "minmax",
                        activations: str = "uint8",
                        latency_batches: Iterable[int] = LATENCY_BATCHES, runs: int = 30, warmup: int = 10,
                        threads: int = 1, latency_extra: Mapping[str, str | Path] | None = None,
                        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Quantize ``fp32_path``, verify the result and write it to ``dst`` (default
    :func:`int8_path`) only if it passes: its accuracy drop on the first split with images
    (``splits`` in order of preference: validation, then test) is at most ``max_drop`` points
    (None: no limit), or ``force``. Returns the report (the ``int8`` section of a model card).

    Raises :class:`Int8Refused` (with the full report) when the drop is over the limit and
    :class:`QuantizeError` when quantization or verification fails; ``dst`` is then untouched
    (no half-written file: the model is written to a temporary file beside it and moved into place)."""
    import onnxruntime

    check_max_drop(max_drop)
    fp32_path = Path(fp32_path)
    dst = Path(dst) if dst is not None else int8_path(fp32_path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        tmp = tmpdir / dst.name
        if log:
            log(f"INT8: calibrating {fp32_path.name} on {len(calibration)} training image(s) (QDQ, per-channel INT8 "
                f"weights, {method})")
        how = quantize_static_int8(fp32_path, tmp, calibration, per_channel=per_channel, method=method,
                                   activations=activations)
        structure = int8_structure(tmp)
        if structure["quantized_weight_layers"] == 0 or structure["quantize_linear"] + structure["qlinear_ops"] == 0:
            raise QuantizeError(f"INT8 quantization of {fp32_path.name} quantized no layer "
                                f"(operators: {', '.join(f'{k} {v}' for k, v in structure['ops'].items())})")
        if log:
            log(f"INT8: verifying against the fp32 model on the {' and '.join(splits)} images")
        accuracy = {k: compare_accuracy(fp32_path, tmp, v) for k, v in splits.items()}
        measured = [k for k, v in accuracy.items() if v is not None]
        if not measured:
            raise QuantizeError("no validation or test images to verify the INT8 model on")
        on = measured[0]
        drop = accuracy[on]["drop_points"]
        passed = max_drop is None or drop <= max_drop + 1e-9
        sizes = {"fp32": file_sizes(fp32_path), "int8": file_sizes(tmp)}
        sizes["ratio"] = sizes["fp32"]["bytes"] / sizes["int8"]["bytes"]
        sizes["gzip_ratio"] = sizes["fp32"]["gzip_bytes"] / sizes["int8"]["gzip_bytes"]
        if log:
            log(f"INT8: measuring ONNX Runtime CPU latency at batch {', '.join(map(str, latency_batches))}")
        latency = latency_pair(fp32_path, tmp, image_size, batches=latency_batches, runs=runs, warmup=warmup,
                               threads=threads, extra=latency_extra)
        report: dict[str, Any] = {
            "file": str(dst.resolve()), "shipped": False, "forced": bool(force and not passed),
            "quantization": how, "structure": structure, "accuracy": accuracy, "drop_split": on,
            "drop_points": drop, "max_drop_points": max_drop, "passed": passed, "size": sizes, "latency": latency,
            "engine": f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider",
        }
        if not passed and not force:
            a = accuracy[on]
            raise Int8Refused(f"INT8 model refused: {on} accuracy drops {drop:.2f} points (fp32 "
                              f"{100 * a['fp32']:.2f} % -> INT8 {100 * a['int8']:.2f} %, {a['images']} images) > the "
                              f"allowed {max_drop:g}", report)
        report["sha256"] = sha256_of(tmp)
        os.replace(tmp, dst)
        report["shipped"] = True
        return report
    except QuantizeError:
        raise
    except Exception as e:
        raise QuantizeError(f"INT8 verification failed: {_msg(e)}") from e
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)

"""Latency budgets: a per-layer latency table measured with ONNX Runtime, turned into a differentiable
cost model of the network pruning will produce.

``gates.target_latency_ms`` asks for the pruned network's ONNX Runtime CPU latency (batch 1,
``measure.threads`` threads: the ``latency_ms`` a trial reports) instead of a MACs share. Before
training, every convolution and linear layer of the network is timed alone, at its own shape and
input size, twice: at its full width and at half its input and output channels. The
difference of the two times over the difference of their MACs is that layer's milliseconds per
multiply-accumulate: what removing channels from that layer buys. Layers can differ in this (a layer
too small for its width to matter buys nothing; depthwise and small-spatial layers are often less
efficient per MAC than wide convolutions), which a latency budget can use and a MACs budget cannot.

The cost model is the :class:`prunevision.budget.MacsModel` with each layer's MACs weighted by its
slope (norms, activations and pooling by the MAC-weighted mean slope), then fitted to two measurements of
the whole network, as it is and with every prunable group cut to half its channels: a common factor
(a layer timed alone does not cost what it costs inside the optimised graph) and a constant, the part of
the time no width changes (the graph's fixed overhead, large for small networks at batch 1). Its share
of the dense latency is what the budget controller (Lagrangian, projection onto the ramp) drives to
``target_latency_ms / dense latency``, exactly as with a MACs budget, and its floor (every layer at its
width floor) is checked against the request before training. HALP (Shen et al., NeurIPS 2022) allocates
channels with a per-layer latency table in the same spirit; here the table is measured in the run, so
it needs no offline profiling and follows the machine it runs on.

The prediction is a model, not a measurement. Measured on an AVX-512 CPU (benchmarks/RESULTS.md), structures
on the model's budget came out 4–36 % off the request, because ONNX Runtime's convolutions work in blocks of
16 channels there and latency steps with the widths, which a two-point table cannot see. So training also
lands by the clock (:func:`land`): when the final budget is first in force, and again at the end, the
network pruning would produce is timed, and if it is off the request the gates are moved (one common shift
of their scores) to the structure measured nearest it; the budget is held there. The trial then measures the
pruned network again (``latency_ms``) and reports it beside the request (``latency_budget_error``).
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from prunevision.gates import forward_with_hooks
from prunevision.measure import ort_timing_session, time_sessions

# ``macs`` below is a prunevision.budget.MacsModel (budget imports this module, so it is not imported here)
MacsModel = Any

# a layer whose time does not change with its width buys nothing: its slope is 0, not negative noise
MIN_SLOPE = 0.0
LATENCY_BATCH = 1  # the batch of ``latency_ms``, the latency a trial reports


@dataclass
class LayerTiming:
    name: str
    full_ms: float
    half_ms: float
    full_macs: float
    half_macs: float

    @property
    def ms_per_mac(self) -> float:
        d = self.full_macs - self.half_macs
        return max(MIN_SLOPE, (self.full_ms - self.half_ms) / d) if d > 0 else 0.0


def _half(n: int, groups: int = 1) -> int:
    """Half of ``n`` channels, at least one, and a multiple of ``groups``."""
    return max(groups, (n // 2) // groups * groups)


def _standalone(mod: nn.Module, in_shape: tuple[int, ...], half: bool) -> tuple[nn.Module, tuple[int, ...], float]:
    """A copy of ``mod``'s shape (at full or half width) with random weights, its input shape and MACs."""
    if isinstance(mod, nn.Conv2d):
        depthwise = mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels
        if depthwise:
            c = _half(mod.in_channels) if half else mod.in_channels
            c_in, c_out, groups = c, c, c
        else:
            groups = mod.groups
            c_in = _half(mod.in_channels, groups) if half else mod.in_channels
            c_out = _half(mod.out_channels, groups) if half else mod.out_channels
        layer = nn.Conv2d(c_in, c_out, mod.kernel_size, mod.stride, mod.padding, mod.dilation, groups,
                          bias=mod.bias is not None, padding_mode=mod.padding_mode)
        shape = (in_shape[0], c_in, *in_shape[2:])
        with torch.no_grad():
            out = layer(torch.zeros(1, *shape[1:]))
        macs = math.prod(mod.kernel_size) * math.prod(out.shape[2:]) * c_in * c_out / groups
        return layer, shape, float(macs)
    c_in = _half(mod.in_features) if half else mod.in_features
    c_out = _half(mod.out_features) if half else mod.out_features
    layer = nn.Linear(c_in, c_out, bias=mod.bias is not None)
    shape = (in_shape[0], *in_shape[1:-1], c_in)
    return layer, shape, float(math.prod(shape[1:-1]) * c_in * c_out)


def onnx_session(layer: nn.Module, shape: tuple[int, ...], threads: int):
    """``layer`` exported (input ``shape``) into an ONNX Runtime session set up as a trial times its models."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(layer.eval(), (torch.zeros(shape),), buf, dynamo=False, input_names=["x"])
    return ort_timing_session(buf.getvalue(), threads, quiet=True)


def input_shapes(model: nn.Module, example: torch.Tensor) -> dict[int, tuple[int, ...]]:
    """Input shape of every convolution and linear layer in one forward pass (id(module) → shape)."""
    shapes: dict[int, tuple[int, ...]] = {}

    def hook(mod, inp, _out):
        shapes.setdefault(id(mod), tuple(inp[0].shape))

    forward_with_hooks(model, example, [m.register_forward_hook(hook) for m in model.modules()
                                        if isinstance(m, (nn.Conv2d, nn.Linear))])
    return shapes


def time_layers(named: list[tuple[str, nn.Module]], shapes: dict[int, tuple[int, ...]], *, batch: int,
                threads: int, runs: int = 30, warmup: int = 5) -> list[LayerTiming]:
    """Each layer alone in ONNX Runtime, at full and at half width, interleaved (median of ``runs``)."""
    rng = np.random.default_rng(0)
    out = []
    for name, mod in named:
        shape = (batch, *shapes[id(mod)][1:])
        sessions, inputs, macs = {}, {}, {}
        for key in ("full", "half"):
            layer, s, m = _standalone(mod, shape, half=key == "half")
            sessions[key] = onnx_session(layer, s, threads)
            inputs[key] = rng.standard_normal(s).astype(np.float32)
            macs[key] = m  # per image: the cost model counts one image's MACs
        t = time_sessions(sessions, inputs, runs, warmup)
        out.append(LayerTiming(name, t["full"]["median_ms"], t["half"]["median_ms"], macs["full"], macs["half"]))
    return out


def calibrate(macs: MacsModel, model: nn.Module, image_size: int, *, threads: int, runs: int = 30,
              warmup: int = 5, dense_ms: float | None = None) -> dict[str, Any]:
    """Turn ``macs`` into a latency model in milliseconds (module docs) and return the measured table.

    1. Every layer alone, at full and half width: its ms per MAC, the *relative* cost of its channels.
    2. The whole network twice, as it is and pruned to half of every prunable group's channels (a copy,
       gates folded, so the exported graph is the one a trial measures): the layers' weighted MACs
       explain the difference between the two (a common scale ``b``, since a layer timed alone is not
       the same as inside the optimised graph), and what no width changes is the fixed part ``a``.
    The model is ``a + b · Σ slope · MACs``: it equals both measurements, and its floor is what the
    network could reach. ``dense_ms`` (kept across iterative steps) is the reference the share is taken
    of; None: the network as it is now."""
    dev = next(model.parameters()).device
    example = torch.zeros(LATENCY_BATCH, 3, image_size, image_size, device=dev)
    shapes = input_shapes(model, example)
    named = [(layer.name, layer.module) for layer in macs.layers]
    timings = time_layers(named, shapes, batch=LATENCY_BATCH, threads=threads, runs=runs, warmup=warmup)
    slopes = [t.ms_per_mac for t in timings]
    layer_macs = _layer_macs(macs)
    total = sum(layer_macs)
    spent = sum(w * m for w, m in zip(slopes, layer_macs))
    if spent <= 0:  # no layer's time moved with its width: count MACs (the fit below then finds no slope)
        slopes, spent = [1.0] * len(slopes), total
    for layer, w in zip(macs.layers, slopes):
        layer.weight = w
    macs.channel_weight = spent / total if total > 0 else 0.0  # norms, activations, pooling: the mean slope

    whole, half, half_cost = _two_structures(macs, model, example.cpu(), threads=threads, runs=runs,
                                             warmup=warmup)
    cost = macs.dense_cost()
    b = (whole - half) / (cost - half_cost) if cost > half_cost else 0.0
    b = max(b, 0.0)
    a = whole - b * cost
    if a < 0:  # more than all of it explained by the widths (noise): no fixed part, one slope through dense
        a, b = 0.0, whole / cost if cost > 0 else 0.0
    for layer in macs.layers:
        layer.weight *= b
    macs.channel_weight *= b
    macs.offset = a
    macs.reference = float(dense_ms) if dense_ms is not None else whole
    return {"whole_ms": whole, "half_ms": half, "fixed_ms": a, "threads": threads, "batch": LATENCY_BATCH,
            "layers": [{"name": t.name, "full_ms": t.full_ms, "half_ms": t.half_ms, "ms_per_mac": layer.weight}
                       for t, layer in zip(timings, macs.layers)]}


def _two_structures(macs: MacsModel, model: nn.Module, example: torch.Tensor, *, threads: int, runs: int,
                    warmup: int) -> tuple[float, float, float]:
    """Measured ms of the network as it is and of a copy with every prunable group halved (by L1 norm), and
    the copy's weighted cost under ``macs``'s layer weights (layers matched by name)."""
    import copy

    from prunevision.prune import prune_structured, strip_gates

    whole_net = strip_gates(copy.deepcopy(model).cpu()).eval()
    half_net = copy.deepcopy(whole_net)
    frozen = {layer.name for layer in macs.layers if layer.module is not None and not _prunable_out(macs, layer)}
    skip = [m for n, m in half_net.named_modules() if n in frozen]
    prune_structured(half_net, example, "l1_structured", 0.5, skip=skip)
    both = {k: onnx_session(m, tuple(example.shape), threads) for k, m in (("whole", whole_net), ("half", half_net))}
    x = np.random.default_rng(0).standard_normal(tuple(example.shape)).astype(np.float32)
    t = time_sessions(both, {"whole": x, "half": x}, runs, warmup)
    weights = {layer.name: layer.weight for layer in macs.layers}
    half_model = type(macs)(half_net, example, threshold=macs.threshold)
    for layer in half_model.layers:
        layer.weight = weights.get(layer.name, macs.channel_weight)
    half_model.channel_weight = macs.channel_weight
    return t["whole"]["median_ms"], t["half"]["median_ms"], half_model.dense_cost()


def _prunable_out(macs: MacsModel, layer) -> bool:
    return any(macs.groups[gi].prunable for gi, _ in layer.outs)


def _layer_macs(macs: MacsModel) -> list[float]:
    """Each layer's MACs in the network as it is now (unweighted)."""
    return [layer.macs(layer.n_in, layer.n_out) for layer in macs.layers]


LANDING_TOLERANCE = 0.05  # a measured structure this near the request (relative) is kept as it is
LANDING_ITERATIONS = 12  # bisection steps over the common shift of the gate scores


def measure_pruned_ms(model: nn.Module, macs: MacsModel, image_size: int, *, threads: int, runs: int = 30,
                      warmup: int = 5) -> float:
    """Measured latency (ms, ONNX Runtime CPU, batch 1) of the network pruning would produce from ``model``
    now: a copy pruned by its gates as the trial will prune it (``macs``'s threshold, width floor, rounding,
    per-layer cap and frozen layers), gates folded, exported and timed. ``model`` itself is not touched."""
    import copy

    from prunevision.prune import prune_by_gates, strip_gates

    names = {id(m): n for n, m in model.named_modules()}
    net = copy.deepcopy(model).cpu().eval()
    copied = dict(net.named_modules())
    skip = [copied[names[id(m)]] for m in macs.frozen if names.get(id(m)) in copied]
    example = torch.zeros(LATENCY_BATCH, 3, image_size, image_size)
    prune_by_gates(net, example, macs.threshold, round_to=macs.round_to, min_channels=macs.min_channels,
                   max_layer_sparsity=macs.max_layer_sparsity, skip=skip or None)
    strip_gates(net, macs.threshold)
    session = onnx_session(net, tuple(example.shape), threads)
    x = np.random.default_rng(0).standard_normal(tuple(example.shape)).astype(np.float32)
    return float(time_sessions({"m": session}, {"m": x}, runs, warmup)["m"]["median_ms"])


def land(macs: MacsModel, target_ms: float, measure: Callable[[], float], *, tolerance: float = LANDING_TOLERANCE,
         iterations: int = LANDING_ITERATIONS) -> dict[str, Any]:
    """Put the gates on the structure whose *measured* latency is nearest ``target_ms``; ``measure()``
    times the network pruning would produce now (:func:`measure_pruned_ms`).

    The cost model is fitted to two structures, and latency moves in steps with the widths (ONNX
    Runtime's convolutions work in blocks of channels), so a structure on the model's budget measured
    4–36 % off it (benchmarks/RESULTS.md). Here the network pruning would produce is timed; when it is
    further than ``tolerance`` from the request, a bisection over one common shift of every prunable
    gate's score (the order training gave the gates is kept, as in :meth:`MacsModel.project`) times the
    structures it passes through and keeps the nearest one measured. Each distinct structure is timed
    once. Returns what was measured: before, after, the shift, how many structures were timed."""
    cache: dict[tuple[int, ...], float] = {}

    def measured(shift: float) -> float:
        with macs.shifted(shift):
            key = macs.structure()
            if key not in cache:
                cache[key] = float(measure())
            return cache[key]

    def error(ms: float) -> float:
        return abs(ms / target_ms - 1.0)

    before = measured(0.0)
    best_shift, best_ms = 0.0, before
    if error(before) > tolerance and macs.prunable_gates():
        open_all, closed_all = macs.score_range()
        lo, hi = (0.0, closed_all) if before > target_ms else (open_all, 0.0)  # measured(lo) > target > (hi)
        for _ in range(iterations):
            mid = (lo + hi) / 2
            ms = measured(mid)
            if error(ms) < error(best_ms):
                best_shift, best_ms = mid, ms
            if error(ms) <= tolerance:
                break
            if ms > target_ms:
                lo = mid
            else:
                hi = mid
        macs.apply_shift(best_shift)
    return {"measured_before_ms": before, "measured_ms": best_ms, "target_ms": target_ms, "shift": best_shift,
            "structures_timed": len(cache)}

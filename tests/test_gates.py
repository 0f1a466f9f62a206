import math

import pytest
import torch
from torch import nn

from prunevision.gates import ChannelGate, PrunableLinear, gate_stats, instrument, iter_gates, penalty, set_temperature


def test_gate_range_init_and_shape():
    g = ChannelGate(8, init=0.95)
    v = g.values()
    assert v.shape == (8,)
    assert torch.all(v >= 0.95 - 1e-6) and torch.all(v < 1)
    with torch.no_grad():
        g.score.copy_(torch.linspace(-50, 50, 8))
    v = g.values()
    assert torch.all(v >= 0) and torch.all(v <= 1)
    x = torch.ones(2, 8, 3, 3)
    y = g(x)
    assert y.shape == x.shape
    assert torch.allclose(y[0, :, 0, 0], v)


def test_gradients_reach_scores_through_task_and_penalty():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), PrunableLinear(4 * 6 * 6, 2))
    instrument(model, torch.zeros(2, 3, 8, 8))
    out = model(torch.randn(3, 3, 8, 8))
    (out.sum() + penalty(model, "mean")).backward()
    gates = dict(iter_gates(model))
    assert set(gates) == {"1.1", "4"}
    assert gates["1.1"].score.grad is not None and gates["1.1"].score.grad.abs().sum() > 0
    assert gates["4"].scores.grad is not None and gates["4"].scores.grad.abs().sum() > 0


def _two_gate_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2), nn.ReLU(),
                          nn.Flatten(), PrunableLinear(2 * 8 * 8, 3))
    instrument(model, torch.zeros(1, 3, 8, 8))
    return model


def test_penalty_modes_match_closed_forms():
    model = _two_gate_model()
    gates = [m for _, m in iter_gates(model)]
    c1, c2, lin = gates
    with torch.no_grad():
        c1.score.copy_(torch.tensor([0.0, 1.0, 2.0, -1.0]))
        c2.score.copy_(torch.tensor([3.0, -3.0]))
    vals = [g.values().reshape(-1) for g in gates]
    allv = torch.cat(vals)
    assert penalty(model, "sum").item() == pytest.approx(allv.sum().item(), rel=1e-6)
    assert penalty(model, "mean").item() == pytest.approx(allv.mean().item(), rel=1e-6)
    # flops: conv1 outputs 8×8 from 3×3×3 inputs (27·64 MACs per channel); conv2 4·1·64; one MAC per weight
    assert c1.cost_per_channel == 27 * 64
    assert c2.cost_per_channel == 4 * 64
    costs = torch.cat([torch.full((4,), 27.0 * 64), torch.full((2,), 4.0 * 64), torch.ones(lin.scores.numel())])
    expected = (allv * costs).sum() / costs.sum()
    assert penalty(model, "flops").item() == pytest.approx(expected.item(), rel=1e-5)
    # closing everything drives every mode to (nearly) zero
    with torch.no_grad():
        for g in gates:
            (g.score if isinstance(g, ChannelGate) else g.scores).fill_(-30)
    for mode in ("mean", "sum", "flops"):
        assert penalty(model, mode).item() < 1e-6


def test_flops_penalty_prefers_expensive_channels():
    model = _two_gate_model()
    c1, c2, _ = [m for _, m in iter_gates(model)]
    model.zero_grad()
    penalty(model, "flops").backward()
    # a conv1 channel controls more MACs than a conv2 channel: its gate is pushed harder
    assert c1.score.grad.mean() > c2.score.grad.mean() > 0


def test_temperature_sharpens_gates():
    g = ChannelGate(2, init=0.95)
    with torch.no_grad():
        g.score.copy_(torch.tensor([1.0, -1.0]))
    m = nn.Sequential(g)
    set_temperature(m, 0.1)
    v = g.values()
    assert v[0] > 0.99 and v[1] < 0.01
    assert g.score.tolist() == [1.0, -1.0]


def test_gate_stats_counts_below_threshold():
    model = _two_gate_model()
    c1 = next(m for _, m in iter_gates(model))
    with torch.no_grad():
        c1.score.copy_(torch.tensor([-5.0, -5.0, 5.0, 5.0]))
    s = gate_stats(model, 0.5)
    assert s["layers"]["1.1"]["closed"] == 2
    assert s["layers"]["1.1"]["below_threshold"] == 0.5
    n_all = 4 + 2 + 3 * 128
    assert s["all"]["n"] == n_all
    assert s["channel"]["below_threshold"] == pytest.approx(2 / 6)
    assert math.isclose(s["weight"]["below_threshold"], 0.0)

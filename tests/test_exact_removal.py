"""Removing closed channels is exact on every architecture, with trained-like norm statistics;
the hybrid drops a backbone its gates have closed."""

import copy

import pytest
import torch
from torch import nn

from prunevision.checkpoint import load_pruned, read_pruned, save_pruned
from prunevision.config import GateConfig, ModelConfig
from prunevision.export import export_onnx
from prunevision.gates import ChannelGate, GateMirror, _is_depthwise, iter_gates
from prunevision.models import build_gated_model
from prunevision.prune import prune_by_gates, strip_gates

SIZE = 32
CLOSED = -40.0  # sigmoid(-40) ≈ 4e-18: a closed gate is zero to float precision


def gated(name, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(name=name, fusion_channels=64, **kw)
    return build_gated_model(cfg, GateConfig(), 10, SIZE).eval(), cfg


def randomise_norms(model, seed=0):
    """Trained-like BatchNorm: random running mean/var, γ and β on every norm."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.5)


def close_share(model, share=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in iter_gates(model):
            if isinstance(m, ChannelGate):
                mask = torch.rand(m.score.shape, generator=g) < share
                m.score.copy_(torch.where(mask, torch.full_like(m.score, CLOSED), torch.full_like(m.score, 6.0)))


def prune(model, threshold=0.5):
    report = prune_by_gates(model, torch.zeros(1, 3, SIZE, SIZE), threshold)
    return strip_gates(model, threshold), report


def assert_same(ref, out):
    scale = float(ref.abs().max())
    assert float((out - ref).abs().max()) <= 1e-4 * scale, float((out - ref).abs().max()) / scale
    assert torch.equal(out.argmax(1), ref.argmax(1))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "torchvision:mnasnet0_5",
                                  "hybrid"])
@pytest.mark.slow
def test_removal_is_exact_with_trained_norm_statistics(name):
    model, _ = gated(name)
    randomise_norms(model)
    close_share(model, 0.3)
    params_before = sum(p.numel() for p in model.parameters())
    x = torch.randn(16, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        pruned, report = prune(model)
        out = pruned(x)
    assert sum(p.numel() for p in pruned.parameters()) < params_before
    assert not any(isinstance(m, (ChannelGate, GateMirror)) for m in pruned.modules())
    assert_same(ref, out)
    if name == "hybrid":  # closing 30 % of the channels at random closes no whole backbone
        assert report.backbones_remaining == ["mobilenet_v3_small", "resnet18", "efficientnet_b0"]
    else:
        assert report.backbones_remaining is None


def test_every_depthwise_norm_carries_its_producers_gate():
    model, _ = gated("mobilenet_v3_small")
    n_dw = sum(1 for m in model.modules() if isinstance(m, nn.Conv2d) and _is_depthwise(m))
    mirrors = [m for m in model.modules() if isinstance(m, GateMirror)]
    assert len(mirrors) == n_dw == 11
    gates = {id(m) for _, m in iter_gates(model)}
    assert all(id(m.source) in gates for m in mirrors)
    # not registered twice: state dict and parameters see each gate once, the penalty too
    n_gates = sum(1 for _, m in iter_gates(model) if isinstance(m, ChannelGate))
    assert sum(1 for k in model.state_dict() if k.endswith(".score")) == n_gates
    assert not any(isinstance(c, ChannelGate) for m in mirrors for c in m.children())
    # a copy's mirrors read the copy's gates
    twin = copy.deepcopy(model)
    twin_gates = {id(m) for _, m in iter_gates(twin)}
    assert all(id(m.source) in twin_gates for m in twin.modules() if isinstance(m, GateMirror))
    assert set(twin.state_dict()) == set(model.state_dict())


def test_a_closed_channel_reaches_its_consumer_as_zero():
    model, _ = gated("mobilenet_v2")
    randomise_norms(model)
    block = model.features[2].conv  # expand (gated) → depthwise (mirrored) → project
    expand_gate = block[0][1][1]
    with torch.no_grad():
        expand_gate.score[:5] = CLOSED
    seen = {}
    h = block[2].register_forward_pre_hook(lambda mod, inp: seen.update(x=inp[0].detach()))
    with torch.no_grad():
        model(torch.randn(2, 3, SIZE, SIZE))
    h.remove()
    assert seen["x"][:, :5].abs().max() < 1e-12  # what the projection conv gets from closed channels


def _calibrate(model, batches=3):
    """Running statistics measured on inputs (every layer normalised, as after training)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(8, 3, SIZE, SIZE, generator=g))
    model.eval()


def _close_all(*gates):
    with torch.no_grad():
        for g in gates:
            g.score.fill_(CLOSED)


@pytest.mark.slow
def test_hybrid_drops_a_backbone_whose_gates_are_closed(tmp_path):
    model, cfg = gated("hybrid")
    _calibrate(model)
    close_share(model, 0.2)
    r18 = model.backbones[1]
    # every gate of resnet18's last stage output (coupled by the residual additions) closed:
    # resnet18 sends only zeros into the fusion layer
    _close_all(r18[7][0].bn2[1], r18[7][0].downsample[1][1], r18[7][1].bn2[1])
    # every channel of mobilenet_v3_small's stem closed: an inner layer, the backbone's output is
    # a non-zero constant (folded into the fusion norm)
    _close_all(model.backbones[0][0][1][1])
    x = torch.randn(16, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        pruned, report = prune(model)
        out = pruned(x)
    assert report.backbones_remaining == ["efficientnet_b0"] == pruned.backbones_remaining
    assert pruned.active == (2,)
    assert isinstance(pruned.backbones[0], nn.Identity) and isinstance(pruned.backbones[1], nn.Identity)
    with torch.no_grad():
        width = pruned.backbones[2](torch.zeros(1, 3, SIZE, SIZE)).shape[1]
    assert pruned.fusion[0].in_channels == width
    assert_same(ref, out)
    r = export_onnx(pruned, tmp_path / "m.onnx", SIZE, check_inputs=[x], exporter="torchscript")
    assert r["max_abs_diff"] <= 1e-4
    path = save_pruned(pruned, tmp_path / "p.safetensors", cfg, 10, SIZE)
    assert read_pruned(path)[0]["hybrid_active"] == [2]
    again = load_pruned(path)
    assert again.backbones_remaining == ["efficientnet_b0"]
    with torch.no_grad():
        assert torch.equal(again(x), out)


@pytest.mark.slow
def test_hybrid_keeps_backbones_that_still_run():
    model, _ = gated("hybrid", backbones=("resnet18", "mobilenet_v3_small"))
    _calibrate(model)
    close_share(model, 0.5)
    x = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        ref = model(x)
        pruned, report = prune(model)
        out = pruned(x)
    assert report.backbones_remaining == ["resnet18", "mobilenet_v3_small"]
    assert_same(ref, out)
    # all of them closed: one backbone stays, the network still runs
    model, _ = gated("hybrid", backbones=("resnet18", "mobilenet_v3_small"))
    _calibrate(model)
    close_share(model, 1.1)
    pruned, report = prune(model)
    assert report.backbones_remaining == ["resnet18"]
    assert pruned(x).shape == (4, 10)

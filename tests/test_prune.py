import pytest
import torch
import torchvision
from torch import nn

from prunevision.checkpoint import PrunedCheckpointError, load_pruned, save_pruned
from prunevision.config import GateConfig, ModelConfig
from prunevision.export import ExportError, export_onnx
from prunevision.gates import ChannelGate, iter_gates
from prunevision.measure import macs_and_params, size_on_disk
from prunevision.models import build_gated_model, list_models
from prunevision.prune import (
    apply_unstructured,
    prune_by_gates,
    prune_structured,
    remove_masks,
    step_ratio,
    strip_gates,
    zero_fraction,
)

SIZE = 32


def gated(name, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(name=name, fusion_channels=64, **kw)
    return build_gated_model(cfg, GateConfig(), 10, SIZE).eval(), cfg


def close_gates(model, share=0.5, closed=-8.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in iter_gates(model):
            p = m.score if isinstance(m, ChannelGate) else m.scores
            mask = torch.rand(p.shape, generator=g) < share
            p.copy_(torch.where(mask, torch.full_like(p, closed), torch.full_like(p, 6.0)))


def prune(model, threshold=0.5, **kw):
    prune_by_gates(model, torch.zeros(1, 3, SIZE, SIZE), threshold, **kw)
    return strip_gates(model, threshold)


@pytest.mark.slow
@pytest.mark.parametrize("name", list_models() + ["torchvision:regnet_x_400mf", "torchvision:mnasnet0_5"])
def test_contract_close_half_prune_export_reload(name, tmp_path):
    model, cfg = gated(name)
    close_gates(model)
    dense = strip_gates(__import__("copy").deepcopy(model))
    macs_d, params_d = macs_and_params(dense, SIZE)
    pruned = prune(model)
    macs_p, params_p = macs_and_params(pruned, SIZE)
    assert macs_p < macs_d and params_p < params_d
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        out = pruned(x)
    assert out.shape == (3, 10)
    assert not any(isinstance(m, ChannelGate) for m in pruned.modules())
    r = export_onnx(pruned, tmp_path / "m.onnx", SIZE, check_inputs=[x], exporter="torchscript")
    assert r["max_abs_diff"] <= 1e-4
    path = save_pruned(pruned, tmp_path / "p.safetensors", cfg, 10, SIZE)
    again = load_pruned(path)
    with torch.no_grad():
        assert torch.equal(again(x), out)


@pytest.mark.parametrize("name", ["resnet18", "small_cnn"])
def test_folding_keeps_what_the_gates_computed(name):
    model, _ = gated(name)
    close_gates(model, closed=-60.0)  # closed gates are exactly zero in fp32
    with torch.no_grad():
        # open gates at several values, so folding has something to fold
        for _, m in iter_gates(model):
            p = m.score if isinstance(m, ChannelGate) else m.scores
            p.copy_(torch.where(p > 0, torch.rand_like(p) * 4 - 1, p))
    x = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        ref = model(x)
        out = prune(model, threshold=1e-6)(x)
    assert torch.allclose(ref, out, atol=1e-4), (ref - out).abs().max()


def test_residual_coupling_resnet():
    model, _ = gated("resnet18")
    close_gates(model, share=0.7)
    m = prune(model)
    stem = m.conv1.out_channels
    assert m.bn1.num_features == stem
    for block in m.layer1:
        assert block.conv2.out_channels == stem == block.conv1.in_channels  # residual adds stay aligned
    assert m.layer2[0].downsample[0].out_channels == m.layer2[0].conv2.out_channels
    assert m.layer1[0].conv1.out_channels < 64  # the block-internal width shrank


def test_depthwise_and_se_coupling():
    m = prune(_closed("mobilenet_v2"))
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d) and mod.groups > 1:
            assert mod.groups == mod.in_channels == mod.out_channels
    e = prune(_closed("efficientnet_b0"))
    for se in (mod for mod in e.modules() if isinstance(mod, torchvision.ops.SqueezeExcitation)):
        assert se.fc2.out_channels == se.fc1.in_channels
    assert e(torch.randn(1, 3, SIZE, SIZE)).shape == (1, 10)


def _closed(name, share=0.6):
    model, _ = gated(name)
    close_gates(model, share=share)
    return model


@pytest.mark.slow
def test_hybrid_fusion_concat_coupling():
    m = prune(_closed("hybrid"))
    with torch.no_grad():
        widths = [b(torch.zeros(1, 3, SIZE, SIZE)).shape[1] for b in m.backbones]
    assert m.fusion[0].in_channels == sum(widths)
    assert m.fusion[0].out_channels < 64


def test_all_gates_closed_is_still_a_network():
    for name in ("resnet18", "mobilenet_v3_small", "small_cnn"):
        model, _ = gated(name)
        close_gates(model, share=1.1)
        m = prune(model)
        assert m(torch.randn(2, 3, SIZE, SIZE)).shape == (2, 10)
        for mod in m.modules():
            if isinstance(mod, nn.Conv2d):
                assert mod.out_channels >= 1
        head = [mod for mod in m.modules() if isinstance(mod, nn.Linear)][-1]
        assert head.out_features == 10  # the classifier keeps its outputs


def test_round_to_and_min_channels():
    model, _ = gated("resnet18")
    close_gates(model, share=0.6)
    m = prune(model, round_to=8)
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d) and mod.out_channels not in (10,):
            assert mod.out_channels % 8 == 0
    model, _ = gated("small_cnn")
    close_gates(model, share=1.1)
    m = prune(model, min_channels=4)
    assert m.features[0].out_channels == 4


def test_weight_gates_become_zeros_and_closed_units_go():
    model, _ = gated("small_cnn")
    close_gates(model, share=0.0)
    with torch.no_grad():
        fc1 = model.classifier[1]
        fc1.scores[:5] = -8.0  # units 0-4: every weight closed
        fc1.scores[5:, :10] = -8.0  # some single weights closed
    m = prune(model)
    lin = m.classifier[1]
    assert isinstance(lin, nn.Linear) and lin.out_features == 256 - 5
    assert (lin.weight[:, :10] == 0).all()
    assert m.classifier[4].in_features == 256 - 5


def test_step_ratio_arithmetic():
    assert step_ratio(0.75, 1) == pytest.approx(0.75)
    s = step_ratio(0.75, 2)
    assert s == pytest.approx(0.5)
    for target, n in [(0.9, 3), (0.5, 4), (0.0, 2)]:
        s = step_ratio(target, n)
        assert (1 - s) ** n == pytest.approx(1 - target)
    with pytest.raises(ValueError):
        step_ratio(1.0, 2)


@pytest.mark.slow
def test_masked_baselines_keep_shapes_and_sizes():
    model, _ = gated("resnet18")
    dense = strip_gates(model)
    macs0, params0 = macs_and_params(dense, SIZE)
    raw0, _ = size_on_disk(dense)
    apply_unstructured(dense, "l1_unstructured", 0.5)
    remove_masks(dense)
    macs1, params1 = macs_and_params(dense, SIZE)
    assert (macs1, params1) == (macs0, params0)
    assert size_on_disk(dense)[0] == raw0
    assert zero_fraction(dense) == pytest.approx(0.5, abs=0.01)
    apply_unstructured(dense, "random_unstructured", 0.5)  # iterative: half of what remains
    remove_masks(dense)
    assert zero_fraction(dense) == pytest.approx(0.75, abs=0.01)


@pytest.mark.parametrize("method", ["l1_structured", "l2_structured", "bn_scale", "random_structured", "taylor"])
def test_structured_baselines(method):
    model, _ = gated("mobilenet_v3_small")
    m = strip_gates(model)
    macs0, _ = macs_and_params(m, SIZE)
    calib = [(torch.randn(8, 3, SIZE, SIZE), torch.randint(0, 10, (8,)))]
    prune_structured(m, torch.zeros(1, 3, SIZE, SIZE), method, 0.5, calibration=calib)
    macs1, _ = macs_and_params(m, SIZE)
    assert macs1 < 0.6 * macs0
    assert m(torch.randn(2, 3, SIZE, SIZE)).shape == (2, 10)


def test_tampered_or_foreign_checkpoints_are_refused(tmp_path):
    model, cfg = gated("small_cnn")
    close_gates(model)
    path = save_pruned(prune(model), tmp_path / "p.safetensors", cfg, 10, SIZE)
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF  # one flipped byte in the tensors
    bad = tmp_path / "tampered.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(PrunedCheckpointError, match="checksum mismatch"):
        load_pruned(bad)
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(path.read_bytes()[:100])
    with pytest.raises(PrunedCheckpointError, match="not a readable"):
        load_pruned(trunc)
    pickled = tmp_path / "pickled.safetensors"
    torch.save(model, pickled)  # a pickled module under the right name
    with pytest.raises(PrunedCheckpointError):
        load_pruned(pickled)
    with pytest.raises(PrunedCheckpointError, match="not found"):
        load_pruned(tmp_path / "none.safetensors")


def test_failed_export_leaves_no_file(tmp_path):
    model, _ = gated("small_cnn")
    m = strip_gates(model)
    with pytest.raises(ExportError, match="differs"):
        export_onnx(m, tmp_path / "m.onnx", SIZE, exporter="torchscript", tolerance=-1.0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_dynamo_export_with_dynamic_batch(tmp_path):
    import onnxruntime as ort

    model, _ = gated("mobilenet_v3_small")
    m = strip_gates(model)
    r = export_onnx(m, tmp_path / "m.onnx", SIZE, exporter="dynamo")
    assert r["max_abs_diff"] <= 1e-4
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: torch.randn(7, 3, SIZE, SIZE).numpy()})[0]
    assert out.shape == (7, 10)


def test_zeros_survive_finetuning_until_masks_are_removed():
    from prunevision.prune import keep_zeros

    lin = nn.Sequential(nn.Linear(8, 4))
    with torch.no_grad():
        lin[0].weight[:, :3] = 0
    keep_zeros(lin)
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        lin(torch.randn(5, 8)).pow(2).sum().backward()
        opt.step()
    remove_masks(lin)
    assert (lin[0].weight[:, :3] == 0).all() and (lin[0].weight[:, 3:] != 0).all()
    assert set(dict(lin.named_parameters())) == {"0.weight", "0.bias"}


def test_gate_pruning_through_flatten_at_other_input_sizes():
    # regression: at 16 px the flattened conv2 features (64 × 4 × 4) once confused the index
    # mapping of gate parameters; gates are now DepGraph nodes of their own
    torch.manual_seed(0)
    model = build_gated_model(ModelConfig(name="small_cnn"), GateConfig(), 4, 16).eval()
    close_gates(model, share=0.5)
    prune_by_gates(model, torch.zeros(1, 3, 16, 16), 0.5)
    m = strip_gates(model, 0.5)
    assert m.classifier[1].in_features == m.features[4].out_channels * 16
    assert m(torch.randn(2, 3, 16, 16)).shape == (2, 4)

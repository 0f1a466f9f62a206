import pytest
import torch
import torchvision
from torch import nn

from prunevision.config import ConfigError, GateConfig, ModelConfig
from prunevision.gates import ChannelGate, GateMirror, PrunableLinear, iter_gates
from prunevision.models import PretrainedWeightsError, build_gated_model, create_model, list_models

EXTRA_TORCHVISION = ["torchvision:regnet_x_400mf", "torchvision:mnasnet0_5", "torchvision:squeezenet1_1",
                     "torchvision:shufflenet_v2_x0_5"]


def expected_channel_gates(model: nn.Module, num_classes: int) -> int:
    """Independent count: every conv's output channels, except depthwise convs, the excitation
    conv of squeeze-and-excitation blocks and a conv classifier."""
    skip = set()
    for m in model.modules():
        if isinstance(m, torchvision.ops.SqueezeExcitation):
            skip.add(id(m.fc2))
        if isinstance(m, torchvision.models.SqueezeNet):
            skip.add(id(m.classifier[1]))
    n = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and id(m) not in skip:
            depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
            if not depthwise:
                n += m.out_channels
    return n


@pytest.mark.parametrize("name", list_models() + EXTRA_TORCHVISION)
def test_instrumentation_of_every_model(name):
    torch.manual_seed(0)
    cfg = ModelConfig(name=name, fusion_channels=64)
    plain = create_model(cfg, num_classes=10, image_size=32)
    expected = expected_channel_gates(plain, 10)
    torch.manual_seed(0)
    model = build_gated_model(cfg, GateConfig(), num_classes=10, image_size=32)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    plain.eval()
    out = model(x)
    assert out.shape == plain(x).shape == (2, 10)
    gates = [m for _, m in iter_gates(model) if isinstance(m, ChannelGate)]
    assert sum(g.score.numel() for g in gates) == expected
    assert all(torch.all(g.values() >= 0.95 - 1e-6) for g in gates)
    # every conv that is followed by a BatchNorm has its gate right after that norm
    for mod in model.modules():
        if isinstance(mod, nn.Sequential) and len(mod) == 2 and isinstance(mod[1], ChannelGate):
            assert isinstance(mod[0], (nn.BatchNorm2d, nn.Conv2d, nn.GroupNorm))
    # depthwise convs get no gate of their own: no gate names one as the conv it controls
    for g in gates:
        conv = model.get_submodule(g.layer_name)
        assert isinstance(conv, nn.Conv2d) and conv.out_channels == g.score.numel()
        assert not (conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels)
    if name == "small_cnn":
        linears = [m for _, m in iter_gates(model) if isinstance(m, PrunableLinear)]
        assert len(linears) == 2 and linears[0].scores.shape == linears[0].weight.shape


def test_depthwise_follows_producer():
    model = build_gated_model(ModelConfig(name="mobilenet_v2"), GateConfig(), num_classes=10, image_size=32)
    block = model.features[2].conv  # expand 1x1 → depthwise 3x3 → project 1x1
    assert isinstance(block[0][1][1], ChannelGate)  # expand: gated after its BN
    dw_norm = block[1][1]
    # depthwise: no gate of its own (its channels are the producer's), a mirror of the producer's
    assert isinstance(dw_norm[0], nn.BatchNorm2d) and isinstance(dw_norm[1], GateMirror)
    assert dw_norm[1].source is block[0][1][1]
    assert isinstance(block[3], nn.Sequential) and isinstance(block[3][1], ChannelGate)


def test_squeeze_excitation_scale_is_not_gated():
    model = build_gated_model(ModelConfig(name="efficientnet_b0"), GateConfig(), num_classes=10, image_size=32)
    se = next(m for m in model.modules() if isinstance(m, torchvision.ops.SqueezeExcitation))
    assert isinstance(se.fc2, nn.Conv2d)  # untouched: a gate before the sigmoid closes nothing
    assert isinstance(se.fc1, nn.Sequential) and isinstance(se.fc1[1], ChannelGate)


def test_small_image_stem_and_num_classes():
    m = create_model(ModelConfig(name="resnet18", small_input=True), num_classes=7, image_size=32)
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert isinstance(m.maxpool, nn.Identity)
    assert m.fc.out_features == 7
    big = create_model(ModelConfig(name="resnet18", small_input=False), num_classes=7, image_size=32)
    assert big.conv1.stride == (2, 2)
    mb = create_model(ModelConfig(name="mobilenet_v3_small", small_input=True), num_classes=10, image_size=32)
    assert mb.features[0][0].stride == (1, 1)


def test_hybrid_backbones_configurable():
    cfg = ModelConfig(name="hybrid", backbones=("resnet18", "mobilenet_v2"), fusion_channels=32)
    m = build_gated_model(cfg, GateConfig(), num_classes=10, image_size=32)
    assert len(m.backbones) == 2
    assert isinstance(m.fusion[1][1], ChannelGate) and m.fusion[1][1].score.numel() == 32
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ConfigError):
        ModelConfig(name="hybrid", backbones=("resnet18", "hybrid"))


def test_pretrained_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    # no route to the weights: a proxy on a closed local port
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    with pytest.raises(PretrainedWeightsError) as e:
        create_model(ModelConfig(name="resnet18", pretrained=True), num_classes=10, image_size=32)
    msg = str(e.value)
    assert "resnet18" in msg and "model.weights" in msg and str(tmp_path / "torch") in msg


def test_pretrained_from_local_file(tmp_path):
    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), path)
    m = create_model(ModelConfig(name="resnet18", pretrained=True, weights=str(path), small_input=False),
                     num_classes=10, image_size=224)
    assert torch.equal(m.layer1[0].conv1.weight, ref.layer1[0].conv1.weight)
    assert m.fc.out_features == 10  # head replaced after loading the 1000-class weights


def test_pickled_module_weights_are_refused(tmp_path):
    path = tmp_path / "model.pth"
    torch.save(torchvision.models.resnet18(weights=None), path)  # a whole pickled module
    with pytest.raises(PretrainedWeightsError, match="cannot read"):
        create_model(ModelConfig(name="resnet18", pretrained=True, weights=str(path)), num_classes=10, image_size=32)
    with pytest.raises(PretrainedWeightsError, match="not found"):
        create_model(ModelConfig(name="resnet18", pretrained=True, weights=str(tmp_path / "x.pth")),
                     num_classes=10, image_size=32)


def test_the_config_knows_the_models_the_builders_register():
    # the config checks names against BUILTIN_MODELS without importing the builders: every one is built
    from prunevision.models import _REGISTRY
    from prunevision.registry import BUILTIN_MODELS

    assert set(BUILTIN_MODELS) <= set(_REGISTRY)

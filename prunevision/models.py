"""One model registry: the small self-pruning CNN, torchvision classifiers by name, the hybrid.

``create_model(cfg, num_classes, image_size)`` builds a plain (ungated) network;
``build_gated_model`` adds the gates (prunevision.gates.instrument). Short names
(``resnet18``, ``mobilenet_v3_small``, ``mobilenet_v2``, ``efficientnet_b0``) and any other
torchvision classification model as ``torchvision:<name>`` come from the same place.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from prunevision.config import ConfigError, GateConfig, ModelConfig
from prunevision.fsutil import require_file
from prunevision.gates import PrunableLinear, instrument
from prunevision.registry import (  # noqa: F401  (re-exported: the registry's public names)
    _REGISTRY,
    TORCHVISION_SHORT_NAMES,
    ModelBuilder,
    check_model_name,
    list_models,
    register_model,
    torchvision_classifiers,
)


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights were asked for and could not be loaded."""


def create_model(cfg: ModelConfig, num_classes: int, image_size: int, pretrained: bool | None = None) -> nn.Module:
    """Build the ungated network. ``pretrained`` overrides cfg.pretrained (False when resuming)."""
    if pretrained is not None and pretrained != cfg.pretrained:
        from dataclasses import replace

        cfg = replace(cfg, pretrained=pretrained)
    check_model_name(cfg.name)
    if cfg.name.startswith("torchvision:"):
        return torchvision_model(cfg.name.split(":", 1)[1], cfg, num_classes, image_size)
    return _REGISTRY[cfg.name](cfg, num_classes, image_size)


def build_gated_model(
    model_cfg: ModelConfig, gate_cfg: GateConfig, num_classes: int, image_size: int,
    pretrained: bool | None = None,
) -> nn.Module:
    model = create_model(model_cfg, num_classes, image_size, pretrained=pretrained)
    example = torch.zeros(2, 3, image_size, image_size)
    instrument(model, example, init=gate_cfg.init, temperature=gate_cfg.temperature, kind=gate_cfg.resolved_kind,
               skip=gate_cfg.skip, num_classes=num_classes)
    return model


# --------------------------------------------------------------------------- small_cnn


class SmallCNN(nn.Module):
    """The classic self-pruning CNN: two conv blocks, two gated fully connected layers."""

    def __init__(self, num_classes: int = 10, image_size: int = 32, channels=(32, 64), hidden: int = 256,
                 dropout: float = 0.3):
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(3, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        flat = c2 * (image_size // 4) ** 2
        self.classifier = nn.Sequential(
            nn.Flatten(), PrunableLinear(flat, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            PrunableLinear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model("small_cnn")
def _small_cnn(cfg: ModelConfig, num_classes: int, image_size: int) -> nn.Module:
    if cfg.pretrained:
        raise ConfigError("model.pretrained: small_cnn has no pretrained weights")
    return SmallCNN(num_classes=num_classes, image_size=image_size, dropout=cfg.dropout)


# --------------------------------------------------------------------------- torchvision


def _register_short(name: str) -> None:
    register_model(name)(lambda cfg, n, size: torchvision_model(name, cfg, n, size))


for _n in TORCHVISION_SHORT_NAMES:
    _register_short(_n)


def torchvision_model(tv_name: str, cfg: ModelConfig, num_classes: int, image_size: int) -> nn.Module:
    import torchvision

    if tv_name not in torchvision_classifiers():
        raise ConfigError(f"model.name: {tv_name!r} is not a torchvision classification model")
    if cfg.pretrained:
        model = torchvision.models.get_model(tv_name, weights=None)
        model.load_state_dict(load_pretrained_state(tv_name, cfg.weights))
        if num_classes != _num_outputs(model):
            replace_classifier(model, num_classes)
    else:
        model = torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes)
    small = cfg.small_input if cfg.small_input is not None else image_size <= 64
    if small:
        small_image_stem(model)
    return model


def load_pretrained_state(tv_name: str, weights: str | None) -> dict[str, torch.Tensor]:
    """ImageNet weights through torchvision's weights API, or a local weights file.

    Never falls back to random initialisation: any failure is a PretrainedWeightsError that
    says how to provide the weights offline.
    """
    import torchvision

    if weights and (Path(weights).suffix in (".pth", ".pt", ".safetensors") or os.sep in weights):
        return _load_weights_file(Path(weights))
    try:
        enum = torchvision.models.get_model_weights(tv_name)
        w = enum[weights] if weights and weights != "DEFAULT" else enum.DEFAULT
    except (KeyError, ValueError) as e:
        raise PretrainedWeightsError(f"no pretrained weights {weights!r} for {tv_name}: {e}") from None
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    fname = w.url.rsplit("/", 1)[-1]
    try:
        return w.get_state_dict(progress=False, check_hash=False)
    except Exception as e:  # offline, blocked, truncated download...
        raise PretrainedWeightsError(
            f"could not load pretrained weights {w} for {tv_name}: {' '.join(str(e).split())}. "
            f"Offline? Put {fname} (from {w.url}) into {hub_dir} (set TORCH_HOME to use another "
            f"cache), or pass a local file with --set model.weights=/path/to/{fname}"
        ) from None


def _load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    require_file(path, "model.weights: file", PretrainedWeightsError)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
    except Exception as e:
        raise PretrainedWeightsError(f"model.weights: cannot read {path}: {' '.join(str(e).split())}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise PretrainedWeightsError(f"model.weights: {path} does not hold a state dict")
    return state


def _last_linear(model: nn.Module) -> tuple[str, nn.Linear] | None:
    found = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            found = (name, m)
    return found


def _num_outputs(model: nn.Module) -> int | None:
    last = _last_linear(model)
    return last[1].out_features if last else None


def replace_classifier(model: nn.Module, num_classes: int) -> None:
    last = _last_linear(model)
    if last is None:
        raise ConfigError("model.num_classes: cannot find a linear classifier head to replace")
    name, lin = last
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.Linear(lin.in_features, num_classes, bias=lin.bias is not None))


def small_image_stem(model: nn.Module) -> None:
    """No early downsampling for 32×32 inputs: the first conv runs at stride 1 (a 7×7 stem
    becomes 3×3, as in CIFAR ResNets) and a max-pool right after the stem is removed."""
    first_conv_path = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            first_conv_path = name
            break
    if first_conv_path is None:
        return
    conv = model.get_submodule(first_conv_path)
    parent_name, _, child = first_conv_path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if conv.kernel_size[0] >= 7:
        setattr(parent, child, nn.Conv2d(conv.in_channels, conv.out_channels, 3, 1, 1, bias=conv.bias is not None))
    else:
        conv.stride = (1, 1)
    # a max-pool registered before the second conv belongs to the stem
    seen_convs = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            seen_convs += 1
            if seen_convs > 1:
                break
        if isinstance(m, nn.MaxPool2d):
            p_name, _, c = name.rpartition(".")
            p = model.get_submodule(p_name) if p_name else model
            setattr(p, c, nn.Identity())
            break


# --------------------------------------------------------------------------- hybrid


def feature_trunk(model: nn.Module) -> nn.Module:
    """The convolutional trunk of a torchvision classifier, giving a 4-D feature map."""
    if hasattr(model, "features") and isinstance(model.features, nn.Module):
        return model.features
    if hasattr(model, "layer4") and hasattr(model, "fc"):  # ResNet family
        return nn.Sequential(*[m for n, m in model.named_children() if n not in ("avgpool", "fc")])
    if hasattr(model, "trunk_output") and hasattr(model, "stem"):  # RegNet
        return nn.Sequential(model.stem, model.trunk_output)
    raise ConfigError(f"model.backbones: cannot find the feature trunk of {type(model).__name__}")


class Hybrid(nn.Module):
    """Backbones side by side; each pooled to 1×1, the 4-D maps concatenated along channels,
    a 1×1 conv + BatchNorm fusion layer (gated like every other conv), one classifier head.

    Fusing 4-D maps with a conv rather than flattening into a Linear keeps the concatenation
    prunable by DepGraph. When the gates close a whole backbone (its output into the fusion layer
    is a constant), gate pruning drops it (:meth:`drop_backbones`): ``active`` lists the
    backbones the forward pass still runs, ``backbones_remaining`` their names.
    """

    def __init__(self, trunks: list[nn.Module], trunk_channels: list[int], fusion_channels: int,
                 num_classes: int, dropout: float, names: list[str] | tuple[str, ...] | None = None):
        super().__init__()
        self.backbones = nn.ModuleList(trunks)
        self.names = tuple(names) if names is not None else tuple(f"backbone{i}" for i in range(len(trunks)))
        # indices of the backbones the forward pass runs (pruning can drop whole backbones: the
        # module at a dropped index becomes an Identity, so state-dict names keep their numbers)
        self.active: tuple[int, ...] = tuple(range(len(trunks)))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fusion = nn.Sequential(
            nn.Conv2d(sum(trunk_channels), fusion_channels, 1, bias=False),
            nn.BatchNorm2d(fusion_channels),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(fusion_channels, num_classes))

    def pooled_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each remaining backbone's pooled N×C×1×1 map, in concatenation order."""
        return [self.pool(self.backbones[i](x)) for i in self.active]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fusion(torch.cat(self.pooled_features(x), dim=1)))

    @property
    def backbones_remaining(self) -> list[str]:
        return [self.names[i] for i in self.active]

    def keep_backbones(self, keep: list[int] | tuple[int, ...]) -> None:
        """Run only the backbones ``keep`` (indices); the others become parameter-free Identity
        modules. No weights change: used to rebuild a pruned hybrid whose tensors say the rest."""
        keep = tuple(sorted(set(int(i) for i in keep)))
        if not keep or any(i not in self.active for i in keep):
            raise ValueError(f"cannot keep backbones {keep}: remaining are {self.active}")
        for i in self.active:
            if i not in keep:
                self.backbones[i] = nn.Identity()
        self.active = keep

    @torch.no_grad()
    def drop_backbones(self, drop: set[int], features: list[torch.Tensor]) -> None:
        """Remove backbones whose pooled output is a constant, exactly.

        ``features``: one C_i vector per remaining backbone (concatenation order), the constant
        output of those in ``drop`` (zeros when their output gates are closed). The fusion conv
        loses their input channels; their constant contribution W_i·c_i moves into the fusion
        norm's running mean (or the conv's bias), so the network computes what it computed.
        """
        drop = {i for i in drop if i in self.active}
        if not drop:
            return
        if len(drop) >= len(self.active):
            raise ValueError("cannot drop every backbone of the hybrid")
        conv = self.fusion[0]
        conv = conv[0] if isinstance(conv, nn.Sequential) else conv
        keep_cols, shift, off = [], None, 0
        for i, f in zip(self.active, features):
            f = f.reshape(-1).to(conv.weight.dtype)
            cols = list(range(off, off + f.numel()))
            off += f.numel()
            if i in drop:
                d = conv.weight[:, cols, 0, 0] @ f
                shift = d if shift is None else shift + d
            else:
                keep_cols += cols
        if off != conv.in_channels:
            raise ValueError(f"backbone widths {off} do not match the fusion conv's {conv.in_channels} inputs")
        if shift is not None and bool(shift.abs().max() > 0):
            norm = self.fusion[1]
            norm = norm[0] if isinstance(norm, nn.Sequential) else norm
            if conv.bias is not None:
                conv.bias.add_(shift)
            elif isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.running_mean is not None:
                norm.running_mean.sub_(shift)  # BN(y + d) with mean μ + d is BN(y) with mean μ
            else:
                raise ValueError("cannot fold a dropped backbone's constant output into the fusion layer")
        conv.weight = nn.Parameter(conv.weight[:, keep_cols].clone(), requires_grad=conv.weight.requires_grad)
        conv.in_channels = len(keep_cols)
        self.keep_backbones([i for i in self.active if i not in drop])


@register_model("hybrid")
def _hybrid(cfg: ModelConfig, num_classes: int, image_size: int) -> nn.Module:
    from dataclasses import replace

    trunks, channels = [], []
    for b in cfg.backbones:
        sub = replace(cfg, name=b)
        net = create_model(sub, num_classes=1000 if cfg.pretrained else num_classes, image_size=image_size)
        trunk = feature_trunk(net)
        with torch.no_grad():
            trunk.eval()
            channels.append(trunk(torch.zeros(1, 3, image_size, image_size)).shape[1])
            trunk.train()
        trunks.append(trunk)
    return Hybrid(trunks, channels, cfg.fusion_channels, num_classes, cfg.dropout, names=cfg.backbones)

"""Learnable gates and the automatic instrumentation of any CNN.

A :class:`ChannelGate` holds one score per channel and multiplies the channel by
``sigmoid(score / temperature)`` right after its normalisation layer. Instrumentation
traces one forward pass, pairs every prunable convolution with the norm layer that runs
right after it, and wraps that norm as ``Sequential(norm, gate)``. Nothing is specific to an
architecture: ResNets, MobileNets, EfficientNets, the hybrid and any other torchvision CNN go
through the same walk. Depthwise convolutions get no gate of their own: their channels are
their producer's channels, which already carry one. Convolutions that feed a sigmoid (the
excitation half of squeeze-and-excitation) get none either: a gate in front of a sigmoid
cannot close a channel.

Torch-pruning's DepGraph sees a gate's [C] parameter as an unwrapped parameter of the
channel dimension and prunes it together with its channels.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

_NORMS = (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d, nn.LayerNorm)
_SIGMOIDS = (nn.Sigmoid, nn.Hardsigmoid)


def init_score(init: float, temperature: float) -> float:
    """The score whose gate value sigmoid(score / T) equals ``init``."""
    return temperature * math.log(init / (1.0 - init))


class ChannelGate(nn.Module):
    """Per-channel gate g = sigmoid(score / T) multiplying an (N, C, ...) tensor."""

    def __init__(self, num_channels: int, init: float = 0.95, temperature: float = 1.0):
        super().__init__()
        self.temperature = float(temperature)
        self.score = nn.Parameter(torch.full((num_channels,), init_score(init, temperature)))
        # MACs of the layer this gate controls, per channel (set by instrument; used by the
        # flops penalty). A plain attribute, not state: it is recomputed on every build.
        self.cost_per_channel = 1.0
        self.layer_name = ""

    def values(self) -> torch.Tensor:
        return torch.sigmoid(self.score / self.temperature)

    def costs(self) -> torch.Tensor:
        return torch.full_like(self.score, float(self.cost_per_channel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.values().to(x.dtype)
        shape = [1, -1] + [1] * (x.dim() - 2)
        return x * g.view(shape)

    def extra_repr(self) -> str:
        return f"{self.score.numel()}, temperature={self.temperature}"


class PrunableLinear(nn.Module):
    """Linear layer with one gate per weight: pruned_weight = weight ⊙ sigmoid(scores / T)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True,
        init: float = 0.95, temperature: float = 1.0,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.temperature = float(temperature)
        lin = nn.Linear(in_features, out_features, bias=bias)  # PyTorch's own initialisation
        self.weight = nn.Parameter(lin.weight.detach().clone())
        self.bias = nn.Parameter(lin.bias.detach().clone()) if bias else None
        self.scores = nn.Parameter(torch.full_like(self.weight, init_score(init, temperature)))
        self.layer_name = ""

    def values(self) -> torch.Tensor:
        return torch.sigmoid(self.scores / self.temperature)

    def costs(self) -> torch.Tensor:
        return torch.ones_like(self.scores)  # one multiply-accumulate per weight

    def pruned_weight(self) -> torch.Tensor:
        return self.weight * self.values()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.pruned_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


GATE_TYPES = (ChannelGate, PrunableLinear)


@dataclass(frozen=True)
class GateSite:
    """Where one gate sits: the conv it controls, and the module it follows."""

    conv: str
    after: str  # name of the norm (or the conv itself when it has no norm)
    channels: int
    macs_per_channel: float


def iter_gates(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, m in model.named_modules():
        if isinstance(m, GATE_TYPES):
            yield name, m


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, m in iter_gates(model) for p in ([m.score] if isinstance(m, ChannelGate) else [m.scores])]


def set_temperature(model: nn.Module, temperature: float) -> None:
    """Set T in every gate, scores unchanged: a lower T pushes gate values towards 0 or 1
    (temperature annealing)."""
    for _, m in iter_gates(model):
        m.temperature = float(temperature)


def penalty(model: nn.Module, mode: str) -> torch.Tensor:
    """The gate penalty that λ multiplies.

    mean  — mean of all gate values: in [0, 1] on any model, so a λ means the same everywhere.
    sum   — Σ gates, the classic self-pruning formulation.
    flops — each gate weighted by the multiply-accumulates it controls, normalised: the
            share of the network's gated MACs that is still switched on. Training under it
            closes expensive channels first.
    """
    values, costs = [], []
    for _, m in iter_gates(model):
        v = m.values().reshape(-1)
        values.append(v)
        if mode == "flops":
            costs.append(m.costs().reshape(-1).to(v.device))
    if not values:
        raise ValueError("the model has no gates: instrument it first")
    allv = torch.cat(values)
    if mode == "mean":
        return allv.mean()
    if mode == "sum":
        return allv.sum()
    if mode == "flops":
        c = torch.cat(costs)
        return (allv * c).sum() / c.sum()
    raise ValueError(f"unknown penalty mode {mode!r}")


@torch.no_grad()
def gate_stats(model: nn.Module, threshold: float) -> dict:
    """Mean gate and share of gates under τ: per layer, for channel gates, weight gates and all."""
    per_layer = {}
    chan, weight = [], []
    for name, m in iter_gates(model):
        v = m.values().detach().float().reshape(-1).cpu()
        (chan if isinstance(m, ChannelGate) else weight).append(v)
        per_layer[name] = {
            "kind": "channel" if isinstance(m, ChannelGate) else "weight",
            "n": int(v.numel()),
            "mean": float(v.mean()),
            "below_threshold": float((v < threshold).float().mean()),
            "closed": int((v < threshold).sum()),
        }

    def summary(vs: list[torch.Tensor]) -> dict:
        if not vs:
            return {"n": 0, "mean": float("nan"), "below_threshold": float("nan")}
        v = torch.cat(vs)
        return {"n": int(v.numel()), "mean": float(v.mean()), "below_threshold": float((v < threshold).float().mean())}

    return {
        "threshold": threshold,
        "all": summary(chan + weight),
        "channel": summary(chan),
        "weight": summary(weight),
        "layers": per_layer,
    }


@torch.no_grad()
def gate_values(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: m.values().detach().float().cpu() for name, m in iter_gates(model)}


# --------------------------------------------------------------------------- instrumentation


def _is_depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def _trace_leaves(model: nn.Module, example: torch.Tensor) -> tuple[list[str], dict[str, torch.Size]]:
    """Leaf modules in the order one forward pass runs them, and their output shapes."""
    order: list[str] = []
    shapes: dict[str, torch.Size] = {}
    handles = []
    for name, m in model.named_modules():
        if len(list(m.children())) == 0 and name:
            def hook(mod, inp, out, name=name):
                if name not in shapes and isinstance(out, torch.Tensor):
                    order.append(name)
                    shapes[name] = out.shape
            handles.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return order, shapes


def find_gate_sites(
    model: nn.Module, example: torch.Tensor, skip: tuple[str, ...] = (), num_classes: int | None = None
) -> list[GateSite]:
    """Every prunable conv's output channels, paired with the module its gate follows."""
    modules = dict(model.named_modules())
    order, shapes = _trace_leaves(model, example)
    convs = [n for n in order if isinstance(modules[n], nn.Conv2d)]
    last_conv = convs[-1] if convs else None
    sites = []
    for i, name in enumerate(order):
        conv = modules[name]
        if not isinstance(conv, nn.Conv2d) or _is_depthwise(conv):
            continue
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if name == last_conv and num_classes is not None and conv.out_channels == num_classes:
            continue  # a conv classifier (SqueezeNet-style): its outputs are the classes
        following = [modules[n] for n in order[i + 1 : i + 3]]
        if any(isinstance(m, _SIGMOIDS) for m in following):
            continue  # squeeze-and-excitation: a gate in front of a sigmoid closes nothing
        nxt = order[i + 1] if i + 1 < len(order) else None
        after = name
        if nxt is not None and isinstance(modules[nxt], _NORMS) and shapes[nxt][1:2] == shapes[name][1:2]:
            after = nxt
        out = shapes[name]
        spatial = math.prod(out[2:]) if len(out) > 2 else 1
        k = math.prod(conv.kernel_size)
        macs = conv.in_channels // conv.groups * k * spatial
        sites.append(GateSite(conv=name, after=after, channels=conv.out_channels, macs_per_channel=float(macs)))
    return sites


def instrument(
    model: nn.Module,
    example: torch.Tensor,
    init: float = 0.95,
    temperature: float = 1.0,
    skip: tuple[str, ...] = (),
    num_classes: int | None = None,
) -> list[GateSite]:
    """Put a ChannelGate after every prunable conv (after its norm). Returns the sites.

    PrunableLinear layers already in the model are kept and get their layer names.
    """
    sites = find_gate_sites(model, example, skip=skip, num_classes=num_classes)
    for site in sites:
        parent_name, _, child = site.after.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        inner = getattr(parent, child)
        gate = ChannelGate(site.channels, init=init, temperature=temperature)
        gate.cost_per_channel = site.macs_per_channel
        # the conv this gate controls (wrapped as "<name>.0" when the gate follows it directly)
        gate.layer_name = site.conv if site.after != site.conv else f"{site.conv}.0"
        setattr(parent, child, nn.Sequential(inner, gate))
    for name, m in model.named_modules():
        if isinstance(m, PrunableLinear):
            m.layer_name = name
            with torch.no_grad():
                m.scores.fill_(init_score(init, temperature))
            m.temperature = float(temperature)
    return sites

"""Learnable gates and the automatic instrumentation of any CNN.

A :class:`ChannelGate` holds one score per channel and multiplies the channel by
``sigmoid(score / temperature)`` right after its normalisation layer. Instrumentation
traces one forward pass, pairs every prunable convolution with the norm layer that runs
right after it, and wraps that norm as ``Sequential(norm, gate)``. Nothing is specific to an
architecture: ResNets, MobileNets, EfficientNets, the hybrid and any other torchvision CNN go
through the same walk. Depthwise convolutions get no gate of their own: their channels are
their producer's channels, which already carry one; a :class:`GateMirror` after the depthwise
norm multiplies by that same gate again, so that a closed channel is exactly zero all the way to
its consumers (without it, act(BN(0)) of the depthwise layer — a constant — would still reach
the projection conv and the squeeze-and-excitation block, and removing the channel would change
the output). Convolutions that feed a sigmoid (the
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


GateKind = str  # "sigmoid" | "ste" | "hard_concrete"
GATE_KINDS = ("sigmoid", "ste", "hard_concrete")

# Hard-concrete (Louizos et al., ICLR 2018): stretch interval (γ, ζ) and temperature β.
HC_GAMMA, HC_ZETA, HC_BETA = -0.1, 1.1, 2.0 / 3.0
HC_LOG_ALPHA_INIT = 3.0  # deterministic gate 1 at the start: training starts from the dense network
# Straight-through scores start just above 0 and stay within ±STE_SCORE_RANGE·T: a gate flips within a
# few steps of the budget pressure changing, so the Lagrange multiplier sees the network respond
# before it winds up (measured: scores starting at +2 gave a delay of an epoch, an overshoot to 0.2
# of the MACs on the way to a 0.7 budget, and all gates closing together).
STE_SCORE_INIT, STE_SCORE_RANGE = 0.25, 1.0


class _Scratch:
    """Per-forward scratch that copies and pickles as empty (it may hold a tensor of the autograd graph,
    which ``copy.deepcopy`` refuses)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = None

    def __deepcopy__(self, memo) -> _Scratch:
        return _Scratch()

    def __getstate__(self):
        return None

    def __setstate__(self, state) -> None:
        self.value = None


class ChannelGate(nn.Module):
    """Per-channel gate multiplying an (N, C, ...) tensor. Three kinds:

    sigmoid       — g = sigmoid(score / T): soft, closed when under τ (the original formulation).
    ste           — g = 1 if score > 0 else 0 in the forward pass, gradient of sigmoid(score / T)
                    in the backward pass (straight-through): every gate is exactly open or closed
                    at every step, so the trained network is the pruned network.
    hard_concrete — L0 gate: during training a stretched, clamped concrete sample (exact zeros and
                    ones are reachable), at test time the deterministic clamp(sigmoid(log α)·(ζ−γ)+γ,
                    0, 1); closed when exactly 0.
    """

    def __init__(self, num_channels: int, init: float = 0.95, temperature: float = 1.0, kind: str = "sigmoid"):
        super().__init__()
        if kind not in GATE_KINDS:
            raise ValueError(f"unknown gate kind {kind!r}")
        self.kind = kind
        self.temperature = float(temperature)
        start = {"hard_concrete": HC_LOG_ALPHA_INIT, "ste": STE_SCORE_INIT * temperature}.get(
            kind, init_score(init, temperature) if kind == "sigmoid" else 0.0)
        self.score = nn.Parameter(torch.full((num_channels,), start))
        # MACs of the layer this gate controls, per channel (set by instrument; used by the
        # flops penalty). A plain attribute, not state: it is recomputed on every build.
        self.cost_per_channel = 1.0
        self.layer_name = ""
        self._scratch = _Scratch()

    def _soft(self) -> torch.Tensor:
        return torch.sigmoid(self.score / self.temperature)

    def _hc_deterministic(self) -> torch.Tensor:
        return (torch.sigmoid(self.score) * (HC_ZETA - HC_GAMMA) + HC_GAMMA).clamp(0.0, 1.0)

    def values(self) -> torch.Tensor:
        """What multiplies the channels now (hard-concrete samples only while training with grad)."""
        if self.kind == "sigmoid":
            return self._soft()
        if self.kind == "ste":
            soft = self._soft()
            return (self.score > 0).to(soft.dtype) + soft - soft.detach()
        if self.training and torch.is_grad_enabled():
            u = torch.rand_like(self.score).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.score) / HC_BETA)
            return (s * (HC_ZETA - HC_GAMMA) + HC_GAMMA).clamp(0.0, 1.0)
        return self._hc_deterministic()

    def open_prob(self) -> torch.Tensor:
        """Differentiable 'is this channel kept': the soft gate (sigmoid), the straight-through
        hard gate (ste), the probability that the gate is non-zero (hard-concrete, L0)."""
        if self.kind == "hard_concrete":
            return torch.sigmoid(self.score - HC_BETA * math.log(-HC_GAMMA / HC_ZETA))
        return self.values()

    @torch.no_grad()
    def closed(self, threshold: float) -> torch.Tensor:
        """Channels pruning removes: under τ (sigmoid); exactly zero at test time (hard kinds)."""
        if self.kind == "sigmoid":
            return self._soft() < threshold
        if self.kind == "ste":
            return self.score <= 0
        return self._hc_deterministic() <= 0

    def costs(self) -> torch.Tensor:
        return torch.full_like(self.score, float(self.cost_per_channel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.values()
        # a hard-concrete sample is drawn once per forward pass: the depthwise norm's GateMirror
        # reuses it, so both places close the same channels
        self._scratch.value = g if self.kind == "hard_concrete" and self.training and torch.is_grad_enabled() else None
        shape = [1, -1] + [1] * (x.dim() - 2)
        return x * g.to(x.dtype).view(shape)

    def extra_repr(self) -> str:
        return f"{self.score.numel()}, kind={self.kind}, temperature={self.temperature}"


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


@torch.no_grad()
def clamp_scores(model: nn.Module) -> None:
    """Keep hard gates' scores where a flip stays reachable: straight-through scores in ±1·T (a
    closed gate the task needs reopens within a few steps), hard-concrete log α in
    [log 0.01, log 100] (Louizos et al.)."""
    for _, m in iter_gates(model):
        if isinstance(m, ChannelGate) and m.kind == "ste":
            m.score.clamp_(-STE_SCORE_RANGE * m.temperature, STE_SCORE_RANGE * m.temperature)
        elif isinstance(m, ChannelGate) and m.kind == "hard_concrete":
            m.score.clamp_(math.log(0.01), math.log(100.0))


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
        v = (m.open_prob() if isinstance(m, ChannelGate) else m.values()).reshape(-1)
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
        closed = (m.closed(threshold) if isinstance(m, ChannelGate) else v < threshold).reshape(-1).cpu()
        (chan if isinstance(m, ChannelGate) else weight).append((v, closed))
        per_layer[name] = {
            "kind": "channel" if isinstance(m, ChannelGate) else "weight",
            "n": int(v.numel()),
            "mean": float(v.mean()),
            "below_threshold": float(closed.float().mean()),
            "closed": int(closed.sum()),
        }

    def summary(vs: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
        if not vs:
            return {"n": 0, "mean": float("nan"), "below_threshold": float("nan")}
        v = torch.cat([a for a, _ in vs])
        closed = torch.cat([c for _, c in vs])
        return {"n": int(v.numel()), "mean": float(v.mean()), "below_threshold": float(closed.float().mean())}

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


class GateMirror(nn.Module):
    """Multiplies its input by another :class:`ChannelGate`'s values (that of the depthwise conv's
    producer), placed after the depthwise conv's norm.

    The source gate is held in a plain tuple, not registered as a submodule: ``state_dict``,
    ``parameters()``, :func:`iter_gates` and the penalty see it once, where it really sits;
    ``copy.deepcopy`` of the model maps the reference onto the copied gate. DepGraph sees the
    mirror as a customized layer coupling its input and output channels (like a norm) with no
    state of its own; :func:`prunevision.prune.strip_gates` folds it into the norm before it.
    """

    def __init__(self, source: ChannelGate):
        super().__init__()
        self._source = (source,)

    @property
    def source(self) -> ChannelGate:
        return self._source[0]

    def values(self) -> torch.Tensor:
        return self.source.values()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        src = self.source
        scratch = getattr(src, "_scratch", None)
        sample = scratch.value if scratch is not None else None
        g = sample if sample is not None and self.training and torch.is_grad_enabled() else src.values()
        return x * g.to(x.dtype).view([1, -1] + [1] * (x.dim() - 2))

    def extra_repr(self) -> str:
        return f"source={self.source.layer_name or '?'}"


@dataclass(frozen=True)
class MirrorSite:
    """A depthwise conv whose channels are those of ``producer`` (a gated conv)."""

    depthwise: str
    after: str  # its norm (or the depthwise conv itself when it has no norm)
    producer: str


# Layers that keep channel i in channel i (what may sit between a conv and the depthwise conv
# that reads its channels).
_CHANNELWISE = _NORMS + (
    nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU, nn.GELU, nn.LeakyReLU, nn.ELU, nn.Mish, nn.PReLU,
    nn.Identity, nn.Dropout, nn.Dropout2d, ChannelGate, GateMirror,
)


def _trace_dataflow(model: nn.Module, example: torch.Tensor):
    """Leaf modules in forward order with the identities of their input and output tensors (the
    tensors are kept alive, so an id is never reused) and their output shapes."""
    order: list[str] = []
    ins: dict[str, int] = {}
    outs: dict[str, int] = {}
    shapes: dict[str, torch.Size] = {}
    keep: list[torch.Tensor] = []
    handles = []
    for name, m in model.named_modules():
        if len(list(m.children())) == 0 and name:
            def hook(mod, inp, out, name=name):
                if name in outs or not isinstance(out, torch.Tensor):
                    return
                x = inp[0] if inp and isinstance(inp[0], torch.Tensor) else None
                order.append(name)
                ins[name] = id(x) if x is not None else -1
                outs[name] = id(out)
                shapes[name] = out.shape
                keep.extend([t for t in (x, out) if t is not None])
            handles.append(m.register_forward_hook(hook))
    forward_with_hooks(model, example, handles)
    return order, ins, outs, shapes


def forward_with_hooks(model: nn.Module, example: torch.Tensor, handles: list) -> None:
    """One inference forward pass of ``example`` for the hooks behind ``handles``, which are removed
    afterwards; the model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def find_mirror_sites(model: nn.Module, example: torch.Tensor, producers: set[str]) -> list[MirrorSite]:
    """Every depthwise conv whose input comes straight from a gated conv (through channel-wise
    layers only: norm, activation, dropout), with the norm its mirror follows."""
    modules = dict(model.named_modules())
    order, ins, outs, shapes = _trace_dataflow(model, example)
    sites = []
    for i, name in enumerate(order):
        conv = modules[name]
        if not isinstance(conv, nn.Conv2d) or not _is_depthwise(conv):
            continue
        producer, cur = None, ins[name]
        for j in range(i - 1, -1, -1):  # walk the data back to the conv that made these channels
            if outs[order[j]] != cur:
                continue
            m = modules[order[j]]
            if isinstance(m, nn.Conv2d) and not _is_depthwise(m):
                producer = order[j] if m.out_channels == conv.in_channels else None
                break
            if not isinstance(m, (nn.Conv2d, *_CHANNELWISE)):
                break  # pooling, attention, ...: no longer the producer's channels one to one
            cur = ins[order[j]]  # in-place layers give out what they got: keep walking back
        if producer is None or producer not in producers:
            continue
        nxt = order[i + 1] if i + 1 < len(order) else None
        after = name
        if (nxt is not None and isinstance(modules[nxt], _NORMS) and shapes[nxt][1:2] == shapes[name][1:2]
                and ins[nxt] == outs[name]):
            after = nxt
        sites.append(MirrorSite(depthwise=name, after=after, producer=producer))
    return sites


def _trace_leaves(model: nn.Module, example: torch.Tensor) -> tuple[list[str], dict[str, torch.Size]]:
    """Leaf modules in the order one forward pass runs them, and their output shapes."""
    order, _, _, shapes = _trace_dataflow(model, example)
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
    kind: str = "sigmoid",
) -> list[GateSite]:
    """Put a ChannelGate after every prunable conv (after its norm), and a GateMirror of the
    producer's gate after every depthwise conv's norm. Returns the gate sites.

    ``kind="sigmoid"``: PrunableLinear layers already in the model are kept (one gate per weight)
    and get their layer names. Hard kinds (``ste``, ``hard_concrete``) prune structure only:
    PrunableLinear layers become plain linear layers and every linear layer but the classifier
    gets a gate per output unit.
    """
    if kind != "sigmoid":
        sites = _gate_linear_units(model, example, init=init, temperature=temperature, kind=kind)
    else:
        sites = []
    conv_sites = find_gate_sites(model, example, skip=skip, num_classes=num_classes)
    mirrors = find_mirror_sites(model, example, {s.conv for s in conv_sites})
    sites = conv_sites + sites
    gate_of: dict[str, ChannelGate] = {}
    for site in sites:
        parent_name, _, child = site.after.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        inner = getattr(parent, child)
        if isinstance(inner, nn.Sequential) and len(inner) == 2 and isinstance(inner[1], ChannelGate):
            gate_of[site.conv] = inner[1]  # already gated (the linear units of hard kinds): one gate only
            continue
        gate = ChannelGate(site.channels, init=init, temperature=temperature, kind=kind)
        gate.cost_per_channel = site.macs_per_channel
        # the conv this gate controls (wrapped as "<name>.0" when the gate follows it directly)
        gate.layer_name = site.conv if site.after != site.conv else f"{site.conv}.0"
        setattr(parent, child, nn.Sequential(inner, gate))
        gate_of[site.conv] = gate
    for ms in mirrors:  # depthwise norms: the producer's gate once more (see GateMirror)
        parent_name, _, child = ms.after.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, nn.Sequential(getattr(parent, child), GateMirror(gate_of[ms.producer])))
    for name, m in model.named_modules():
        if isinstance(m, PrunableLinear):
            m.layer_name = name
            with torch.no_grad():
                m.scores.fill_(init_score(init, temperature))
            m.temperature = float(temperature)
    return sites


def _gate_linear_units(
    model: nn.Module, example: torch.Tensor, *, init: float, temperature: float, kind: str
) -> list[GateSite]:
    """Hard kinds: PrunableLinear → nn.Linear (same weights), then a unit gate after every linear
    layer except the last one (the classifier), after its BatchNorm1d when one follows."""
    for _, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, PrunableLinear):
                lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                with torch.no_grad():
                    lin.weight.copy_(child.weight)
                    if child.bias is not None:
                        lin.bias.copy_(child.bias)
                setattr(module, child_name, lin.to(child.weight.device))
    modules = dict(model.named_modules())
    order, shapes = _trace_leaves(model, example)
    linears = [n for n in order if isinstance(modules[n], nn.Linear)]
    sites = []
    for name in linears[:-1]:
        i = order.index(name)
        nxt = order[i + 1] if i + 1 < len(order) else None
        after = nxt if nxt is not None and isinstance(modules[nxt], nn.BatchNorm1d) else name
        lin = modules[name]
        parent_name, _, child = after.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        gate = ChannelGate(lin.out_features, init=init, temperature=temperature, kind=kind)
        gate.cost_per_channel = float(lin.in_features)
        gate.layer_name = name if after != name else f"{name}.0"
        setattr(parent, child, nn.Sequential(getattr(parent, child), gate))
        sites.append(GateSite(conv=name, after=after, channels=lin.out_features,
                              macs_per_channel=float(lin.in_features)))
    return sites

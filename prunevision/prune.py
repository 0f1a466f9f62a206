"""Hard pruning: channels are removed for real with torch-pruning's DepGraph.

``gate`` (ours) reads the trained gates through :class:`GateImportance`, a torch-pruning
``Importance``: DepGraph finds the coupled layers (residual additions, depthwise convs,
squeeze-and-excitation, the hybrid's concatenation) and a channel of a coupled group goes only
when every gate in the group is under τ (group reduction: max). Gate scores are parameters of
the channel dimension, so DepGraph prunes them along with their channels.

Baselines go through the same pipeline: masks (``l1_unstructured``, ``random_unstructured``:
sparse, same shapes, no speed-up) and structured group criteria from torch-pruning
(``l1_structured``, ``l2_structured``, ``taylor``, ``bn_scale``, ``random_structured``), and two
class-aware criteria computed on calibration images of the selected classes (``data.classes``):
``ocap`` (output activation statistics of each channel, collected with forward hooks; layers
compared on normalised scores, so each layer gets its own ratio) and ``lrp`` (layer-wise
relevance of each channel for the true class, LRP-0 computed as activation × gradient of the
true-class logit, which equals LRP-0 for networks of ReLUs and linear layers; accumulated over the
calibration images).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import prune as nn_prune

from prunevision.gates import ChannelGate, GateMirror, PrunableLinear

STRUCTURED = ("l1_structured", "l2_structured", "taylor", "bn_scale", "random_structured", "ocap", "lrp")
CLASS_AWARE = ("ocap", "lrp")
UNSTRUCTURED = ("l1_unstructured", "random_unstructured")


class PruneError(RuntimeError):
    """Pruning could not be done as asked."""


def step_ratio(target: float, steps: int) -> float:
    """Share of what remains to prune at each of ``steps`` steps to reach ``target`` overall:
    S_step = 1 − (1 − S_target)^(1/N)."""
    if not 0 <= target < 1 or steps < 1:
        raise ValueError("target must be in [0, 1) and steps ≥ 1")
    return 1.0 - (1.0 - target) ** (1.0 / steps)


def classifier_head(model: nn.Module) -> nn.Module | None:
    """The layer whose outputs are the classes (kept whole)."""
    last = None
    for m in model.modules():
        if isinstance(m, (nn.Linear, PrunableLinear)):
            last = m
    if last is not None:
        return last
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1] if convs else None


# --------------------------------------------------------------------------- gates → plain layers


@torch.no_grad()
def strip_gates(model: nn.Module, threshold: float | None = None) -> nn.Module:
    """Fold every gate's value into the adjacent affine parameters and remove the gate.

    ``Sequential(norm, gate)`` becomes ``norm`` with γ·g and β·g (a gate right after a conv
    scales that conv's weights and bias): the network computes exactly what it computed with
    its gates. A :class:`PrunableLinear` becomes an ``nn.Linear`` with weight ⊙ g; weights whose
    gate is under ``threshold`` become real zeros. A :class:`GateMirror` after a depthwise norm
    is folded into that norm the same way (with its source gate's values, all read before
    anything is replaced).
    """
    values: dict[int, torch.Tensor] = {}
    for m in model.modules():
        if isinstance(m, ChannelGate):
            values[id(m)] = m.values().detach()
    for m in model.modules():
        if isinstance(m, GateMirror):
            values[id(m)] = values[id(m.source)] if id(m.source) in values else m.source.values().detach()
    for _, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Sequential) and len(child) == 2 and isinstance(child[1], (ChannelGate, GateMirror)):
                inner, gate = child[0], child[1]
                if _fold_channel_scale(inner, values[id(gate)]):
                    setattr(module, child_name, inner)
                elif isinstance(gate, GateMirror):  # not foldable: a gate of its own, same values
                    fixed = copy.deepcopy(gate.source)
                    setattr(module, child_name, nn.Sequential(inner, fixed))
            elif isinstance(child, PrunableLinear):
                setattr(module, child_name, _linear_from_prunable(child, threshold))
    return model


def _fold_channel_scale(layer: nn.Module, g: torch.Tensor) -> bool:
    g = g.to(next(layer.parameters()).device) if any(True for _ in layer.parameters()) else g
    if isinstance(layer, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)):
        if getattr(layer, "weight", None) is None:
            return False  # not affine: keep the gate as a fixed scale
        layer.weight.mul_(g.to(layer.weight.dtype))
        if layer.bias is not None:
            layer.bias.mul_(g.to(layer.bias.dtype))
        return True
    if isinstance(layer, nn.Linear):
        layer.weight.mul_(g.view(-1, 1).to(layer.weight.dtype))
        if layer.bias is not None:
            layer.bias.mul_(g.to(layer.bias.dtype))
        return True
    if isinstance(layer, nn.Conv2d):
        layer.weight.mul_(g.view(-1, 1, 1, 1).to(layer.weight.dtype))
        if layer.bias is not None:
            layer.bias.mul_(g.to(layer.bias.dtype))
        return True
    return False


def _linear_from_prunable(p: PrunableLinear, threshold: float | None) -> nn.Linear:
    g = p.values().detach()
    w = p.weight.detach() * g
    if threshold is not None:
        w = torch.where(g < threshold, torch.zeros_like(w), w)
    lin = nn.Linear(p.in_features, p.out_features, bias=p.bias is not None).to(w.device)
    lin.weight.copy_(w)
    if p.bias is not None:
        lin.bias.copy_(p.bias.detach())
    return lin


# --------------------------------------------------------------------------- importance


class ChannelGatePruner(tp.pruner.function.BasePruningFunc):
    """Torch-pruning's pruning function for a ChannelGate: a per-channel layer whose input and
    output channels are the same (like BatchNorm). Registered as a customized pruner, the gate is
    one node of the dependency graph, pruned with its channels."""

    TARGET_MODULES = (ChannelGate,)

    def prune_out_channels(self, layer: ChannelGate, idxs: list[int]) -> ChannelGate:
        keep = sorted(set(range(layer.score.numel())) - set(idxs))
        layer.score = self._prune_parameter_and_grad(layer.score, keep, 0)
        return layer

    prune_in_channels = prune_out_channels  # same function: DepGraph couples in and out

    def get_out_channels(self, layer: ChannelGate) -> int:
        return layer.score.numel()

    get_in_channels = get_out_channels


class GateMirrorPruner(tp.pruner.function.BasePruningFunc):
    """A GateMirror couples its input and output channels and holds nothing to prune (its source
    gate is pruned as a node of its own); its width is inferred from its neighbours."""

    TARGET_MODULES = (GateMirror,)

    def prune_out_channels(self, layer: GateMirror, idxs: list[int]) -> GateMirror:
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: GateMirror) -> None:
        return None

    get_in_channels = get_out_channels


GATE_PRUNERS = {ChannelGate: ChannelGatePruner(), GateMirror: GateMirrorPruner()}


class GateImportance(tp.importance.GroupMagnitudeImportance):
    """Per-channel importance of a DepGraph group = the largest gate value in the group.

    Reads the ChannelGate nodes of the group (registered with :class:`ChannelGatePruner`) and,
    for linear layers that had weight-level gates, the largest gate of each output unit. Groups
    without a gate return None and are left alone.
    """

    def __init__(self, linear_unit_gates: dict[nn.Module, torch.Tensor] | None = None):
        super().__init__(p=1, group_reduction="max", normalizer=None)
        self.linear_unit_gates = {id(k): v for k, v in (linear_unit_gates or {}).items()}

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        imps, idxs_list = [], []
        for i, (dep, idxs) in enumerate(group):
            layer = dep.layer
            if isinstance(layer, ChannelGate):
                imps.append(layer.values().detach()[idxs].float())
                idxs_list.append(group[i].root_idxs)
            elif id(layer) in self.linear_unit_gates and dep.pruning_fn == tp.prune_linear_out_channels:
                imps.append(self.linear_unit_gates[id(layer)][idxs].float())
                idxs_list.append(group[i].root_idxs)
        if not imps:
            return None
        return self._reduce(imps, idxs_list)


# --------------------------------------------------------------------------- pruning


def _removes_out_channels(dep) -> bool:
    """Whether a DepGraph dependency removes its layer's output channels (not its inputs)."""
    return "out_channels" in getattr(dep.handler, "__name__", "")


@dataclass
class PruneReport:
    method: str
    removed: dict[str, int] = field(default_factory=dict)  # root layer → channels removed
    kept: dict[str, int] = field(default_factory=dict)
    # conv layer → indices of its output channels removed (in that step's numbering)
    removed_idxs: dict[str, list[int]] = field(default_factory=dict)
    # the hybrid's backbones still run after this step (None: not a hybrid)
    backbones_remaining: list[str] | None = None

    def record(self, group, names: dict[int, str]) -> None:
        """Note which output channels of which conv layers a pruning group removes."""
        for dep, idxs in group:
            if isinstance(dep.target.module, nn.Conv2d) and _removes_out_channels(dep):
                key = names.get(id(dep.target.module), "")
                self.removed_idxs.setdefault(key, []).extend(int(i) for i in idxs)

    def merge(self, other: PruneReport) -> None:
        for k, v in other.removed.items():
            self.removed[k] = self.removed.get(k, 0) + v
        self.kept.update(other.kept)
        if other.backbones_remaining is not None:
            self.backbones_remaining = list(other.backbones_remaining)

    @property
    def channels_removed(self) -> int:
        return sum(self.removed.values())


def _names(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


def cap_floor(n: int, max_layer_sparsity: float | None) -> int:
    """The fewest of ``n`` channels a layer keeps under ``prune.max_layer_sparsity`` (0: no cap)."""
    return int(math.ceil(n * (1 - max_layer_sparsity))) if max_layer_sparsity is not None else 0


def keep_count(n: int, n_closed: int, min_channels: int, round_to: int | None,
               max_layer_sparsity: float | None = None) -> int:
    """Channels a group keeps: the open ones, at least ``min_channels``, rounded up to ``round_to``, and never
    fewer than ``1 − max_layer_sparsity`` of ``n``."""
    keep = max(n - n_closed, min(min_channels, n), 1)
    if round_to:
        keep = min(n, int(math.ceil(keep / round_to) * round_to))
    return max(keep, cap_floor(n, max_layer_sparsity))


def prune_by_gates(
    model: nn.Module,
    example: torch.Tensor,
    threshold: float,
    *,
    round_to: int | None = None,
    min_channels: int = 1,
    max_layer_sparsity: float | None = None,
    skip: Iterable[nn.Module] | None = None,
) -> PruneReport:
    """Remove every channel whose coupled gates are all under ``threshold``.

    Channel gates stay in the model (pruned along with their channels), so training under the
    penalty can go on between iterative steps; call :func:`strip_gates` at the end.
    PrunableLinear layers are turned into plain linear layers (weights ⊙ gate, closed weights
    zero) and output units whose weights are all closed are removed. Layer widths never drop to
    zero (``min_channels``), ``round_to`` rounds kept widths up to a multiple, the classifier
    keeps all its outputs. In the hybrid, a backbone the closed gates turn into a constant goes
    whole (:func:`drop_closed_backbones`; the report's ``backbones_remaining`` names the rest).
    """
    linear_gates: dict[nn.Module, torch.Tensor] = {}
    with torch.no_grad():
        for _, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, PrunableLinear):
                    unit = child.values().detach().max(dim=1).values
                    lin = _linear_from_prunable(child, threshold)
                    setattr(module, child_name, lin)
                    linear_gates[lin] = unit
    head = classifier_head(model)
    importance = GateImportance(linear_gates)
    was_training = model.training
    model.eval()
    remaining = drop_closed_backbones(model, example, threshold, skip=skip,
                                      max_layer_sparsity=max_layer_sparsity)
    with torch.enable_grad():  # DepGraph traces with autograd
        DG = tp.DependencyGraph().build_dependency(model, example_inputs=example, customized_pruners=GATE_PRUNERS)
    names = _names(model)
    report = PruneReport("gate", backbones_remaining=remaining)
    ignored = ([head] if head is not None else []) + list(skip or [])
    skip_ids = {m for m in skip or []}
    for group in DG.get_all_groups(ignored_layers=ignored, root_module_types=(nn.Conv2d, nn.Linear)):
        if skip and any(dep.target.module in skip_ids and _removes_out_channels(dep) for dep, _ in group):
            continue  # a skipped layer's channels stay, and so do those coupled to them
        imp = importance(group)
        if imp is None:
            continue
        # grouped convs (RegNet, ResNeXt) keep equal group widths: judge a channel position across
        # all groups and remove it from every group
        ch_groups = _channel_groups(group)
        if len(imp) % ch_groups:
            continue
        dim_imp = imp.view(ch_groups, -1).max(dim=0).values
        n = len(dim_imp)
        closed = (dim_imp < threshold).nonzero().flatten()
        keep = keep_count(n, len(closed), min_channels, round_to, max_layer_sparsity)
        n_remove = n - keep
        if n_remove <= 0:
            continue
        order = torch.argsort(dim_imp[closed])  # least open first
        pos = closed[order][:n_remove]
        idxs = torch.cat([pos + n * k for k in range(ch_groups)]).tolist()
        root = group[0].dep.target.module
        pg = DG.get_pruning_group(root, group[0].dep.handler, idxs)
        if DG.check_pruning_group(pg):
            report.record(pg, names)
            pg.prune()
            report.removed[names.get(id(root), type(root).__name__)] = len(idxs)
            report.kept[names.get(id(root), type(root).__name__)] = keep
    model.train(was_training)
    return report


CONSTANT_RTOL = 1e-5  # a backbone whose pooled output varies less than this (relative) is constant
VARIES_RTOL = 1e-3  # ... and one that varies more than this with all gates open is closed by its gates


@torch.no_grad()
def drop_closed_backbones(
    model: nn.Module,
    example: torch.Tensor,
    threshold: float,
    *,
    skip: Iterable[nn.Module] | None = None,
    max_layer_sparsity: float | None = None,
) -> list[str] | None:
    """The hybrid: drop every backbone that the closed gates (under ``threshold``) turn into a
    constant — its gates into the fusion layer all closed, or every channel of one of its layers —
    and return the names of the backbones that remain (None when the model is no hybrid).

    With the closed gates at exactly zero, each backbone runs on the example and two random
    images; one whose pooled output does not change (while it does with every gate open: the gates
    made it constant, not an untrained network's vanishing signal) is removed from the hybrid, and
    its constant contribution is folded into the fusion layer (``Hybrid.drop_backbones``): the network computes
    what it computed up to the closed gates' own values. One backbone always stays. A backbone
    holding a ``skip`` layer stays, and so does every backbone under ``max_layer_sparsity``
    (dropping one removes all of its layers' channels).
    """
    hybrid = next((m for m in model.modules() if hasattr(m, "drop_backbones") and hasattr(m, "pooled_features")),
                  None)
    if hybrid is None:
        return None
    if (max_layer_sparsity is not None and max_layer_sparsity < 1) or len(hybrid.active) < 2:
        return hybrid.backbones_remaining
    open_of = {id(m): (m.values().detach() >= threshold) for m in hybrid.modules() if isinstance(m, ChannelGate)}

    def gated(mask: torch.Tensor | None):
        def hook(_mod, inp, out):
            if mask is None:
                return inp[0]  # every gate wide open
            return out * mask.to(out.dtype).view([1, -1] + [1] * (out.dim() - 2))
        return hook

    gen = torch.Generator().manual_seed(0)
    xs = torch.cat([example[:1], torch.randn((2, *example.shape[1:]), generator=gen).to(example)])
    was = hybrid.training
    hybrid.eval()
    runs, handles = [], []
    try:
        for wide_open in (False, True):
            for m in hybrid.modules():
                if isinstance(m, ChannelGate):
                    handles.append(m.register_forward_hook(gated(None if wide_open else open_of[id(m)])))
                elif isinstance(m, GateMirror):
                    mask = open_of.get(id(m.source))
                    mask = mask if mask is not None else m.source.values().detach() >= threshold
                    handles.append(m.register_forward_hook(gated(None if wide_open else mask)))
            runs.append([f.flatten(1) for f in hybrid.pooled_features(xs)])
            for h in handles:
                h.remove()
            handles = []
    finally:
        for h in handles:
            h.remove()
        hybrid.train(was)
    feats, feats_open = runs

    def variation(f: torch.Tensor) -> tuple[float, float]:
        return float((f - f[:1]).abs().max()), float(f.abs().max())

    skip_ids = {id(m) for m in skip or []}
    drop = set()
    for k, (i, f) in enumerate(zip(hybrid.active, feats)):
        if any(id(m) in skip_ids for m in hybrid.backbones[i].modules()):
            continue
        var, scale = variation(f)
        var_open, scale_open = variation(feats_open[k])
        # constant with the closed gates at zero, and because of them: it varies with all gates open
        if var <= CONSTANT_RTOL * scale and var_open > VARIES_RTOL * scale_open:
            drop.add(i)
    if len(drop) == len(hybrid.active):
        drop.discard(hybrid.active[0])  # every backbone closed: the first one stays
    hybrid.drop_backbones(drop, [f[0] for f in feats])
    return hybrid.backbones_remaining


def _channel_groups(group) -> int:
    groups = [1]
    for dep, _ in group:
        m = dep.target.module
        if isinstance(m, nn.Conv2d) and m.groups > 1 and not (m.groups == m.in_channels == m.out_channels):
            groups.append(m.groups)
    return max(groups)


class ChannelScoreImportance(tp.importance.GroupMagnitudeImportance):
    """Precomputed scores per output channel of conv / norm layers, read for each DepGraph group
    (mean over the group's layers, then divided by the group's mean so that layers of different
    scale compare in global pruning)."""

    def __init__(self, scores: dict[nn.Module, torch.Tensor]):
        super().__init__(p=1, group_reduction="mean", normalizer="mean")
        self.scores = scores

    def __call__(self, group) -> torch.Tensor | None:
        from torch_pruning.pruner import function as F

        out_fns = (F.prune_conv_out_channels, F.prune_batchnorm_out_channels, F.prune_linear_out_channels)
        imps, roots = [], []
        for i, (dep, idxs) in enumerate(group):
            score = self.scores.get(dep.layer)
            if score is not None and dep.pruning_fn in out_fns and len(score) > max(idxs, default=-1):
                imps.append(score[idxs].float())
                roots.append(group[i].root_idxs)
        if not imps:
            return None
        return self._normalize(self._reduce(imps, roots), self.normalizer)


def _scored_layers(model: nn.Module) -> list[nn.Module]:
    """Where channel statistics are read: each norm layer, and each conv not followed by one."""
    order = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.GroupNorm))]
    out = []
    for i, m in enumerate(order):
        if isinstance(m, nn.Conv2d) and i + 1 < len(order) and not isinstance(order[i + 1], nn.Conv2d):
            continue  # its norm (next in module order) stands for it
        out.append(m)
    return out


def class_aware_scores(model: nn.Module, method: str,
                       calibration: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[nn.Module, torch.Tensor]:
    """One score per output channel of every norm/conv layer, from calibration batches.

    ``ocap``: mean positive activation (after the layer, as the following ReLU sees it).
    ``lrp``: mean |Σ_spatial activation × ∂ logit_true / ∂ activation| (LRP-0 relevance).
    """
    layers = _scored_layers(model)
    sums: dict[nn.Module, torch.Tensor] = {}
    count = 0
    acts: dict[nn.Module, torch.Tensor] = {}
    relus = [m for m in model.modules() if isinstance(m, (nn.ReLU, nn.ReLU6)) and m.inplace]
    for m in relus:  # relevance needs the activations as they were, not rectified in place
        m.inplace = False

    def hook(mod, _inp, out):
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            return
        if method == "ocap":
            s = out.detach().clamp_min(0).mean(dim=(0, 2, 3)) * out.shape[0]
            sums[mod] = sums.get(mod, 0) + s
        else:
            out.retain_grad()
            acts[mod] = out

    handles = [m.register_forward_hook(hook) for m in layers]
    was = model.training
    model.eval()
    try:
        for x, y in calibration:
            if method == "ocap":
                with torch.no_grad():
                    model(x)
            else:
                acts.clear()
                model.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    logits = model(x)
                    logits.gather(1, y.view(-1, 1)).sum().backward()
                for mod, a in acts.items():
                    if a.grad is not None:
                        r = (a.detach() * a.grad).sum(dim=(2, 3)).abs().sum(dim=0)
                        sums[mod] = sums.get(mod, 0) + r
            count += len(x)
    finally:
        for h in handles:
            h.remove()
        for m in relus:
            m.inplace = True
        model.zero_grad(set_to_none=True)
        model.train(was)
    if count == 0:
        raise PruneError(f"prune.method={method} needs calibration images")
    return {m: (v / count).cpu() for m, v in sums.items()}


def first_convs(model: nn.Module, n: int) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)][:n]


def kept_whole(model: nn.Module, example: torch.Tensor, layers: Iterable[nn.Module]) -> list[str]:
    """Names of the convs whose output channels are coupled to those of ``layers`` (residual sums,
    depthwise pairs; ``layers`` included): what pruning keeps whole when it skips ``layers``."""
    names = _names(model)
    with torch.enable_grad():  # DepGraph traces with autograd
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example, customized_pruners=GATE_PRUNERS)
    out: dict[str, None] = {}
    for layer in layers:
        out[names[id(layer)]] = None
        group = dg.get_pruning_group(layer, tp.prune_conv_out_channels, idxs=[0])
        for dep, _ in group:
            if isinstance(dep.target.module, nn.Conv2d) and _removes_out_channels(dep):
                out[names[id(dep.target.module)]] = None
    return [n for n, _ in model.named_modules() if n in out]  # in the model's order


def structured_importance(method: str) -> tp.importance.Importance:
    if method == "l1_structured":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if method == "l2_structured":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if method == "bn_scale":
        return tp.importance.BNScaleImportance()
    if method == "taylor":
        return tp.importance.GroupTaylorImportance()
    if method == "random_structured":
        return tp.importance.RandomImportance()
    raise PruneError(f"prune.method: {method!r} is not a structured method")


def prune_structured(
    model: nn.Module,
    example: torch.Tensor,
    method: str,
    ratio: float,
    *,
    round_to: int | None = None,
    max_layer_sparsity: float | None = None,
    calibration: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
    skip: Iterable[nn.Module] | None = None,
) -> PruneReport:
    """Remove ``ratio`` of every prunable group's channels by a torch-pruning group criterion
    (class-aware methods: ``ratio`` of all channels, spread over layers by their scores).

    ``taylor``, ``ocap`` and ``lrp`` need ``calibration`` batches. ``skip``: layers left whole.
    """
    head = classifier_head(model)
    if method in CLASS_AWARE:
        if calibration is None:
            raise PruneError(f"prune.method={method} needs calibration batches")
        imp = ChannelScoreImportance(class_aware_scores(model, method, calibration))
    else:
        imp = structured_importance(method)
    ignored = ([head] if head is not None else []) + list(skip or [])
    was_training = model.training
    model.eval()
    with torch.enable_grad():  # DepGraph traces with autograd
        pruner = tp.pruner.BasePruner(
            model, example, importance=imp, pruning_ratio=ratio,
            max_pruning_ratio=max_layer_sparsity if max_layer_sparsity is not None else 0.95,
            ignored_layers=ignored, round_to=round_to,
            global_pruning=method in CLASS_AWARE,  # per-layer ratios from the scores themselves
        )
    if method == "taylor":
        if calibration is None:
            raise PruneError("prune.method=taylor needs calibration batches")
        model.zero_grad()
        with torch.enable_grad():
            for x, y in calibration:
                nn.functional.cross_entropy(model(x), y).backward()
    names = _names(model)
    report = PruneReport(method)
    for group in pruner.step(interactive=True):
        root = group[0].dep.target.module
        report.removed[names.get(id(root), type(root).__name__)] = len(group[0].idxs)
        report.record(group, names)
        group.prune()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return report


def apply_unstructured(model: nn.Module, method: str, ratio: float) -> PruneReport:
    """Mask ``ratio`` of all conv/linear weights (global L1 or random). Shapes stay; the masks
    stay attached (so fine-tuning keeps the zeros) until :func:`remove_masks`."""
    params = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not params:
        raise PruneError("the model has no conv or linear weights to mask")
    fn = nn_prune.L1Unstructured if method == "l1_unstructured" else nn_prune.RandomUnstructured
    nn_prune.global_unstructured(params, pruning_method=fn, amount=ratio)
    n = sum(m.weight.numel() for m, _ in params)
    return PruneReport(method, removed={"weights": int(round(n * ratio))})


def keep_zeros(model: nn.Module) -> None:
    """Hold exact zeros of conv/linear weights at zero through fine-tuning (a mask on each layer that
    has some), e.g. the closed weight gates of a PrunableLinear. :func:`remove_masks` makes them
    permanent."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and not nn_prune.is_pruned(m):
            zero = m.weight.detach() == 0
            if zero.any():
                nn_prune.custom_from_mask(m, "weight", ~zero)


def remove_masks(model: nn.Module) -> None:
    for m in model.modules():
        if nn_prune.is_pruned(m) and hasattr(m, "weight_mask"):
            nn_prune.remove(m, "weight")


def zero_fraction(model: nn.Module) -> float:
    """Share of exactly-zero weights in conv and linear layers."""
    zeros = total = 0
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            w = m.weight
            zeros += int((w == 0).sum())
            total += w.numel()
    return zeros / max(total, 1)


def prune_step(
    model: nn.Module,
    example: torch.Tensor,
    method: str,
    *,
    threshold: float,
    ratio: float,
    round_to: int | None = None,
    min_channels: int = 1,
    max_layer_sparsity: float | None = None,
    calibration: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]] | None = None,
    skip_first: int = 0,
) -> PruneReport:
    """One pruning step of any method (``ratio``: share of what remains, for baselines).
    ``skip_first``: the first N conv layers keep all their channels (structured methods)."""
    skip = first_convs(model, skip_first) if skip_first else None
    if method == "gate":
        return prune_by_gates(model, example, threshold, round_to=round_to, min_channels=min_channels,
                              max_layer_sparsity=max_layer_sparsity, skip=skip)
    if method in UNSTRUCTURED:
        return apply_unstructured(model, method, ratio)
    return prune_structured(model, example, method, ratio, round_to=round_to, max_layer_sparsity=max_layer_sparsity,
                            calibration=calibration() if calibration else None, skip=skip)

"""MACs budgets: the multiply-accumulates of the network that pruning will produce, as a
differentiable function of the channel gates, and the Lagrangian that makes training meet a budget.

:class:`MacsModel` reads the gated network once with torch-pruning's DepGraph: every group of
coupled channels (a conv's outputs, its norm and gate, the next layers' inputs, residual additions,
concatenations, flattening) and, for every conv and linear layer, which groups size its inputs and
outputs. A layer's MACs are ``k_h·k_w·H·W · C_in·C_out / groups`` (depthwise: ``k·k·H·W·C``; linear:
``C_in·C_out``), so a layer whose inputs and outputs both shrink to half costs a quarter: the
product is what makes a budget of 0.125 reachable at all, where a penalty that counts each gate's
own MACs (``gates.penalty=flops``) is linear in the gates. The channel count of a group is the
number of positions where some gate of the group is open; its value in the forward pass is the
count pruning will keep (closed channels removed, ``min_channels``, ``round_to`` and
``max_layer_sparsity`` applied), its gradient that of the differentiable open probabilities
(:meth:`ChannelGate.open_prob`). Everything the model does not cover (norms, pooling, the
classifier's bias) is a constant calibrated so that the model equals torch-pruning's own count of
the dense network.

:class:`BudgetController` adds ``λ1·(s − t) + λ2·(s − t)²`` to the loss, where ``s`` is that MACs
share and ``t`` the budget in force (ramped from 1, :func:`prunevision.schedules.target_at`); λ1
and λ2 rise by gradient ascent (Adam, maximising), as in CoFiPruning's Lagrangian: the
multiplier grows while the network is over budget and falls once it is under, so no λ has to be
guessed.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from prunevision.config import ConfigError
from prunevision.gates import ChannelGate, GateMirror
from prunevision.prune import GATE_PRUNERS, cap_floor, classifier_head, first_convs, keep_count

BUDGET_TOLERANCE = 0.1  # how near a pruned network's MACs share lands to the budget asked for (relative)


class BudgetError(ConfigError):
    """A budget that cannot be met (reported like a configuration error: one line, before training)."""


@dataclass
class _Group:
    n: int  # channel positions
    per_channel: float = 0.0  # MACs of norms, activations and pooling that follow one channel
    gates: list[tuple[ChannelGate, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # gate, idxs, positions
    prunable: bool = True


@dataclass
class _Layer:
    name: str
    cost: float  # MACs per (input channel, output channel) pair (depthwise: per channel)
    depthwise: bool
    groups: int
    n_in: int
    n_out: int
    ins: list[tuple[int, float]] = field(default_factory=list)  # (group, multiplicity)
    outs: list[tuple[int, float]] = field(default_factory=list)
    module: nn.Module | None = None
    weight: float = 1.0  # what one of its MACs costs (1: counting MACs; ms per MAC: a latency model)

    def macs(self, a_in, a_out):
        """Its MACs with ``a_in`` input and ``a_out`` output channels (depthwise: ``a_in`` is not used)."""
        return self.cost * a_out if self.depthwise else self.cost * a_in * a_out / self.groups


def _side(dep) -> str | None:
    name = getattr(dep.handler, "__name__", "")
    if "out_channels" in name:
        return "out"
    if "in_channels" in name:
        return "in"
    return None


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


class MacsModel:
    """Share of the dense network's MACs that the pruned network will have (see module docs)."""

    OPEN_MARGIN = 1e-3  # the score :meth:`open_floor` gives a straight-through gate it opens

    def __init__(
        self,
        model: nn.Module,
        example: torch.Tensor,
        *,
        threshold: float,
        reference_macs: float | None = None,
        round_to: int | None = None,
        min_channels: int = 1,
        max_layer_sparsity: float | None = None,
        frozen: tuple[nn.Module, ...] = (),
    ):
        self.threshold = threshold
        self.round_to, self.min_channels = round_to, min_channels
        self.max_layer_sparsity = max_layer_sparsity
        self.frozen = tuple(frozen)  # layers whose channels stay (prune.skip_first), as pruning will keep them
        # depthwise norms' copies of a producer's gate (the Fisher estimate sums the gradient over both places)
        self.mirrors = [m for m in model.modules() if isinstance(m, GateMirror)]
        names = {id(m): n for n, m in model.named_modules()}
        out_hw: dict[int, int] = {}
        order: list[tuple[nn.Module, int]] = []  # leaf modules as the forward pass runs them, output channels

        def hook(mod, _inp, out):
            if isinstance(out, torch.Tensor) and out.dim() >= 2:
                out_hw[id(mod)] = math.prod(out.shape[2:])
                order.append((mod, out.shape[1]))

        hooks = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
        was = model.training
        model.eval()
        example = example[:1]
        try:
            with torch.no_grad():
                macs_now, _, per_layer, _ = tp.utils.count_ops_and_params(model, example, layer_wise=True)
                model(example)
            for h in hooks:
                h.remove()
            hooks = []
            with torch.enable_grad():  # DepGraph traces with autograd
                dg = tp.DependencyGraph().build_dependency(model, example_inputs=example,
                                                           customized_pruners=GATE_PRUNERS)
        finally:
            for h in hooks:
                h.remove()
            model.train(was)
        head = classifier_head(model)
        fixed = {id(m) for m in frozen} | ({id(head)} if head is not None else set())
        self.groups: list[_Group] = []
        layers: dict[int, _Layer] = {}
        out_group: dict[int, int] = {}  # module → the group its output channels belong to
        for group in dg.get_all_groups(ignored_layers=[], root_module_types=(nn.Conv2d, nn.Linear)):
            n = len(group[0].idxs)
            g = _Group(n=n)
            gi = len(self.groups)
            for i, (dep, idxs) in enumerate(group):
                mod = dep.target.module
                side = _side(dep)
                roots = torch.as_tensor(group[i].root_idxs, dtype=torch.long)
                if isinstance(mod, ChannelGate):
                    g.gates.append((mod, torch.as_tensor(idxs, dtype=torch.long), roots))
                    continue
                if side == "out" and id(mod) in fixed:
                    g.prunable = False
                if side == "out" and len(idxs) == n:
                    out_group.setdefault(id(mod), gi)
                if not isinstance(mod, (nn.Conv2d, nn.Linear)) or side is None:
                    continue
                layer = layers.get(id(mod))
                if layer is None:
                    if isinstance(mod, nn.Conv2d):
                        cost = math.prod(mod.kernel_size) * out_hw.get(id(mod), 1)
                        layer = _Layer(names.get(id(mod), ""), float(cost), _is_depthwise(mod), mod.groups,
                                       mod.in_channels, mod.out_channels, module=mod)
                    else:
                        layer = _Layer(names.get(id(mod), ""), 1.0, False, 1, mod.in_features, mod.out_features,
                                       module=mod)
                    layers[id(mod)] = layer
                mult = len(idxs) / max(len(set(roots.tolist())), 1)
                terms = layer.outs if side == "out" else layer.ins
                if all(t[0] != gi for t in terms):
                    terms.append((gi, mult))
            if not g.gates:
                g.prunable = False
            self.groups.append(g)
        self.layers = list(layers.values())
        self.channel_weight = 1.0  # what one MAC of the norms, activations and pooling costs
        # norms, activations and pooling: their MACs per channel go to the group of the channels they
        # follow (the last conv/norm of that width in the forward pass that belongs to a group)
        last: dict[int, int] = {}  # channels → group of the latest module of that output width
        for mod, ch in order:
            gi = out_group.get(id(mod))
            if gi is not None:
                last[ch] = gi
            if isinstance(mod, (nn.Conv2d, nn.Linear)) or not per_layer.get(mod):
                continue
            gi = gi if gi is not None else last.get(ch)
            if gi is not None and self.groups[gi].n == ch:
                self.groups[gi].per_channel += float(per_layer[mod]) / ch
        # the constant part: torch-pruning's count of the network as it is now, minus the model's
        full = [torch.tensor(float(g.n)) for g in self.groups]
        self.offset = float(macs_now) - float(self._macs(full))
        self.reference = float(reference_macs) if reference_macs is not None else float(macs_now)

    # ------------------------------------------------------------------ counting

    def _macs(self, counts: list[torch.Tensor]) -> torch.Tensor:
        total = torch.zeros(())
        for layer in self.layers:
            def alive(terms, n):
                covered = sum(self.groups[gi].n * m for gi, m in terms)
                a = torch.zeros((), device=counts[0].device) + (n - covered)
                for gi, m in terms:
                    a = a + m * counts[gi]
                return a

            macs = layer.macs(None if layer.depthwise else alive(layer.ins, layer.n_in), alive(layer.outs, layer.n_out))
            total = total.to(macs.device) + layer.weight * macs
        for g, c in zip(self.groups, counts):
            if g.per_channel:
                total = total + self.channel_weight * g.per_channel * c.to(total.device)
        return total

    def dense_cost(self) -> float:
        """The weighted count of the network with every group whole (no offset)."""
        return float(self._macs([torch.tensor(float(g.n)) for g in self.groups]))

    def _soft_counts(self) -> list[torch.Tensor]:
        out = []
        for g in self.groups:
            if not g.prunable:
                out.append(torch.tensor(float(g.n)))
                continue
            vec = None
            for gate, idxs, roots in g.gates:
                p = gate.open_prob()
                placed = torch.zeros(g.n, device=p.device, dtype=p.dtype).index_copy(0, roots.to(p.device), p[idxs.to(
                    p.device)])
                vec = placed if vec is None else torch.maximum(vec, placed)
            count = vec.sum()
            if self.max_layer_sparsity is not None:  # under the cap, closing more saves nothing: no gradient
                count = torch.clamp(count, min=cap_floor(g.n, self.max_layer_sparsity))
            out.append(count)
        return out

    @torch.no_grad()
    def _hard_counts(self, all_closed: bool = False) -> list[torch.Tensor]:
        out = []
        for g in self.groups:
            if not g.prunable:
                out.append(torch.tensor(float(g.n)))
                continue
            n_closed = g.n if all_closed else g.n - int(self._open_mask(g).sum())
            out.append(torch.tensor(float(keep_count(g.n, n_closed, self.min_channels, self.round_to,
                                                     self.max_layer_sparsity))))
        return out

    @torch.no_grad()
    def _open_mask(self, grp: _Group) -> torch.Tensor:
        """A group's open positions: those where some gate of the group is open."""
        is_open = torch.zeros(grp.n, dtype=torch.bool)
        for gate, idxs, roots in grp.gates:
            is_open[roots] |= ~gate.closed(self.threshold).cpu()[idxs]
        return is_open

    @torch.no_grad()
    def _best_scores(self, grp: _Group) -> torch.Tensor:
        """The largest score at each of a group's positions."""
        value = torch.full((grp.n,), -math.inf)
        for gate, idxs, roots in grp.gates:
            value[roots] = torch.maximum(value[roots], gate.score.detach().float().cpu()[idxs])
        return value

    @torch.no_grad()
    def clamp_positions(self, grp: _Group, positions: torch.Tensor, *, low: float | None = None,
                        high: float | None = None) -> None:
        """Clamp the scores of every gate of ``grp`` at ``positions`` (to open them: ``low`` > 0; to close them:
        ``high`` ≤ 0)."""
        for gate, idxs, roots in grp.gates:
            hit = torch.isin(roots, positions)
            if hit.any():
                i = idxs[hit].to(gate.score.device)
                gate.score[i] = torch.clamp(gate.score[i], min=low, max=high)

    def structure(self) -> tuple[int, ...]:
        """Channels every group keeps in the network pruning would produce now."""
        return tuple(int(c) for c in self._hard_counts())

    def share(self) -> torch.Tensor:
        """MACs share: value = the network pruning would produce now; gradient through the gates."""
        soft = self._soft_counts()
        dev = next((c.device for c in soft if c.requires_grad), soft[0].device)
        soft = [c.to(dev) for c in soft]
        s_soft = (self._macs(soft) + self.offset) / self.reference
        s_hard = (self._macs([c.to(dev) for c in self._hard_counts()]) + self.offset) / self.reference
        return s_soft + (s_hard - s_soft).detach()

    @torch.no_grad()
    def hard_share(self) -> float:
        return float((self._macs(self._hard_counts()) + self.offset) / self.reference)

    def prunable_gates(self) -> list[ChannelGate]:
        seen: dict[int, ChannelGate] = {}
        for g in self.groups:
            if g.prunable:
                for gate, _, _ in g.gates:
                    seen.setdefault(id(gate), gate)
        return list(seen.values())

    @contextlib.contextmanager
    def restored(self, gates: list[ChannelGate] | None = None):
        """The scores of ``gates`` (every prunable gate by default) come back exactly after the block."""
        saved = [(g.score, g.score.detach().clone()) for g in (self.prunable_gates() if gates is None else gates)]
        try:
            yield
        finally:
            with torch.no_grad():
                for score, value in saved:
                    score.copy_(value)

    @contextlib.contextmanager
    def shifted(self, shift: float):
        """Inside the block every prunable gate's score is lowered by ``shift`` (restored exactly after)."""
        with self.restored():
            self.apply_shift(shift)
            yield

    @torch.no_grad()
    def apply_shift(self, shift: float) -> None:
        """Lower every prunable gate's score by ``shift``: a common shift keeps the order training gave them."""
        for gate in self.prunable_gates():
            gate.score.sub_(shift)

    def score_range(self) -> tuple[float, float]:
        """Shifts from which every prunable gate is open (first) and closed (second)."""
        scores = torch.cat([g.score.detach().reshape(-1).float().cpu() for g in self.prunable_gates()])
        return float(scores.min()) - 10.0, float(scores.max()) + 10.0

    def share_if_shifted(self, shift: float) -> float:
        """The pruned network's MACs share if every prunable gate's score were lowered by ``shift``."""
        with self.shifted(shift):
            return self.hard_share()

    @torch.no_grad()
    def bracket(self, target: float, iterations: int = 30) -> tuple[float, float]:
        """By bisection from :meth:`score_range`: the largest shift found whose share is over ``target`` and the
        smallest at or under it (meaningful when all open is over and all closed is under)."""
        lo, hi = self.score_range()
        for _ in range(iterations):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.share_if_shifted(mid) > target else (lo, mid)
        return lo, hi

    @torch.no_grad()
    def project(self, target: float, iterations: int = 30) -> float:
        """Lower (or raise) every prunable gate's score by one common amount so that the network
        pruning would produce keeps as close to ``target`` of the MACs as the gates allow; returns the
        new share. A common shift keeps the order the training gave the gates. Nothing moves when no
        shift comes nearer than where the gates are (``round_to`` makes the widths move in steps)."""
        if not self.prunable_gates():
            return self.hard_share()
        _, floor = self.score_range()  # share(floor shift) = every prunable gate closed
        if self.share_if_shifted(floor) > target:
            best = floor
        else:
            # hi: the smallest shift at or under the budget; lo: just over it. Keep the nearer one.
            lo, hi = self.bracket(target, iterations)
            s_hi, s_lo = self.share_if_shifted(hi), self.share_if_shifted(lo)
            best = lo if abs(s_lo - target) < abs(s_hi - target) else hi
        if abs(self.share_if_shifted(best) - target) >= abs(self.hard_share() - target):
            return self.hard_share()  # a common shift cannot come nearer (width rounding): leave it to training
        self.apply_shift(best)
        return self.hard_share()

    def positions(self, grp: _Group) -> tuple[torch.Tensor, torch.Tensor]:
        """A group's open positions (some gate open there) and the largest score at each."""
        return self._open_mask(grp), self._best_scores(grp)

    @torch.no_grad()
    def open_floor(self) -> None:
        """Open, in every group of straight-through gates, the best-scored channels that pruning keeps whatever
        the gates say (``min_channels``, at least one, and the ``max_layer_sparsity`` cap), so that the network
        trained is the network pruned. Left closed, a group whose gates all close cuts the signal in the
        forward pass while pruning keeps a dead channel; every norm after it then sees a batch variance of 0,
        and each one multiplies the backward pass by γ/√ε (≈ 300): mobilenet_v2's stem closed whole under the
        Fisher scores, and 15 norms later the gradient passed float32's range (benchmarks/RESULTS.md)."""
        for grp in self.groups:
            if not grp.prunable or not grp.gates or any(gate.kind != "ste" for gate, _, _ in grp.gates):
                continue
            floor = max(min(self.min_channels, grp.n), 1, cap_floor(grp.n, self.max_layer_sparsity))
            is_open = self._open_mask(grp)  # every gate step: the scores are read only for a group under its floor
            missing = floor - int(is_open.sum())
            if missing <= 0:
                continue
            shut = torch.nonzero(~is_open).flatten()
            pos = shut[torch.argsort(self._best_scores(grp)[shut], descending=True)][:missing]
            self.clamp_positions(grp, pos, low=self.OPEN_MARGIN)

    @torch.no_grad()
    def floor_share(self) -> float:
        """The smallest share pruning can reach: every prunable group at its width floor."""
        return float((self._macs(self._hard_counts(all_closed=True)) + self.offset) / self.reference)


def _fisher_hook(est: torch.Tensor, beta: float, pending: torch.Tensor | None = None, final: bool = True):
    """A forward hook for a gate (``final``) or a :class:`GateMirror` of it (not ``final``): each backward pass
    adds ∂L/∂g over the batch and positions, Σ ∂L/∂out · x, at every place the gate's value multiplies; the
    mirrors' parts wait in ``pending`` (a mirror comes after its gate in the forward pass, so before it in the
    backward pass) and the gate's own hook squares the sum into the running mean ``est`` while the gate is
    open. Both places count: a channel that feeds a depthwise conv and its norm alone is scale-invariant there
    (the norm undoes any scale the gate gives it), so ∂L/∂g at the gate itself is ~0 whatever the channel
    does (mobilenet_v2's expand convs and stem: estimates 1e-9 against 1e-3 for its projections), and what
    the channel is worth shows at the mirror after that norm."""
    def hook(mod: nn.Module, inputs, out: torch.Tensor) -> None:
        if not (mod.training and torch.is_grad_enabled() and out.requires_grad):
            return
        gate = mod if isinstance(mod, ChannelGate) else mod.source
        x = inputs[0].detach()
        is_open = (gate.score.detach() > 0).to(est.device)
        dims = [d for d in range(x.dim()) if d != 1]

        def on_grad(grad_out: torch.Tensor) -> None:
            g = (grad_out.detach().float() * x.float()).sum(dim=dims).to(est.device)
            if not final:
                pending.add_(g)
                return
            if pending is not None:
                g = g + pending
                pending.zero_()
            g2 = g.square()
            # a step whose gradient overflows leaves the estimate as it was: one inf would make every score NaN
            est.copy_(torch.where(is_open & torch.isfinite(g2), beta * est + (1 - beta) * g2, est))

        out.register_hook(on_grad)
    return hook


class FisherScores:
    """``gates.importance=fisher``: gate scores from what closing each channel costs the task, not from the
    gradient at the gate.

    The gates sit right after a norm layer whose scale and shift train too, so once those settle the task
    loss's gradient at a gate, (γ·∂L/∂γ + β·∂L/∂β)/g, averages to zero: the learned scores then move by the
    budget's term alone, which ranks channels by their MACs, and a budget closes the costliest channels
    whatever they do (resnet18 at 0.5 of the MACs: the stem and layer1 cut to 3–19 of 64 channels,
    benchmarks/RESULTS.md). The square of that gradient does not average away: its running mean over the
    steps a gate is open is a Fisher (second-order Taylor) estimate of the loss a closed channel adds
    (Theis et al. 2018, "Faster gaze prediction with dense networks and Fisher pruning"). At every
    projection each straight-through gate's score is set to ``SCALE·(log F − log m − mean)``, where
    ``m`` is the cost of one more channel of its group now (MACs, or the latency model's cost), so the
    common shift onto the budget closes the channels with the least loss per unit of cost; a closed gate
    keeps the estimate it had when it was last open, and reopens only when that estimate per unit of cost
    is ``exp(HYSTERESIS)`` times (twice) the weakest open one's. The estimates are noisy running means, and a
    closed one is stale: without that margin the open set of mobilenet_v2 turned over about once an epoch
    while the budget held still (2,000–5,000 flips every 20 projections with 2,600 channels open), and each
    flip changes what the next norms see, so their running statistics never fitted (held-out accuracy 13 %
    against 28 % on the training batches, one run; with the margin 59–197 flips and 32.8 %; with the norms
    recalibrated too, 3 seeds: 34.60 % against the gradient scores' 27.09 %, benchmarks/RESULTS.md).
    """

    BETA, SCALE = 0.98, 0.05  # running-mean decay per step; score = SCALE·(log(F/m) − its mean)
    HYSTERESIS = math.log(2.0)  # what a closed channel's log estimate per cost must beat the open ones' by

    def __init__(self, macs: MacsModel):
        self.macs = macs
        self.gates = [g for g in macs.prunable_gates() if g.kind == "ste"]
        self.estimates = {id(g): torch.zeros_like(g.score.detach()) for g in self.gates}
        # closures, not bound methods: a deep copy of the model (a timed copy, a baseline) copies its hooks, and
        # a bound method would drag this object and its model along
        mirrored = {id(m.source) for m in macs.mirrors}
        self.pending = {id(g): torch.zeros_like(self.estimates[id(g)]) for g in self.gates if id(g) in mirrored}
        self.handles = [g.register_forward_hook(_fisher_hook(self.estimates[id(g)], self.BETA, self.pending.get(id(g))))
                        for g in self.gates]
        self.handles += [m.register_forward_hook(_fisher_hook(self.estimates[id(m.source)], self.BETA,
                                                              self.pending[id(m.source)], final=False))
                         for m in macs.mirrors if id(m.source) in self.pending]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    @torch.no_grad()
    def rescore(self) -> None:
        """Set every straight-through gate's score from its estimate per unit of marginal cost."""
        seen = [g for g in self.gates if bool(self.estimates[id(g)].any())]
        if not seen:
            return  # no step has trained yet: the scores stay as they are
        with torch.enable_grad():
            counts = [c.clone().float().requires_grad_(True) for c in self.macs._hard_counts()]
            grads = torch.autograd.grad(self.macs._macs(counts), counts, allow_unused=True)
        floor = 1e-9 * max(self.macs.reference, 1e-30)  # a channel that costs nothing is never cheaper to cut
        marginal: dict[int, float] = {}
        for grp, grad in zip(self.macs.groups, grads):
            for gate, _, _ in grp.gates:
                marginal.setdefault(id(gate), max(float(grad) if grad is not None else 0.0, floor))
        base = {id(g): (self.estimates[id(g)] + 1e-30).log() - math.log(marginal.get(id(g), floor))
                - self.HYSTERESIS * (g.score.detach() <= 0).to(self.estimates[id(g)]) for g in seen}
        centre = torch.cat([b.reshape(-1) for b in base.values()]).mean()
        for g in seen:
            g.score.copy_((self.SCALE * (base[id(g)] - centre)).to(g.score))

    @torch.no_grad()
    def project(self, target: float, tolerance: float) -> float:
        """The common shift onto ``target`` (:meth:`MacsModel.project`). With rounded widths
        (``prune.round_to``) that shift can jump over the budget (every layer's width moves in blocks at the
        same time); then, from the structure just over the budget, the block of channels with the least
        estimated loss per share of MACs it saves is closed, one at a time, while some block keeps the share
        over the budget; the last step takes the block that lands nearest under it, if that is nearer than
        where the share is."""
        macs = self.macs
        share = macs.project(target)
        if abs(share / target - 1.0) <= tolerance or not macs.round_to:
            return share
        if macs.share_if_shifted(macs.score_range()[0]) <= target:
            return share  # the whole network is within the budget
        macs.apply_shift(macs.bracket(target)[0])  # the largest shift still over the budget
        over = macs.hard_share()
        while over > target:
            block = self._cheapest_block(over, target)
            if block is None:
                break
            self._close(*block[:2])
            over = macs.hard_share()
        return macs.hard_share()

    def _positions(self, grp: _Group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A group's open positions, the largest score at each and the summed estimates."""
        is_open, value = self.macs.positions(grp)
        loss = torch.zeros(grp.n)
        for gate, idxs, roots in grp.gates:
            est = self.estimates.get(id(gate))
            if est is not None:
                loss.index_add_(0, roots, est.float().cpu()[idxs])
        return is_open, value, loss

    def _close(self, grp: _Group, positions: torch.Tensor) -> None:
        self.macs.clamp_positions(grp, positions, high=-self.SCALE)

    @torch.no_grad()
    def _cheapest_block(self, share: float, target: float) -> tuple[_Group, torch.Tensor] | None:
        """The next block to close: of the groups' next blocks of open channels (enough that the group's kept
        width drops by a rounding step), the one that costs the least estimated loss per share of MACs saved
        among those that keep the share over ``target``; when every block crosses it, the one that lands
        nearest (None when that is not nearer than ``share``)."""
        macs = self.macs
        over, cross = None, None  # (cost per share saved, group, positions), (distance, group, positions)
        for grp, kept in zip(macs.groups, macs._hard_counts()):
            if not grp.prunable or not grp.gates:
                continue
            is_open, value, loss = self._positions(grp)
            n_open, kept = int(is_open.sum()), int(kept)
            need = next((k for k in range(1, n_open + 1) if keep_count(
                grp.n, grp.n - n_open + k, macs.min_channels, macs.round_to, macs.max_layer_sparsity) < kept), None)
            if need is None:
                continue  # at its width floor
            pos = torch.nonzero(is_open).flatten()
            pos = pos[torch.argsort(value[pos])][:need]
            with macs.restored([g for g, _, _ in grp.gates]):
                self._close(grp, pos)
                after = macs.hard_share()
            if after >= share:
                continue
            if after > target:
                cost = float(loss[pos].sum()) / (share - after)
                if over is None or cost < over[0]:
                    over = (cost, grp, pos)
            elif target - after < share - target and (cross is None or target - after < cross[0]):
                cross = (target - after, grp, pos)
        best = over if over is not None else cross
        return None if best is None else best[1:]

    def state_dict(self) -> list[torch.Tensor]:
        return [self.estimates[id(g)].detach().cpu().clone() for g in self.gates]

    def load_state_dict(self, state: list[torch.Tensor]) -> None:
        if len(state) != len(self.gates) or any(s.shape != g.score.shape for s, g in zip(state, self.gates)):
            return  # another structure (an earlier pruning step's): the estimates start again
        for s, g in zip(state, self.gates):
            self.estimates[id(g)].copy_(s.to(self.estimates[id(g)].device))


class BudgetController:
    """λ1·(s − t) + λ2·(s − t)² with λ1, λ2 raised by gradient ascent (CoFiPruning's Lagrangian),
    and the structure kept on the budget's ramp by projection.

    The Lagrangian alone lags behind a ramp and then hovers around the budget (hard gates flip in
    cohorts; measured on small_cnn at a 0.25 budget: 0.242, 0.222, 0.222 over the last three
    epochs). Projecting once per epoch fixed where it ended, but each projection closed a cohort
    of channels at once, after which the next layers' BatchNorm statistics were stale: small_cnn
    at 0.5 with a one-epoch ramp fell from 47.6 % to 32.1 % test accuracy in that epoch, and the
    last projection, after the last step, left the network no step to adapt. So :meth:`follow`
    is called every few steps (``FOLLOW_EVERY`` times an epoch): a structure further than
    ``FOLLOW_TOLERANCE`` from the budget in force now (1 during the warm-up, then the ramp) is
    projected onto it by a common shift of the gate scores, a few channels at a time, and the
    weights and norms adapt between calls. The Lagrangian's gradient still ranks the gates by
    cost as well as by use, and holds the structure between projections.
    """

    FOLLOW_EVERY = 20  # projections per epoch, at most
    FOLLOW_TOLERANCE = 0.02

    def __init__(self, macs: MacsModel, lr: float, device: torch.device, target: float | None = None,
                 calibration: dict | None = None, importance: str = "gradient"):
        self.macs = macs
        self.fisher = FisherScores(macs) if importance == "fisher" else None
        self.target = target  # the final share asked for (of the MACs, or of the dense latency)
        self.calibration = calibration  # latency budgets: the measured table the cost model came from
        self.lambdas = torch.zeros(2, device=device, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.lambdas], lr=lr, maximize=True)
        self.last_share = float("nan")

    def loss(self, target: float) -> torch.Tensor:
        s = self.macs.share()
        self.last_share = float(s.detach())
        d = s.to(self.lambdas.device) - target
        return self.lambdas[0] * d + self.lambdas[1] * d * d

    def follow(self, target: float, tolerance: float | None = None) -> float | None:
        """When the network pruning would produce is further than ``tolerance`` (relative) from
        ``target``, project the gates onto it (:meth:`MacsModel.project`) so that training goes on in
        that structure. Returns the new share, or None when nothing moved."""
        tolerance = self.FOLLOW_TOLERANCE if tolerance is None else tolerance
        try:
            if self.fisher is not None:  # the scores come from the estimates: re-rank, then onto the budget
                self.fisher.rescore()
                return self.fisher.project(target, tolerance)
            share = self.macs.hard_share()
            if abs(share / target - 1.0) <= tolerance:
                return None
            return self.macs.project(target)
        finally:
            self.macs.open_floor()  # no group trains fully closed (the share counts its floor already)

    def close(self) -> None:
        """Training is over: nothing of the controller stays hooked into the model."""
        if self.fisher is not None:
            self.fisher.remove()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.optimizer.step()

    @property
    def lam(self) -> float:
        return float(self.lambdas[0].detach())

    def state_dict(self) -> dict:
        state = {"lambdas": self.lambdas.detach().cpu(), "optimizer": self.optimizer.state_dict()}
        if self.fisher is not None:
            state["fisher"] = self.fisher.state_dict()
        if self.calibration is not None:  # a resumed run keeps the cost model it started with
            state["cost_model"] = {"weights": torch.tensor([layer.weight for layer in self.macs.layers]),
                                   "channel_weight": torch.tensor(self.macs.channel_weight),
                                   "offset": torch.tensor(self.macs.offset),
                                   "reference": torch.tensor(self.macs.reference),
                                   "target": torch.tensor(self.target)}
        return state

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.lambdas.copy_(state["lambdas"].to(self.lambdas.device))
        self.optimizer.load_state_dict(state["optimizer"])
        if self.fisher is not None and state.get("fisher") is not None:
            self.fisher.load_state_dict(state["fisher"])
        cost = state.get("cost_model")
        if self.calibration is not None and cost is not None and len(cost["weights"]) == len(self.macs.layers):
            for layer, w in zip(self.macs.layers, cost["weights"].tolist()):
                layer.weight = w
            self.macs.channel_weight = float(cost["channel_weight"])
            self.macs.offset, self.macs.reference = float(cost["offset"]), float(cost["reference"])
            self.target = float(cost["target"])


def check_budget_reachable(macs: MacsModel, target: float) -> None:
    """One clear line, before training, when the width floor alone is above the budget."""
    floor = macs.floor_share()
    if floor > target * 1.1:
        raise BudgetError(
            f"gates.target_macs: {target:g} cannot be reached: with every prunable layer at its width floor "
            f"(prune.min_channels={macs.min_channels}, prune.round_to={macs.round_to}) the network keeps "
            f"{floor:.3f} of its MACs; ask for at least {floor:.3f} or lower the floor"
        )


def check_latency_reachable(model: MacsModel, target_ms: float, calibration: dict) -> None:
    """One clear line, before training, when the latency model's floor is above the latency asked for."""
    floor_ms = model.floor_share() * model.reference
    if floor_ms > target_ms * (1 + BUDGET_TOLERANCE):
        raise BudgetError(
            f"gates.target_latency_ms: {target_ms:g} cannot be reached: the network measured "
            f"{calibration['whole_ms']:.4g} ms (ONNX Runtime CPU, batch 1, {calibration['threads']} thread(s)), "
            f"{calibration['fixed_ms']:.4g} ms of it fixed, and with every prunable layer at its width floor "
            f"(prune.min_channels={model.min_channels}, prune.round_to={model.round_to}) it would still take "
            f"about {floor_ms:.4g} ms; ask for at least {floor_ms:.4g} ms"
        )


def budget_for(model: nn.Module, cfg, image_size: int, device: torch.device) -> BudgetController | None:
    """The controller for a budgeted gate run (``cfg.budget`` or ``cfg.latency_budget``), or None. The
    dense network's MACs (and latency) are remembered on the model (``pv_dense_macs``,
    ``pv_dense_latency_ms``) so that later iterative steps keep the same reference."""
    if cfg.budget is None and cfg.latency_budget is None:
        return None
    p = cfg.prune
    example = torch.zeros(1, 3, image_size, image_size, device=device)
    frozen = tuple(first_convs(model, p.skip_first)) if p.skip_first else ()
    macs = MacsModel(model, example, threshold=cfg.tau, reference_macs=getattr(model, "pv_dense_macs", None),
                     round_to=p.round_to, min_channels=p.min_channels, max_layer_sparsity=p.max_layer_sparsity,
                     frozen=frozen)
    if getattr(model, "pv_dense_macs", None) is None:
        model.pv_dense_macs = macs.reference
    if cfg.latency_budget is None:
        check_budget_reachable(macs, cfg.budget)
        return BudgetController(macs, cfg.gates.budget_lr, device, target=cfg.budget,
                                importance=cfg.gates.resolved_importance)
    from prunevision.latency import calibrate

    cal = calibrate(macs, model, image_size, threads=cfg.measure.threads,
                    dense_ms=getattr(model, "pv_dense_latency_ms", None))
    if getattr(model, "pv_dense_latency_ms", None) is None:
        model.pv_dense_latency_ms = macs.reference
    check_latency_reachable(macs, cfg.latency_budget, cal)
    return BudgetController(macs, cfg.gates.budget_lr, device, target=min(1.0, cfg.latency_budget / macs.reference),
                            calibration=cal, importance=cfg.gates.resolved_importance)

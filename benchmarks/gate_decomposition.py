"""Why budgeted gates trail the one-shot baselines: the cost of the structure they choose against the cost of
training while pruning.

For each budget and seed, in one process:

1. a budgeted gate run (``gates.target_macs``), pruned, fine-tuned: its layer widths and test accuracy;
2. the same network trained dense for the same epochs (the baselines' starting point), then pruned
   one-shot and fine-tuned for the same epoch three ways: Taylor at the one ratio that meets the budget
   (what ``prune.method=taylor`` does), L1 at its own one ratio (``prune.method=l1_structured``), and
   Taylor and L1 at the *gate run's layer widths*.

Taylor at the gates' widths against Taylor at one ratio is the cost of the gates' structure; the gate run
against Taylor at its own widths is the cost of learning it while training. ``--variant`` changes how the
gate scores move (a diagnostic: the variants patch the gate optimiser in this process only, they are not
options of the library):

    default        global-RMS normalised SGD (prunevision.train.NormalizedSGD)
    layer_rms      each layer's score gradient normalised by its own RMS
    centred        each layer's score gradient minus its mean (no common scale mode), then per-layer RMS
    centred_global each layer's score gradient minus its mean, then the global RMS
    warmup_frozen  scores do not move during the dense warm-up
    hold_frozen    scores and the budget's projections stop once the final budget is in force
    masked_1_in_4  after the warm-up the gates apply on one step in four (and only those steps move the
                   scores); the other steps train the whole network, which is pruned at the end
    fisher         scores are not learned by gradient: each open gate keeps a running mean of its squared
                   task gradient (a Fisher / second-order Taylor estimate of what closing it costs, which
                   a BatchNorm after it does not cancel, unlike the signed gradient), and at every
                   projection the scores are set to log(that estimate / the channel's marginal MACs) and
                   shifted onto the budget in force; a closed gate keeps the estimate it had when open
                   (the prototype of the library's ``gates.importance=fisher``, now the default for
                   budgeted straight-through gates; every variant but ``default`` runs with
                   ``gates.importance=gradient``, and ``--set gates.importance=gradient`` reproduces the
                   default rows from before it)
    taylor_gradual not gates learning: the control for the schedule. Each gate keeps a running mean of
                   |task gradient at the gate| (first-order Taylor, what torch-pruning's Taylor importance
                   measures; for a closed gate, what reopening it would change), and at every projection
                   each layer keeps its most important channels at one ratio for every layer, the ratio
                   that meets the budget in force: Taylor pruning at one ratio, done gradually on the
                   gates' own schedule (dense, ramp, hold) and with their masks

    .venv/bin/python benchmarks/gate_decomposition.py --budgets 0.5,0.7 --seeds 0,1,2 \
        --data ../shared/data/cifar10-jpeg.tar.gz --out benchmarks/results/gate_decomposition.jsonl

Rows go to ``--out`` one JSON object a line; rows already there with the same (budget, seed, variant,
settings) are not run again. Accuracy on the full test set; the widths are the out-channels of every conv
and linear layer in forward order.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import run_main  # noqa: E402
from prunevision.cliargs import add_set_argument  # noqa: E402

VARIANTS = ("default", "layer_rms", "centred", "centred_global", "warmup_frozen", "hold_frozen", "masked_1_in_4",
            "fisher", "taylor_gradual")


_BYPASS = [False]  # masked_1_in_4: the next forward pass runs the whole network


def _bypassable_gates():
    """Let masked_1_in_4 switch every gate off for a step (this process only)."""
    from prunevision import gates

    for cls in (gates.ChannelGate, gates.GateMirror):
        if getattr(cls.forward, "bypassable", False):
            continue  # wrapped by an earlier run in this process
        forward = cls.forward
        cls.forward = lambda self, x, _f=forward: x if _BYPASS[0] else _f(self, x)
        cls.forward.bypassable = True


_FISHER: dict = {}  # fisher: id(gate score) -> running mean of the squared task gradient at the gate
FISHER_BETA, FISHER_SCALE = 0.98, 0.05


def _fisher_gates():
    """Let the fisher variant see each straight-through gate's task gradient (this process only)."""
    import torch

    from prunevision import gates

    cls = gates.ChannelGate
    if getattr(cls.forward, "fisher", False):
        return
    forward = cls.forward

    def fwd(self, x, _f=forward):
        if not (_FISHER and self.training and torch.is_grad_enabled() and self.kind == "ste"):
            return _f(self, x)
        g = self.values()
        mean = _FISHER.setdefault(id(self.score), torch.zeros_like(self.score.detach()))
        squared = _FISHER["on"] == "fisher"
        # fisher: only an open gate's estimate moves; taylor_gradual: every gate's
        moves = (self.score.detach() > 0).to(mean.dtype) if squared else torch.ones_like(mean)

        def hook(grad):  # the gradient of the task loss at this gate's value (not the budget's)
            g = grad.detach().float()
            upd = FISHER_BETA * mean + (1 - FISHER_BETA) * (g ** 2 if squared else g.abs())
            mean.copy_(moves * upd + (1 - moves) * mean)

        g.register_hook(hook)
        return x * g.to(x.dtype).view([1, -1] + [1] * (x.dim() - 2))

    cls.forward = fwd
    cls.forward.fisher = True


def _fisher_follow(self, target: float, tolerance: float | None = None):
    """BudgetController.follow for the fisher variant: scores from the running estimates, then the
    common shift onto ``target``."""
    import torch

    macs = self.macs
    counts = [c.clone().requires_grad_(True) for c in macs._hard_counts()]
    grads = torch.autograd.grad(macs._macs(counts), counts, allow_unused=True)
    marginal = {}
    for g, grad in zip(macs.groups, grads):
        for gate, _, _ in g.gates:
            marginal.setdefault(id(gate), max(float(grad) if grad is not None else 0.0, 1.0))
    with torch.no_grad():
        gates = [g for g in macs.prunable_gates() if id(g.score) in _FISHER and _FISHER[id(g.score)].any()]
        if not gates:
            return macs.project(target)
        base = {id(g): (_FISHER[id(g.score)] + 1e-30).log() - float(np.log(marginal[id(g)])) for g in gates}
        centre = torch.cat(list(base.values())).mean()
        for g in gates:
            g.score.copy_(FISHER_SCALE * (base[id(g)] - centre))
    return macs.project(target)


def _taylor_gradual_follow(self, target: float, tolerance: float | None = None):
    """BudgetController.follow for taylor_gradual: every prunable group keeps its ``(1 - r)`` most
    important channels, with the one ratio ``r`` that meets ``target``."""
    import torch

    from prunevision.prune import keep_count

    macs = self.macs

    def counts(r):
        return [torch.tensor(float(keep_count(g.n, int(round(r * g.n)), macs.min_channels, macs.round_to)
                                   if g.prunable else g.n)) for g in macs.groups]

    def share(r):
        return float((macs._macs(counts(r)) + macs.offset) / macs.reference)

    lo, hi = 0.0, 1.0
    if share(0.0) <= target:
        hi = 0.0
    else:
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if share(mid) > target else (lo, mid)
    keep = counts(hi)
    with torch.no_grad():
        for g, k in zip(macs.groups, keep):
            if not g.prunable:
                continue
            for gate, idxs, _ in g.gates:
                imp = _FISHER.get(id(gate.score))
                imp = imp[idxs] if imp is not None else torch.zeros(len(idxs))
                order = torch.argsort(imp, descending=True, stable=True)
                score = torch.full((len(idxs),), -0.5)
                score[order[:int(k)]] = 0.5
                gate.score[idxs] = score.to(gate.score.dtype)
    return macs.hard_share()


def _optimizer_variant(variant: str, steps_per_epoch: int, warmup_epochs: float, in_force_epochs: float):
    """A NormalizedSGD subclass that moves the gate scores the ``variant`` way."""
    import torch

    from prunevision import budget as budget_mod
    from prunevision.train import NormalizedSGD

    class Variant(NormalizedSGD):
        def step(self, closure=None):
            self.n_steps = getattr(self, "n_steps", 0) + 1
            if variant == "masked_1_in_4":
                was_whole = _BYPASS[0]  # this step's forward pass ran without gates: nothing to learn
                _BYPASS[0] = self.n_steps >= warmup_epochs * steps_per_epoch and self.n_steps % 4 != 0
                return None if was_whole else super().step(closure)
            if variant in ("fisher", "taylor_gradual"):
                return None  # the scores move in the variant's follow only
            if variant == "warmup_frozen" and self.n_steps <= warmup_epochs * steps_per_epoch:
                return None
            if variant == "hold_frozen" and self.n_steps > in_force_epochs * steps_per_epoch:
                budget_mod.BudgetController.follow = lambda *a, **k: None  # this process only
                return None
            if variant in ("default", "warmup_frozen", "hold_frozen"):
                return super().step(closure)
            with torch.no_grad():
                d = {}
                for p in (p for g in self.param_groups for p in g["params"] if p.grad is not None):
                    g = p.grad.float()
                    if variant.startswith("centred") and p.dim() == 1 and p.numel() > 1:
                        g = g - g.mean()
                    if variant in ("layer_rms", "centred"):
                        g = g / g.pow(2).mean().sqrt().clamp_min(1e-12)
                    d[p] = g
                if variant == "centred_global":
                    rms = torch.sqrt(sum((g ** 2).sum() for g in d.values()) / sum(g.numel() for g in d.values()))
                    d = {p: g / rms.clamp_min(1e-12) for p, g in d.items()}
                for group in self.param_groups:
                    for p in group["params"]:
                        if p not in d:
                            continue
                        buf = self.state[p].get("momentum_buffer")
                        if buf is None:
                            buf = self.state[p]["momentum_buffer"] = d[p].clone()
                        else:
                            buf.mul_(group["momentum"]).add_(d[p])
                        p.add_(buf, alpha=-group["lr"] * (1 - group["momentum"]))
            return None

    return Variant


def one(budget: float, seed: int, variant: str, base: dict, baselines: bool) -> dict:
    import torch
    import torch_pruning as tp
    from torch import nn

    import prunevision.train as train_mod
    from prunevision.budget import BudgetController
    from prunevision.config import load_config
    from prunevision.data import DeviceLoader, load_dataset
    from prunevision.measure import macs_and_params
    from prunevision.models import build_gated_model
    from prunevision.pipeline import resolve_config
    from prunevision.prune import classifier_head, keep_zeros, prune_step, remove_masks, strip_gates
    from prunevision.schedules import budget_in_force, budget_warmup
    from prunevision.train import evaluate, fit
    from prunevision.trial import calibration_batches, finetune, ratio_for_budget

    def widths(m):
        return [x.out_channels if isinstance(x, nn.Conv2d) else x.out_features
                for x in m.modules() if isinstance(x, (nn.Conv2d, nn.Linear))]

    def test(m):
        return evaluate(m, DeviceLoader(data.test_x, data.test_y, 1000, data.mean, data.std, train=False),
                        data.num_classes)["accuracy"]

    row = {"budget": budget, "seed": seed, "variant": variant, "settings": base}
    cfg = load_config(None, {**base, "prune.method": "gate", "seed": seed, "gates.target_macs": budget})
    torch.manual_seed(seed)
    data = load_dataset(cfg.data, seed=seed)
    cfg = resolve_config(cfg, data)
    steps = len(DeviceLoader(data.train_x, data.train_y, cfg.data.batch_size, data.mean, data.std, train=True))
    original, follow = train_mod.NormalizedSGD, BudgetController.follow
    train_mod.NormalizedSGD = _optimizer_variant(variant, steps, budget_warmup(cfg.gates, cfg.train.epochs),
                                                 budget_in_force(cfg.gates, cfg.train.epochs))
    if variant == "masked_1_in_4":
        _bypassable_gates()
    if variant in ("fisher", "taylor_gradual"):
        _fisher_gates()
        _FISHER["on"] = variant  # a non-empty dict switches the hook on
        BudgetController.follow = _fisher_follow if variant == "fisher" else _taylor_gradual_follow
    t0 = time.perf_counter()
    try:
        model = build_gated_model(cfg.model, cfg.gates, data.num_classes, data.image_size)
        fit(model, data, cfg)
    finally:
        train_mod.NormalizedSGD, BudgetController.follow = original, follow  # hold_frozen disables follow
        _BYPASS[0] = False
        _FISHER.clear()
    example = torch.zeros(1, 3, data.image_size, data.image_size)
    prune_step(model, example, "gate", threshold=cfg.tau, ratio=0.0, round_to=cfg.prune.round_to,
               min_channels=cfg.prune.min_channels, max_layer_sparsity=cfg.prune.max_layer_sparsity,
               skip_first=cfg.prune.skip_first)
    strip_gates(model, cfg.tau)
    keep_zeros(model)
    gate_widths = widths(model)
    row.update(gate_widths=gate_widths, gate_before_ft=test(model))
    finetune(model, data, cfg, cfg.prune.finetune_epochs, penalty=False, phase="finetune", log=None)
    remove_masks(model)
    row.update(gate=test(model), gate_macs=macs_and_params(model, data.image_size)[0], gate_s=time.perf_counter() - t0)
    if not baselines:
        return row
    cfg = load_config(None, {**base, "prune.method": "taylor", "seed": seed, "gates.target_macs": budget})
    cfg = resolve_config(cfg, data)
    torch.manual_seed(seed)
    dense = build_gated_model(cfg.model, cfg.gates, data.num_classes, data.image_size)
    fit(dense, data, cfg)
    strip_gates(dense)
    dense_widths, dense_macs = widths(dense), macs_and_params(copy.deepcopy(dense), data.image_size)[0]
    row.update(dense=test(dense), gate_share=row.pop("gate_macs") / dense_macs)
    calibration = calibration_batches(data, cfg)
    # one ratio for every layer: which channels go depends on the importance, how many does not, so the
    # ratio that meets the budget for Taylor meets it for L1 too (L1: the other structured baseline of
    # frontier_quality.py)
    ratio, _ = ratio_for_budget(copy.deepcopy(dense), example, cfg, calibration)
    for prefix, method in (("uniform", "taylor"), ("l1_uniform", "l1_structured")):
        m = copy.deepcopy(dense)
        prune_step(m, example, method, threshold=cfg.tau, ratio=ratio, round_to=cfg.prune.round_to,
                   max_layer_sparsity=cfg.prune.max_layer_sparsity, calibration=calibration,
                   skip_first=cfg.prune.skip_first)
        row.update({f"{prefix}_widths": widths(m), f"{prefix}_before_ft": test(m)})
        finetune(m, data, cfg, cfg.prune.finetune_epochs, penalty=False, phase="finetune", log=None)
        row.update({prefix: test(m), f"{prefix}_share": macs_and_params(m, data.image_size)[0] / dense_macs})
    for name, imp in (("taylor_at_gate_widths", tp.importance.GroupTaylorImportance()),
                      ("l1_at_gate_widths", tp.importance.GroupMagnitudeImportance(p=1))):
        m = copy.deepcopy(dense).eval()
        layers = [x for x in m.modules() if isinstance(x, (nn.Conv2d, nn.Linear))]
        head = classifier_head(m)
        per_layer = {la: 1 - w / d for la, w, d in zip(layers, gate_widths, dense_widths) if la is not head and w < d}
        pruner = tp.pruner.BasePruner(m, example, importance=imp, pruning_ratio=0.0, pruning_ratio_dict=per_layer,
                                      ignored_layers=[head], max_pruning_ratio=0.99)
        if name.startswith("taylor"):
            m.zero_grad()
            for x, y in calibration():
                nn.functional.cross_entropy(m(x), y).backward()
        pruner.step()
        m.zero_grad(set_to_none=True)
        m.train()
        assert widths(m) == gate_widths, (widths(m), gate_widths)
        row[name + "_before_ft"] = test(m)
        finetune(m, data, cfg, cfg.prune.finetune_epochs, penalty=False, phase="finetune", log=None)
        row[name] = test(m)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", default="0.5")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--variant", choices=VARIANTS, default="default")
    ap.add_argument("--no-baselines", action="store_true", help="the gate run only")
    ap.add_argument("--data", default="../shared/data/cifar10-jpeg.tar.gz")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--subset", type=int, default=10000)
    ap.add_argument("--out", default="benchmarks/results/gate_decomposition.jsonl")
    add_set_argument(ap, "config keys for every run (e.g. gates.warmup_epochs=3)")
    ap.add_argument("--smoke-test", action="store_true", help="synthetic data, 2 epochs, one budget and seed")
    args = ap.parse_args()
    from prunevision.config import parse_overrides

    # the absolute path, so that the same dataset spelt another way is the same row (resuming)
    base = {"data.root": str(Path(args.data).expanduser().resolve()),
            "data.subset": args.subset, "data.test_subset": None, "data.batch_size": 128,
            "train.epochs": args.epochs, "gates.lr": 0.05, "prune.round_to": None, "prune.finetune_epochs": 1,
            "model.name": "small_cnn", "measure.enabled": False, "train.device": "cpu"}
    budgets = [float(b) for b in args.budgets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.smoke_test:
        base.update({"data.name": "synthetic", "data.synthetic_train": 256, "data.synthetic_test": 64,
                     "data.num_classes": 4, "data.batch_size": 32, "data.image_size": 16, "train.epochs": 2,
                     "data.subset": None})
        budgets, seeds = budgets[:1], seeds[:1]
    # explicit in the rows' settings (rows from before the key existed ran the gradient scores), and the
    # variants patch the learned scores, so they run on them
    base["gates.importance"] = "fisher" if args.variant == "default" else "gradient"
    base.update(parse_overrides(args.overrides))
    out = Path(args.out)
    done = set()
    if out.exists():
        for line in out.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            done.add((r["budget"], r["seed"], r["variant"], json.dumps(r["settings"], sort_keys=True)))
    rows = []
    for budget in budgets:
        for seed in seeds:
            key = (budget, seed, args.variant, json.dumps(base, sort_keys=True))
            if key in done:
                print(f"budget {budget:g} seed {seed} {args.variant}: in {out} already", flush=True)
                continue
            row = one(budget, seed, args.variant, base, not args.no_baselines)
            print(json.dumps(row), flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            with out.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            rows.append(row)
    for name in ("gate", "uniform", "l1_uniform", "taylor_at_gate_widths", "l1_at_gate_widths"):
        vals = [100 * r[name] for r in rows if name in r]
        if vals:
            print(f"{name}: {np.mean(vals):.2f} ± {np.std(vals, ddof=1) if len(vals) > 1 else 0:.2f} % "
                  f"over {len(vals)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))

"""Latency budgets: a per-layer ONNX Runtime latency table becomes a cost model that equals the measured
network where it was measured, unreachable or contradictory requests are refused before training, and a
budgeted run ends on the budget its model predicts. (What the pruned network really measures against
the request is a benchmark's question, benchmarks/RESULTS.md, not a timed assertion here.)"""

import copy

import pytest
import torch

from prunevision.budget import BudgetController, BudgetError, MacsModel, budget_for
from prunevision.config import ConfigError, GateConfig, ModelConfig, load_config
from prunevision.gates import iter_gates
from prunevision.latency import _two_structures, calibrate, input_shapes, land, measure_pruned_ms, time_layers
from prunevision.models import build_gated_model
from prunevision.train import fit


def _cfg(**over):
    base = {"data.name": "synthetic", "data.synthetic_train": 512, "data.synthetic_test": 128, "data.num_classes": 4,
            "data.batch_size": 32, "data.image_size": 16, "model.name": "small_cnn", "train.epochs": 3,
            "train.lr": 0.05, "gates.lr": 0.05, "gates.warmup_epochs": 1, "measure.runs": 30}
    base.update(over)
    return load_config(None, base)


@pytest.mark.parametrize("override, message", [
    ({"gates.target_latency_ms": 0.0}, "gates.target_latency_ms: 0.0 is out of range"),
    ({"gates.target_latency_ms": -1}, "gates.target_latency_ms: -1.0 is out of range"),
    ({"gates.target_latency_ms": float("inf")}, "gates.target_latency_ms: inf is not a finite number"),
    ({"gates.target_latency_ms": 2.0, "gates.target_macs": 0.5}, "are two budgets; set one of them"),
    ({"gates.target_latency_ms": 2.0, "gates.lam": 1.0}, "gates.lam: 1.0 contradicts gates.target_latency_ms=2.0"),
    ({"gates.target_latency_ms": 2.0, "gates.schedule": "linear"}, "contradicts gates.target_latency_ms"),
    ({"gates.target_latency_ms": 2.0, "prune.method": "taylor", "prune.target_sparsity": 0.5},
     "a latency budget is met by the gates (prune.method=gate)"),
])
def test_bad_latency_budgets_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_latency_budget_makes_the_gates_hard():
    assert GateConfig(target_latency_ms=1.0).resolved_kind == "ste"


def test_each_layer_is_timed_alone_at_full_and_half_width():
    model = build_gated_model(ModelConfig(name="mobilenet_v2"), GateConfig(kind="ste"), 10, 32).eval()
    ex = torch.zeros(1, 3, 32, 32)
    mm = MacsModel(model, ex, threshold=1e-6)
    shapes = input_shapes(model, ex)
    named = [(layer.name, layer.module) for layer in mm.layers][:6]
    timings = time_layers(named, shapes, batch=1, threads=1, runs=30, warmup=2)
    assert [t.name for t in timings] == [n for n, _ in named]
    for t, layer in zip(timings, mm.layers):
        assert t.full_ms > 0 and t.half_ms > 0 and t.ms_per_mac >= 0
        # half of the inputs and half of the outputs: a quarter of the MACs (depthwise: half)
        expect = 0.5 if layer.depthwise else 0.25
        assert t.half_macs / t.full_macs == pytest.approx(expect, rel=0.3)
        assert t.full_macs == pytest.approx(layer.cost * layer.n_out * (1 if layer.depthwise else
                                                                          layer.n_in / layer.groups), rel=1e-6)


@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
def test_the_latency_model_equals_both_measured_networks(name):
    torch.manual_seed(0)
    model = build_gated_model(ModelConfig(name=name), GateConfig(kind="ste"), 10, 16)
    mm = MacsModel(model, torch.zeros(1, 3, 16, 16), threshold=1e-6)
    cal = calibrate(mm, model, 16, threads=1, runs=30, warmup=2)
    assert cal["whole_ms"] > 0 and cal["fixed_ms"] >= 0
    assert mm.reference == cal["whole_ms"]
    assert mm.hard_share() == pytest.approx(1.0, rel=1e-6)  # the dense network: its own measurement
    assert mm.dense_cost() + mm.offset == pytest.approx(cal["whole_ms"], rel=1e-6)
    assert all(layer["ms_per_mac"] >= 0 for layer in cal["layers"])
    # the floor is under the dense network, never under the fixed part
    assert cal["fixed_ms"] / cal["whole_ms"] - 1e-9 <= mm.floor_share() <= 1.0
    # the half-width copy's cost under the same weights: what the fit made the model equal
    whole, half, half_cost = _two_structures(mm, model, torch.zeros(1, 3, 16, 16), threads=1, runs=30, warmup=2)
    assert 0 < half_cost < mm.dense_cost()


def _stepped_latency(mm: MacsModel):
    """A stand-in for the clock with ONNX Runtime's shape: latency moves in blocks of 16 channels."""
    calls = []

    def measure():
        calls.append(mm.structure())
        return 0.05 + sum(0.01 * -(-c // 16) * 16 / 16 for c in mm.structure())

    return measure, calls


def _gated_small_cnn():
    torch.manual_seed(0)
    model = build_gated_model(ModelConfig(name="small_cnn"), GateConfig(kind="ste"), 10, 16)
    with torch.no_grad():
        for _, g in iter_gates(model):
            g.score.copy_(torch.rand_like(g.score) * 4 + 0.1)  # all open, in an order training could have left
    return model, MacsModel(model, torch.zeros(1, 3, 16, 16), threshold=1e-6)


def test_landing_keeps_a_structure_already_near_the_request_and_times_it_once():
    model, mm = _gated_small_cnn()
    measure, calls = _stepped_latency(mm)
    scores = [g.score.clone() for _, g in iter_gates(model)]
    now = measure()
    calls.clear()
    out = land(mm, now * 1.03, measure)
    assert out["measured_ms"] == out["measured_before_ms"] == now and out["shift"] == 0.0
    assert len(calls) == 1 and out["structures_timed"] == 1
    assert all(torch.equal(a, g.score) for a, (_, g) in zip(scores, iter_gates(model)))


def test_landing_moves_the_gates_to_the_structure_measured_nearest_the_request():
    model, mm = _gated_small_cnn()
    measure, calls = _stepped_latency(mm)
    dense = measure()
    scores = [g.score.clone() for _, g in iter_gates(model)]
    for want in (dense * 0.6, dense * 0.8):
        calls.clear()
        out = land(mm, want, measure)
        assert len(set(calls)) == len(calls) == out["structures_timed"] > 1  # each structure timed once
        assert abs(measure() / want - 1) <= 0.05  # the clock, not the model, says where it landed
        assert out["measured_ms"] == pytest.approx(measure())
        # one common shift of every score: the order training gave the gates is kept
        assert out["shift"] > 0
        assert all(torch.allclose(a - g.score, torch.full_like(a, out["shift"])) for a, (_, g) in
                   zip(scores, iter_gates(model)))
        mm.apply_shift(-out["shift"])  # back to the start for the next request


def test_the_pruned_network_is_timed_as_the_trial_will_prune_it_and_the_model_is_untouched():
    model, mm = _gated_small_cnn()
    before = copy.deepcopy(model.state_dict())
    dense_ms = measure_pruned_ms(model, mm, 16, threads=1, runs=20, warmup=2)
    with mm.shifted(mm.score_range()[1]):  # every gate closed: the width floor
        floor_ms = measure_pruned_ms(model, mm, 16, threads=1, runs=20, warmup=2)
    assert 0 < floor_ms < dense_ms
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_latency_under_the_floor_is_refused_before_training():
    cfg = _cfg(**{"gates.target_latency_ms": 1e-6})
    from prunevision.data import load_dataset

    data = load_dataset(cfg.data, seed=0)
    model = build_gated_model(cfg.model, cfg.gates, data.num_classes, data.image_size)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(BudgetError, match=r"gates.target_latency_ms: 1e-06 cannot be reached: .* ask for at least"):
        fit(model, data, cfg)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing trained


def test_a_latency_budgeted_run_ends_on_its_predicted_budget_and_resumes_with_the_same_model():
    from prunevision.data import load_dataset

    cfg = _cfg(**{"gates.target_latency_ms": 1e3})  # placeholder: replaced by a reachable request below
    data = load_dataset(cfg.data, seed=0)
    torch.manual_seed(0)
    model = build_gated_model(cfg.model, cfg.gates, data.num_classes, data.image_size)
    probe = budget_for(copy.deepcopy(model), cfg, data.image_size, torch.device("cpu"))
    assert probe.target == 1.0  # a request above the dense latency asks for nothing to go
    # half-way between the floor and the dense latency: reachable whatever the timings' noise
    want = probe.macs.reference * (1 + probe.macs.floor_share()) / 2
    cfg = cfg.replace(**{"gates.target_latency_ms": want})
    state = fit(model, data, cfg)
    last = state.history[-1]
    assert last["latency_share"] == pytest.approx(last["target_latency_now"], rel=0.1)
    assert last["target_latency_now"] == pytest.approx(state.budget.target)
    assert state.history[0]["latency_share"] > 0.9  # warm-up: dense
    assert "macs_share" not in last
    # measured landings: when the final budget is first in force (epoch 2 here) and at the end
    assert [r["epoch"] for r in state.history if "latency_ms_measured" in r] == [2, 3]
    assert all(r["latency_ms_measured"] > 0 for r in state.history[1:])
    assert last["latency_share"] == pytest.approx(state.budget.target)  # the landed structure is the budget held
    closed = sum(int((g.score <= 0).sum()) for _, g in iter_gates(model))
    assert closed > 0
    # the checkpointed controller carries its cost model: a resumed run predicts with the same table
    saved = state.budget.state_dict()
    other = BudgetController(copy.deepcopy(state.budget.macs), 0.02, torch.device("cpu"), target=0.9,
                             calibration={"layers": []})
    for layer in other.macs.layers:
        layer.weight = 0.0
    other.load_state_dict(saved)
    assert [layer.weight for layer in other.macs.layers] == pytest.approx(
        [layer.weight for layer in state.budget.macs.layers])
    assert other.target == pytest.approx(state.budget.target)
    assert other.macs.offset == pytest.approx(state.budget.macs.offset)


def test_a_trial_reports_the_latency_it_asked_for_beside_the_one_it_measured(tmp_path):
    from prunevision.pipeline import run_training

    cfg = _cfg(**{"gates.target_latency_ms": 1e3, "train.epochs": 2, "prune.finetune_epochs": 0,
                  "measure.torch_latency": False, "measure.exporter": "torchscript"})
    m = run_training(cfg, tmp_path / "run", log=None)
    assert m["target_latency_ms"] == 1e3
    assert m["latency_ms"] > 0 and m["latency_ms_dense"] > 0
    assert m["latency_budget_error"] == pytest.approx(m["latency_ms"] / 1e3 - 1)
    plain = run_training(_cfg(**{"gates.target_macs": 0.9, "train.epochs": 1, "prune.finetune_epochs": 0,
                                 "measure.latency": False, "measure.export": False}), tmp_path / "macs", log=None)
    assert "target_latency_ms" not in plain and "latency_budget_error" not in plain  # only latency budgets

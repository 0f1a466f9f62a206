import pytest
import torch

from prunevision.config import ExperimentConfig, load_config
from prunevision.data import load_dataset
from prunevision.models import build_gated_model
from prunevision.train import CheckpointError, fit, load_checkpoint


def _cfg(**overrides) -> ExperimentConfig:
    base = {
        "data.name": "synthetic", "data.synthetic_train": 256, "data.synthetic_test": 128, "data.num_classes": 4,
        "data.batch_size": 32, "data.image_size": 16, "model.name": "small_cnn", "train.epochs": 4,
        "train.lr": 0.05, "gates.lam": 0.0, "gates.lr": 0.05,
    }
    base.update(overrides)
    return load_config(None, base)


def _train(cfg, **kw):
    torch.manual_seed(cfg.seed)
    data = load_dataset(cfg.data, seed=cfg.seed)
    model = build_gated_model(cfg.model, cfg.gates, data.num_classes, data.image_size)
    return fit(model, data, cfg, **kw), data


def test_loss_falls_and_gates_stay_open_without_penalty():
    state, _ = _train(_cfg())
    h = state.history
    assert len(h) == 4
    assert h[-1]["task_loss"] < 0.7 * h[0]["task_loss"]
    assert h[-1]["test_accuracy"] > 0.6  # 4 classes: chance is 0.25
    assert h[-1]["val_accuracy"] > 0.6
    assert h[-1]["mean_gate"] > 0.9
    for key in ("task_loss", "penalty", "lam", "mean_gate", "gates_below_threshold", "val_accuracy", "val_loss",
                "test_accuracy", "test_loss", "lr"):
        assert key in h[0]


def test_val_metrics_come_from_the_val_split_or_the_test_split_without_one():
    from prunevision.data import DeviceLoader
    from prunevision.train import evaluate

    cfg = _cfg(**{"train.epochs": 1, "data.val_split": 0.2})
    state, data = _train(cfg)
    assert len(data.val_y) == 51 and len(data.train_y) == 205
    r = state.history[-1]
    ev = evaluate(state.model, DeviceLoader(data.val_x, data.val_y, 64, data.mean, data.std, train=False),
                  data.num_classes)
    assert r["val_accuracy"] == pytest.approx(ev["accuracy"]) and r["val_loss"] == pytest.approx(ev["loss"])
    state, data = _train(_cfg(**{"train.epochs": 1, "data.val_split": 0}))
    r = state.history[-1]
    assert not data.has_val and len(data.train_y) == 256
    assert r["val_accuracy"] == r["test_accuracy"] and r["val_loss"] == r["test_loss"]


@pytest.mark.parametrize("mode", ["mean", "flops"])
def test_large_lambda_closes_gates(mode):
    # all 256 images train (8 steps an epoch): how far gates close depends on the number of steps
    state, _ = _train(_cfg(**{"gates.lam": 20.0, "gates.penalty": mode, "gates.lr": 0.2, "data.val_split": 0}))
    h = state.history
    assert h[-1]["mean_gate"] < h[0]["mean_gate"] - 0.3
    assert h[-1]["gates_below_threshold"] > 0.5
    assert all(r["lam"] == 20.0 for r in h)


def test_resume_continues_without_repeating_epochs(tmp_path):
    cfg = _cfg(**{"gates.lam": 1.0, "train.epochs": 3})
    full, _ = _train(cfg)
    ckpts = []

    def stop_after_two(record, save):
        ckpts.append(save(tmp_path / f"e{record['epoch']}"))
        if record["epoch"] == 2:
            raise KeyboardInterrupt  # a trial killed mid-run

    with pytest.raises(KeyboardInterrupt):
        _train(cfg, reporter=stop_after_two)
    ckpt = load_checkpoint(ckpts[-1])
    assert ckpt["epoch"] == 2 and len(ckpt["history"]) == 2
    seen = []
    resumed, _ = _train(cfg, resume=ckpt, reporter=lambda r, s: seen.append(r["epoch"]))
    assert seen == [3]  # finished epochs are not run again
    assert resumed.epoch == 3 and len(resumed.history) == 3
    # the interrupted-and-resumed run ends where the uninterrupted one does
    assert resumed.history[-1]["test_accuracy"] == pytest.approx(full.history[-1]["test_accuracy"], abs=1e-6)
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), k


def test_checkpoint_is_plain_tensors_and_corruption_is_reported(tmp_path):
    state, _ = _train(_cfg(**{"train.epochs": 1}))
    path = state.save(tmp_path / "ck")
    torch.load(path, weights_only=True)  # no pickled code inside
    ck = load_checkpoint(path)
    assert ck["config"] == state.cfg
    bad = tmp_path / "bad.pt"
    bad.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="not a prunevision training checkpoint"):
        load_checkpoint(other)


def test_resume_into_another_model_is_refused(tmp_path):
    state, _ = _train(_cfg(**{"train.epochs": 1}))
    ck = load_checkpoint(state.save(tmp_path / "ck"))
    with pytest.raises(CheckpointError, match="another model"):
        _train(_cfg(**{"train.epochs": 2, "model.name": "resnet18"}), resume=ck)


def test_speedup_spread_is_the_range_of_the_rounds_ratios():
    from prunevision.metrics import format_speedup, speedup

    dense = {"median_ms": 4.0, "round_medians_ms": [4.0, 4.4, 3.6, 4.0, 4.0]}
    pruned = {"median_ms": 2.0, "round_medians_ms": [2.0, 2.0, 2.0, 1.6, 2.5]}
    s = speedup(dense, pruned)
    assert s["median"] == 2.0 and s["rounds"] == 5
    assert s["lo"] == pytest.approx(1.6) and s["hi"] == pytest.approx(2.5)
    assert format_speedup(s["median"], s["lo"], s["hi"]) == "2.00× (1.60–2.50)"
    assert format_speedup(2.0) == "2.00×"
    # results without rounds (older files): the median alone
    assert speedup({"median_ms": 3.0}, {"median_ms": 1.5}) == {"median": 2.0, "lo": 2.0, "hi": 2.0, "rounds": 0}


def test_interleaved_timing_records_each_rounds_median():
    import time

    from prunevision.measure import _interleaved

    res = _interleaved({"slow": lambda: time.sleep(0.002), "fast": lambda: None}, runs=10, warmup=1, rounds=5)
    for r in res.values():
        assert len(r["round_medians_ms"]) == 5 and r["runs"] == 10
    assert min(res["slow"]["round_medians_ms"]) > max(res["fast"]["round_medians_ms"])


def test_recalibrating_the_norms_fits_their_statistics_and_moves_nothing_else():
    """The running statistics become those of the batches seen (cumulative mean over them); weights, the
    momentum, the training mode and the global random stream (dropout stays off) are as before."""
    from prunevision.train import recalibrate_norms

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4, momentum=0.3),
                                torch.nn.Dropout(0.5), torch.nn.Flatten(), torch.nn.Linear(4 * 16, 2))
    with torch.no_grad():
        model[1].running_mean.fill_(50.0)
        model[1].running_var.fill_(1e-4)
    batches = [(torch.randn(8, 3, 4, 4) * 2 + 1, torch.zeros(8)) for _ in range(5)]
    weights = [p.detach().clone() for p in model.parameters()]
    model.train()
    rng = torch.get_rng_state()
    recalibrate_norms(model, batches, batches=3)
    assert torch.equal(torch.get_rng_state(), rng)
    conv = torch.cat([model[0](x) for x, _ in batches[:3]]).detach()
    assert model[1].running_mean == pytest.approx(conv.mean(dim=(0, 2, 3)), abs=1e-5)
    per_batch_var = torch.stack([model[0](x).detach().var(dim=(0, 2, 3)) for x, _ in batches[:3]])
    assert model[1].running_var == pytest.approx(per_batch_var.mean(0), rel=1e-4)
    assert model[1].momentum == 0.3 and model.training and model[2].training
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))

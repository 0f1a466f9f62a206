import pytest

from prunevision.config import GateConfig, TrainConfig
from prunevision.schedules import lam_at, lr_at, temperature_at

E = 10


def test_constant():
    c = GateConfig(lam=2.0)
    assert lam_at(c, 0, E) == lam_at(c, 9.5, E) == 2.0


def test_linear_warmup_boundaries():
    c = GateConfig(lam=2.0, schedule="linear", warmup_epochs=4)
    assert lam_at(c, 0, E) == 0.0
    assert lam_at(c, 2, E) == pytest.approx(1.0)
    assert lam_at(c, 4, E) == pytest.approx(2.0)
    assert lam_at(c, 9, E) == pytest.approx(2.0)
    assert lam_at(GateConfig(lam=2.0, schedule="linear", warmup_epochs=0), 0, E) == 2.0


def test_staged_steps():
    c = GateConfig(lam=3.0, schedule="staged", warmup_epochs=4, stages=3)  # stages of 2 epochs
    assert lam_at(c, 3.99, E) == 0.0
    assert lam_at(c, 4.0, E) == pytest.approx(1.0)
    assert lam_at(c, 5.99, E) == pytest.approx(1.0)
    assert lam_at(c, 6.0, E) == pytest.approx(2.0)
    assert lam_at(c, 8.0, E) == pytest.approx(3.0)
    assert lam_at(c, 10.0, E) == pytest.approx(3.0)


def test_cubic_zhu_gupta():
    c = GateConfig(lam=1.0, schedule="cubic", warmup_epochs=2)
    assert lam_at(c, 1.9, E) == 0.0
    assert lam_at(c, 2.0, E) == 0.0
    assert lam_at(c, 6.0, E) == pytest.approx(1 - 0.5**3)
    assert lam_at(c, 10.0, E) == pytest.approx(1.0)
    ramp = GateConfig(lam=1.0, schedule="cubic", warmup_epochs=2, ramp_epochs=2)
    assert lam_at(ramp, 4.0, E) == pytest.approx(1.0)
    assert lam_at(ramp, 7.0, E) == pytest.approx(1.0)
    vals = [lam_at(c, e / 10, E) for e in range(101)]
    assert vals == sorted(vals)  # monotone


def test_temperature_annealing():
    c = GateConfig(temperature=1.0, temperature_final=0.25)
    assert temperature_at(c, 0, E) == pytest.approx(1.0)
    assert temperature_at(c, 5, E) == pytest.approx(0.5)
    assert temperature_at(c, 10, E) == pytest.approx(0.25)
    assert temperature_at(GateConfig(temperature=2.0), 7, E) == 2.0


def test_lr_schedules():
    oc = TrainConfig(lr=1.0, lr_schedule="onecycle")
    assert lr_at(oc, 0, 100) == pytest.approx(1 / 25)
    assert lr_at(oc, 25, 100) == pytest.approx(1.0)
    assert lr_at(oc, 100, 100) == pytest.approx(1e-4)
    cos = TrainConfig(lr=1.0, lr_schedule="cosine")
    assert lr_at(cos, 0, 100) == pytest.approx(1.0)
    assert lr_at(cos, 50, 100) == pytest.approx(0.5)
    assert lr_at(cos, 100, 100) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(TrainConfig(lr=0.3, lr_schedule="constant"), 77, 100) == 0.3

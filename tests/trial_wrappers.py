"""Trial functions for tests: sweeps.trainable.sweep_trial with a fault or a rendezvous added, passed
to ``sweeps.run.build_tuner(..., trial_fn=...)``. They run in Ray's worker processes, which do not
import this folder: they travel by value (cloudpickle), so they import what they need inside."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import ray.cloudpickle


def failing_once_after(epoch: int, marker_dir: str | Path):
    """Every trial fails once, right after reporting ``epoch`` (a marker per trial in a folder every
    attempt can see), then runs again from the checkpoint it reported."""
    marker_dir = str(marker_dir)

    def trial(config: dict[str, Any], *, base: dict[str, Any], settings: dict[str, Any]) -> None:
        from ray import tune

        from sweeps.trainable import sweep_trial

        marker = Path(marker_dir) / f"{tune.get_context().get_trial_id()}.failed_once"
        real = tune.report

        def report(metrics: dict[str, Any], **kw: Any) -> None:
            real(metrics, **kw)
            if metrics.get("epoch") == epoch and not metrics.get("trial_final") and not marker.exists():
                marker.touch()
                raise RuntimeError("injected failure (test)")

        tune.report = report
        try:
            sweep_trial(config, base=base, settings=settings)
        finally:
            tune.report = real

    return _named(trial)


def held_until_peers(folder: str | Path, count: int, timeout_s: float = 120.0):
    """Each trial waits at its start until ``count`` trials (itself included) have arrived in
    ``folder``, or ``timeout_s`` passed: trials released together ran side by side."""
    folder = str(folder)

    def trial(config: dict[str, Any], *, base: dict[str, Any], settings: dict[str, Any]) -> None:
        import time

        from ray import tune

        from sweeps.trainable import sweep_trial

        here = Path(folder)
        here.mkdir(parents=True, exist_ok=True)
        (here / tune.get_context().get_trial_id()).touch()
        deadline = time.monotonic() + timeout_s
        while sum(1 for _ in here.iterdir()) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        sweep_trial(config, base=base, settings=settings)

    return _named(trial)


def _named(fn):
    """Ray names trials after their function: keep the names the shipped trainable gives them."""
    fn.__name__ = fn.__qualname__ = "sweep_trial"
    return fn


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

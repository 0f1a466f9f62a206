"""The searcher: Ray's OptunaSearch, with early-stopped trials told to Optuna as PRUNED."""

from __future__ import annotations

from typing import Any

from ray.tune.search.optuna import OptunaSearch

from sweeps.folder import FINAL_KEY, MLFLOW_TRIAL_KEY, RAY_TRIAL_ATTR, RESUME_ATTR, RESUME_KEY
from sweeps.spec import Dist, suggest


class DefineByRun:
    """Picklable define-by-run space (Ray saves the searcher with the experiment)."""

    def __init__(self, space: dict[str, Dist]):
        self.space = space

    def __call__(self, trial: Any) -> None:
        suggest(trial, self.space)


class FrontSafeOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna an early-stopped trial is PRUNED, not COMPLETE.

    Ray's OptunaSearch reports whatever the last result held: a trial that ASHA stopped after a
    few epochs would enter the study (and every Pareto front) with partial metrics. Only a
    result marked ``trial_final`` — the whole pipeline ran — counts as complete.
    """

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        ot_trial = self._ot_trials.get(trial_id)
        if config is None or ot_trial is None:
            return config
        # the study records which Ray trial ran each Optuna trial: resume finds its folder by it
        ot_trial.set_user_attr(RAY_TRIAL_ATTR, trial_id)
        prior = ot_trial.user_attrs.get(RESUME_ATTR)
        if prior:  # a trial cut off by an interrupted sweep, queued again by `sweep resume`
            config[MLFLOW_TRIAL_KEY] = prior["mlflow"]
            if prior.get("folder"):
                config[RESUME_KEY] = prior["folder"]
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if not error and (not result or not result.get(FINAL_KEY)):
            result = None  # OptunaSearch then tells Optuna: PRUNED
        super().on_trial_complete(trial_id, result=result, error=error)

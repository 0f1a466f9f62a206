"""Launch, resume and inspect sweeps: Ray Tune + OptunaSearch (multi-objective) + MLflow.

The sweep's folder is ``<storage>/<name>``: Ray's experiment (results and checkpoints per trial),
the Optuna study (``optuna.db``, sqlite: ``optuna-dashboard sqlite:///…/optuna.db`` and
``optuna.load_study(...).best_trials`` work on it) and ``prunevision_sweep.json`` (what resume
needs: the base config, the search space, the MLflow run ids).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sweeps.spec import SweepError, SweepSpec, spec_summary
from sweeps.tracking import check_reachable, client, experiment_id, git_commit, parent_run, resolve_tracking_uri

STATE_FILE = "prunevision_sweep.json"
STUDY_FILE = "optuna.db"
FINAL_KEY = "trial_final"  # marks a trial's last result: pruned, measured and exported


def last_result(path: str | Path) -> dict[str, Any]:
    """The last complete JSON line of a Ray ``result.json`` (a line cut short by a killed trial is
    skipped; no file: empty)."""
    last: dict[str, Any] = {}
    path = Path(path)
    if not path.is_file():
        return last
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                last = json.loads(line)
            except ValueError:
                continue
    return last


def nsga2_population(num_samples: int, population: int | None = None) -> int:
    """NSGA-II's population: as given, else a quarter of the trials (at least 4, at most Optuna's
    default 50) — with the default 50, a sweep of fewer than 50 trials is one random generation."""
    return population if population else max(4, min(50, num_samples // 4))


def make_sampler(name: str, seed: int, num_samples: int = 50, population: int | None = None):
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=nsga2_population(num_samples, population))
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise SweepError(f"search.sampler: unknown sampler {name!r}")


def _absolute_data_root(base: dict[str, Any]) -> dict[str, Any]:
    """Trials run in their own folders: a relative data.root must not depend on the cwd."""
    root = (base.get("data") or {}).get("root")
    if root and not os.path.isabs(os.path.expanduser(root)):
        base = json.loads(json.dumps(base))
        base["data"]["root"] = str(Path(root).resolve())
    return base


def prepare(spec: SweepSpec, storage: str | Path) -> dict[str, Any]:
    """Everything before Ray starts: folders, tracking server check, MLflow parent run."""
    storage = str(Path(storage).resolve()) if "://" not in str(storage) else str(storage)
    sweep_dir = Path(storage) / spec.name
    if (sweep_dir / STATE_FILE).exists():
        raise SweepError(f"{sweep_dir} already holds a sweep: `prunevision sweep resume {sweep_dir}` continues it, "
                         "or choose another name/--storage")
    uri = resolve_tracking_uri(spec.mlflow.get("tracking_uri"))
    check_reachable(uri)
    # the dataset is found (or downloaded) and decoded once here: a missing dataset stops the sweep
    # before Ray starts, and local trials read the decoded cache
    from prunevision.data import load_dataset

    base_cfg = spec.base_config()
    load_dataset(base_cfg.data, seed=base_cfg.seed)
    c = client(uri)
    exp_id = experiment_id(c, spec.mlflow.get("experiment") or "prunevision")
    summary = spec_summary(spec)
    import yaml

    parent = parent_run(
        c, exp_id, str(sweep_dir), spec.name,
        tags={"prunevision.sweep": spec.name, "git_commit": git_commit(), "mlflow.source.git.commit": git_commit()},
        params={"sampler": spec.sampler, "seed": spec.seed, "num_samples": spec.num_samples,
                "objectives": spec.objectives, **{f"space.{k}": v for k, v in summary["space"].items()}},
        artifacts={"sweep.yaml": yaml.safe_dump(spec.source, sort_keys=False),
                   "search_space.json": json.dumps(summary, indent=2)},
    )
    sweep_dir.mkdir(parents=True, exist_ok=True)
    state = {
        "name": spec.name, "storage": storage, "sweep_dir": str(sweep_dir), "source": spec.source,
        "base": _absolute_data_root(spec.base),
        "settings": {"tracking_uri": uri, "experiment_id": exp_id, "parent_run_id": parent, "score": spec.score,
                     "log_models": bool(spec.mlflow.get("log_models", False))},
        "run": {"num_samples": spec.num_samples, "max_concurrent": spec.max_concurrent, "sampler": spec.sampler,
                "seed": spec.seed, "population_size": spec.population_size, "resources": spec.resources,
                "max_failures": spec.max_failures,
                "scheduler": spec.scheduler, "objectives": spec.objectives},
    }
    (sweep_dir / STATE_FILE).write_text(json.dumps(state, indent=2))
    return state


def _trainable(state: dict[str, Any]):
    from ray import tune

    from sweeps.trainable import sweep_trial

    # Epoch results carry the ASHA score but not the objectives, which only exist once the trial
    # has been pruned and measured; FrontSafeOptunaSearch only reads the final result.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    res = state["run"]["resources"]
    fn = tune.with_parameters(sweep_trial, base=state["base"], settings=state["settings"])
    return tune.with_resources(fn, {"cpu": res.get("cpu", 1), "gpu": res.get("gpu", 0)})


def build_tuner(spec: SweepSpec, state: dict[str, Any]):
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter

    run = state["run"]
    sweep_dir = Path(state["sweep_dir"])
    storage = optuna.storages.RDBStorage(f"sqlite:///{sweep_dir / STUDY_FILE}")
    from sweeps.search import DefineByRun, FrontSafeOptunaSearch

    searcher = FrontSafeOptunaSearch(
        space=DefineByRun(spec.space),
        metric=list(run["objectives"]), mode=list(run["objectives"].values()),
        points_to_evaluate=spec.points_to_evaluate or None,
        sampler=make_sampler(run["sampler"], run["seed"], run["num_samples"], run.get("population_size")),
        storage=storage, study_name=spec.name,
    )
    search = ConcurrencyLimiter(searcher, max_concurrent=run["max_concurrent"])
    scheduler = None
    if run["scheduler"]:
        s = run["scheduler"]
        epochs = spec.base_config().train.epochs
        if "train.epochs" in spec.space:  # the longest trial the space allows
            epochs = max(epochs, int(spec.space["train.epochs"].high or 0), *[
                int(c) for c in spec.space["train.epochs"].choices if isinstance(c, int)])
        scheduler = ASHAScheduler(metric="score", mode="max", time_attr="training_iteration",
                                  max_t=epochs + 1, grace_period=s.get("grace_period", 1),
                                  reduction_factor=s.get("reduction_factor", 2))
    return tune.Tuner(
        _trainable(state),
        tune_config=tune.TuneConfig(search_alg=search, scheduler=scheduler, num_samples=run["num_samples"],
                                    reuse_actors=True),  # no new worker process (and imports) per trial
        run_config=tune.RunConfig(
            name=state["name"], storage_path=state["storage"],
            failure_config=tune.FailureConfig(max_failures=run["max_failures"]),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            verbose=1,
        ),
    )


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)


def run_sweep(spec: SweepSpec, storage: str | Path, address: str | None = None,
              num_cpus: int | None = None) -> dict[str, Any]:
    """Validate and prepare (before Ray starts), then run the sweep. Returns a summary."""
    state = prepare(spec, storage)
    init_ray(address, num_cpus)
    tuner = build_tuner(spec, state)
    results = tuner.fit()
    return finish(state, results)


def load_state(sweep_dir: str | Path) -> dict[str, Any]:
    from analysis.results import SweepDataError, read_state

    try:
        return read_state(sweep_dir)
    except SweepDataError as e:
        raise SweepError(str(e)) from None


def resume_sweep(sweep_dir: str | Path, address: str | None = None, num_cpus: int | None = None) -> dict[str, Any]:
    """Continue an interrupted sweep (errored trials included) with ``Tuner.restore``."""
    from ray import tune

    state = load_state(sweep_dir)
    check_reachable(state["settings"]["tracking_uri"])
    init_ray(address, num_cpus)
    path = state["sweep_dir"]
    if not tune.Tuner.can_restore(path):
        raise SweepError(f"{path}: Ray has no experiment state to restore (did the sweep start?)")
    tuner = tune.Tuner.restore(path, trainable=_trainable(state), resume_errored=True)
    results = tuner.fit()
    return finish(state, results)


def finish(state: dict[str, Any], results) -> dict[str, Any]:
    c = client(state["settings"]["tracking_uri"])
    summary = sweep_status(state["sweep_dir"])
    try:
        c.set_terminated(state["settings"]["parent_run_id"], status="FINISHED")
    except Exception:
        pass
    summary["errors"] = len(results.errors)
    return summary


def sweep_status(sweep_dir: str | Path) -> dict[str, Any]:
    """Trial counts by Optuna state and the last result of every Ray trial (no pickles read)."""
    import optuna

    state = load_state(sweep_dir)
    d = Path(state["sweep_dir"])
    counts: dict[str, int] = {}
    study_trials = 0
    if (d / STUDY_FILE).exists():
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.load_study(study_name=state["name"], storage=f"sqlite:///{d / STUDY_FILE}")
        for t in study.get_trials(deepcopy=False):
            counts[t.state.name] = counts.get(t.state.name, 0) + 1
        study_trials = len(study.trials)
    trials = []
    for result_file in sorted(d.glob("*/result.json")):
        last = last_result(result_file)
        trials.append({"trial_dir": str(result_file.parent), "trial_id": last.get("trial_id"),
                       "final": bool(last.get(FINAL_KEY)), "epoch": last.get("epoch"),
                       **{k: last.get(k) for k in state["run"]["objectives"]}})
    return {"sweep_dir": str(d), "name": state["name"], "study": str(d / STUDY_FILE), "study_trials": study_trials,
            "states": counts, "trials": trials, "tracking_uri": state["settings"]["tracking_uri"],
            "experiment_id": state["settings"]["experiment_id"],
            "parent_run_id": state["settings"]["parent_run_id"]}

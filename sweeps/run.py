"""Launch, resume and inspect sweeps: Ray Tune + OptunaSearch (multi-objective) + MLflow.

The sweep's folder is ``<storage>/<name>``: Ray's experiment (results and checkpoints per trial),
the Optuna study (``optuna.db``, sqlite: ``prunevision sweep dashboard DIR`` and
``optuna.load_study(...).best_trials`` work on it) and ``prunevision_sweep.json`` (what resume
needs: the base config, the search space, the MLflow run ids).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prunevision.fsutil import LOCK_FILE, atomic_write, locked_folder
from sweeps.folder import (  # noqa: F401  (re-exported: the names callers know from here)
    FINAL_KEY,
    INTERRUPTED_DIR,
    MLFLOW_TRIAL_KEY,
    RAY_TRIAL_ATTR,
    RESUME_ATTR,
    RESUME_KEY,
    STATE_FILE,
    STUDY_FILE,
    SweepDataError,
    interrupted_checkpoint,
    last_result,
    ray_statuses,
    ray_trial_id,
    read_state,
    trial_status,
)
from sweeps.spec import SweepError, SweepSpec, spec_summary
from sweeps.tracking import (
    PENDING_FILE,
    check_reachable,
    client,
    experiment_id,
    experiment_name,
    git_commit,
    parent_run,
    read_ops,
    resolve_tracking_uri,
    send_carried,
)


class SweepInterrupted(Exception):
    """The sweep was stopped (Ctrl-C) before all its trials ended; ``sweep resume`` continues it."""

    def __init__(self, sweep_dir: str, done: int, total: int):
        self.sweep_dir, self.done, self.total = sweep_dir, done, total
        super().__init__(f"sweep interrupted with {done} of {total} trials done; continue it with "
                         f"`prunevision sweep resume {sweep_dir}`")


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
    exp_id = experiment_id(c, experiment_name(spec.mlflow))
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
    atomic_write(sweep_dir / STATE_FILE, json.dumps(state, indent=2))
    return state


def _trainable(state: dict[str, Any], trial_fn: Callable[..., None] | None = None):
    from ray import tune

    from sweeps.trainable import sweep_trial

    # Epoch results carry the ASHA score but not the objectives, which only exist once the trial
    # has been pruned and measured; FrontSafeOptunaSearch only reads the final result.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    res = state["run"]["resources"]
    settings = dict(state["settings"], sweep_dir=state["sweep_dir"])
    fn = tune.with_parameters(trial_fn or sweep_trial, base=state["base"], settings=settings)
    return tune.with_resources(fn, {"cpu": res.get("cpu", 1), "gpu": res.get("gpu", 0)})


def build_tuner(spec: SweepSpec, state: dict[str, Any], num_samples: int | None = None,
                trial_fn: Callable[..., None] | None = None):
    """The Tuner of a new sweep, or (``num_samples``: the trials left) of a resumed one, whose
    points to evaluate and cut-off trials already wait in the study. ``trial_fn``: the function
    each trial runs (default :func:`sweeps.trainable.sweep_trial`; a wrapper of it takes
    ``(config, *, base, settings)`` too), e.g. to add fault injection or instrumentation."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter

    run = state["run"]
    sweep_dir = Path(state["sweep_dir"])
    storage = optuna.storages.RDBStorage(f"sqlite:///{sweep_dir / STUDY_FILE}")
    from sweeps.search import DefineByRun, FrontSafeOptunaSearch

    # a resumed sweep's sampler must not draw the first run's random points again
    study = _study(state) if num_samples is not None else None
    asked = len(study.trials) if study is not None else 0
    searcher = FrontSafeOptunaSearch(
        space=DefineByRun(spec.space),
        metric=list(run["objectives"]), mode=list(run["objectives"].values()),
        points_to_evaluate=(spec.points_to_evaluate or None) if num_samples is None else None,
        sampler=make_sampler(run["sampler"], run["seed"] + asked, run["num_samples"], run.get("population_size")),
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
        _trainable(state, trial_fn),
        tune_config=tune.TuneConfig(search_alg=search, scheduler=scheduler,
                                    num_samples=run["num_samples"] if num_samples is None else num_samples,
                                    reuse_actors=True),  # no new worker process (and imports) per trial
        run_config=tune.RunConfig(
            name=sweep_dir.name, storage_path=str(sweep_dir.parent) if "://" not in state["storage"]
            else state["storage"],
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
        # Under Ray Client (ray://) Tune's loop runs on the cluster, where this process's environment
        # does not reach: the job's runtime env carries what it needs (epoch results hold no objectives)
        # (unless a job's runtime env already set it: Ray refuses conflicting env vars)
        env = {} if "TUNE_DISABLE_STRICT_METRIC_CHECKING" in os.environ else {
            "runtime_env": {"env_vars": {"TUNE_DISABLE_STRICT_METRIC_CHECKING": "1"}}}
        ray.init(address=address, log_to_driver=True, **env)
    else:
        _loopback_only()
        # address="local": a Ray of its own, never a cluster someone started on this machine
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)


def _loopback_only() -> None:
    """A local Ray listens on 127.0.0.1 only. Ray binds GCS, raylet, object manager and worker
    servers to all interfaces unless its node address is loopback, which it is when Ray runs as a
    single machine without cluster support (its default on macOS and Windows): the switch below."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read by the processes Ray starts
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # read by this process when it picks the node address


def check_resources(state: dict[str, Any]) -> None:
    """Refuse, before any trial is queued, a sweep whose trials ask for more CPU or GPU than any one
    node of the Ray cluster has, or any node type its autoscaler can start: Ray would leave such
    trials pending for ever."""
    import ray

    res = state["run"]["resources"]
    nodes = [n.get("Resources") or {} for n in ray.nodes() if n.get("Alive")]
    if any(trials_per_node(res, r) for r in nodes):
        return
    types = _autoscaled_node_types()
    if types is None or any(trials_per_node(res, r) for r in types):  # None: node types unknown here
        return
    shapes = sorted({(float(r.get("GPU", 0)), float(r.get("CPU", 0))) for r in nodes + types}, reverse=True)
    have = ", ".join(f"{c:g} CPU + {g:g} GPU" for g, c in shapes[:4])
    raise SweepError(f"resources: each trial asks for {res.get('cpu', 1):g} CPU and {res.get('gpu', 0):g} GPU, more "
                     f"than any node of the Ray cluster has (nodes: {have}); lower resources.cpu/resources.gpu or add "
                     "a bigger node")


def trials_per_node(resources: dict[str, float], node: dict[str, float]) -> int:
    """How many trials asking for ``resources`` ({cpu, gpu}) one node (Ray's {CPU, GPU, ...}) runs
    at once; Ray counts resources in units of 1/10000."""
    want = {"CPU": resources.get("cpu", 1), "GPU": resources.get("gpu", 0)}
    counts = [round(float(node.get(k, 0)) * 10000) // round(v * 10000) for k, v in want.items() if v > 0]
    return min(counts) if counts else 0


BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # the cluster file `ray up` leaves on the head (Tune reads it too)


def _autoscaled_node_types() -> list[dict[str, float]] | None:
    """The resources of the node types the cluster's autoscaler can start, read from the head's
    bootstrap config (by a zero-CPU task on the head, so that it works from any driver): [] without
    an autoscaler, None when they cannot be known (a type whose resources Ray detects at launch)."""
    import ray

    @ray.remote(num_cpus=0, resources={"node:__internal_head__": 0.001}, max_retries=0)
    def read_bootstrap_config() -> str | None:
        p = Path(BOOTSTRAP_CONFIG).expanduser()
        return p.read_text() if p.is_file() else None

    try:
        text = ray.get(read_bootstrap_config.remote(), timeout=60)
    except Exception:
        return None
    if text is None:
        return []
    import yaml

    try:
        cfg = yaml.safe_load(text) or {}
        types = [t for name, t in (cfg.get("available_node_types") or {}).items()
                 if name == cfg.get("head_node_type") or t.get("max_workers", 1) > 0]
        if any(not isinstance(t.get("resources"), dict) for t in types):
            return None
        return [{k: float(v) for k, v in t["resources"].items()} for t in types]
    except (yaml.YAMLError, AttributeError, TypeError, ValueError):
        return None


def run_sweep(spec: SweepSpec, storage: str | Path, address: str | None = None,
              num_cpus: int | None = None) -> dict[str, Any]:
    """Validate and prepare (before Ray starts), then run the sweep. Returns a summary."""
    state = prepare(spec, storage)
    try:
        with driver_lock(state["sweep_dir"]):
            return _run(state, spec, address, num_cpus)
    except SweepInterrupted:
        raise
    except BaseException:
        _forget_if_unstarted(state)
        raise


def _forget_if_unstarted(state: dict[str, Any]) -> None:
    """A sweep that failed before any trial was asked for (Ray unreachable, resources refused)
    leaves no folder behind, so the same command runs once the cause is fixed; its parent run
    stays in MLflow, marked FAILED."""
    d = Path(state["sweep_dir"])
    if "://" in state["storage"] or (d / STUDY_FILE).exists() or any(d.glob("*/params.json")):
        return
    for name in (STATE_FILE, LOCK_FILE):
        (d / name).unlink(missing_ok=True)
    try:
        d.rmdir()  # only when nothing else is in it
    except OSError:
        pass


def _run(state: dict[str, Any], spec: SweepSpec, address: str | None, num_cpus: int | None,
         num_samples: int | None = None) -> dict[str, Any]:
    """Start Ray, fit, and close the parent run whatever happens: FINISHED, KILLED (Ctrl-C: the
    sweep can be resumed) or FAILED."""
    try:
        init_ray(address, num_cpus)
        check_resources(state)
        results = build_tuner(spec, state, num_samples=num_samples).fit()
        summary = finish(state, results)
    except KeyboardInterrupt:
        _close_parent(state, "KILLED")
        done, total = _progress(state)
        raise SweepInterrupted(state["sweep_dir"], done, total) from None
    except BaseException:
        _close_parent(state, "FAILED")
        raise
    if summary["interrupted"]:  # Ray caught the Ctrl-C itself and returned what had ended
        raise SweepInterrupted(state["sweep_dir"], summary["done"], summary["total"])
    return summary


def load_state(sweep_dir: str | Path) -> dict[str, Any]:
    try:
        state = read_state(sweep_dir)
    except SweepDataError as e:
        raise SweepError(str(e)) from None
    if "://" not in str(state.get("storage", "")):  # a copied or moved folder is acted on where it is
        here = Path(sweep_dir).resolve()
        state.update(sweep_dir=str(here), storage=str(here.parent))
    return state


def resume_sweep(sweep_dir: str | Path, address: str | None = None, num_cpus: int | None = None) -> dict[str, Any]:
    """Continue an interrupted or partly failed sweep from the sweep's own JSON record and its Optuna
    study — never from Ray's pickled experiment state, which a sweep folder on shared storage
    cannot vouch for. Finished trials stay; the trials that were cut off (or errored) run again
    with the same parameters, each from its newest checkpoint and in its own MLflow child run."""
    state = load_state(sweep_dir)
    check_reachable(state["settings"]["tracking_uri"])
    with driver_lock(state["sweep_dir"]):
        spec = _spec_from_state(state)
        remaining = _prepare_resume(state)  # None: Ray never started a trial, so start afresh
        if remaining == 0:  # finished: only what MLflow has not had yet is left to do
            unsent = send_carried(state["settings"], _carried_in_folder(state["sweep_dir"]))
            summary = sweep_status(state["sweep_dir"])
            _close_parent(state, "FINISHED")
            return dict(summary, errors=0, interrupted=False, mlflow_unsent=unsent)
        return _run(state, spec, address, num_cpus, num_samples=remaining)


def _spec_from_state(state: dict[str, Any]) -> SweepSpec:
    from sweeps.spec import parse_sweep

    raw = dict(state["source"], base=state["base"], name=state["name"])
    raw.pop("base_config", None)
    return parse_sweep(raw)


def _study(state: dict[str, Any]):
    """The sweep's Optuna study (sqlite, no pickles), or None before Ray asked for a trial."""
    import optuna

    path = Path(state["sweep_dir"]) / STUDY_FILE
    if not path.is_file():
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=state["name"], storage=f"sqlite:///{path}")
    except KeyError:
        return None


def _prepare_resume(state: dict[str, Any]) -> int | None:
    """Close the study's cut-off trials, queue their parameters again (linked to the old Ray
    trial and its newest checkpoint), move their folders aside, and return how many trials are
    left to run."""
    from optuna.trial import TrialState

    d = Path(state["sweep_dir"])
    study = _study(state)
    if study is None:
        return None
    folders = [q.parent for q in d.glob("*/params.json")]  # Ray names them <trainable>_<trial id>_<n>_...
    trials = study.get_trials(deepcopy=False)
    replaced = _requeued(trials)
    done = 0
    requeue = []
    for t in trials:
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            done += 1
        elif t.state in (TrialState.RUNNING, TrialState.FAIL) and t.number not in replaced:
            if t.state == TrialState.RUNNING:
                study.tell(t.number, state=TrialState.FAIL)
            requeue.append(t)
    for t in requeue:
        ray_id = t.user_attrs.get(RAY_TRIAL_ATTR)
        if not ray_id:
            study.enqueue_trial(t.params, skip_if_exists=False)
            continue
        # the MLflow child run it goes on in: the first trial's of a chain of resumes
        prior = {"mlflow": (t.user_attrs.get(RESUME_ATTR) or {}).get("mlflow") or ray_id}
        old = next((f for f in folders if f"_{ray_id}_" in f.name), None)
        if old is not None:
            moved = d / INTERRUPTED_DIR / old.name
            moved.parent.mkdir(exist_ok=True)
            old.rename(moved)
            prior["folder"] = ray_id
        study.enqueue_trial(t.params, user_attrs={RESUME_ATTR: prior}, skip_if_exists=False)
    _mark_unfinished_children(client(state["settings"]["tracking_uri"]), state)
    return max(0, state["run"]["num_samples"] - done)


def _mark_unfinished_children(c, state: dict[str, Any]) -> None:
    """Child runs a killed driver left RUNNING are KILLED until their trial runs again."""
    from sweeps.tracking import child_runs

    try:
        for run in child_runs(c, state["settings"]["experiment_id"], state["settings"]["parent_run_id"]):
            if run.info.status == "RUNNING":
                c.set_terminated(run.info.run_id, status="KILLED")
    except Exception:  # MLflow trouble must not block the resume; TrialLogger reopens the run
        pass


def _progress(state: dict[str, Any]) -> tuple[int, int]:
    """(trials ended, trials asked for) by the Optuna study."""
    from optuna.trial import TrialState

    total = state["run"]["num_samples"]
    try:
        study = _study(state)
    except Exception:  # on the way out of an interrupted run: never mask why it stopped
        study = None
    if study is None:
        return 0, total
    trials = study.get_trials(deepcopy=False)
    replaced = _requeued(trials)
    ended = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return sum(t.state in ended and t.number not in replaced for t in trials), total


def _requeued(trials: list) -> set[int]:
    """Trials a resume queued again: cut off or failed, and a later trial of the study has their
    parameters (finished trials never count here: a sweep may evaluate one point twice)."""
    from optuna.trial import TrialState

    later: set[str] = set()
    out = set()
    for t in reversed(trials):
        params = t.params or t.system_attrs.get("fixed_params") or {}  # WAITING: queued, not yet asked
        key = json.dumps(params, sort_keys=True, default=str)
        if key in later and t.state in (TrialState.FAIL, TrialState.RUNNING):
            out.add(t.number)
        later.add(key)
    return out


def _close_parent(state: dict[str, Any], status: str) -> None:
    try:
        client(state["settings"]["tracking_uri"]).set_terminated(state["settings"]["parent_run_id"], status=status)
    except Exception:  # the tracking server may be the reason we are here
        pass


def driver_lock(sweep_dir: str | Path):
    """One driver per sweep folder: a second ``sweep run``/``resume`` on it gets one line."""
    return locked_folder(sweep_dir, "sweep folder", busy="{path} is in use by another sweep driver (pid {pid})",
                         error=SweepError)


def finish(state: dict[str, Any], results) -> dict[str, Any]:
    summary = sweep_status(state["sweep_dir"])
    done, total = _progress(state)
    summary.update(errors=len(results.errors), done=done, total=total, interrupted=done < total,
                   mlflow_unsent=_send_carried(state, results))
    _close_parent(state, "KILLED" if summary["interrupted"] else "FINISHED")
    return summary


def _carried_in_folder(sweep_dir: str | Path) -> list[tuple[str, str, Path]]:
    """(trial id, name, newest checkpoint) of the trials in a local sweep folder whose newest
    checkpoint carries operations MLflow has not had."""
    found = []
    for result in sorted(Path(sweep_dir).glob("*/result.json")):
        ckpts = sorted(result.parent.glob("checkpoint_*"), key=lambda p: p.name)
        if not ckpts or not (ckpts[-1] / PENDING_FILE).is_file():
            continue
        last = last_result(result)
        tid = str((last.get("config") or {}).get(MLFLOW_TRIAL_KEY) or last.get("trial_id") or result.parent.name)
        found.append((tid, f"sweep_trial_{tid}", ckpts[-1]))
    return found


def _send_carried(state: dict[str, Any], results) -> int:
    """What finished trials could not send to MLflow rides in their final checkpoints: the driver
    sends it now (the server may be back, or reachable from here). Returns how many operations are
    still unsent; on remote storage the checkpoints are not read (their count is in the results)."""
    found, remote = [], 0
    for r in results:
        ck = getattr(r, "checkpoint", None)
        if ck is None:
            continue
        if type(ck.filesystem).__name__ != "LocalFileSystem":
            remote += int((r.metrics or {}).get("mlflow_unsent") or 0)
            continue
        tid = str((r.config or {}).get(MLFLOW_TRIAL_KEY) or (r.metrics or {}).get("trial_id"))
        found.append((tid, f"sweep_trial_{tid}", Path(ck.path)))
    try:
        return send_carried(state["settings"], found) + remote
    except Exception:  # never the reason a finished sweep fails
        return sum(len(read_ops(d / PENDING_FILE)) for *_, d in found) + remote


def sweep_status(sweep_dir: str | Path) -> dict[str, Any]:
    """Trial counts by Optuna state and the last result of every Ray trial (no pickles read)."""
    state = load_state(sweep_dir)
    d = Path(state["sweep_dir"])
    counts: dict[str, int] = {}
    study_trials = 0
    study = _study(state)
    if study is not None:
        for t in study.get_trials(deepcopy=False):
            counts[t.state.name] = counts.get(t.state.name, 0) + 1
        study_trials = len(study.trials)
    trials = []
    statuses = ray_statuses(d)
    for result_file in sorted(d.glob("*/result.json")):
        last = last_result(result_file)
        tid = ray_trial_id(last, statuses, result_file.parent)
        status = trial_status(last, (statuses.get(tid) or {}).get("status"))
        trials.append({"trial_dir": str(result_file.parent), "trial_id": tid, "status": status,
                       "final": bool(last.get(FINAL_KEY)), "epoch": last.get("epoch"),
                       **{k: last.get(k) for k in state["run"]["objectives"]}})
    return {"sweep_dir": str(d), "name": state["name"], "study": str(d / STUDY_FILE), "study_trials": study_trials,
            "states": counts, "trials": trials, "tracking_uri": state["settings"]["tracking_uri"],
            "experiment_id": state["settings"]["experiment_id"],
            "experiment": experiment_name((state.get("source") or {}).get("mlflow")),
            "parent_run_id": state["settings"]["parent_run_id"]}

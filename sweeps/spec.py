"""Sweep files: a base experiment config + a search space + run settings, validated before Ray starts.

```yaml
name: smoke
base:                      # an experiment config (as for `prunevision train`), or base_config: path
  model: {name: small_cnn}
space:                     # dotted config keys → distributions
  gates.lam: {type: loguniform, low: 0.01, high: 10}
  prune.threshold: {type: uniform, low: 0.2, high: 0.8}
  gates.schedule:          # categorical; a choice may bring its own parameters
    type: categorical
    choices:
      constant: {}
      cubic: {gates.warmup_epochs: {type: int, low: 0, high: 2}}
  prune.steps: {type: int, low: 1, high: 3}
points_to_evaluate:        # known-good configurations, run first
  - {gates.lam: 0.1, prune.threshold: 0.5, gates.schedule: constant, prune.steps: 1}
objectives: {val_accuracy: max, param_sparsity: max, latency_ms: min}   # val_accuracy: the validation split
search: {sampler: tpe, seed: 0, num_samples: 8, max_concurrent: 2}
resources: {cpu: 1, gpu: 0}
scheduler: {type: asha, grace_period: 1, reduction_factor: 2}   # optional early stopping
mlflow: {tracking_uri: null, experiment: prunevision, log_models: false}
failure: {max_failures: 1}
```
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from prunevision.config import (
    ConfigError,
    ExperimentConfig,
    build_section,
    check_range,
    flatten,
    from_dict,
    load_config,
    read_yaml_mapping,
)

# val_accuracy: the pruned model's accuracy on the validation split (data.val_split), what sweeps
# optimise; accuracy is the test accuracy, reported with every trial (choosing on it overfits the test set)
from prunevision.metrics import EPOCH_METRICS, OBJECTIVE_METRICS

SAMPLERS = ("tpe", "nsga2", "random")
DIST_TYPES = ("loguniform", "uniform", "int", "categorical")
_TOP_KEYS = ("name", "base", "base_config", "space", "points_to_evaluate", "objectives", "search", "resources",
             "scheduler", "mlflow", "failure", "score")


class SweepError(ConfigError):
    """A sweep file problem, reported as one line before Ray starts."""


@dataclass(frozen=True)
class Dist:
    type: str
    low: float | None = None
    high: float | None = None
    step: int | None = None
    choices: tuple[Any, ...] = ()
    # categorical: parameters that exist only when that choice is made
    conditional: dict[Any, dict[str, Dist]] = field(default_factory=dict)


@dataclass(frozen=True)
class SweepSpec:
    name: str
    base: dict[str, Any]
    space: dict[str, Dist]
    points_to_evaluate: list[dict[str, Any]]
    objectives: dict[str, str]
    sampler: str = "tpe"
    seed: int = 0
    num_samples: int = 8
    max_concurrent: int = 1
    population_size: int | None = None  # NSGA-II; None: a quarter of num_samples, at least 4
    resources: dict[str, float] = field(default_factory=lambda: {"cpu": 1, "gpu": 0})
    scheduler: dict[str, Any] | None = None
    mlflow: dict[str, Any] = field(default_factory=dict)
    max_failures: int = 1
    score: dict[str, float] = field(default_factory=lambda: {"val_accuracy": 1.0, "gates_below_threshold": 0.2})
    source: dict[str, Any] = field(default_factory=dict)  # the sweep file as read

    def base_config(self) -> ExperimentConfig:
        return from_dict(self.base)


def load_sweep(path: str | Path, overrides: dict[str, Any] | None = None) -> SweepSpec:
    p = Path(path)
    raw = read_yaml_mapping(p, "sweep file", SweepError)
    if "base_config" in raw:
        base_path = (p.parent / raw["base_config"]).resolve()
        raw = dict(raw, base=load_config(base_path).to_dict())
    return parse_sweep(raw, overrides or {}, default_name=p.stem)


class _Section:
    """A section of the sweep file, validated by the config's build_section."""

    @staticmethod
    def check_raw(data: dict[str, Any]) -> None:
        """Checks on the mapping as written, before build_section (where a message says more)."""


@dataclass(frozen=True)
class SearchSection(_Section):
    sampler: Literal["tpe", "nsga2", "random"] = "tpe"
    seed: int = 0
    num_samples: int = 8
    max_concurrent: int = 1
    population_size: Optional[int] = None  # NSGA-II only

    def __post_init__(self) -> None:
        check_range("search.seed", self.seed, low=0, high=2**32 - 1)  # numpy's seed range (Optuna's samplers)
        check_range("search.num_samples", self.num_samples, low=1)
        check_range("search.max_concurrent", self.max_concurrent, low=1)
        check_range("search.population_size", self.population_size, low=2, optional=True)
        if self.population_size is not None and self.sampler != "nsga2":
            raise SweepError("search.population_size: only for sampler nsga2")

    @staticmethod
    def check_raw(data: dict[str, Any]) -> None:
        if data.get("sampler", "tpe") not in SAMPLERS:
            raise SweepError(f"search.sampler: unknown sampler {data['sampler']!r}; choose from {', '.join(SAMPLERS)}")


@dataclass(frozen=True)
class ResourcesSection(_Section):
    cpu: float = 1.0
    gpu: float = 0.0

    def __post_init__(self) -> None:
        check_range("resources.cpu", self.cpu, low=0.0, low_open=True)  # a trial needs some CPU
        check_range("resources.gpu", self.gpu, low=0.0)


@dataclass(frozen=True)
class SchedulerSection(_Section):
    type: Literal["asha"] = "asha"
    grace_period: int = 1
    reduction_factor: float = 2.0

    def __post_init__(self) -> None:
        check_range("scheduler.grace_period", self.grace_period, low=1)
        check_range("scheduler.reduction_factor", self.reduction_factor, low=1.0, low_open=True)

    @staticmethod
    def check_raw(data: dict[str, Any]) -> None:
        if data.get("type") != "asha":  # also when no type is given: a scheduler section names its scheduler
            raise SweepError("scheduler: only {type: asha, grace_period, reduction_factor} is supported")


@dataclass(frozen=True)
class MlflowSection(_Section):
    tracking_uri: Optional[str] = None
    experiment: Optional[str] = None
    log_models: bool = False


@dataclass(frozen=True)
class FailureSection(_Section):
    max_failures: int = 1

    def __post_init__(self) -> None:
        check_range("failure.max_failures", self.max_failures, low=0)


def parse_sweep(raw: dict[str, Any], overrides: dict[str, Any] | None = None, default_name: str = "sweep") -> SweepSpec:
    for k in raw:
        if k not in _TOP_KEYS:
            close = difflib.get_close_matches(k, _TOP_KEYS, n=1)
            raise SweepError(f"unknown sweep key {k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    overrides = dict(overrides or {})
    run_keys = {k: overrides.pop(k) for k in list(overrides) if k.split(".")[0] in ("search", "resources", "name")}
    try:
        base = from_dict(_mapping(raw, "base") or {}, overrides)  # validates the base config, with --set overrides
    except ConfigError as e:
        raise SweepError(f"base: {e}") from None
    space = _parse_space(_mapping(raw, "space") or {}, set(base.flat()))
    for key in space:
        if key in overrides:
            raise SweepError(f"--set {key}: this key is searched over in the sweep's space")
    raw = _with_run_overrides(raw, run_keys)
    search = _section(SearchSection, raw, "search")
    resources = _section(ResourcesSection, raw, "resources")
    _check_gpu_request(resources.gpu, base.train.device)
    scheduler = _section(SchedulerSection, raw, "scheduler") if raw.get("scheduler") is not None else None
    points = raw.get("points_to_evaluate") or []
    if not isinstance(points, list):
        raise SweepError("points_to_evaluate: a list of {key: value} configurations")
    for i, pt in enumerate(points):
        _check_point(i, pt, space, base)
    return SweepSpec(
        name=_name(raw, default_name), base=base.to_dict(), space=space, points_to_evaluate=points,
        objectives=_objectives(raw.get("objectives")), sampler=search.sampler, seed=search.seed,
        num_samples=search.num_samples, max_concurrent=search.max_concurrent,
        population_size=search.population_size, resources={"cpu": resources.cpu, "gpu": resources.gpu},
        scheduler=dataclasses.asdict(scheduler) if scheduler is not None else None,
        mlflow={k: v for k, v in dataclasses.asdict(_section(MlflowSection, raw, "mlflow")).items()
                if k in (raw.get("mlflow") or {})},
        max_failures=_section(FailureSection, raw, "failure").max_failures,
        score=_score(raw.get("score")), source=raw,
    )


def _only(d: dict, allowed: tuple[str, ...], section: str) -> None:
    for k in d:
        if k not in allowed:
            close = difflib.get_close_matches(str(k), allowed, n=1)
            raise SweepError(f"unknown key {section}.{k}" + (f" (did you mean {section}.{close[0]}?)" if close else ""))


def _mapping(raw: dict[str, Any], key: str) -> Any:
    v = raw.get(key)
    if v is not None and not isinstance(v, dict):
        raise SweepError(f"{key}: expected a mapping, got {type(v).__name__}")
    return v


def _section(cls: type[_Section], raw: dict[str, Any], key: str) -> Any:
    """One section of the sweep file through the config's validator (shape, keys, types, ranges)."""
    data = _mapping(raw, key) or {}
    _only(data, tuple(f.name for f in dataclasses.fields(cls)), key)
    cls.check_raw(data)
    try:
        return build_section(cls, data, prefix=f"{key}.")
    except SweepError:
        raise
    except ConfigError as e:
        raise SweepError(str(e)) from None


def _with_run_overrides(raw: dict[str, Any], run_keys: dict[str, Any]) -> dict[str, Any]:
    """``--set name=... search.seed=... resources.cpu=...`` applied to the run sections."""
    for k, v in run_keys.items():
        section, _, sub = k.partition(".")
        if section == "name":
            raw = dict(raw, name=v)
        else:
            raw = dict(raw, **{section: dict(_mapping(raw, section) or {}, **{sub: v})})
    return raw


def _name(raw: dict[str, Any], default: str) -> str:
    name = str(raw.get("name") or default)
    if not name.replace("-", "").replace("_", "").isalnum():
        raise SweepError(f"name: {name!r} may hold letters, digits, - and _ only")
    return name


def _objectives(objectives: Any) -> dict[str, str]:
    objectives = objectives or {"val_accuracy": "max", "param_sparsity": "max", "latency_ms": "min"}
    if not isinstance(objectives, dict) or not objectives:
        raise SweepError("objectives: a mapping of metric → max|min")
    for m, mode in objectives.items():
        if m not in OBJECTIVE_METRICS:
            raise SweepError(f"objectives: unknown metric {m!r}; choose from {', '.join(OBJECTIVE_METRICS)}")
        if mode not in ("max", "min"):
            raise SweepError(f"objectives.{m}: {mode!r} must be max or min")
    return dict(objectives)


def _score(score: Any) -> dict[str, float]:
    """ASHA's one number: weights of metrics every epoch reports (a final-only metric would fail
    every trial inside Ray at its first report)."""
    if score is None:
        return {"val_accuracy": 1.0, "gates_below_threshold": 0.2}
    if not isinstance(score, dict) or not score:
        raise SweepError("score: a mapping of per-epoch metric → weight")
    for m, w in score.items():
        if m not in EPOCH_METRICS:
            close = difflib.get_close_matches(str(m), EPOCH_METRICS, n=1)
            raise SweepError(f"score: {m!r} is not reported every epoch" + (f" (did you mean {close[0]!r}?)" if close
                             else "") + f"; choose from {', '.join(EPOCH_METRICS)}")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise SweepError(f"score.{m}: {w!r} must be a finite number")
    return {k: float(v) for k, v in score.items()}


def _parse_space(space: dict[str, Any], valid_keys: set[str]) -> dict[str, Dist]:
    return {k: _parse_dist(k, v, valid_keys) for k, v in space.items()}


def _check_gpu_request(gpu: float, device: str) -> None:
    """Ray gives a trial a fraction of one GPU (< 1) or whole GPUs; inside a trial, train.device
    cuda:N is the N-th GPU Ray assigned it (sweeps/placement.py), so it needs N + 1 of them."""
    if gpu > 1 and gpu != int(gpu):
        raise SweepError(f"resources.gpu: {gpu!r}: a share of one GPU (below 1) or a whole number of GPUs")
    if device.startswith("cuda"):
        n = int(device.partition(":")[2] or 0)
        if max(int(gpu), 1 if gpu > 0 else 0) <= n:
            raise SweepError(f"train.device={device} needs {n + 1} GPU(s) per trial but resources.gpu is {gpu:g}: "
                             "raise resources.gpu, or use train.device=auto (the GPU Ray assigns, else the CPU)")


def _parse_dist(key: str, spec: Any, valid_keys: set[str]) -> Dist:
    if key not in valid_keys:
        close = difflib.get_close_matches(key, sorted(valid_keys), n=1)
        raise SweepError(f"space: unknown parameter {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    if not isinstance(spec, dict) or spec.get("type") not in DIST_TYPES:
        raise SweepError(f"space.{key}: needs type: one of {', '.join(DIST_TYPES)}")
    t = spec["type"]
    if t == "categorical":
        choices = spec.get("choices")
        conditional: dict[Any, dict[str, Dist]] = {}
        if isinstance(choices, dict):
            for c, sub in choices.items():
                conditional[c] = {k: _parse_dist(k, v, valid_keys) for k, v in (sub or {}).items()}
            choices = list(choices)
        if not isinstance(choices, list) or not choices:
            raise SweepError(f"space.{key}: categorical needs a non-empty list of choices")
        for c in choices:  # every choice must be a valid value of that key, with the parameters it brings
            _validate_value(key, c, f"space.{key}", {k: _example(d) for k, d in conditional.get(c, {}).items()})
        return Dist("categorical", choices=tuple(choices), conditional=conditional)
    low, high = spec.get("low"), spec.get("high")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
        raise SweepError(f"space.{key}: {t} needs numeric low and high")
    if not all(math.isfinite(v) for v in (low, high)):
        raise SweepError(f"space.{key}: low {low} and high {high} must be finite numbers")
    if not low < high:
        raise SweepError(f"space.{key}: empty range (low {low} ≥ high {high})")
    if t == "loguniform" and low <= 0:
        raise SweepError(f"space.{key}: loguniform needs low > 0")
    if t == "int" and (low != int(low) or high != int(high)):
        raise SweepError(f"space.{key}: int needs whole low and high")
    for v in (low, high):
        _validate_value(key, int(v) if t == "int" else float(v), f"space.{key}")
    return Dist(t, low=float(low) if t != "int" else int(low), high=float(high) if t != "int" else int(high),
                step=spec.get("step"))


def _example(d: Dist) -> Any:
    """A value the distribution can produce (its first choice, or its low end)."""
    return d.choices[0] if d.type == "categorical" else d.low


def _validate_value(key: str, value: Any, where: str, context: dict[str, Any] | None = None) -> None:
    try:
        from_dict({}, {**(context or {}), key: value})
    except ConfigError as e:
        raise SweepError(f"{where}: {e}") from None


def _check_point(i: int, pt: Any, space: dict[str, Dist], base: ExperimentConfig) -> None:
    if not isinstance(pt, dict):
        raise SweepError(f"points_to_evaluate[{i}]: must be a mapping of parameters")
    allowed = set(space) | {k for d in space.values() for sub in d.conditional.values() for k in sub}
    for k in pt:
        if k not in allowed:
            raise SweepError(f"points_to_evaluate[{i}]: {k!r} is not a parameter of the space")
    try:
        from_dict(base.to_dict(), pt)
    except ConfigError as e:
        raise SweepError(f"points_to_evaluate[{i}]: {e}") from None


def suggest(trial: Any, space: dict[str, Dist]) -> None:
    """Define-by-run search space for Optuna: conditional parameters only when their choice is made."""
    for key, d in space.items():
        _suggest_one(trial, key, d)


def _suggest_one(trial: Any, key: str, d: Dist) -> Any:
    if d.type == "loguniform":
        return trial.suggest_float(key, d.low, d.high, log=True)
    if d.type == "uniform":
        return trial.suggest_float(key, d.low, d.high)
    if d.type == "int":
        return trial.suggest_int(key, d.low, d.high, step=d.step or 1)
    value = trial.suggest_categorical(key, list(d.choices))
    for sub_key, sub in d.conditional.get(value, {}).items():
        _suggest_one(trial, sub_key, sub)
    return value


def scalar_score(record: dict[str, Any], weights: dict[str, float]) -> float:
    """The one metric ASHA sees: a weighted sum of per-epoch metrics (NaN counts as 0)."""
    total = 0.0
    for k, w in weights.items():
        v = record.get(k)
        if isinstance(v, (int, float)) and math.isfinite(v):
            total += w * v
    return total


def spec_summary(spec: SweepSpec) -> dict[str, Any]:
    return {"space": {k: _dist_dict(d) for k, d in spec.space.items()}, "objectives": spec.objectives,
            "sampler": spec.sampler, "seed": spec.seed, "num_samples": spec.num_samples,
            "base": flatten(spec.base)}


def _dist_dict(d: Dist) -> dict[str, Any]:
    out: dict[str, Any] = {"type": d.type}
    if d.type == "categorical":
        out["choices"] = list(d.choices)
        if d.conditional:
            out["conditional"] = {str(c): {k: _dist_dict(s) for k, s in sub.items()}
                                  for c, sub in d.conditional.items()}
    else:
        out.update(low=d.low, high=d.high)
    return out

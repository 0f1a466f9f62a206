import optuna
import pytest
import yaml

from sweeps.spec import SweepError, load_sweep, parse_sweep, scalar_score, suggest

BASE = {"model": {"name": "small_cnn"}, "data": {"name": "synthetic"}}


def spec(**kw):
    raw = {"name": "t", "base": BASE, "space": {"gates.lam": {"type": "loguniform", "low": 1e-3, "high": 1.0}}}
    raw.update(kw)
    return parse_sweep(raw)


def test_shipped_sweep_files_parse():
    from pathlib import Path

    for f in sorted(Path(__file__).resolve().parents[1].glob("sweeps/configs/*.yaml")):
        s = load_sweep(f)
        assert s.space and s.objectives
        assert "val_accuracy" in s.objectives and "accuracy" not in s.objectives, f  # never the test split


@pytest.mark.parametrize(
    "change, message",
    [
        ({"space": {"gates.lamda": {"type": "uniform", "low": 0, "high": 1}}},
         "unknown parameter 'gates.lamda' (did you mean 'gates.lam'?)"),
        ({"space": {"gates.lam": {"type": "uniform", "low": 1, "high": 1}}}, "empty range"),
        ({"space": {"gates.lam": {"type": "loguniform", "low": 0, "high": 1}}}, "loguniform needs low > 0"),
        ({"space": {"gates.lam": {"type": "gaussian", "low": 0, "high": 1}}}, "needs type"),
        ({"space": {"prune.threshold": {"type": "uniform", "low": 0.0, "high": 1.5}}}, "prune.threshold"),
        ({"space": {"model.name": {"type": "categorical", "choices": []}}}, "non-empty list"),
        ({"space": {"model.name": {"type": "categorical", "choices": ["resnet18", "resnet19"]}}}, "resnet19"),
        ({"search": {"sampler": "cmaes"}}, "unknown sampler 'cmaes'"),
        ({"search": {"num_samples": 0}}, "search.num_samples"),
        ({"search": {"sead": 1}}, "unknown key search.sead (did you mean search.seed?)"),
        ({"objectives": {"acc": "max"}}, "unknown metric 'acc'"),
        ({"objectives": {"accuracy": "up"}}, "must be max or min"),
        ({"resources": {"gpu": -1}}, "resources.gpu"),
        ({"scheduler": {"type": "hyperband"}}, "only {type: asha"),
        ({"points_to_evaluate": [{"gates.lam": -1}]}, "points_to_evaluate[0]"),
        ({"points_to_evaluate": [{"train.lr": 0.1}]}, "not a parameter of the space"),
        ({"base": {"train": {"epochs": 0}}}, "train.epochs"),
        ({"spaces": {}}, "unknown sweep key 'spaces' (did you mean 'space'?)"),
    ],
)
def test_bad_sweep_files_fail_before_ray(change, message):
    with pytest.raises(SweepError) as e:
        spec(**change)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_load_sweep_file_errors(tmp_path):
    with pytest.raises(SweepError, match="not found"):
        load_sweep(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("space: [unclosed")
    with pytest.raises(SweepError, match="not valid YAML"):
        load_sweep(bad)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"base": BASE, "space": {"gates.lam": {"type": "uniform", "low": 0, "high": 2}}}))
    s = load_sweep(good, {"train.epochs": 3, "search.num_samples": 5})
    assert s.name == "good" and s.base["train"]["epochs"] == 3 and s.num_samples == 5


def test_conditional_parameters_only_with_their_choice():
    s = spec(space={
        "gates.lam": {"type": "loguniform", "low": 1e-3, "high": 1.0},
        "gates.schedule": {"type": "categorical", "choices": {
            "constant": {}, "staged": {"gates.stages": {"type": "int", "low": 2, "high": 4}},
            "cubic": {"gates.warmup_epochs": {"type": "int", "low": 0, "high": 2}}}},
    })
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        t = study.ask()
        suggest(t, s.space)
        params = t.params
        seen.add(params["gates.schedule"])
        assert ("gates.stages" in params) == (params["gates.schedule"] == "staged")
        assert ("gates.warmup_epochs" in params) == (params["gates.schedule"] == "cubic")
        study.tell(t, 0.0)
    assert seen == {"constant", "staged", "cubic"}


def test_defaults_choose_on_the_validation_split():
    s = spec()
    assert s.objectives == {"val_accuracy": "max", "param_sparsity": "max", "latency_ms": "min"}
    assert s.score == {"val_accuracy": 1.0, "gates_below_threshold": 0.2}  # what ASHA sees
    assert scalar_score({"val_accuracy": 0.5, "test_accuracy": 0.9, "gates_below_threshold": 0.5}, s.score) == 0.6
    # the test accuracy can still be named (older sweep files), and a sweep file's own score is kept
    old = spec(objectives={"accuracy": "max"}, score={"test_accuracy": 1.0})
    assert old.objectives == {"accuracy": "max"} and old.score == {"test_accuracy": 1.0}


def test_scalar_score():
    assert scalar_score({"test_accuracy": 0.5, "gates_below_threshold": 0.5}, {"test_accuracy": 1.0,
                                                                               "gates_below_threshold": 0.2}) == 0.6
    assert scalar_score({"test_accuracy": float("nan")}, {"test_accuracy": 1.0}) == 0.0


def test_methods_sweep_samples_valid_configs_for_every_method():
    from pathlib import Path

    from prunevision.config import from_dict

    spec = load_sweep(Path(__file__).resolve().parents[1] / "sweeps" / "configs" / "methods.yaml")
    study = optuna.create_study(directions=["maximize", "maximize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=0))
    methods = set()
    for _ in range(40):
        t = study.ask()
        suggest(t, spec.space)
        cfg = from_dict(spec.base, t.params)
        methods.add(cfg.prune.method)
        assert cfg.prune.method == "gate" or 0.3 <= cfg.prune.target_sparsity <= 0.9
    assert methods == {"gate", "ocap", "lrp", "l1_structured", "taylor"}
    assert spec.base_config().data.classes == ("cat", "dog", "truck")


def test_nsga2_population_size():
    from sweeps.run import make_sampler

    base = {"name": "p", "base": {}, "space": {"gates.lam": {"type": "loguniform", "low": 0.1, "high": 10}}}
    spec = parse_sweep({**base, "search": {"sampler": "nsga2", "num_samples": 24, "population_size": 6}})
    assert spec.population_size == 6
    assert make_sampler("nsga2", 0, 24, spec.population_size)._population_size == 6
    assert make_sampler("nsga2", 0, 24)._population_size == 6  # a quarter of the trials by default
    assert make_sampler("nsga2", 0, 400)._population_size == 50
    with pytest.raises(SweepError, match="only for sampler nsga2"):
        parse_sweep({**base, "search": {"sampler": "tpe", "population_size": 6}})
    with pytest.raises(SweepError, match="population_size"):
        parse_sweep({**base, "search": {"sampler": "nsga2", "population_size": 1}})

import os

import pytest

from prunevision.config import ConfigError, ExperimentConfig, load_config
from prunevision_cli.main import main


def test_defaults_and_required_keys():
    flat = ExperimentConfig().flat()
    for key in ["model.name", "data.name", "data.root", "train.epochs", "train.lr", "gates.lam",
                "gates.penalty", "gates.schedule", "prune.method", "prune.threshold", "prune.steps",
                "prune.target_sparsity"]:
        assert key in flat, key
    assert flat["data.val_split"] == 0.1  # a validation split unless asked otherwise


def test_yaml_plus_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {name: resnet18}\ngates: {lam: 0.5, schedule: cubic}\n")
    cfg = load_config(p, ["gates.lam=2e-3", "train.epochs=3", "model.backbones=resnet18,mobilenet_v2"])
    assert cfg.model.name == "resnet18"
    assert cfg.gates.lam == pytest.approx(2e-3)
    assert cfg.gates.schedule == "cubic"
    assert cfg.train.epochs == 3
    assert cfg.model.backbones == ("resnet18", "mobilenet_v2")
    # round trip through the plain dict
    assert load_config(None, cfg.flat()) == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("gates.lamda=1", "unknown config key 'gates.lamda' (did you mean 'gates.lam'?)"),
        ("nonsense.key=1", "unknown config key 'nonsense'"),
        ("gates.lam=-1", "gates.lam: -1.0 is out of range"),
        ("prune.threshold=0", "prune.threshold: 0.0 is out of range (0.0, 1.0)"),
        ("prune.threshold=1.5", "prune.threshold"),
        ("train.epochs=0", "train.epochs: 0 is out of range"),
        ("train.epochs=2.5", "train.epochs: expected a whole number"),
        ("train.lr=fast", "train.lr: expected a number"),
        ("model.name=resnet19", "model.name: unknown model 'resnet19' (did you mean 'resnet18'?)"),
        ("model.name=torchvision:resnet1000", "not a torchvision classification model"),
        ("data.name=mnist", "data.name: 'mnist' is not one of cifar10, imagefolder, gtsrb, synthetic"),
        ("gates.penalty=l2", "gates.penalty"),
        ("prune.method=magic", "prune.method"),
        ("data.augment=maybe", "data.augment: expected true or false"),
        ("data.val_split=0.6", "data.val_split: 0.6 is out of range [0.0, 0.5]"),
        ("data.val_split=-0.1", "data.val_split: -0.1 is out of range [0.0, 0.5]"),
        ("data.val_split=most", "data.val_split: expected a number"),
        ("gates=3", "gates: expected a mapping"),
    ],
)
def test_bad_values_are_rejected_with_one_line(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a folder, not a YAML file"):
        load_config(tmp_path)
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="is not a regular file"):  # refused at once, never opened (would block)
        load_config(fifo)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(top)


def test_cli_rejects_bad_config_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--set", "gates.lam=-3", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc != 0
    assert err.strip().count("\n") == 0 and "gates.lam" in err
    assert not out.exists()  # nothing was started


def test_baseline_methods_train_without_the_gate_penalty():
    from prunevision.config import from_dict

    cfg = from_dict({"gates": {"lam": 3.0}}, {"prune.method": "taylor", "prune.target_sparsity": 0.5})
    assert cfg.gates.lam == 0.0
    assert from_dict({"gates": {"lam": 3.0}}).gates.lam == 3.0  # gate pruning keeps its λ

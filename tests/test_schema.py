"""Every file and override a user writes goes through one validator: bad values, shapes and
encodings stop with one line naming the key, before any data is read or Ray starts."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from prunevision.config import ConfigError, load_config
from sweeps.spec import SweepError, load_sweep, parse_sweep

BASE = {"model": {"name": "small_cnn"}, "data": {"name": "synthetic"}, "train": {"epochs": 1}}
SPACE = {"gates.target_macs": {"type": "uniform", "low": 0.2, "high": 0.6}}
PROG = Path(sys.executable).parent / "prunevision"


@pytest.mark.parametrize("override, needle", [
    ("train.epochs=.inf", "train.epochs: expected a whole number, got inf"),
    ("train.epochs=.nan", "train.epochs: expected a whole number"),
    ("data.subset=.inf", "data.subset: inf is not a finite number"),
    ("gates.lam=.inf", "gates.lam: inf is not a finite number"),
    ("gates.lr=-.inf", "gates.lr: -inf is not a finite number"),
    ("train.lr=.nan", "train.lr: NaN is not allowed"),
    ("prune.target_sparsity=.inf", "prune.target_sparsity"),
    ("data.image_size=100000", "data.image_size: 100000 is out of range [8, 1024]"),
    ("seed=100000000000000000000000", "seed: 100000000000000000000000 is out of range [0, 2147483647]"),
    ("seed=-1", "seed: -1 is out of range [0, 2147483647]"),
])
def test_non_finite_and_huge_values_are_refused(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("change, needle", [
    ({"search": "tpe"}, "search: expected a mapping, got str"),
    ({"resources": "one"}, "resources: expected a mapping, got str"),
    ({"space": ["gates.lam"]}, "space: expected a mapping, got list"),
    ({"score": 5}, "score: a mapping of per-epoch metric"),
    ({"score": {"latency_ms": 1.0}}, "score: 'latency_ms' is not reported every epoch"),
    ({"score": {"val_accuracy": float("inf")}}, "score.val_accuracy: inf must be a finite number"),
    ({"scheduler": {"type": "asha", "reduction_factor": "two"}}, "scheduler.reduction_factor: expected a number"),
    ({"scheduler": {"type": "asha", "reduction_factor": 1}}, "scheduler.reduction_factor: 1.0 is out of range"),
    ({"objectives": ["val_accuracy"]}, "objectives: a mapping of metric"),
    ({"points_to_evaluate": 3}, "points_to_evaluate: a list"),
    ({"points_to_evaluate": ["gates.target_macs"]}, "points_to_evaluate[0]: must be a mapping"),
    ({"mlflow": "x"}, "mlflow: expected a mapping, got str"),
    ({"mlflow": {"log_models": "yes"}}, "mlflow.log_models: expected true or false"),
    ({"failure": 3}, "failure: expected a mapping, got int"),
    ({"failure": {"max_failures": -1}}, "failure.max_failures: -1 is out of range"),
    ({"search": {"num_samples": float("inf")}}, "search.num_samples: expected a whole number, got inf"),
    ({"search": {"seed": 2**32}}, "search.seed: 4294967296 is out of range [0, 4294967295]"),
    ({"resources": {"cpu": float("nan")}}, "resources.cpu: NaN is not allowed"),
    ({"resources": {"cpu": float("inf")}}, "resources.cpu: inf is not a finite number"),
    ({"resources": {"gpu": float("inf")}}, "resources.gpu: inf is not a finite number"),
    ({"resources": {"cpu": 0}}, "resources.cpu: 0.0 is out of range (0.0, inf]"),
    ({"space": {"gates.target_macs": {"type": "uniform", "low": 0.2, "high": float("inf")}}},
     "space.gates.target_macs: low 0.2 and high inf must be finite numbers"),
    ({"space": {"gates.target_macs": {"type": "uniform", "low": float("nan"), "high": 0.5}}},
     "must be finite numbers"),
    ({"space": {"train.epochs": {"type": "int", "low": 1, "high": float("inf")}}}, "must be finite numbers"),
])
def test_sweep_sections_of_the_wrong_shape_or_value_are_refused(change, needle):
    with pytest.raises(SweepError) as e:
        parse_sweep({"name": "t", "base": BASE, "space": SPACE, **change})
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_score_of_per_epoch_metrics_is_accepted():
    spec = parse_sweep({"name": "t", "base": BASE, "space": SPACE,
                        "score": {"val_accuracy": 1, "macs_share": -0.5, "channel_gates_below_threshold": 0.1}})
    assert spec.score == {"val_accuracy": 1.0, "macs_share": -0.5, "channel_gates_below_threshold": 0.1}


def test_files_that_are_not_utf8_are_refused(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_bytes(b"train:\n  epochs: \xff\xfe\x00\x81\n")
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(byte \d+\)"):
        load_config(bad)
    with pytest.raises(SweepError, match=r"is not UTF-8 text \(byte \d+\)"):
        load_sweep(bad)


def test_a_key_given_twice_and_an_alias_bomb_are_refused(tmp_path):
    """A key given twice would let the later one win unseen; nine levels of nine aliases are 400
    bytes that expand to 387 million values. Both stop at once, config and sweep file alike."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("model:\n  name: small_cnn\ntrain: {epochs: 1}\nmodel:\n  name: resnet18\n")
    with pytest.raises(ConfigError, match=r"key 'model' given twice \(line 1 and line 4\)"):
        load_config(twice)
    bomb = tmp_path / "bomb.yaml"
    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"] + [
        f"{b}: &{b} [{', '.join(['*' + a] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi")]
    bomb.write_text("\n".join(levels) + "\n")
    with pytest.raises(ConfigError, match="expands to more than 100000 values"):
        load_config(bomb)
    with pytest.raises(SweepError, match="expands to more than 100000 values"):
        load_sweep(bomb)
    shared = tmp_path / "shared.yaml"  # aliases within reason stay usable
    shared.write_text("x: &t {epochs: 1}\ntrain: *t\nmodel: {name: small_cnn}\ndata: {name: synthetic}\n")
    with pytest.raises(ConfigError, match="unknown config key 'x'"):
        load_config(shared)


def _cli(*args: str) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    r = subprocess.run([str(PROG), *args], capture_output=True, text=True, timeout=120)
    return r.returncode, r.stderr, time.perf_counter() - t0


@pytest.mark.slow
def test_the_command_line_stops_with_one_line_and_exit_2(tmp_path):
    """Through the console script: exit 2, one line on stderr, no traceback, nothing written."""
    out = tmp_path / "run"
    rc, err, _ = _cli("train", "--smoke-test", "--out", str(out), "--set", "train.epochs=.inf")
    assert rc == 2 and err.strip().count("\n") == 0 and "Traceback" not in err, err
    assert "train.epochs: expected a whole number, got inf" in err and not out.exists()

    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(128, 256)))
    rc, err, _ = _cli("train", str(binary), "--out", str(out))
    assert rc == 2 and "is not UTF-8 text" in err and "Traceback" not in err, err

    sweep = tmp_path / "s.yaml"
    sweep.write_text("name: s\nbase: {data: {name: synthetic}}\n"
                     "space: {gates.target_macs: {type: uniform, low: 0.2, high: 0.6}}\n"
                     "score: {latency_ms: 1}\n")
    rc, err, _ = _cli("sweep", "run", str(sweep), "--storage", str(tmp_path / "runs"))
    assert rc == 2 and err.strip().count("\n") == 0 and "Traceback" not in err, err
    assert "score: 'latency_ms' is not reported every epoch" in err
    assert not (tmp_path / "runs" / "s").exists()  # refused before the sweep folder or Ray


def _readme_config_table() -> dict[str, set[str]]:
    """section → the keys README's configuration table names (text in parentheses is description)."""
    import re

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    table = text[text.index("| section | keys |"):]
    rows: dict[str, set[str]] = {}
    for line in table.splitlines()[2:]:
        if not line.startswith("| `"):
            break
        section, keys = [c.strip() for c in line.strip("|").split("|", 1)]
        while re.search(r"\([^()]*\)", keys):
            keys = re.sub(r"\([^()]*\)", "", keys)
        rows[section.strip("`")] = set(re.findall(r"`([a-z_]+)`", keys))
    return rows


def test_the_readme_table_names_every_config_key_and_no_other():
    import dataclasses

    from prunevision.config import ExperimentConfig

    cfg = ExperimentConfig()
    schema = {f.name: {g.name for g in dataclasses.fields(getattr(cfg, f.name))}
              for f in dataclasses.fields(cfg) if f.name != "seed"}
    assert _readme_config_table() == schema

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from conftest import write_cifar_batches

from prunevision.cli import main


def test_smoke_test_writes_results(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--smoke-test", "--out", str(out), "--set", "gates.lam=0.5"]) == 0
    printed = capsys.readouterr().out
    assert str(out / "metrics.json") in printed
    m = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "per_class_accuracy", "mean_gate", "gates_below_threshold", "gates", "history", "config"):
        assert key in m
    assert len(m["per_class_accuracy"]) == 10 and len(m["history"]) == 1
    assert m["config"]["gates"]["lam"] == 0.5 and m["config"]["model"]["num_classes"] == 10
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["data"]["name"] == "synthetic" and cfg["train"]["epochs"] == 1
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1


def test_resume_from_cli_extends_training(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--smoke-test", "--out", str(out)]) == 0
    out2 = tmp_path / "more"
    rc = main(["train", "--resume", str(out / "checkpoint.pt"), "--set", "train.epochs=2", "--out", str(out2)])
    assert rc == 0
    m = json.loads((out2 / "metrics.json").read_text())
    assert [r["epoch"] for r in m["history"]] == [1, 2]


def test_smoke_test_on_user_data_uses_a_subset(tmp_path):
    write_cifar_batches(tmp_path / "cifar", n_per_batch=40, n_test=80)
    out = tmp_path / "run"
    rc = main(["train", "--smoke-test", "--out", str(out), "--set", f"data.root={tmp_path / 'cifar'}",
               "--set", "data.download=false"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["dataset"]["name"] == "cifar10" and m["dataset"]["train_images"] == 128
    assert m["dataset"]["test_images"] == 64


def test_missing_dataset_and_corrupt_checkpoint_exit_nonzero(tmp_path, capsys):
    rc = main(["train", "--out", str(tmp_path / "r"), "--set", f"data.root={tmp_path / 'none'}",
               "--set", "data.download=false"])
    err = capsys.readouterr().err
    assert rc == 2 and "no CIFAR-10 found" in err and err.count("\n") == 1
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    rc = main(["train", "--resume", str(bad), "--out", str(tmp_path / "r2")])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot read checkpoint" in err


def test_console_script_smoke_test_on_a_torchvision_model(tmp_path):
    exe = shutil.which("prunevision", path=str(Path(sys.executable).parent))
    assert exe, "the prunevision console script is installed with the package"
    out = tmp_path / "run"
    r = subprocess.run([exe, "train", "--smoke-test", "--set", "model.name=mobilenet_v3_small", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "metrics.json").read_text())["config"]["model"]["name"] == "mobilenet_v3_small"
    bad = subprocess.run([exe, "train", "--set", "model.name=resnet19"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "did you mean 'resnet18'" in bad.stderr

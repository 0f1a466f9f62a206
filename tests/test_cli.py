import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_cifar_batches

from prunevision_cli.main import main

FAST = ["--set", "measure.exporter=torchscript"]

METRIC_KEYS = ("accuracy", "accuracy_dense", "val_accuracy", "val_accuracy_dense", "per_class_accuracy", "params",
               "params_dense", "macs", "macs_dense",
               "param_sparsity", "gate_sparsity", "size_bytes", "size_gzip_bytes", "latency_ms", "latency_ms_dense",
               "latency_speedup", "onnx_max_abs_diff", "method", "history", "mean_gate", "gates", "config")


@pytest.mark.slow
def test_smoke_test_writes_results(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--smoke-test", "--out", str(out), "--set", "gates.lam=0.5"]) == 0  # default exporter
    printed = capsys.readouterr().out
    assert str(out) in printed and "speed-up" in printed
    m = json.loads((out / "metrics.json").read_text())
    for key in METRIC_KEYS:
        assert key in m, key
    for f in ("model.onnx", "dense.onnx", "pruned.safetensors", "checkpoint.pt", "config.yaml", "gate_histogram.png"):
        assert (out / f).stat().st_size > 0, f
    assert m["onnx_max_abs_diff"] <= 1e-4 and m["method"] == "gate"
    assert m["latency"]["onnxruntime_cpu_b1"]["pruned"]["runs"] >= 30
    assert len(m["per_class_accuracy"]) == 10 and [r.get("phase") for r in m["history"]] == [None, "finetune"]
    assert m["config"]["gates"]["lam"] == 0.5 and m["config"]["model"]["num_classes"] == 10
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["data"]["name"] == "synthetic" and cfg["train"]["epochs"] == 1
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1


def test_resume_from_cli_extends_training(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--smoke-test", "--out", str(out), "--set", "measure.enabled=false"]) == 0
    out2 = tmp_path / "more"
    rc = main(["train", "--resume", str(out / "checkpoint.pt"), "--set", "train.epochs=2", "--out", str(out2),
               "--set", "measure.enabled=false"])
    assert rc == 0
    m = json.loads((out2 / "metrics.json").read_text())
    assert [r["epoch"] for r in m["history"]] == [1, 2]


@pytest.mark.slow
def test_prune_and_export_commands(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--smoke-test", "--out", str(out), "--set", "model.name=resnet18",
                 "--set", "measure.enabled=false"]) == 0
    p = tmp_path / "pruned"
    rc = main(["prune", str(out / "checkpoint.pt"), "--out", str(p), "--set", "prune.method=l1_structured",
               "--set", "prune.target_sparsity=0.5", "--set", "prune.steps=2", "--set", "measure.batch=2", *FAST])
    assert rc == 0
    m = json.loads((p / "metrics.json").read_text())
    assert m["method"] == "l1_structured" and m["macs"] < 0.5 * m["macs_dense"]
    assert [r.get("phase") for r in m["history"]] == [None, "finetune-step1", "finetune"]
    onnx_out = tmp_path / "exported.onnx"
    assert main(["export", str(p / "pruned.safetensors"), "--out", str(onnx_out), "--exporter", "torchscript"]) == 0
    assert onnx_out.stat().st_size > 0 and "max abs diff" in capsys.readouterr().out
    assert main(["prune", str(out / "checkpoint.pt"), "--out", str(p), "--set", "gates.lam=3"]) == 2
    assert "only prune.*" in capsys.readouterr().err


@pytest.mark.slow
def test_smoke_test_on_user_data_uses_a_subset(tmp_path):
    write_cifar_batches(tmp_path / "cifar", n_per_batch=40, n_test=80)
    out = tmp_path / "run"
    rc = main(["train", "--smoke-test", "--out", str(out), "--set", f"data.root={tmp_path / 'cifar'}",
               "--set", "data.download=false", "--set", "prune.steps=2", *FAST])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["dataset"]["name"] == "cifar10" and m["dataset"]["train_images"] + m["dataset"]["val_images"] == 128
    assert m["dataset"]["val_images"] == 13  # data.val_split 0.1 of the subset
    assert m["dataset"]["test_images"] == 64
    assert [r.get("phase") for r in m["history"]] == [None, "gate-step2", "finetune"]  # iterative gate steps


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


@pytest.mark.slow
def test_console_script_smoke_test_on_a_torchvision_model(tmp_path):
    exe = shutil.which("prunevision", path=str(Path(sys.executable).parent))
    assert exe, "the prunevision console script is installed with the package"
    out = tmp_path / "run"
    r = subprocess.run([exe, "train", "--smoke-test", "--set", "model.name=mobilenet_v3_small", "--out", str(out),
                        *FAST],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "metrics.json").read_text())["config"]["model"]["name"] == "mobilenet_v3_small"
    bad = subprocess.run([exe, "train", "--set", "model.name=resnet19"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "did you mean 'resnet18'" in bad.stderr

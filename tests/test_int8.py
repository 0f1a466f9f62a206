"""INT8 export and the front in INT8: real ONNX Runtime static quantization, verified on real
CIFAR-10 images (a small subset of the JPEG copy in ../shared/data) with a briefly trained small_cnn,
and the sweep form's registry on the shared smoke sweep (an sqlite MLflow store in tmp)."""

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from onnx import TensorProto

from prunevision.quantize import QuantizeError, calibration_images, int8_path, int8_structure
from prunevision_cli.main import main

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
PER_CLASS = {"train": 200, "test": 60}  # 2,000 training images (500 held out for validation), 600 test


def _extract_subset(dst: Path) -> Path:
    """The first images of each class of the real CIFAR-10 (JPEG copy), in its ImageFolder layout."""
    counts: dict[tuple[str, str], int] = {}
    with tarfile.open(CIFAR) as tf:
        for m in tf:
            parts = Path(m.name).parts
            if not m.isfile() or len(parts) < 3 or parts[-3] not in PER_CLASS:
                continue
            key = (parts[-3], parts[-2])
            if counts.get(key, 0) >= PER_CLASS[key[0]]:
                continue
            counts[key] = counts.get(key, 0) + 1
            out = dst / key[0] / key[1] / parts[-1]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(tf.extractfile(m).read())
            if len(counts) == 20 and all(v >= PER_CLASS[k[0]] for k, v in counts.items()):
                break
    return dst


@pytest.fixture(scope="module")
def cifar_model(tmp_path_factory):
    """small_cnn trained for 3 epochs on 1,500 real CIFAR-10 images, saved as a pruned checkpoint
    (pruned.safetensors) with the config.yaml that says which images it was trained on."""
    if not CIFAR.is_file():
        pytest.skip(f"{CIFAR} is not here")
    from prunevision import ModelConfig, create_model, load_dataset, save_pruned, strip_gates
    from prunevision.config import from_dict, save_config
    from prunevision.data import DeviceLoader

    tmp = tmp_path_factory.mktemp("int8")
    root = _extract_subset(tmp / "cifar")
    cfg = from_dict({"model": {"name": "small_cnn", "num_classes": 10, "small_input": True},
                     "data": {"name": "cifar10", "root": str(root), "val_split": 0.25, "eval_batch_size": 500,
                              "cache_dir": str(tmp / "cache")},
                     "measure": {"batch": 32, "runs": 30, "warmup": 3}})
    data = load_dataset(cfg.data, seed=cfg.seed)
    torch.manual_seed(0)
    model = strip_gates(create_model(ModelConfig(name="small_cnn"), 10, 32, pretrained=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loader = DeviceLoader(data.train_x, data.train_y, 64, data.mean, data.std, train=True, augment=False)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.05, total_steps=3 * len(loader))
    model.train()
    for epoch in range(3):  # about 40 % on the validation split
        loader.set_epoch(epoch)
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
    model.eval()
    out = tmp / "trained"
    save_pruned(model, out / "pruned.safetensors", cfg.model, 10, 32,
                extra={"mean": list(data.mean), "std": list(data.std), "classes": list(data.classes)})
    save_config(cfg, out / "config.yaml")
    return out / "pruned.safetensors"


def _export(ckpt: Path, out: Path, *extra: str) -> int:
    return main(["export", str(ckpt), "--out", str(out), "--exporter", "torchscript", "--int8", *extra])


def _one_line(err: str) -> str:
    assert err.count("\n") == 1, err
    return err


@pytest.mark.slow
def test_int8_export_quantizes_and_verifies_on_real_cifar10(cifar_model, tmp_path, capsys):
    import onnxruntime as ort

    out = tmp_path / "ship" / "model.onnx"
    assert _export(cifar_model, out) == 0
    printed = capsys.readouterr().out
    q8 = out.with_name("model.int8.onnx")
    assert q8.is_file() and int8_path(out) == q8 and "model.int8.onnx" in printed
    # the graph really is quantized: Q/DQ pairs, INT8 weight tensors feeding every conv and linear layer
    g = onnx.load(str(q8)).graph
    ops = [n.op_type for n in g.node]
    assert ops.count("QuantizeLinear") >= 4 and ops.count("DequantizeLinear") >= 8
    int8_inits = {i.name for i in g.initializer if i.data_type == TensorProto.INT8}
    dq_of_int8 = {n.output[0] for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in int8_inits}
    layers = [n for n in g.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert len(layers) == 4 and all(n.input[1] in dq_of_int8 for n in layers)  # 2 conv + 2 linear
    st = int8_structure(q8)
    assert st["float_weight_layers"] == 0 and q8.stat().st_size < out.stat().st_size / 3.5
    # and ONNX Runtime runs them as integer kernels (QLinearConv, QGemm), none left in float
    assert st["runtime"]["int8_kernels"] == 4 and st["runtime"]["float_weight_ops"] == 0
    assert st["runtime"]["ops"].get("QLinearConv") == 2

    card = json.loads(out.with_name("model.json").read_text())
    q = card["int8"]
    assert q["shipped"] and not q["forced"] and q["passed"] and q["file"] == str(q8.resolve())
    assert q["quantization"]["format"] == "QDQ" and "per channel" in q["quantization"]["weights"]
    assert q["quantization"]["activations"].startswith("uint8") and q["quantization"]["preprocessed"]
    assert q["calibration"]["images"] == 256 and q["calibration"]["requested"] == 256
    val, test = q["accuracy"]["val"], q["accuracy"]["test"]
    assert val["images"] == 500 and test["images"] == 600
    assert val["fp32"] > 0.3 and test["fp32"] > 0.3  # trained: well above chance (0.1)
    # INT8 within the allowed drop (the default, 1 point of validation accuracy) of the fp32 model
    assert q["drop_split"] == "val" and q["max_drop_points"] == 1.0
    assert q["drop_points"] == pytest.approx(100 * (val["fp32"] - val["int8"])) and q["drop_points"] <= 1.0
    assert val["agreement"] > 0.9 and test["agreement"] > 0.9
    # the card's INT8 accuracy is the file's: recomputed here with a plain ONNX Runtime session
    from prunevision import load_dataset
    from prunevision.config import load_config
    from prunevision.quantize import split_batches

    cfg = load_config(cifar_model.parent / "config.yaml")
    data = load_dataset(cfg.data, seed=cfg.seed)
    sess = ort.InferenceSession(str(q8), providers=["CPUExecutionProvider"])
    hits = sum(int((sess.run(None, {"input": x})[0].argmax(1) == y).sum()) for x, y in split_batches(data, "val"))
    assert hits / 500 == pytest.approx(val["int8"])
    # sizes (raw and gzip) and latency with its spread, at batch 1 and the config's measure.batch
    s = q["size"]
    assert s["fp32"]["bytes"] == out.stat().st_size and s["int8"]["bytes"] == q8.stat().st_size
    assert s["ratio"] > 3.5 and s["int8"]["gzip_bytes"] < s["fp32"]["gzip_bytes"]
    assert set(q["latency"]) == {"batch_1", "batch_32"}
    for lat in q["latency"].values():
        for k in ("fp32", "int8"):
            r = lat[k]
            assert r["runs"] >= 30 and r["threads"] == 1 and 0 < r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
        assert lat["speedup"] == pytest.approx(lat["fp32"]["median_ms"] / lat["int8"]["median_ms"])
    assert card["verification"]["passed"] and card["input"]["mean"] == list(data.mean)
    assert not list(out.parent.glob(".model.int8.onnx*"))  # no temporary left behind


@pytest.mark.slow
def test_int8_refused_over_the_limit_leaves_fp32_and_no_int8(cifar_model, tmp_path, capsys, monkeypatch):
    import analysis.int8

    real = analysis.int8.calibration_images
    # forced-bad calibration: ranges from near-black images saturate every real activation
    monkeypatch.setattr(analysis.int8, "calibration_images", lambda *a, **k: real(*a, **k) * 0.02)
    out = tmp_path / "model.onnx"
    stale = int8_path(out)
    stale.write_bytes(b"an INT8 file of an earlier export")
    assert _export(cifar_model, out) == 2
    err = _one_line(capsys.readouterr().err)
    assert "INT8 model refused: val accuracy drops" in err and "--force-int8" in err
    assert "nothing registered" not in err  # a checkpoint is never registered
    assert not stale.exists() and not list(tmp_path.glob(".model.int8.onnx*"))
    card = json.loads((tmp_path / "model.json").read_text())
    assert card["sha256"] and out.is_file() and out.stat().st_size == card["size_bytes"]  # fp32 intact
    q = card["int8"]
    assert not q["shipped"] and not q["passed"] and q["drop_points"] > 1.0 and "refused" in q["error"]
    # --force-int8 ships it anyway, and says so
    assert _export(cifar_model, out, "--force-int8") == 0
    assert "FORCED" in capsys.readouterr().out
    q = json.loads((tmp_path / "model.json").read_text())["int8"]
    assert q["shipped"] and q["forced"] and not q["passed"] and int8_path(out).is_file()


@pytest.mark.slow
def test_calibration_and_verification_failures(cifar_model, tmp_path, capsys, monkeypatch):
    import analysis.int8

    out = tmp_path / "model.onnx"
    # no training images to calibrate on: --data names a dataset without any
    empty = tmp_path / "empty"
    for c in ("airplane", "automobile"):
        (empty / "train" / c).mkdir(parents=True)
        (empty / "test" / c).mkdir(parents=True)
    assert _export(cifar_model, out, "--data", str(empty)) == 2
    err = _one_line(capsys.readouterr().err)
    assert "cannot load the images INT8 calibration and verification need" in err and out.is_file()
    assert not int8_path(out).exists()
    # calibration that ONNX Runtime cannot run (images of the wrong size)
    monkeypatch.setattr(analysis.int8, "calibration_images", lambda *a, **k: np.zeros((8, 3, 16, 16), np.float32))
    assert _export(cifar_model, out) == 2
    err = _one_line(capsys.readouterr().err)
    assert "INT8 calibration of model.onnx failed" in err and not int8_path(out).exists() and out.is_file()
    assert json.loads((tmp_path / "model.json").read_text())["int8"]["shipped"] is False
    # the library refuses an empty calibration set, whatever asks
    from prunevision import load_dataset
    from prunevision.config import load_config

    cfg = load_config(cifar_model.parent / "config.yaml")
    data = load_dataset(cfg.data, seed=cfg.seed)
    with pytest.raises(QuantizeError, match="empty calibration set"):
        calibration_images(data, 0)
    data.train_x, data.train_y = data.train_x[:0], data.train_y[:0]
    with pytest.raises(QuantizeError, match="empty calibration set.*no training images"):
        calibration_images(data, 16)
    x = calibration_images(load_dataset(cfg.data, seed=cfg.seed), 40, seed=3)
    assert x.shape == (40, 3, 32, 32) and x.dtype == np.float32 and abs(float(x.mean())) < 1  # normalised
    np.testing.assert_array_equal(x, calibration_images(load_dataset(cfg.data, seed=cfg.seed), 40, seed=3))


@pytest.mark.parametrize("args, needle", [
    (["--int8", "--max-int8-drop", "nan"], "--max-int8-drop must be a finite number"),
    (["--int8", "--max-int8-drop", "inf"], "--max-int8-drop must be a finite number"),
    (["--int8", "--max-int8-drop", "-0.5"], "--max-int8-drop must be a finite number"),
    (["--int8", "--max-int8-drop", "101"], "--max-int8-drop must be a finite number"),
    (["--int8", "--calibration-size", "0"], "empty calibration set"),
    (["--int8", "--calibration-size", "-3"], "--calibration-size must be"),
    (["--int8", "--calibration-size", "1000000"], "--calibration-size must be"),
    (["--force-int8"], "need --int8"),
    (["--max-int8-drop", "2"], "need --int8"),
])
def test_bad_int8_flags_stop_with_one_line_before_any_work(args, needle, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    assert main(["export", str(tmp_path / "pruned.safetensors"), "--out", str(out), *args]) == 2
    assert needle in _one_line(capsys.readouterr().err) and not out.exists()
    if "--force-int8" not in args:
        assert main(["analyze", str(tmp_path), *args]) == 2
        assert needle in _one_line(capsys.readouterr().err)


# --------------------------------------------------------------------------- sweeps (shared smoke sweep)


@pytest.fixture
def tracking(smoke_sweep, monkeypatch):
    from analysis.results import read_state

    settings = read_state(smoke_sweep)["settings"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", settings["tracking_uri"])
    return settings


def _versions(uri: str, name: str) -> list:
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri).search_model_versions(f"name = '{name}'")


@pytest.mark.slow
def test_sweep_export_int8_registers_its_own_model(smoke_sweep, tracking, tmp_path, capsys):
    import mlflow
    from mlflow.tracking import MlflowClient

    out = tmp_path / "model.onnx"
    assert main(["export", str(smoke_sweep), "--out", str(out), "--exporter", "torchscript", "--int8",
                 "--registered-model", "int8-model"]) == 0
    printed = capsys.readouterr().out
    assert "int8-model-int8" in printed and int8_path(out).is_file()
    from analysis.results import load_sweep

    assert len(load_sweep(smoke_sweep, "mlflow")) == 4  # the export run under the parent run is not a trial
    card = json.loads((tmp_path / "model.json").read_text())
    q, reg = card["int8"], card["registry"]
    assert q["shipped"] and {"val", "test"} <= set(q["accuracy"]) and q["drop_points"] <= 1.0
    assert reg["int8"]["name"] == "int8-model-int8" and reg["int8"]["alias"] == "champion"
    c = MlflowClient(tracking["tracking_uri"])
    mv8 = c.get_model_version_by_alias("int8-model-int8", "champion")
    mv = c.get_model_version_by_alias("int8-model", "champion")
    assert mv8.tags["precision"] == "int8" and mv.tags["precision"] == "fp32"
    assert mv8.tags["prunevision.fp32_model"] == f"int8-model/{mv.version}" and mv8.run_id == mv.run_id
    run = c.get_run(mv8.run_id)
    assert run.data.metrics["int8.val_accuracy"] == pytest.approx(q["accuracy"]["val"]["int8"])
    assert run.data.metrics["int8.size_bytes"] == int8_path(out).stat().st_size
    assert "int8.latency_ms_b1_p90" in run.data.metrics and run.data.tags["prunevision.int8"] == "verified"
    size = card["input"]["size"]
    x = np.random.default_rng(0).standard_normal((3, 3, size, size)).astype(np.float32)
    pred = mlflow.pyfunc.load_model("models:/int8-model-int8@champion").predict(x)
    import onnxruntime as ort

    direct = ort.InferenceSession(str(int8_path(out)), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(np.asarray(pred["logits"] if isinstance(pred, dict) else pred), direct, atol=1e-6)
    # a plain export to the same place: the INT8 file of the export before is not this model's
    assert main(["export", str(smoke_sweep), "--out", str(out), "--exporter", "torchscript", "--no-register"]) == 0
    assert not int8_path(out).exists() and "int8" not in json.loads((tmp_path / "model.json").read_text())


@pytest.mark.slow
def test_sweep_export_refused_registers_nothing(smoke_sweep, tracking, tmp_path, capsys, monkeypatch):
    import analysis.int8

    def bad(fp32, *a, **k):  # a verification that finds a 5-point drop
        raise analysis.int8.Int8Refused("INT8 model refused: val accuracy drops 5.00 points (test) > the allowed 1",
                                        {"drop_points": 5.0, "passed": False})

    monkeypatch.setattr(analysis.int8, "quantize_and_verify", bad)
    out = tmp_path / "model.onnx"
    assert main(["export", str(smoke_sweep), "--out", str(out), "--exporter", "torchscript", "--int8",
                 "--registered-model", "refused-model"]) == 2
    err = _one_line(capsys.readouterr().err)
    assert "refused" in err and "nothing registered" in err and "--force-int8" in err
    assert out.is_file() and not int8_path(out).exists()
    assert _versions(tracking["tracking_uri"], "refused-model") == []
    assert _versions(tracking["tracking_uri"], "refused-model-int8") == []
    card = json.loads((tmp_path / "model.json").read_text())
    assert "registry" not in card and card["int8"]["shipped"] is False and card["int8"]["drop_points"] == 5.0
    # an empty calibration set (no training images in the trial's dataset): the same, before any quantization
    def no_images(*a, **k):
        raise QuantizeError("empty calibration set: the dataset has no training images")

    monkeypatch.setattr(analysis.int8, "calibration_images", no_images)
    assert main(["export", str(smoke_sweep), "--out", str(out), "--exporter", "torchscript", "--int8",
                 "--registered-model", "refused-model"]) == 2
    assert "empty calibration set" in _one_line(capsys.readouterr().err)
    assert _versions(tracking["tracking_uri"], "refused-model") == [] and out.is_file()


@pytest.mark.slow
def test_analyze_int8_adds_a_variant_of_each_front_trial(smoke_sweep, tmp_path, capsys):
    out = tmp_path / "analysis"
    assert main(["analyze", str(smoke_sweep), "--out", str(out), "--runs", "5", "--no-mlflow", "--int8",
                 "--calibration-size", "64"]) == 0
    assert "INT8:" in capsys.readouterr().out
    front = pd.read_csv(out / "pareto.csv", dtype={"trial_id": str})
    fp32, int8 = front[front["precision"] == "fp32"], front[front["precision"] == "int8"]
    assert len(fp32) >= 1 and sorted(int8["trial_id"]) == sorted(fp32["trial_id"])
    assert list(front.columns[1:4]) == ["val_accuracy", "accuracy", "precision"]
    for _, r in int8.iterrows():
        assert Path(r["int8_file"]).is_file() and r["onnx_bytes"] < fp32.set_index("trial_id").at[
            r["trial_id"], "onnx_bytes"]
        assert r["latency_ms"] > 0 and r["latency_ms_fp32_same_run"] > 0 and r["latency_ms_dense"] > 0
        assert 0 <= r["val_accuracy"] <= 1 and 0 <= r["int8_agreement"] <= 1
    assert front["front_with_int8"].astype(bool).any()
    s = json.loads((out / "summary.json").read_text())
    assert s["int8"]["variants"] == len(fp32) and not s["int8"]["failed"]
    assert s["int8"]["results"][int8["trial_id"].iloc[0]]["calibration"]["images"] == 64
    md = (out / "report.md").read_text()
    assert "## The front in INT8" in md and "int8_front.png" in md and (out / "int8_front.png").stat().st_size > 5000
    # without --int8 nothing changes but the precision column
    assert main(["analyze", str(smoke_sweep), "--out", str(tmp_path / "plain"), "--no-remeasure", "--no-mlflow"]) == 0
    plain = pd.read_csv(tmp_path / "plain" / "pareto.csv")
    assert set(plain["precision"]) == {"fp32"}
    assert "The front in INT8" not in (tmp_path / "plain" / "report.md").read_text()
    shutil.rmtree(out)

"""TrialLogger's logged models and dataset inputs against a real MLflow store, and how they
degrade: a model that cannot be logged costs a warning, a server that is down keeps it pending."""

import json
import os
import time
from pathlib import Path

import mlflow
import mlflow.onnx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sweeps.tracking import TrialLogger, client, dataset_record, experiment_id, parent_run, use_tracking_uri

pytestmark = pytest.mark.slow  # real Ray / MLflow servers / subprocess sweeps


def _tiny_onnx(path: Path) -> Path:
    """N×3×4×4 images → N×2 logits (flatten and a matrix product)."""
    w = numpy_helper.from_array(np.arange(96, dtype=np.float32).reshape(48, 2) / 96, "w")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])], initializer=[w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)
    return path


USED = {"name": "synthetic", "source": "synthetic", "train_images": 86, "val_images": 10, "test_images": 48,
        "classes": ["a", "b", "c", "d"], "image_size": 16}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the module (creating its tables is most of the cost)."""
    tmp = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    c = client(uri)
    exp = experiment_id(c, "exp")
    parent = parent_run(c, exp, str(tmp / "sweep"), "sweep", {}, {"a": 1}, {})
    return uri, c, exp, parent


def test_trial_model_and_dataset_are_logged_and_load(tmp_path, store, capsys):
    uri, c, exp, parent = store
    assert c.get_experiment(exp).tags["mlflow.experimentKind"] == "custom_model_development"  # "Model training"
    log = TrialLogger(uri, exp, parent, "t1", "sweep_trial_t1", tmp_path)
    log.start({"gates.lam": 0.5})
    log.log_metrics({"val_accuracy": 0.75, "latency_ms": 1.5}, step=3)
    record = dataset_record({"name": "synthetic", "num_classes": 4}, 0, USED)
    log.log_dataset(record)
    log.log_dataset(record)  # a restarted trial sends it again: still one input
    model_file = _tiny_onnx(tmp_path / "model.onnx")
    t0 = time.perf_counter()
    log.log_model(model_file, step=3)
    log.log_model(model_file, step=3)  # sent again (a retry): still one model
    took = time.perf_counter() - t0
    assert log.finish() == 0 and "warning" not in capsys.readouterr().err
    assert took < 10  # no requirement inference in a subprocess

    run = c.get_run(log.run_id)
    [inp] = run.inputs.dataset_inputs
    assert (inp.dataset.name, inp.dataset.digest) == ("synthetic", record["digest"])
    assert {(t.key, t.value) for t in inp.tags} == {("mlflow.data.context", "training")}
    assert json.loads(inp.dataset.profile) == {"train": 86, "validation": 10, "test": 48, "classes": 4,
                                               "image_size": 16}
    [out] = run.outputs.model_outputs
    [model] = c.search_logged_models([exp], filter_string=f"source_run_id = '{log.run_id}'")
    assert out.model_id == model.model_id and model.source_run_id == log.run_id and model.name == "sweep_trial_t1"
    assert str(model.status) == "READY" and model.params["gates.lam"] == "0.5"
    assert {m.key: m.value for m in model.metrics} == {"val_accuracy": 0.75, "latency_ms": 1.5}  # linked to it

    with use_tracking_uri(uri):
        loaded = mlflow.onnx.load_model(f"models:/{model.model_id}")
        sig = mlflow.models.get_model_info(f"models:/{model.model_id}").signature
    x = np.random.default_rng(0).random((5, 3, 4, 4), dtype=np.float32)
    got = ort.InferenceSession(loaded.SerializeToString()).run(None, {"input": x})[0]
    assert got.shape == (5, 2) and np.allclose(got, x.reshape(5, 48) @ (np.arange(96).reshape(48, 2) / 96), atol=1e-5)
    assert tuple(sig.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 3, 4, 4)


def test_a_model_that_cannot_be_logged_costs_a_warning_not_the_trial(tmp_path, store, capsys):
    uri, c, exp, parent = store
    log = TrialLogger(uri, exp, parent, "t2", "sweep_trial_t2", tmp_path, backoff=0.01)
    log.log_metrics({"val_accuracy": 0.5}, step=1)
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not an onnx file")
    log.log_model(bad, step=1)
    log.log_metrics({"val_accuracy": 0.6}, step=2)  # later calls are not held up
    assert log.finish() == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning: MLflow: trial t2: the pruned model was not logged" in err
    assert c.get_run(log.run_id).info.status == "FINISHED"
    assert not c.search_logged_models([exp], filter_string=f"source_run_id = '{log.run_id}'")


def test_a_model_waits_while_the_server_is_down(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = TrialLogger(f"http://127.0.0.1:{port}", "1", "p", "t3", "sweep_trial_t3", tmp_path, retries=2, backoff=0.01)
    log.log_model(_tiny_onnx(tmp_path / "model.onnx"), step=2)
    log.log_dataset(dataset_record({"name": "synthetic"}, 0, USED))
    assert [json.loads(x)["op"] for x in (tmp_path / "mlflow_pending.jsonl").read_text().splitlines()] == [
        "model", "input"]


def test_dataset_digest_follows_the_files_and_the_selection(tmp_path):
    archive = tmp_path / "cifar10.tar.gz"
    archive.write_bytes(b"x" * 100)
    cfg = {"name": "cifar10", "root": str(archive), "subset": 10000, "val_split": 0.1}
    used = dict(USED, name="cifar10", source=str(tmp_path / "cache"))
    a = dataset_record(cfg, 0, used)
    assert a == dataset_record(dict(cfg), 0, dict(used))  # the same images: the same digest
    assert json.loads(a["source"]) == {"uri": str(archive)} and a["source_type"] == "local"
    assert dataset_record(dict(cfg, subset=5000), 0, used)["digest"] != a["digest"]
    assert dataset_record(cfg, 1, used)["digest"] != a["digest"]  # another seed: other subset and split
    os.utime(archive, ns=(1, 1))  # the archive changed
    assert dataset_record(cfg, 0, used)["digest"] != a["digest"]
    tree = tmp_path / "flowers"
    (tree / "train" / "rose").mkdir(parents=True)
    folder = dataset_record({"name": "imagefolder", "root": str(tree)}, 0, dict(used, name="imagefolder"))
    assert folder["name"] == "imagefolder:flowers"

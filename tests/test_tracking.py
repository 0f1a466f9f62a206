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


def _unreachable_uri() -> str:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_unsent_operations_outlive_the_node_in_its_checkpoint(tmp_path, store, monkeypatch):
    """The server is down while a trial runs two epochs; its node dies after the checkpoint. The
    restarted attempt (another node: another folder) adopts what the checkpoint carried and sends it
    first; adopting a stale copy again repeats nothing: one point per epoch."""
    from sweeps.tracking import PENDING_FILE

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    uri, c, exp, parent = store
    node1, ckpt, node2 = tmp_path / "node1", tmp_path / "ckpt", tmp_path / "node2"
    for d in (node1, ckpt, node2):
        d.mkdir()
    down = TrialLogger(_unreachable_uri(), exp, parent, "t-node", "sweep_trial_t-node", node1, retries=1,
                       backoff=0.01)
    down.start({"a": 1})
    for epoch in (1, 2):
        down.log_metrics({"epoch": epoch, "val_accuracy": 0.1 * epoch}, step=epoch)
    assert down.carry(ckpt) == 3 and (ckpt / PENDING_FILE).is_file()
    # the node dies: node1's folder is gone with it
    (node1 / PENDING_FILE).unlink()
    again = TrialLogger(uri, exp, parent, "t-node", "sweep_trial_t-node", node2)
    assert again.adopt(ckpt / PENDING_FILE) == 0 and not (node2 / PENDING_FILE).exists()
    again.log_metrics({"epoch": 3, "val_accuracy": 0.3}, step=3)
    assert again.carry(ckpt) == 0 and not (ckpt / PENDING_FILE).exists()  # nothing left to carry
    stale = tmp_path / "stale.jsonl"
    stale.write_text("".join(json.dumps({"op": "metrics", "metrics": {"epoch": e, "val_accuracy": 0.1 * e},
                                         "step": e, "ts": 1}) + "\n" for e in (1, 2)) + "{torn")
    (tmp_path / "node3").mkdir()
    third = TrialLogger(uri, exp, parent, "t-node", "sweep_trial_t-node", tmp_path / "node3")
    assert third.adopt(stale) == 0  # a torn last line is skipped, not fatal
    run = c.get_run(again.run_id)
    assert run.data.params["a"] == "1"
    hist = sorted((m.step, m.value) for m in c.get_metric_history(again.run_id, "val_accuracy"))
    assert hist == [(1, pytest.approx(0.1)), (2, pytest.approx(0.2)), (3, pytest.approx(0.3))]


def test_a_final_checkpoint_carries_its_uploads_for_the_driver(tmp_path, store, monkeypatch):
    """A trial ends while the server is down: its final checkpoint (the outputs folder) carries the
    unsent operations, with the files they upload named inside it; the driver, which only has the
    checkpoint, sends them (send_carried) and the pending file goes."""
    from sweeps.tracking import PENDING_FILE, send_carried

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    uri, c, exp, parent = store
    trial, final = tmp_path / "trial", tmp_path / "trial" / "artifacts"
    final.mkdir(parents=True)
    (final / "metrics.json").write_text('{"accuracy": 0.5}')
    down = TrialLogger(_unreachable_uri(), exp, parent, "t-final", "sweep_trial_t-final", trial, retries=1,
                       backoff=0.01)
    down.log_metrics({"accuracy": 0.5}, step=5)
    down.log_artifact(final / "metrics.json")
    assert down.finish() == 3
    assert down.carry(final, outputs=final) == 3
    stored = tmp_path / "storage" / "checkpoint_000005"  # what Ray persisted, elsewhere
    stored.mkdir(parents=True)
    for f in final.iterdir():
        (stored / f.name).write_bytes(f.read_bytes())
    import shutil

    shutil.rmtree(trial)  # the trial's node folder is gone
    settings = {"tracking_uri": uri, "experiment_id": exp, "parent_run_id": parent}
    assert send_carried(settings, [("t-final", "sweep_trial_t-final", stored)]) == 0
    assert not (stored / PENDING_FILE).exists()
    kid = [r for r in c.search_runs([exp]) if r.data.tags.get("prunevision.trial_id") == "t-final"]
    assert len(kid) == 1 and kid[0].data.metrics["accuracy"] == 0.5 and kid[0].info.status == "FINISHED"
    assert [a.path for a in c.list_artifacts(kid[0].info.run_id)] == ["metrics.json"]

"""Sweeps with a real Ray, real Optuna and a real MLflow store (sqlite file and `mlflow server`)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow.onnx
import numpy as np
import onnxruntime as ort
import optuna
import pytest
import ray
from trial_wrappers import failing_once_after

from sweeps.run import build_tuner, prepare, run_sweep, sweep_status
from sweeps.spec import parse_sweep
from sweeps.tracking import TrialLogger, child_runs, client, use_tracking_uri

pytestmark = pytest.mark.slow  # real Ray, MLflow servers, subprocess sweeps

ROOT = Path(__file__).resolve().parents[1]
BASE = {
    "model": {"name": "small_cnn"},
    "data": {"name": "synthetic", "synthetic_train": 96, "synthetic_test": 48, "batch_size": 32,
             "eval_batch_size": 48, "num_classes": 4, "image_size": 16},
    "gates": {"lr": 0.1},
    "train": {"epochs": 2, "lr": 0.05},
    "prune": {"finetune_epochs": 1},
    "measure": {"batch": 1, "warmup": 1, "exporter": "torchscript", "torch_latency": False},
}
SPACE = {"gates.lam": {"type": "loguniform", "low": 0.05, "high": 5.0},
         "prune.threshold": {"type": "uniform", "low": 0.3, "high": 0.7}}


def make_spec(name, n=4, conc=2, **kw):
    raw = {"name": name, "base": BASE, "space": SPACE, "search": {"num_samples": n, "max_concurrent": conc, "seed": 1},
           "mlflow": {"experiment": f"exp-{name}"}}
    raw.update(kw)
    return parse_sweep(raw)


@pytest.fixture
def local_ray(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # never a cluster started by another
    yield tmp_path
    ray.shutdown()


def study_states(summary):
    s = optuna.load_study(study_name=summary["name"], storage=f"sqlite:///{summary['study']}")
    return s, sorted(t.state.name for t in s.trials)


def test_sweep_records_every_trial_and_retries_from_checkpoint(local_ray):
    spec = make_spec("e2e", n=3, conc=2, mlflow={"experiment": "exp-e2e", "log_models": True})
    state = prepare(spec, local_ray / "runs")
    # every trial fails once, after its first epoch
    summary = _fit(spec, state, trial_fn=failing_once_after(1, local_ray))
    study, states = study_states(summary)
    assert states == ["COMPLETE"] * 3
    assert len(study.best_trials) >= 1 and len(study.directions) == 3
    # each trial failed once and went on from its epoch-1 checkpoint: no epoch ran twice
    for t in summary["trials"]:
        assert t["final"]
        lines = [json.loads(x) for x in (Path(t["trial_dir"]) / "result.json").read_text().splitlines() if x]
        epochs = [r["epoch"] for r in lines if not r.get("trial_final")]
        # Ray may keep only the results after the restored checkpoint in result.json; what must
        # hold is that no epoch was reported twice (MLflow's per-epoch history is checked below)
        assert epochs and epochs[-1] == 2 and len(epochs) == len(set(epochs)), epochs
        assert (local_ray / f"{t['trial_id']}.failed_once").exists()
        # the trial's outputs are in its final checkpoint, in the sweep's storage
        final_ckpt = sorted(Path(t["trial_dir"]).glob("checkpoint_*"))[-1]
        for f in ("metrics.json", "pruned.safetensors", "model.onnx", "dense.onnx", "config.yaml"):
            assert (final_ckpt / f).stat().st_size > 0, f
    # MLflow (sqlite file in the working directory): parent run + one child per trial
    c = client(summary["tracking_uri"])
    assert summary["tracking_uri"] == f"sqlite:///{local_ray / 'mlflow.db'}"
    kids = child_runs(c, summary["experiment_id"], summary["parent_run_id"])
    assert len(kids) == 3
    parent = c.get_run(summary["parent_run_id"])
    assert parent.data.tags["prunevision.sweep"] == "e2e" and "git_commit" in parent.data.tags
    digests = set()
    for run in kids:
        assert run.info.status == "FINISHED" and run.info.run_name.startswith("sweep_trial_")
        assert "gates.lam" in run.data.params and "model.name" in run.data.params
        for m in ("val_accuracy", "accuracy", "param_sparsity", "latency_ms", "macs", "test_accuracy"):
            assert m in run.data.metrics, m
        assert [h.step for h in c.get_metric_history(run.info.run_id, "test_accuracy")] == [1, 2]
        arts = {a.path for a in c.list_artifacts(run.info.run_id)}
        assert {"metrics.json", "config.yaml", "gate_history.json", "plots"} <= arts
        plots = {a.path for a in c.list_artifacts(run.info.run_id, "plots")}
        assert {"plots/gate_histogram.png", "plots/first_conv_filters.png",
                "plots/gate_histograms_over_training.png"} <= plots
        # log_models: the files, and the pruned model as an MLflow logged model linked to the run's final metrics
        assert {"model/pruned.safetensors", "model/model.onnx"} <= {
            a.path for a in c.list_artifacts(run.info.run_id, "model")}
        full = c.get_run(run.info.run_id)  # with its inputs and outputs
        [out] = full.outputs.model_outputs
        model = c.get_logged_model(out.model_id)
        assert model.source_run_id == run.info.run_id and str(model.status) == "READY"
        linked = {m.key: m.value for m in model.metrics}
        assert linked["val_accuracy"] == run.data.metrics["val_accuracy"] and "latency_ms" in linked
        with use_tracking_uri(summary["tracking_uri"]):
            onnx_model = mlflow.onnx.load_model(f"models:/{out.model_id}")
        x = np.zeros((2, 3, 16, 16), dtype=np.float32)
        assert ort.InferenceSession(onnx_model.SerializeToString()).run(None, {onnx_model.graph.input[0].name: x})[
            0].shape == (2, 4)
        # the dataset it used: name, split sizes (96 images, 10 % for validation; 48 test), digest
        [inp] = full.inputs.dataset_inputs
        digests.add(inp.dataset.digest)
        assert inp.dataset.name == "synthetic" and [(t.key, t.value) for t in inp.tags] == [
            ("mlflow.data.context", "training")]
        profile = json.loads(inp.dataset.profile)
        assert (profile["train"], profile["validation"], profile["test"], profile["classes"]) == (86, 10, 48, 4)
    assert len(digests) == 1  # the trials saw the same images: one dataset


def _fit(spec, state, trial_fn=None):
    from sweeps.run import finish

    results = build_tuner(spec, state, trial_fn=trial_fn).fit()
    return finish(state, results)


def test_asha_stopped_trials_are_pruned_not_complete(local_ray):
    base = json.loads(json.dumps(BASE))
    base["train"]["epochs"] = 3
    # ASHA's score is the validation accuracy: 32 validation images tell the trials apart, and 96
    # images still train (3 steps an epoch)
    base["data"].update(synthetic_train=128, val_split=0.25)
    space = dict(SPACE, **{"train.lr": {"type": "loguniform", "low": 1e-6, "high": 0.1}})
    good = {"gates.lam": 0.1, "prune.threshold": 0.5, "train.lr": 0.05}
    bad = {"gates.lam": 0.1, "prune.threshold": 0.5, "train.lr": 1e-6}  # learns nothing: ASHA stops it
    spec = parse_sweep({"name": "asha", "base": base, "space": space, "points_to_evaluate": [good, bad, bad],
                        "search": {"num_samples": 3, "max_concurrent": 1},
                        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
                        "mlflow": {"experiment": "exp-asha"}})
    summary = run_sweep(spec, local_ray / "runs")
    study, states = study_states(summary)
    stopped = [t for t in summary["trials"] if not t["final"]]
    assert stopped, "ASHA stopped no trial"
    assert states.count("PRUNED") == len(stopped) and states.count("COMPLETE") == 3 - len(stopped)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert all(t.values is not None for t in complete)
    assert {t.number for t in study.best_trials} <= {t.number for t in complete}  # no stopped trial on the front
    from analysis.results import load_ray

    df = load_ray(summary["sweep_dir"])  # the analysis reads Ray's files the same way
    assert (df["status"] == "stopped").sum() == len(stopped) and (df["status"] == "complete").sum() == 3 - len(stopped)


def _free_port():
    """A free port outside the kernel's ephemeral range and Ray's worker ports (10002-19999), so
    Ray's processes cannot take it between now and the server's bind."""
    import random

    for _ in range(200):
        port = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port")  # pragma: no cover


def _start_mlflow_server(tmp, port, attempts=3):
    for attempt in range(attempts):  # a restart may find the port still held for a moment
        try:
            return _start_mlflow_server_once(tmp, port)
        except RuntimeError:
            if attempt == attempts - 1:
                raise
            time.sleep(5)


def _start_mlflow_server_once(tmp, port):
    exe = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen([str(exe), "server", "--backend-store-uri", f"sqlite:///{tmp / 'server.db'}",
                             "--artifacts-destination", str(tmp / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp / f"mlflow-server-{port}.log", "ab"),
                            start_new_session=True,
                            # no background job runner: it can outlive the server and hold the port
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    import urllib.request

    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        try:
            # a fresh opener without proxies: urlopen's cached one may hold a proxy an earlier test set
            urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    log = (tmp / f"mlflow-server-{port}.log").read_text()[-1500:]
    raise RuntimeError(f"mlflow server did not start: {log}")


def _stop(proc):
    """Stop the server and everything it started (uvicorn can outlive the `mlflow server` process)."""
    port = int(proc.args[proc.args.index("--port") + 1])
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    subprocess.run(["pkill", "-9", "-f", "--", f"--port {port}( |$)"], check=False)  # a uvicorn left behind
    proc.wait(timeout=30)
    for _ in range(60):  # until nothing listens on the port any more
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return
        time.sleep(0.5)
    raise RuntimeError(f"port {port} still in use after stopping the mlflow server")  # pragma: no cover


class BlinkingProxy:
    """A TCP relay on 127.0.0.1 in front of the tracking server; stop() is an outage (connections
    refused), start() brings the same address back."""

    def __init__(self, port, target_port):
        self.port, self.target = port, target_port
        self.listener, self.conns = None, []

    def start(self):
        import threading

        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(16)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def stop(self):
        for sock in [self.listener, *self.conns]:  # shutdown wakes the threads blocked on them
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        self.conns = []

    def _accept(self, listener):
        import threading

        while True:
            try:
                client_sock, _ = listener.accept()
            except OSError:
                return  # closed: the outage
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.conns += [client_sock, upstream]
            for a, b in ((client_sock, upstream), (upstream, client_sock)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for x in (src, dst):
                try:
                    x.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def test_sweep_against_mlflow_server_and_a_blink(local_ray, monkeypatch):
    port = _free_port()
    server = _start_mlflow_server(local_ray, port)
    uri = f"http://127.0.0.1:{port}"
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        summary = run_sweep(make_spec("server", n=2, conc=2), local_ray / "runs")
        c = client(uri)
        kids = child_runs(c, summary["experiment_id"], summary["parent_run_id"])
        assert len(kids) == 2 and all("accuracy" in k.data.metrics for k in kids)

        # the server blinks: what cannot be sent waits in the trial folder and goes out later
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
        proxy = BlinkingProxy(_free_port(), port)
        proxy.start()
        trial_dir = local_ray / "blink"
        trial_dir.mkdir()
        log = TrialLogger(f"http://127.0.0.1:{proxy.port}", summary["experiment_id"], summary["parent_run_id"],
                          "blink-1", "blink", trial_dir, retries=2, backoff=0.01)
        log.start({"a": 1})
        log.log_metrics({"loss": 1.0}, step=1)
        proxy.stop()
        log.log_metrics({"loss": 0.5}, step=2)  # server unreachable: kept, the trial goes on
        log.log_metrics({"loss": 0.25}, step=3)
        assert log.unsent() == 2
        proxy.start()
        assert log.finish() == 0  # flushed, in order, then ended
        hist = c.get_metric_history(log.run_id, "loss")
        assert [(h.step, h.value) for h in sorted(hist, key=lambda h: h.step)] == [(1, 1.0), (2, 0.5), (3, 0.25)]
        assert c.get_run(log.run_id).info.status == "FINISHED"
        proxy.stop()
    finally:
        _stop(server)


def test_unreachable_tracking_server_fails_before_ray(tmp_path, monkeypatch):
    from sweeps.spec import SweepError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(SweepError, match="unreachable"):
        prepare(make_spec("nowhere"), tmp_path / "runs")
    assert not ray.is_initialized() and not (tmp_path / "runs").exists()


def test_two_node_cluster_with_a_node_removed_mid_sweep(tmp_path, monkeypatch):
    from ray.cluster_utils import Cluster

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    try:
        base = json.loads(json.dumps(BASE))
        base["train"]["epochs"] = 3
        spec = parse_sweep({"name": "nodes", "base": base, "space": SPACE,
                            "search": {"num_samples": 4, "max_concurrent": 2, "seed": 3},
                            "failure": {"max_failures": 3}, "mlflow": {"experiment": "exp-nodes"}})
        state = prepare(spec, tmp_path / "runs")
        import threading

        sweep_dir = Path(state["sweep_dir"])

        def remove_worker_when_busy():
            deadline = time.time() + 300
            while time.time() < deadline:  # once two trials have reported, take a node away
                done = list(sweep_dir.glob("*/result.json"))
                if len([p for p in done if p.read_text().strip()]) >= 2:
                    cluster.remove_node(worker)
                    return
                time.sleep(0.5)

        t = threading.Thread(target=remove_worker_when_busy, daemon=True)
        t.start()
        summary = _fit(spec, state)
        t.join(timeout=1)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 1  # the worker node really went
        finals = [tr for tr in summary["trials"] if tr["final"]]
        assert len(finals) == 4  # all N trials finished, the interrupted ones from their checkpoints
        nodes = set()
        for tr in summary["trials"]:
            lines = [json.loads(x) for x in (Path(tr["trial_dir"]) / "result.json").read_text().splitlines() if x]
            nodes |= {r["node_id"] for r in lines if r.get("node_id")}
        assert len(nodes) == 2  # trials ran on both nodes
        c = client(summary["tracking_uri"])
        assert len(child_runs(c, summary["experiment_id"], summary["parent_run_id"])) == 4
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_interrupted_sweep_resumes_to_exactly_n_trials(tmp_path):
    # the shipped smoke sweep through the CLI, as CI's smoke test, interrupted and resumed
    spec_file = ROOT / "sweeps" / "configs" / "smoke.yaml"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    cmd = [sys.executable, "-m", "prunevision_cli", "sweep", "run", str(spec_file), "--storage", str(tmp_path / "runs"),
           "--num-cpus", "1", "--smoke-test", "--set", "search.num_samples=3", "--set", "search.max_concurrent=1",
           "--set", "train.epochs=3"]
    err = open(tmp_path / "run.err", "w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=err,
                            start_new_session=True)
    sweep_dir = tmp_path / "runs" / "smoke"
    deadline = time.time() + 300
    while time.time() < deadline:  # interrupt once one trial is done and another has checkpointed
        results = {p.parent: p.read_text() for p in sweep_dir.glob("*/result.json")}
        running = [d for d, text in results.items() if "trial_final" not in text]
        if len(results) > len(running) and any(list(d.glob("checkpoint_*/checkpoint.pt")) for d in running):
            break
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    err.close()
    subprocess.run([sys.executable, "-c", "import ray; ray.shutdown()"], check=False)
    # Ctrl-C is not a success: exit 130, the parent run KILLED, and the hint is our own command
    assert proc.returncode == 130, (tmp_path / "run.err").read_text()[-3000:]
    assert f"prunevision sweep resume {sweep_dir}" in (tmp_path / "run.err").read_text()
    before = sweep_status(sweep_dir)
    c = client(before["tracking_uri"])
    assert c.get_run(before["parent_run_id"]).info.status == "KILLED"

    # the sweep folder is untrusted: resume never unpickles what is in it (Ray's tuner.pkl,
    # experiment and searcher state); a crafted pickle that would leave a marker is not run
    marker = tmp_path / "pwned"
    crafted = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    for f in [sweep_dir / "tuner.pkl", *sweep_dir.glob("searcher-state-*.pkl")]:
        f.write_bytes(crafted)

    r = subprocess.run([sys.executable, "-m", "prunevision_cli", "sweep", "resume", str(sweep_dir), "--num-cpus", "1"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert not marker.exists()
    summary = sweep_status(sweep_dir)
    assert len(summary["trials"]) == 3 and all(t["final"] for t in summary["trials"])
    assert c.get_run(summary["parent_run_id"]).info.status == "FINISHED"
    kids = child_runs(c, summary["experiment_id"], summary["parent_run_id"])
    assert len(kids) == 3  # the interrupted trial kept its child run
    assert len({k.data.tags["prunevision.trial_id"] for k in kids}) == 3
    for k in kids:  # exactly one point per epoch, the interrupted trial's included
        assert k.info.status == "FINISHED"
        steps = [h.step for h in c.get_metric_history(k.info.run_id, "test_accuracy")]
        assert sorted(steps) == [1, 2, 3], steps
    # the cut-off trial went on from its checkpoint: it did not train its first epoch again
    moved = list((sweep_dir / ".interrupted").iterdir())
    assert len(moved) == 1
    resumed = [t for t in summary["trials"]
               if json.loads((Path(t["trial_dir"]) / "params.json").read_text()).get("_resume_of")]
    assert len(resumed) == 1
    lines = [json.loads(x) for x in (Path(resumed[0]["trial_dir"]) / "result.json").read_text().splitlines() if x]
    epochs = [r["epoch"] for r in lines if not r.get("trial_final")]
    assert 1 not in epochs and lines[-1].get("trial_final"), epochs


def test_sweep_folder_copied_is_read_where_it_is(tmp_path):
    # `sweep status` on a copy acts on the copy, not on the folder recorded inside it
    import shutil

    from sweeps.run import STATE_FILE

    src = tmp_path / "a" / "s1"
    src.mkdir(parents=True)
    state = {"name": "s1", "storage": str(src.parent), "sweep_dir": str(src), "source": {}, "base": {},
             "settings": {"tracking_uri": "sqlite:///x.db", "experiment_id": "1", "parent_run_id": "p"},
             "run": {"objectives": {"val_accuracy": "max"}, "num_samples": 1}}
    (src / STATE_FILE).write_text(json.dumps(state))
    dst = tmp_path / "b" / "copy"
    shutil.copytree(src, dst)
    shutil.rmtree(src)
    s = sweep_status(dst)
    assert s["sweep_dir"] == str(dst.resolve()) and s["study"].startswith(str(dst.resolve()))


def test_local_ray_listens_on_loopback_only(tmp_path):
    # a local sweep's Ray (GCS, raylet, workers, this driver): no listening socket off loopback
    code = """
import json, psutil, ray
from sweeps.run import init_ray
init_ray(None, num_cpus=1)
ray.get(ray.remote(lambda: 1).remote())  # a worker is up
me = psutil.Process()
pids = {me.pid} | {p.pid for p in me.children(recursive=True)}
socks = [(c.laddr.ip, c.laddr.port, c.pid) for c in psutil.net_connections(kind="inet")
         if c.status == psutil.CONN_LISTEN and c.pid in pids]
print(json.dumps(socks))
ray.shutdown()
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    socks = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(socks) >= 3  # GCS, raylet, worker at least
    off = [s for s in socks if s[0] not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
    assert not off, off

"""The commands prunevision prints work: `prunevision sweep dashboard`, the MLflow hint, and
`--set` with several pairs."""

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import optuna
import pytest
from test_sweeps import make_spec

from prunevision_cli.main import build_parser, main
from sweeps.cli import print_summary
from sweeps.run import STUDY_FILE, prepare, sweep_status

pytestmark = pytest.mark.slow  # real Ray / MLflow servers / subprocess sweeps

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    """A real sweep folder (prepared by the sweep code: state file, MLflow parent run) with a real
    Optuna study of three finished trials in its optuna.db."""
    tmp = tmp_path_factory.mktemp("dash")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv("PRUNEVISION_CACHE", str(tmp / "cache"))
        state = prepare(make_spec("dash"), tmp / "runs")
    d = Path(state["sweep_dir"])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=f"sqlite:///{d / STUDY_FILE}", study_name="dash",
                                directions=["maximize", "maximize", "minimize"])
    study.optimize(lambda t: (t.suggest_float("gates.lam", 0.05, 5.0), 0.5, 1.0), n_trials=3)
    return d


def _listening_addresses(pid: int) -> list[str]:
    """Local addresses of the TCP sockets process ``pid`` listens on (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # LISTEN
                out.append(cols[1])
    return out


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads listening sockets from /proc")
def test_printed_dashboard_command_serves_the_study_on_loopback_and_stops_cleanly(sweep_dir, capsys):
    print_summary(sweep_status(sweep_dir))
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("study:"))
    cmd = shlex.split(line.split(":", 1)[1]) + ["--port", "0"]  # the printed command, on a free port
    assert cmd[-5:-2] == ["sweep", "dashboard", str(sweep_dir)]
    # two at once (Ctrl-C and SIGTERM), so that their start-ups overlap
    procs = {sig: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for sig, proc in procs.items():
            first = proc.stdout.readline()
            m = re.search(r"http://127\.0\.0\.1:(\d+)(/dashboard/studies/(\d+))", first)
            assert m, first + proc.stderr.read()
            base = f"http://127.0.0.1:{m[1]}"
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(base + "/", timeout=10) as r:  # redirects to the dashboard's page
                assert r.status == 200 and r.url == base + "/dashboard" and "text/html" in r.headers["Content-Type"]
            with opener.open(base + "/api/studies", timeout=10) as r:
                studies = json.loads(r.read())["study_summaries"]
            assert [(s["study_id"], s["study_name"]) for s in studies] == [(int(m[3]), "dash")]
            with opener.open(base + m[2], timeout=10) as r:
                assert r.status == 200
            addresses = _listening_addresses(proc.pid)
            assert addresses and all(a.startswith("0100007F:") for a in addresses), addresses  # 127.0.0.1 only
            proc.send_signal(sig)
            assert proc.wait(timeout=30) == 0, proc.stderr.read()
            assert proc.stdout.read().strip() == "dashboard stopped"
            with socket.socket() as s:
                assert s.connect_ex(("127.0.0.1", int(m[1]))) != 0  # nothing listens any more
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_dashboard_refuses_with_one_line(tmp_path, sweep_dir, capsys):
    assert main(["sweep", "dashboard", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "is not a prunevision sweep folder" in err and err.count("\n") == 1
    (sweep_dir / STUDY_FILE).rename(tmp_path / "moved.db")
    assert main(["sweep", "dashboard", str(sweep_dir)]) == 2
    err = capsys.readouterr().err
    assert "has no Optuna study yet" in err and err.count("\n") == 1
    (tmp_path / "moved.db").rename(sweep_dir / STUDY_FILE)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["sweep", "dashboard", str(sweep_dir), "--port", str(busy.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert "cannot listen on 127.0.0.1" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as e:
        main(["sweep", "dashboard", str(sweep_dir), "--port", "70000"])
    assert e.value.code == 2 and "not a port" in capsys.readouterr().err


def _summary(uri):
    return {"name": "s", "states": {"COMPLETE": 2}, "trials": [], "sweep_dir": "/data/runs/my sweep",
            "tracking_uri": uri, "experiment_id": "7", "experiment": "prunevision-quickstart", "parent_run_id": "abc"}


def test_printed_mlflow_hint_for_a_store_and_for_a_server(tmp_path, capsys, monkeypatch):
    venv_bin = Path(sys.executable).parent
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # the venv is not activated: the commands name its scripts
    monkeypatch.chdir(tmp_path)
    print_summary(_summary("sqlite:////data/mlflow.db"))
    out = capsys.readouterr().out.splitlines()
    assert f"study:    {venv_bin / 'prunevision'} sweep dashboard '/data/runs/my sweep'" in out
    mlflow_line = next(x for x in out if x.startswith("MLflow:"))
    assert mlflow_line == f"MLflow:   {venv_bin / 'mlflow'} ui --backend-store-uri sqlite:////data/mlflow.db"
    where = out[out.index(mlflow_line) + 1]
    assert where.startswith("          then open http://127.0.0.1:5000/#/experiments/7/runs: experiment "
                            "prunevision-quickstart, parent run abc")
    assert '"Model training"' in where

    monkeypatch.setenv("PATH", f"{venv_bin}:/usr/bin:/bin")  # activated: plain names
    print_summary(_summary("http://10.1.2.3:5000/"))
    out = capsys.readouterr().out.splitlines()
    assert "study:    prunevision sweep dashboard '/data/runs/my sweep'" in out
    assert "MLflow:   open http://10.1.2.3:5000/#/experiments/7/runs" in out  # mlflow ui takes no http URL
    assert not any("mlflow ui" in x for x in out)


@pytest.mark.parametrize("prefix", [["train"], ["prune", "ckpt.pt", "--out", "o"], ["sweep", "run", "s.yaml"]])
def test_set_takes_several_pairs_and_repeats(prefix, capsys):
    parser = build_parser()
    for tail in (["--set", "a=1", "b=2", "--set", "c=x y"], ["--set", "a=1", "--set", "b=2", "--set", "c=x y"],
                 ["--set", "a=1", "b=2", "c=x y"]):
        assert parser.parse_args(prefix + tail).overrides == ["a=1", "b=2", "c=x y"]
    assert parser.parse_args(prefix).overrides == []
    with pytest.raises(SystemExit) as e:  # a positional swallowed by --set is named, with the fix
        parser.parse_args(["train", "--set", "a=1", "configs/quickstart.yaml"])
    assert e.value.code == 2
    assert "'configs/quickstart.yaml'" in capsys.readouterr().err


def test_set_pairs_reach_the_config():
    from prunevision_cli.main import build_config

    args = build_parser().parse_args(["train", "--set", "gates.lam=2", "train.epochs=3", "--set", "data.subset=64"])
    cfg = build_config(args)
    assert (cfg.gates.lam, cfg.train.epochs, cfg.data.subset) == (2, 3, 64)


def test_every_set_option_is_the_shared_one():
    """No command defines --set on its own (benchmarks included): they all take several pairs."""
    own = [str(p.relative_to(ROOT)) for d in ("prunevision", "sweeps", "analysis", "benchmarks")
           for p in sorted((ROOT / d).rglob("*.py"))
           for line in p.read_text().splitlines() if re.search(r"""add_argument\(\s*["']--set""", line)]
    assert own == ["prunevision/cliargs.py"]  # add_set_argument

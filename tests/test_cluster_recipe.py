"""README's one-machine cluster recipe, run as written: two `ray start` nodes and an `mlflow server`
on 127.0.0.1, the smoke sweep as a `ray job submit` job and through Ray Client (`ray://`). Only the
placeholders the README names change: OUT (a temporary folder) and the ports (free ones)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
PORTS = (6390, 8265, 10001, 5055, 52365, 52400, 52401, 52402, 52403)
# failures of Ray's own start-up, not ours: psutil.ZombieProcess (a process Ray scanned had just
# exited; no module of ours uses psutil), seen once in about six runs here, and the Ray Client proxy's
# per-client server exiting before it answered, seen once, in CI on 2026-11-22
TRANSIENT = ("psutil.ZombieProcess", "Starting Ray client server failed")
COMMIT = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def readme_block() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("**Try it on one machine**")
    return re.search(r"```bash\n(.*?)```", text[start:], re.S).group(1)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ours(marker: str) -> list:
    """The processes the recipe started, found while the nodes still run: those that name the
    temporary folder on their command line or in their environment (PATH holds its bin/), with all
    their children (Ray's agents and workers rename themselves). `ray stop` would end every Ray on
    the machine, other people's too."""
    import psutil

    found = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in a for a in (p.info["cmdline"] or [])) or any(marker in v for v in p.environ().values()):
                found[p.pid] = p
                found.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.Error:
            pass
    found.pop(os.getpid(), None)
    return list(found.values())


def stop(marker: str) -> None:
    import psutil

    for _ in range(3):  # a raylet may start a worker while the others go
        procs = ours(marker)
        if not procs:
            return
        for p in procs:
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=10)
        for p in alive:  # Ray's agents ignore SIGTERM
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=10)


def ray_logs(out: Path) -> str:
    """The end of the agents' and job server's logs, for a failure message."""
    tails = []
    for name in ("dashboard_agent.log", "dashboard_agent.err", "dashboard.log", "raylet.err",
                 "ray_client_server*.err", "ray_client_server*.out"):
        for f in sorted(out.glob(f"*/session_latest/logs/{name}")):
            tails.append(f"== {f.relative_to(out)}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-15:]))
    return "\n".join(tails)


def discard(out: Path) -> None:
    stop(str(out))
    shutil.rmtree(out, ignore_errors=True)


@pytest.fixture
def recipe():
    """A function that prepares one run of the README block: its own OUT and free ports."""
    made: list[Path] = []

    def prepare() -> tuple[str, dict, Path, dict]:
        # a short path: Ray's unix sockets live under OUT, and a socket path may not exceed 107 bytes
        tmp_path = Path(tempfile.mkdtemp(prefix="pvc-", dir="/tmp"))
        made.append(tmp_path)
        script = readme_block().replace("OUT=/tmp/pv-cluster", f"OUT={tmp_path}")
        mapping = dict(zip(PORTS, free_ports(len(PORTS))))
        for old, new in mapping.items():
            script = re.sub(rf"(?<=[:= ]){old}\b", str(new), script)
        assert str(tmp_path) in script and not any(re.search(rf"[:= ]{p}\b", script) for p in PORTS)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
        env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
        return script, env, tmp_path, mapping

    try:
        yield prepare
    finally:
        for d in made:
            discard(d)


def run_block(prepare) -> tuple[subprocess.CompletedProcess, dict, Path, dict]:
    script, env, out, ports = prepare()
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    return r, env, out, ports


def test_the_readme_cluster_recipe_runs_as_written(recipe):
    r, env, out, ports = run_block(recipe)
    if r.returncode != 0 and any(s in r.stderr for s in TRANSIENT):
        # Ray's own start-up, not ours, failed: the whole block once more, from scratch; what the first
        # attempt's logs said goes to the test's output
        print(f"first attempt: exit {r.returncode}\n{r.stderr[-3000:]}\n{ray_logs(out)}")
        discard(out)
        r, env, out, ports = run_block(recipe)
    mlflow_port = ports[5055]
    if r.returncode != 0:  # the whole story: pytest would shorten an assertion message
        pytest.fail(f"exit {r.returncode}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-6000:]}\n"
                    f"{ray_logs(out)}", pytrace=False)
    assert "succeeded" in r.stdout + r.stderr
    for name in ("smoke", "smoke-client"):
        folder = out / "runs" / name
        finals = []
        for result in folder.glob("sweep_trial_*/result.json"):
            lines = [json.loads(x) for x in result.read_text().splitlines() if x.strip()]
            finals += [x for x in lines if x.get("trial_final")]
        assert len(finals) == 4, name
        if name == "smoke":  # the job's trials ran on both nodes
            assert len({f["node_id"] for f in finals}) == 2, [f["node_id"] for f in finals]
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"http://127.0.0.1:{mlflow_port}")
    exp = c.get_experiment_by_name("prunevision-smoke")
    runs = c.search_runs([exp.experiment_id])
    parents = [x for x in runs if "mlflow.parentRunId" not in x.data.tags]
    kids = [x for x in runs if "mlflow.parentRunId" in x.data.tags]
    assert sorted(p.info.run_name for p in parents) == ["smoke", "smoke-client"]
    assert len(kids) == 8 and all(k.info.status == "FINISHED" for k in kids)
    # the job's copy of the project has no .git: its commit comes from the README's PRUNEVISION_GIT_COMMIT;
    # the Ray Client driver runs here and asks git itself
    assert len(COMMIT) == 40
    for p in parents:
        assert p.data.tags.get("git_commit") == COMMIT, p.info.run_name
    import psutil

    # the job server and the tracking server listen on 127.0.0.1 only, as the README says
    pids = {p.pid for p in ours(str(out))}
    listening = [(c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.pid in pids]
    for port in (ports[8265], mlflow_port):
        ips = {ip.removeprefix("::ffff:") for ip, p in listening if p == port}
        assert ips == {"127.0.0.1"}, (port, sorted(listening))
    # token auth: the job server answers a client with RAY_AUTH_MODE=token and refuses one without
    jobs = ["ray", "job", "list", "--address", f"http://127.0.0.1:{ports[8265]}"]
    with_token = subprocess.run(jobs, env=dict(env, RAY_AUTH_MODE="token"), capture_output=True, text=True, timeout=120)
    assert with_token.returncode == 0, with_token.stderr[-2000:]
    without = subprocess.run(jobs, env=env, capture_output=True, text=True, timeout=120)
    assert without.returncode != 0, without.stdout[-2000:]
    assert "Authentication required" in without.stdout + without.stderr, without.stderr[-2000:]

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
PORTS = (6390, 8265, 10001, 5055, 52400, 52401, 52402, 52403)


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


@pytest.fixture
def recipe():
    # a short path: Ray's unix sockets live under OUT, and a socket path may not exceed 107 bytes
    tmp_path = Path(tempfile.mkdtemp(prefix="pvc-", dir="/tmp"))
    script = readme_block().replace("OUT=/tmp/pv-cluster", f"OUT={tmp_path}")
    mapping = dict(zip(PORTS, free_ports(len(PORTS))))
    for old, new in mapping.items():
        script = re.sub(rf"(?<=[:= ]){old}\b", str(new), script)
    assert str(tmp_path) in script and not any(re.search(rf"[:= ]{p}\b", script) for p in PORTS)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    yield script, env, tmp_path, mapping[5055]
    subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True, timeout=120)
    subprocess.run(["pkill", "-f", f"mlflow server --host 127.0.0.1 --port {mapping[5055]}"], capture_output=True)
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_the_readme_cluster_recipe_runs_as_written(recipe):
    script, env, out, mlflow_port = recipe
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
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
    job_parent = next(p for p in parents if p.info.run_name == "smoke")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert job_parent.data.tags.get("git_commit") == commit  # PRUNEVISION_GIT_COMMIT reached the job

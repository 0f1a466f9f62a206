"""MLflow for sweeps: one parent run per sweep, one nested child run per trial.

Trials log from inside the trial (they may run on other nodes), through
:class:`TrialLogger`, which retries when the tracking server blinks and writes what it could
not send to ``mlflow_pending.jsonl`` in the trial folder, sending it with the next call that
gets through. A trial never fails because of MLflow.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sweeps.spec import SweepError

TRIAL_TAG = "prunevision.trial_id"
SWEEP_TAG = "prunevision.sweep_dir"


def resolve_tracking_uri(spec_uri: str | None) -> str:
    """MLFLOW_TRACKING_URI, else the sweep file's, else MLflow's default sqlite file in the working
    directory — made absolute, since trials run in other folders."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or spec_uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel = uri[len("sqlite:///"):]
        uri = f"sqlite:///{(Path.cwd() / rel).resolve()}"
    elif "://" not in uri:  # a plain folder
        uri = str(Path(uri).resolve())
    return uri


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail before any work when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        # a fresh opener reads the proxy settings in force now (urlopen caches the first ones)
        with urllib.request.build_opener().open(uri.rstrip("/") + "/health", timeout=timeout) as r:
            if r.status >= 400:
                raise SweepError(f"MLflow tracking server {uri} answered {r.status}")
    except (urllib.error.URLError, OSError) as e:
        raise SweepError(
            f"MLflow tracking server {uri} is unreachable ({' '.join(str(e).split())}); start one with "
            f"`mlflow server --host 127.0.0.1 --port 5000` or unset MLFLOW_TRACKING_URI"
        ) from None


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(c, name: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return c.create_experiment(name)
    except Exception:  # created meanwhile by another process
        return c.get_experiment_by_name(name).experiment_id


def parent_run(c, exp_id: str, sweep_dir: str, name: str, tags: dict[str, str], params: dict[str, Any],
               artifacts: dict[str, str]) -> str:
    """The sweep's parent run: found again by the sweep folder (resume), else created."""
    found = c.search_runs([exp_id], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep_dir}' and tags.`mlflow.parentRunId` "
                                                  "IS NULL", max_results=1)
    found = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    if found:
        run_id = found[0].info.run_id
        if found[0].info.status != "RUNNING":
            c.update_run(run_id, status="RUNNING")
        return run_id
    run = c.create_run(exp_id, run_name=name, tags={SWEEP_TAG: sweep_dir, **tags})
    from mlflow.entities import Param

    c.log_batch(run.info.run_id, params=[Param(k, _param_str(v)) for k, v in list(params.items())[:100]])
    for fname, text in artifacts.items():
        c.log_text(run.info.run_id, text, fname)
    return run.info.run_id


def _param_str(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v)
    return s[:6000]


def child_runs(c, exp_id: str, parent_id: str) -> list:
    return c.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=5000)


class TrialLogger:
    """Logs one trial to its child run, surviving tracking-server outages."""

    def __init__(self, uri: str, exp_id: str, parent_id: str, trial_id: str, trial_name: str, trial_dir: Path,
                 retries: int = 6, backoff: float = 0.5, sleep: Callable[[float], None] = time.sleep):
        self.uri, self.exp_id, self.parent_id = uri, exp_id, parent_id
        self.trial_id, self.trial_name = trial_id, trial_name
        self.pending_path = Path(trial_dir) / "mlflow_pending.jsonl"
        self.retries, self.backoff, self.sleep = retries, backoff, sleep
        self.run_id: str | None = None
        self._client = client(uri)

    # -- the calls -----------------------------------------------------------------------
    def start(self, params: dict[str, Any]) -> None:
        self._do({"op": "start", "params": {k: _param_str(v) for k, v in params.items()}})

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")}
        self._do({"op": "metrics", "metrics": clean, "step": int(step), "ts": int(time.time() * 1000)})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if Path(path).exists():
            self._do({"op": "artifact", "path": str(path), "artifact_path": artifact_path})

    def finish(self, status: str = "FINISHED") -> int:
        """End the run; returns how many operations are still unsent (kept in the pending file)."""
        self._do({"op": "end", "status": status})
        return self.unsent()

    def unsent(self) -> int:
        if not self.pending_path.exists():
            return 0
        return sum(1 for line in self.pending_path.read_text().splitlines() if line.strip())

    # -- machinery -----------------------------------------------------------------------
    def _do(self, op: dict[str, Any]) -> None:
        pending = self._read_pending()
        queue = pending + [op]
        sent = 0
        for item in queue:
            if not self._send_with_retry(item, quick=bool(pending) and item is not op):
                break
            sent += 1
        rest = queue[sent:]
        if rest:
            self.pending_path.write_text("".join(json.dumps(x) + "\n" for x in rest))
        elif self.pending_path.exists():
            self.pending_path.unlink()

    def _read_pending(self) -> list[dict[str, Any]]:
        if not self.pending_path.exists():
            return []
        return [json.loads(line) for line in self.pending_path.read_text().splitlines() if line.strip()]

    def _send_with_retry(self, op: dict[str, Any], quick: bool = False) -> bool:
        delay = self.backoff
        for attempt in range(self.retries):
            try:
                self._send(op)
                return True
            except Exception:  # any transport or server error: wait and try again
                if attempt == self.retries - 1:
                    return False
                self.sleep(delay)
                delay = min(delay * 2, 8.0)
        return False

    def _ensure_run(self) -> str:
        if self.run_id is None:
            runs = self._client.search_runs(
                [self.exp_id],
                filter_string=f"tags.`{TRIAL_TAG}` = '{self.trial_id}' and tags.`mlflow.parentRunId` = "
                              f"'{self.parent_id}'",
                max_results=1)
            if runs:  # a restarted or resumed trial goes on in its own child run
                self.run_id = runs[0].info.run_id
                if runs[0].info.status != "RUNNING":
                    self._client.update_run(self.run_id, status="RUNNING")
            else:
                run = self._client.create_run(self.exp_id, run_name=self.trial_name, tags={
                    "mlflow.parentRunId": self.parent_id, TRIAL_TAG: self.trial_id})
                self.run_id = run.info.run_id
        return self.run_id

    def _send(self, op: dict[str, Any]) -> None:
        from mlflow.entities import Metric, Param

        run_id = self._ensure_run()
        kind = op["op"]
        if kind == "start":
            existing = self._client.get_run(run_id).data.params
            new = [Param(k, v) for k, v in op["params"].items() if k not in existing]
            for i in range(0, len(new), 100):
                self._client.log_batch(run_id, params=new[i:i + 100])
        elif kind == "metrics":
            ms = [Metric(k, v, op["ts"], op["step"]) for k, v in op["metrics"].items()]
            for i in range(0, len(ms), 1000):
                self._client.log_batch(run_id, metrics=ms[i:i + 1000])
        elif kind == "artifact":
            self._client.log_artifact(run_id, op["path"], op.get("artifact_path"))
        elif kind == "end":
            self._client.set_terminated(run_id, status=op["status"])

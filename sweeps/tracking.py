"""MLflow for sweeps: one parent run per sweep, one nested child run per trial.

Trials log from inside the trial (they may run on other nodes), through
:class:`TrialLogger`, which retries when the tracking server blinks and writes what it could
not send to ``mlflow_pending.jsonl`` in the trial folder, sending it with the next call that
gets through. A trial never fails because of MLflow. What is still unsent travels in every
checkpoint the trial reports (:meth:`TrialLogger.carry`), so a node that dies while the server is
down loses nothing: the restarted attempt sends it first (:meth:`TrialLogger.adopt`), and what a
finished trial could not send the driver sends at the end of the sweep (:func:`send_carried`).

With ``mlflow.log_models`` each trial's pruned model becomes an MLflow logged model (ONNX flavour)
linked to its run and final metrics, and every trial records the dataset it used
(``mlflow.log_input``-style, context ``training``).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prunevision.fsutil import atomic_write
from sweeps.spec import SweepError

TRIAL_TAG = "prunevision.trial_id"
PENDING_FILE = "mlflow_pending.jsonl"
SWEEP_TAG = "prunevision.sweep_dir"
DEFAULT_EXPERIMENT = "prunevision"
# MLflow 3's UI shows an experiment of this kind as model training (runs, logged models), not GenAI
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# calls that are given up (with a warning) when they fail while the server answers: what the run
# would miss, said in that warning
OPTIONAL_OPS = {"model": "the pruned model was not logged as an MLflow model; its files are in the run's "
                         "artifacts under model/"}


def experiment_name(mlflow_cfg: dict[str, Any] | None) -> str:
    """The MLflow experiment of a sweep: the sweep file's ``mlflow.experiment``, else prunevision."""
    return (mlflow_cfg or {}).get("experiment") or DEFAULT_EXPERIMENT


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
    """The commit of this code: git's, else ``PRUNEVISION_GIT_COMMIT`` (a Ray job's working dir is
    uploaded without ``.git``; pass it with ``--runtime-env-json``), else "unknown"."""
    try:
        found = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                               cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        found = ""
    return found or os.environ.get("PRUNEVISION_GIT_COMMIT", "").strip() or "unknown"


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(c, name: str) -> str:
    """The experiment's id, created (or restored) when needed, and marked as model training unless
    someone chose its kind already."""
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        if EXPERIMENT_KIND_TAG not in exp.tags:
            c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    try:
        return c.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
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


def _fingerprint(root: str | Path | None) -> list[Any]:
    """Cheap identity of a dataset's files: a file's (path, size, mtime); a folder's entries two
    levels deep (adding or removing images changes their folders' mtimes). No file is read, and
    what cannot be listed leaves just the path."""
    if not root:
        return []
    path = Path(root).expanduser().resolve()
    try:
        entries = [path, *(sorted(path.iterdir()) if path.is_dir() else [])]
        for sub in entries[1:]:
            if sub.is_dir():
                entries += sorted(sub.iterdir())
        out: list[Any] = []
        for e in entries:
            st = e.stat()
            out.append([str(e), st.st_size if e.is_file() else None, st.st_mtime_ns])
        return out
    except OSError:  # gone, or not readable here: never a reason to fail the trial
        return [str(path)]


def dataset_record(data_cfg: dict[str, Any], seed: int, used: dict[str, Any]) -> dict[str, Any]:
    """What ``log_dataset`` sends for a trial: name, split sizes (``used``: metrics.json's
    ``dataset``), source and a digest of the files' identity plus everything that picks the images
    (subset sizes, classes, validation share, seed), so that trials which saw the same images share
    one MLflow dataset."""
    name = used.get("name") or data_cfg.get("name") or "dataset"
    root = data_cfg.get("root")
    if name == "imagefolder" and root:
        name = f"imagefolder:{Path(str(root).rstrip('/')).name}"
    splits = {"train": used.get("train_images"), "validation": used.get("val_images"), "test": used.get("test_images")}
    picks = {k: data_cfg.get(k) for k in ("name", "subset", "test_subset", "val_split", "classes", "class_head",
                                          "image_size", "num_classes", "synthetic_train", "synthetic_test")}
    # not the decoded cache's path (``used["source"]``): it differs between machines for the same images
    identity = {"files": _fingerprint(root), "picks": picks, "seed": seed, "splits": splits}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    source = str(Path(root).expanduser().resolve()) if root else str(used.get("source") or name)
    profile = {**splits, "classes": len(used.get("classes") or []) or None, "image_size": used.get("image_size")}
    return {"name": name, "digest": digest, "source_type": "local" if root else "code",
            "source": json.dumps({"uri": source} if root else {"tags": {"prunevision.data": source}}),
            "profile": json.dumps(profile)}


def child_runs(c, exp_id: str, parent_id: str) -> list:
    return c.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=5000)


class TrialLogger:
    """Logs one trial to its child run, surviving tracking-server outages."""

    def __init__(self, uri: str, exp_id: str, parent_id: str, trial_id: str, trial_name: str, trial_dir: Path,
                 retries: int = 6, backoff: float = 0.5, sleep: Callable[[float], None] = time.sleep):
        self.uri, self.exp_id, self.parent_id = uri, exp_id, parent_id
        self.trial_id, self.trial_name = trial_id, trial_name
        self.pending_path = Path(trial_dir) / PENDING_FILE
        self.retries, self.backoff, self.sleep = retries, backoff, sleep
        self.run_id: str | None = None
        self.logged_upto = 0  # epochs the child run already holds (a restarted or resumed trial)
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

    def log_dataset(self, record: dict[str, Any], context: str = "training") -> None:
        """Record the dataset the trial used (a :func:`dataset_record`) as the run's input."""
        self._do({"op": "input", "dataset": record, "context": context})

    def log_model(self, onnx_path: str | Path, step: int) -> None:
        """Log the pruned ONNX model as an MLflow logged model of this run, linked to the run's
        metrics at ``step`` (the final ones). A model that cannot be logged while the server
        answers costs a warning line, never the trial; while the server is down it waits in the
        pending file like every other call."""
        if Path(onnx_path).exists():
            self._do({"op": "model", "path": str(onnx_path), "step": int(step)})

    def finish(self, status: str = "FINISHED") -> int:
        """End the run; returns how many operations are still unsent (kept in the pending file)."""
        self._do({"op": "end", "status": status})
        return self.unsent()

    def unsent(self) -> int:
        return len(self._read_pending())

    def flush(self) -> int:
        """Try to send what is pending; returns how many operations are still unsent."""
        self._do(None)
        return self.unsent()

    def carry(self, folder: str | Path, outputs: str | Path | None = None) -> int:
        """Put what is still unsent into ``folder``, a checkpoint about to be reported, so that it
        outlives this node (an empty queue leaves no file there). Files an operation uploads from
        under ``outputs`` (the trial's outputs, which the final checkpoint is) are also named relative
        to it, for a reader that has only the checkpoint. Returns how many operations it carries."""
        ops = self._read_pending()
        target = Path(folder) / PENDING_FILE
        if not ops:
            target.unlink(missing_ok=True)
            return 0
        if outputs is not None:
            for op in ops:
                if "path" in op and Path(op["path"]).is_relative_to(outputs):
                    op["in_checkpoint"] = Path(op["path"]).relative_to(outputs).as_posix()
        _write_ops(target, ops)
        return len(ops)

    def adopt(self, carried: str | Path) -> int:
        """Queue the operations an earlier attempt carried in its checkpoint (``carried``, a pending
        file) ahead of this attempt's own, and try to send them; returns how many are still unsent.
        An operation that did reach the server before is not repeated: metrics of epochs the run
        holds are skipped, params it has are not sent again."""
        old = read_ops(Path(carried))
        if not old:
            return self.unsent()
        mine = self._read_pending()
        _write_ops(self.pending_path, old + [op for op in mine if op not in old])
        return self.flush()

    # -- machinery -----------------------------------------------------------------------
    def _do(self, op: dict[str, Any] | None) -> None:
        pending = self._read_pending()
        queue = pending + ([op] if op is not None else [])
        sent = 0
        for item in queue:
            if not self._send_with_retry(item, quick=bool(pending) and item is not op):
                break
            sent += 1
        rest = queue[sent:]
        if rest:
            _write_ops(self.pending_path, rest)
        elif self.pending_path.exists():
            self.pending_path.unlink()

    def _read_pending(self) -> list[dict[str, Any]]:
        ops = read_ops(self.pending_path)
        for op in ops:  # read from a checkpoint: the files it uploads are in that checkpoint
            rel = op.get("in_checkpoint")
            if rel and not Path(op["path"]).exists() and (self.pending_path.parent / rel).exists():
                op["path"] = str(self.pending_path.parent / rel)
        return ops

    def _send_with_retry(self, op: dict[str, Any], quick: bool = False) -> bool:
        delay = self.backoff
        for attempt in range(self.retries):
            try:
                self._send(op)
                return True
            except Exception as e:  # any transport or server error: wait and try again
                if op["op"] in OPTIONAL_OPS and attempt >= 1 and self._answers():
                    # failing twice while the server answers: the call itself fails, not the network
                    print(f"prunevision: warning: MLflow: trial {self.trial_id}: {OPTIONAL_OPS[op['op']]} "
                          f"({' '.join(str(e).split())[:300] or type(e).__name__})", file=sys.stderr, flush=True)
                    return True
                if attempt == self.retries - 1:
                    return False
                self.sleep(delay)
                delay = min(delay * 2, 8.0)
        return False

    def _answers(self) -> bool:
        try:
            self._client.get_run(self._ensure_run())
            return True
        except Exception:
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
                # epochs logged before the trial was cut off and not checkpointed run again: their
                # second results are not logged, so the history holds one point per epoch
                self.logged_upto = max((m.step for m in self._client.get_metric_history(self.run_id, "epoch")),
                                       default=0)
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
            if "epoch" in op["metrics"] and op["step"] <= self.logged_upto:
                return
            ms = [Metric(k, v, op["ts"], op["step"]) for k, v in op["metrics"].items()]
            for i in range(0, len(ms), 1000):
                self._client.log_batch(run_id, metrics=ms[i:i + 1000])
        elif kind == "artifact":
            self._client.log_artifact(run_id, op["path"], op.get("artifact_path"))
        elif kind == "input":
            from mlflow.entities import Dataset, DatasetInput, InputTag
            from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

            self._client.log_inputs(run_id, datasets=[DatasetInput(
                Dataset(**op["dataset"]), tags=[InputTag(MLFLOW_DATASET_CONTEXT, op["context"])])])
        elif kind == "model":
            self._log_model(run_id, Path(op["path"]), op["step"])
        elif kind == "end":
            self._client.set_terminated(run_id, status=op["status"])

    def _log_model(self, run_id: str, onnx_path: Path, step: int) -> None:
        import mlflow
        import mlflow.onnx
        import onnx
        from mlflow.entities import LoggedModelStatus

        onnx_model = onnx.load(str(onnx_path))  # a missing or damaged file fails here, before MLflow
        # a retry after a partial upload completes the model it created, never a second one
        mine = [m for m in self._client.search_logged_models([self.exp_id], filter_string=f"source_run_id = "
                                                             f"'{run_id}'") if m.tags.get(TRIAL_TAG) == self.trial_id]
        if any(m.status == LoggedModelStatus.READY for m in mine):
            return
        model = mine[0] if mine else self._client.create_logged_model(
            self.exp_id, name=self.trial_name, source_run_id=run_id, model_type="pruned-onnx",
            params=dict(list(self._client.get_run(run_id).data.params.items())[:500]),
            tags={TRIAL_TAG: self.trial_id})
        with use_tracking_uri(self.uri):  # log_model's own client and status update use it
            mlflow.onnx.log_model(onnx_model, model_id=model.model_id, run_id=run_id, step=step,
                                  signature=_onnx_signature(onnx_model),
                                  # the flavour's own requirements: inferring them costs a subprocess (2 s)
                                  pip_requirements=mlflow.onnx.get_default_pip_requirements())


def read_ops(path: Path) -> list[dict[str, Any]]:
    """The operations in a pending file; a line that is not a JSON object (a torn write) is skipped."""
    try:
        lines = path.read_text().splitlines()
    except (FileNotFoundError, NotADirectoryError):
        return []
    ops = []
    for line in lines:
        try:
            op = json.loads(line)
        except ValueError:
            continue
        if isinstance(op, dict) and isinstance(op.get("op"), str):
            ops.append(op)
    return ops


def _write_ops(path: Path, ops: list[dict[str, Any]]) -> None:
    atomic_write(path, "".join(json.dumps(x) + "\n" for x in ops))


def send_carried(settings: dict[str, Any], checkpoints: list[tuple[str, str, Path]],
                 log: Callable[[str], None] | None = None) -> int:
    """Send what finished trials could not send to MLflow, from the pending files their final
    checkpoints carry: ``checkpoints`` holds (trial id, trial name, checkpoint folder) on a local
    filesystem. Returns how many operations are still unsent (they stay in the checkpoints)."""
    left = 0
    for trial_id, name, folder in checkpoints:
        if not (Path(folder) / PENDING_FILE).is_file():
            continue
        logger = TrialLogger(settings["tracking_uri"], settings["experiment_id"], settings["parent_run_id"],
                             trial_id, name, Path(folder), retries=2)
        n = logger.flush()
        if log:
            log(f"MLflow: trial {trial_id}: {'sent what it could not send' if n == 0 else f'{n} operation(s) unsent'}")
        left += n
    return left


@contextmanager
def use_tracking_uri(uri: str):
    """MLflow's process-wide tracking URI (and the MLFLOW_TRACKING_URI it sets) for a while, then
    exactly as before: the process may be a Ray worker or a test that reads its own settings."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    old_uri, old_env = getattr(tracking_utils, "_tracking_uri", None), os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old_uri)
        if old_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_env


def _onnx_signature(onnx_model):
    """The model's input and output tensors (a dynamic dimension as -1), for the MLflow model."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec
    from onnx import helper

    def spec(values):
        return Schema([TensorSpec(np.dtype(helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)),
                                  tuple(d.dim_value or -1 for d in v.type.tensor_type.shape.dim), v.name)
                       for v in values])

    return ModelSignature(inputs=spec(onnx_model.graph.input), outputs=spec(onnx_model.graph.output))

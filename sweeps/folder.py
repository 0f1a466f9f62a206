"""The sweep folder's layout and its own record, shared by the sweep layer and the analysis above it.

``<storage>/<name>/`` holds Ray's experiment (a folder per trial with ``result.json`` and its
checkpoints), the Optuna study (``optuna.db``) and ``prunevision_sweep.json`` (:func:`read_state`:
the base config, the search space, the run settings and the MLflow run ids; JSON, never a pickle).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

STATE_FILE = "prunevision_sweep.json"
STUDY_FILE = "optuna.db"
FINAL_KEY = "trial_final"  # marks a trial's last result: pruned, measured and exported
# Optuna user attributes linking the study to Ray's trials (resume reads them; no pickles)
RAY_TRIAL_ATTR = "ray_trial_id"
RESUME_ATTR = "resume_of"
RESUME_KEY = "_resume_of"  # in a trial's config: the Ray trial (moved aside) whose checkpoint it continues from
MLFLOW_TRIAL_KEY = "_mlflow_trial"  # in a trial's config: the trial id of the MLflow child run it logs to
INTERRUPTED_DIR = ".interrupted"  # where resume moves the folders of the trials it restarts


def last_result(path: str | Path) -> dict[str, Any]:
    """The last complete JSON line of a Ray ``result.json`` (a line cut short by a killed trial is
    skipped; no file: empty)."""
    last: dict[str, Any] = {}
    path = Path(path)
    if not path.is_file():
        return last
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                last = json.loads(line)
            except ValueError:
                continue
    return last


def ray_statuses(sweep_dir: Path) -> dict[str, dict[str, Any]]:
    """trial_id → {status, num_failures, logdir} from Ray's newest experiment state (JSON fields only,
    never its pickles)."""
    files = sorted(sweep_dir.glob("experiment_state-*.json"))
    if not files:
        return {}
    try:
        data = json.loads(files[-1].read_text())
    except ValueError:
        return {}
    out = {}
    for entry in data.get("trial_data", []):
        try:
            meta = json.loads(entry[0]) if isinstance(entry[0], str) else entry[0]
            run = json.loads(entry[1]) if isinstance(entry[1], str) else entry[1]
        except (ValueError, IndexError, TypeError):
            continue
        out[meta.get("trial_id")] = {"status": meta.get("status"), "logdir": meta.get("relative_logdir"),
                                     "num_failures": (run or {}).get("num_failures", 0)}
    return out


def ray_trial_id(last: dict[str, Any], statuses: dict[str, dict[str, Any]], trial_dir: Path) -> str | None:
    """A trial folder's Ray trial id: from its last result, else (a trial that reported nothing yet)
    from Ray's record of the folder (:func:`ray_statuses`)."""
    return last.get("trial_id") or next((k for k, v in statuses.items() if v.get("logdir") == trial_dir.name), None)


def trial_status(last: dict[str, Any], ray_status: str | None) -> str:
    """One of ``complete``, ``error``, ``stopped`` (ended by the scheduler before pruning and
    measurement), ``pending`` or ``running``: from a trial's last result and Ray's status for it."""
    if last.get(FINAL_KEY):
        return "complete"
    if ray_status == "ERROR":
        return "error"
    if ray_status == "TERMINATED":
        return "stopped"
    if ray_status == "PENDING" and not last:
        return "pending"
    return "running"


def interrupted_checkpoint(sweep_dir: str | Path, ray_trial_id: str) -> Path | None:
    """The newest epoch checkpoint (``checkpoint_*/checkpoint.pt``) Ray persisted for a trial that
    ``sweep resume`` moved aside."""
    ckpts = sorted(Path(sweep_dir, INTERRUPTED_DIR).glob(f"*_{ray_trial_id}_*/checkpoint_*/checkpoint.pt"),
                   key=lambda p: p.parent.name)
    return ckpts[-1] if ckpts else None


class SweepDataError(ValueError):
    """The sweep folder, study or MLflow run cannot be read."""


def read_state(sweep_dir: str | Path) -> dict[str, Any]:
    """The sweep's own record (``prunevision_sweep.json``), written before Ray started."""
    p = Path(sweep_dir) / STATE_FILE
    if not p.is_file():
        raise SweepDataError(f"{sweep_dir} is not a prunevision sweep folder (no {STATE_FILE})")
    try:
        state = json.loads(p.read_text())
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise SweepDataError(f"{p} is damaged (not JSON)") from None
    except OSError as e:
        raise SweepDataError(f"cannot read {p}: {e.strerror or e}") from None
    problem = _state_problem(state)
    if problem:
        raise SweepDataError(f"{p} is damaged: {problem}")
    return state


# what every reader of prunevision_sweep.json relies on: key → type (a tuple: one of these);
# keys marked optional may be missing (older sweep files), but not of another type
_STATE_SCHEMA: dict[str, Any] = {
    "name": str, "sweep_dir": (str, "optional"), "storage": (str, "optional"), "base": (dict, "optional"),
    "source": (dict, "optional"),
    "settings": {"tracking_uri": str, "experiment_id": str, "parent_run_id": str},
    "run": {"objectives": dict, "num_samples": int, "max_concurrent": (int, "optional"), "sampler": (str, "optional"),
            "seed": (int, "optional"), "resources": (dict, "optional"), "max_failures": (int, "optional")},
}


def _state_problem(state: Any, schema: dict[str, Any] = _STATE_SCHEMA, where: str = "") -> str | None:
    """What is wrong with a sweep's state record (None: nothing)."""
    if not isinstance(state, dict):
        return f"{where or 'the file'} is not a JSON object"
    for key, want in schema.items():
        name = f"{where}{key}"
        if isinstance(want, dict):
            problem = _state_problem(state.get(key), want, f"{name}.") if key in state else f"no {name!r}"
            if problem:
                return problem
            continue
        optional = isinstance(want, tuple)
        tp = want[0] if optional else want
        if key not in state:
            if not optional:
                return f"no {name!r}"
            continue
        v = state[key]
        if not isinstance(v, tp) or isinstance(v, bool) or (tp is str and not v):
            return f"{name!r} is {str(v)[:40]!r}, not a {'non-empty string' if tp is str else tp.__name__}"
    if where:
        return None
    objectives = state["run"]["objectives"]
    if not objectives or not all(isinstance(k, str) and v in ("max", "min") for k, v in objectives.items()):
        return "'run.objectives' must map metric names to max or min"
    return None

"""Writing results safely: atomic files, a checked and locked output folder.

Every file prunevision writes goes through :func:`atomic_write`: the bytes go to a temporary
file in the same folder, which then replaces the target in one ``os.replace``. A full disk or a
killed process leaves the previous file as it was (and no half-written one). A run's output
folder is claimed with :func:`claim_run_folder`: checked writable before any work, locked for
the run (a second run into the same folder stops at once), and a finished run in it is kept
unless the user asks to replace it.
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LOCK_FILE = ".prunevision.lock"


class OutputError(RuntimeError):
    """An output cannot be written: not a folder, not writable, full, or in use by another run."""


def _reason(e: OSError) -> str:
    return e.strerror or (os.strerror(e.errno) if e.errno else str(e))


def require_file(path: str | Path, what: str, error: type[Exception], kind: str = "a file") -> Path:
    """``path`` when it is a regular file (or a link to one), else one line in ``error``: not found, a
    folder, or something else (a fifo, socket or device, which reading could block on, is never opened).
    ``what`` names the file for the user ("config file", "checkpoint"), ``kind`` what a folder is not."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        raise error(f"{what} {path} is a folder, not {kind}")
    if path.exists():
        raise error(f"{what} {path} is not a regular file")
    raise error(f"{what} not found: {path}")


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` all at once: a temporary file beside it, flushed to disk, then
    renamed over it. On any failure the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {_reason(e)}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OutputError(f"cannot write {path}: {_reason(e)}") from None
        raise
    return path


def save_figure(fig, path: str | Path, **kwargs) -> Path:
    """A matplotlib figure, written atomically (format from the file's suffix)."""
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".") or "png", **kwargs)
    return atomic_write(path, buf.getvalue())


def check_writable_dir(path: str | Path, what: str = "output folder") -> Path:
    """Stop with one line, before any work, when ``path`` cannot become a folder we can write:
    it (or a folder above it) is a regular file, or the nearest existing folder is read-only.
    Creates nothing when ``path`` does not exist yet."""
    path = Path(path).expanduser()
    probe = path
    while not probe.exists() and not probe.is_symlink():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "is" if probe == path else f"is under {probe}, which is"
        raise OutputError(f"{what} {path} {where} a file, not a folder")
    if probe.is_symlink() and not probe.exists():
        raise OutputError(f"{what} {path}: {probe} is a broken symbolic link")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".write-test-", dir=probe)
    except OSError as e:
        raise OutputError(f"{what} {path} is not writable ({probe}: {_reason(e)})") from None
    os.close(fd)
    os.unlink(tmp)
    return path


def ensure_dir(path: str | Path, what: str = "output folder") -> Path:
    """``path`` as a folder (created with its parents), or one line saying why it cannot be."""
    path = check_writable_dir(path, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {what} {path}: {_reason(e)}") from None
    return path


@contextmanager
def locked_folder(path: str | Path, what: str = "output folder",
                  busy: str = "{path} is being written by another run (pid {pid})",
                  error: type[Exception] = OutputError) -> Iterator[Path]:
    """Create ``path`` if needed and hold an exclusive lock on it (``flock`` on a lock file in
    it) for the ``with`` block. A second holder gets one line, ``error(busy)``, naming the first
    one's pid."""
    path = ensure_dir(path, what)
    try:
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise OutputError(f"cannot create {what} {path}: {_reason(e)}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputError(f"cannot lock {what} {path}: {_reason(e)}") from None
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise error(busy.format(path=path, pid=pid)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race a waiting run)


class RunFolder:
    """A locked output folder of one run. :meth:`begin` is called once the run is known to be
    valid, before its first file is written: with ``overwrite`` it removes the previous run's
    outputs (its ``metrics.json`` first, so an interrupted clean-up never looks finished)."""

    def __init__(self, path: Path, outputs: tuple[str, ...], clear: bool, keep: Iterable[Path] = ()):
        self.path, self.outputs, self.clear = path, outputs, clear
        self.keep = {p.resolve() for p in keep}
        self._begun = False

    def begin(self) -> None:
        if self._begun:
            return
        self._begun = True
        if not self.clear:
            return
        for name in self.outputs:
            p = self.path / name
            if p.resolve() in self.keep:
                continue
            try:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink(missing_ok=True)
            except OSError as e:
                raise OutputError(f"cannot remove the previous run's {p}: {_reason(e)}") from None


def _checkpoint_file(p: str | Path | None) -> Path | None:
    if p is None:
        return None
    p = Path(p)
    return p / "checkpoint.pt" if p.is_dir() else p


@contextmanager
def claim_run_folder(path: str | Path, outputs: tuple[str, ...], *, finished: str, overwrite: bool = False,
                     resume: str | Path | None = None, source: str | Path | None = None,
                     hint: str = "") -> Iterator[RunFolder]:
    """Lock ``path`` for a run that writes ``outputs`` (``finished``: the file a finished run
    has). Refuses, unless ``overwrite``, a folder that holds another run's outputs: a finished
    run, or an unfinished one that ``resume`` does not continue in place (``hint`` says how to
    continue it). The checkpoint the run reads (``resume`` or ``source``) is never removed."""
    with locked_folder(path) as out:
        present = [n for n in outputs if (out / n).exists()]
        resume_file, source_file = _checkpoint_file(resume), _checkpoint_file(source)
        in_place = resume_file is not None and resume_file.resolve().parent == out.resolve()
        if present and not overwrite:
            if finished in present:
                raise OutputError(f"{out} already holds a finished run ({finished}); choose another --out, or pass "
                                  "--overwrite to replace it")
            if not in_place:
                raise OutputError(f"{out} holds an unfinished run ({', '.join(present[:3])}){hint}; choose another "
                                  "--out, or pass --overwrite to start over")
        yield RunFolder(out, outputs, clear=overwrite and bool(present),
                        keep=[p for p in (resume_file, source_file) if p is not None])


def write_json(path: str | Path, obj: Any) -> None:
    """``obj`` as indented JSON, written atomically (NaN and inf as null)."""
    atomic_write(path, json.dumps(_finite(obj), indent=2))


def _finite(o: Any) -> Any:
    """NaN/inf become null: metrics.json stays valid JSON."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o

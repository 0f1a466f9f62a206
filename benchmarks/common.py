"""What every benchmark script shares: the machine's description, the commit, and appending a
dated section (figures, exact command, machine, date, commit) to benchmarks/RESULTS.md."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f", GPU {torch.cuda.get_device_name(0)}"
    except Exception:
        pass
    return f"{model}, {os.cpu_count()} cores{gpu}"


def commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":!benchmarks/results", ":!benchmarks/RESULTS.md"],  # our own outputs
                               cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("+uncommitted changes" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def command_line() -> str:
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(ROOT)
    except ValueError:
        pass
    return ".venv/bin/python " + " ".join(shlex.quote(a) for a in [str(script), *sys.argv[1:]])


def md_table(rows: list[dict], cols: list[str], headers: list[str] | None = None) -> str:
    head = "| " + " | ".join(headers or cols) + " |"
    sep = "|" + " --- |" * len(cols)
    body = ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def append_results(title: str, body: str, path: str | Path | None = RESULTS_MD) -> None:
    """Append one dated section; ``path=None`` appends nothing (smoke tests pass a temp file)."""
    if path is None:
        return
    header = (f"\n## {title} — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n"
              f"    {command_line()}\n\nMachine: {machine()}; commit {commit()}.\n\n")
    with open(path, "a") as f:
        f.write(header + body.rstrip() + "\n")
    print(f"appended to {path}")


def write_raw(path: str | Path, base: dict, runs: list[dict]) -> None:
    """The raw runs of a benchmark as JSON, with the date, the machine and the base config."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": machine(), "base": base,
                                      "runs": runs}, indent=2, default=str))


def run_main(main) -> int:
    """Run a benchmark's ``main``: a configuration or dataset problem (a missing or corrupt dataset, an
    unknown key, a value out of range) is one line on stderr and exit status 2, not a traceback."""
    from prunevision.config import ConfigError
    from prunevision.data import DatasetError

    try:
        return main()
    except (ConfigError, DatasetError) as e:
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        return 2

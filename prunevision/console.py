"""Console output that shows up at once, also when stdout is a file or a pipe (CI, Ray logs)."""

from __future__ import annotations


def echo(message: str) -> None:
    print(message, flush=True)

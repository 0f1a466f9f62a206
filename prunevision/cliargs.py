"""Command-line pieces shared by every layer's commands and the benchmarks."""

from __future__ import annotations

import argparse


class _KeyValues(argparse.Action):
    """``--set a=1 b=2`` and ``--set a=1 --set b=2`` both add to one list of KEY=VALUE strings."""

    def __call__(self, parser, namespace, values, option_string=None):
        for item in values:
            if "=" not in item:
                parser.error(f"{option_string} expects KEY=VALUE pairs, got {item!r} (arguments without a "
                             f"--flag go before {option_string}, or after --)")
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), *values])


def add_set_argument(p: argparse.ArgumentParser | argparse._ArgumentGroup, help: str) -> None:
    """The ``--set KEY=VALUE [KEY=VALUE ...]`` option (repeatable) every command with overrides uses;
    the pairs land in ``args.overrides``, in order (a later pair for the same key wins)."""
    p.add_argument("--set", dest="overrides", action=_KeyValues, nargs="+", default=[], metavar="KEY=VALUE",
                   help=f"{help}; several pairs per --set, and --set repeats")

"""report.md and one self-contained report.html (images inlined, the 3-D view embedded)."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.results import CONFIG_PREFIX
from prunevision.fsutil import atomic_write


def _fmt(v: Any, col: str = "") -> str:
    if v is None or (isinstance(v, float) and pd.isna(v)):
        return "–"
    if isinstance(v, (bool,)):
        return "yes" if v else "no"
    if isinstance(v, float):
        if col in ("accuracy", "accuracy_dense", "val_accuracy", "val_accuracy_dense", "param_sparsity",
                   "gate_sparsity") or col.startswith("per_class"):
            return f"{100 * v:.2f} %"
        if col.startswith("latency_ms"):
            return f"{v:.4f}"
        if col in ("latency_speedup", "macs_reduction"):
            return f"{v:.2f}×"
        return f"{v:.4g}"
    return str(v)


def _cell(r: dict[str, Any], col: str) -> str:
    """A table cell; a speed-up comes with its spread over the timing rounds where it is known."""
    from prunevision.metrics import format_speedup  # lazily: prunevision imports torch

    v = r.get(col)
    lo, hi = r.get(f"{col}_lo"), r.get(f"{col}_hi")
    if col == "latency_speedup" and isinstance(v, float) and not pd.isna(v) and lo is not None and hi is not None:
        return format_speedup(v, float(lo), float(hi))
    return _fmt(v, col)


def table_md(rows: list[dict[str, Any]], cols: list[str], headers: list[str] | None = None) -> str:
    headers = headers or cols
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(_cell(r, c).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(out)


def table_html(rows: list[dict[str, Any]], cols: list[str], headers: list[str] | None = None) -> str:
    headers = headers or cols
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c), c))}</td>" for c in cols) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;color:#222;
line-height:1.45;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0;display:block;overflow-x:auto}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:right;white-space:nowrap}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #eee;margin:.4em 0}code,pre{background:#f6f8fa;padding:.1em .3em}
pre{padding:.6em;overflow-x:auto}.note{color:#555;font-size:.9em}
"""


class Report:
    """Sections written once into both formats."""

    def __init__(self, title: str, out_dir: Path):
        self.title, self.out = title, out_dir
        self.md: list[str] = [f"# {title}", ""]
        self.html: list[str] = [f"<h1>{html.escape(title)}</h1>"]

    def heading(self, text: str) -> None:
        self.md += [f"## {text}", ""]
        self.html.append(f"<h2>{html.escape(text)}</h2>")

    def para(self, text: str, note: bool = False) -> None:
        self.md += [f"*{text}*" if note else text, ""]
        self.html.append(f"<p class='note'>{html.escape(text)}</p>" if note else f"<p>{html.escape(text)}</p>")

    def bullets(self, items: list[str]) -> None:
        self.md += [f"- {i}" for i in items] + [""]
        self.html.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>")

    def code(self, text: str) -> None:
        self.md += ["```", text, "```", ""]
        self.html.append(f"<pre>{html.escape(text)}</pre>")

    def table(self, rows: list[dict[str, Any]], cols: list[str], headers: list[str] | None = None) -> None:
        self.md += [table_md(rows, cols, headers), ""]
        self.html.append(table_html(rows, cols, headers))

    def image(self, path: Path | None, caption: str) -> None:
        if path is None or not Path(path).is_file():
            return
        rel = Path(path).relative_to(self.out) if Path(path).is_relative_to(self.out) else Path(path)
        self.md += [f"![{caption}]({rel.as_posix()})", f"*{caption}*", ""]
        data = base64.b64encode(Path(path).read_bytes()).decode()
        self.html.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption class='note'>{html.escape(caption)}</figcaption></figure>")

    def embed_html(self, path: Path | None, caption: str) -> None:
        """A plotly page inlined in an iframe (srcdoc), so report.html needs no other file."""
        if path is None or not Path(path).is_file():
            return
        rel = Path(path).relative_to(self.out)
        self.md += [f"Interactive 3-D view: [{rel.as_posix()}]({rel.as_posix()})", ""]
        doc = html.escape(Path(path).read_text(), quote=True)
        self.html.append(f"<figure><iframe srcdoc=\"{doc}\" style='width:100%;height:680px;border:1px solid #eee'>"
                         f"</iframe><figcaption class='note'>{html.escape(caption)}</figcaption></figure>")

    def write(self) -> tuple[Path, Path]:
        md = self.out / "report.md"
        atomic_write(md, "\n".join(self.md))
        page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{CSS}</style></head><body>{''.join(self.html)}</body></html>")
        h = self.out / "report.html"
        atomic_write(h, page)
        return md, h


def plain(v: Any) -> Any:
    """A numpy scalar as the Python value it holds (JSON-ready); anything else as it is."""
    return v.item() if isinstance(v, np.generic) else v


def config_of(row: pd.Series) -> dict[str, Any]:
    """The sampled parameters of a trial row, as plain Python values."""
    return {c[len(CONFIG_PREFIX):]: plain(row[c])
            for c in row.index if c.startswith(CONFIG_PREFIX) and pd.notna(row[c])}

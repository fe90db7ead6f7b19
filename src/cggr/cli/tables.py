"""The tables of the ``cggr`` command and the benchmark scripts, drawn by rich (a dependency of the ``bench`` and
``test`` extras): a Markdown pipe table for the ``.md`` files, a fixed-width one for the terminal.

Rows are dicts; the columns are their keys in order of first appearance unless given. Each cell is formatted
once by a ``fmt`` function (default :func:`cell`: 4 decimals for a float under 100, so held-out losses such as
7.9973 and 8.0972 stay apart), and the same strings go to the terminal and to the Markdown.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any


def cell(value: Any) -> str:
    """A table cell: ``–`` for ``None``, ``n/a`` for NaN, a float with 4 decimals (``,.1f`` from 100 on), an int
    with thousands separators, anything else as ``str``."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if value != value:  # NaN
            return "n/a"
        return f"{value:.4f}" if abs(value) < 100 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def columns_of(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Every key of ``rows``, in order of first appearance."""
    cols: list[str] = []
    for row in rows:
        cols += [k for k in row if k not in cols]
    return cols


def _rich():
    try:
        from rich import box
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text
    except ImportError as exc:
        raise ImportError("cggr's tables need rich: pip install 'cggr[bench]' (or pip install rich)") from exc
    return box, Console, Table, Text


def _render(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None, fmt: Callable[[Any], str], *,
            markdown: bool) -> str:
    box, Console, Table, Text = _rich()
    cols = list(columns) if columns is not None else columns_of(rows)

    def text(s: str) -> Any:  # rich Text: no markup parsing of cells such as "[+0.28, +0.90]"
        return Text(s.replace("|", "\\|") if markdown else s)

    table = Table(box=box.MARKDOWN if markdown else box.SIMPLE_HEAD, show_edge=markdown, header_style="",
                  highlight=False)
    for i, c in enumerate(cols):
        table.add_column(text(str(c)), justify="left" if i == 0 else "right", no_wrap=True)
    for r in rows:
        table.add_row(*(text(fmt(r.get(c))) for c in cols))
    out = io.StringIO()
    Console(file=out, width=1_000_000, color_system=None, force_terminal=False, force_jupyter=False,
            legacy_windows=False, emoji=False, markup=False, highlight=False).print(table)
    lines = [line.rstrip() for line in out.getvalue().splitlines()]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None,
                   fmt: Callable[[Any], str] = cell) -> str:
    """A Markdown pipe table of ``rows`` (``''`` when there are none); ``|`` inside a cell is escaped."""
    return _render(rows, columns, fmt, markdown=True) if rows else ""


def text_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None,
               fmt: Callable[[Any], str] = cell) -> str:
    """A fixed-width table for the terminal (a rule under the header, numbers right-aligned)."""
    return _render(rows, columns, fmt, markdown=False) if rows else ""


__all__ = ["cell", "columns_of", "markdown_table", "text_table"]

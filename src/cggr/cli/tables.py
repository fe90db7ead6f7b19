"""The tables of the ``cggr`` command and the benchmark scripts, drawn by rich (a dependency of the ``bench`` and
``test`` extras, and of transformers): a Markdown pipe table for the ``.md`` files, a fixed-width one for the
terminal. Where rich is not installed (a benchmark machine with torch alone) a plain writer draws the same cells.

Rows are dicts; the columns are their keys in order of first appearance unless given. Each cell is formatted
once by a ``fmt`` function (default :func:`cell`: 4 decimals for a float under 100, so held-out losses such as
7.9973 and 8.0972 stay apart), and the same strings go to the terminal and to the Markdown. A count averaged over
seeds (steps, sequences, tokens) goes in as :func:`count_cell` makes it: a count, not a loss.
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


def count_cell(mean: float | None) -> int | str | None:
    """A count averaged over seeds (steps, sequences, tokens) for a table cell or a label: an int (which
    :func:`cell` prints with thousands separators) when the mean is a whole number (every seed the same, or seeds
    that average to one: 752 and 754 give 753), else the mean with one decimal (``'51.3'``, ``'1,234.5'``) rather
    than :func:`cell`'s 4 decimals of a loss, or a whole number it is not. ``None`` stays ``None``."""
    if mean is None:
        return None
    return int(mean) if float(mean).is_integer() else f"{mean:,.1f}"


def count_over_seeds(values: Sequence[int | float]) -> int | str | None:
    """:func:`count_cell` of the mean of ``values`` (one count per seed); ``None`` without values."""
    return count_cell(sum(values) / len(values)) if values else None


def columns_of(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Every key of ``rows``, in order of first appearance."""
    cols: list[str] = []
    for row in rows:
        cols += [k for k in row if k not in cols]
    return cols


def _plain(header: list[str], body: list[list[str]], markdown: bool) -> str:
    """The same table without rich (only where it is not installed, e.g. a benchmark machine with torch alone):
    cells padded to their column's width, numbers right-aligned."""
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return ("| " + " | ".join(padded) + " |") if markdown else " " + "   ".join(padded)

    if markdown:
        rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    else:
        rule = "-" * (sum(widths) + 3 * len(widths) - 1)
    return "\n".join(line_.rstrip() for line_ in [line(header), rule, *map(line, body)])


def _render(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None, fmt: Callable[[Any], str], *,
            markdown: bool) -> str:
    cols = list(columns) if columns is not None else columns_of(rows)
    escape = (lambda s: s.replace("|", "\\|")) if markdown else (lambda s: s)
    header = [escape(str(c)) for c in cols]
    body = [[escape(fmt(r.get(c))) for c in cols] for r in rows]
    try:
        from rich import box
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text
    except ImportError:  # rich comes with the bench and test extras (and with transformers); a bare install: plain
        return _plain(header, body, markdown)

    table = Table(box=box.MARKDOWN if markdown else box.SIMPLE_HEAD, show_edge=markdown, header_style="",
                  highlight=False)
    for i, c in enumerate(header):  # rich Text: no markup parsing of cells such as "[+0.28, +0.90]"
        table.add_column(Text(c), justify="left" if i == 0 else "right", no_wrap=True)
    for cells in body:
        table.add_row(*map(Text, cells))
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


__all__ = ["cell", "columns_of", "count_cell", "count_over_seeds", "markdown_table", "text_table"]

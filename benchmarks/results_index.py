"""Write ``benchmarks/results/INDEX.md``: the file behind every result the README cites, and what else is kept.

    python benchmarks/results_index.py            # rewrite the index
    python benchmarks/results_index.py --check    # exit 1 if the committed index is out of date

The index has three parts, all generated from the files (edit the README or move files, then re-run):

* **Claims of the README**: every Markdown link of README.md into ``benchmarks/results/``, in README order, with the
  claim it backs (the first cell of its table row, or the bold lead of its paragraph), the file, and the device,
  date (UTC) and command of the run, read from the ``environment`` record of the result's JSON (``<stem>.json``
  beside the linked ``.md`` / ``.png`` / ``.log``; the first line of a log without one).
* **Other current results**: the files of ``benchmarks/results/<device>/`` that the README does not link, with the
  docs that cite them.
* **Archive**: superseded runs and test logs under ``benchmarks/results/<device>/archive/``. Each archived result
  gets an anchor (``INDEX.md#archive-<device>-<stem>``): the README cites an older run only through that anchor,
  never by its path, so that it links to current results only. :data:`SUPERSEDED_BY` names the run that replaced
  each archived one.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
INDEX = RESULTS / "INDEX.md"
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))

#: Archived result stem (``<device>/archive/<stem>``) -> the current result that replaced it (``<device>/<stem>``),
#: or a reason when nothing replaced it one for one (test logs).
SUPERSEDED_BY: dict[str, str] = {
    "cpu/race-default-xeon-2core": "cpu/race-default-xeon-2core-run4",
    "cpu/race-default-xeon-2core-run2": "cpu/race-default-xeon-2core-run4",
    "cpu/race-default-xeon-2core-run3": "cpu/race-default-xeon-2core-run4",
    "h200/cggr_model_run1": "h200/cggr_model",
    "h200/cggr_model_run2": "h200/cggr_model",
    "h200/cggr_model_run4_unfused_head": "h200/cggr_model",
    "h200/cggr_model_run5": "h200/cggr_model",
    "h200/moe_run1": "h200/moe",
    "h200/linear_ce_fused": "h200/linear_ce",
    "h200/linear_ce_fused_filter": "h200/linear_ce",
    "h200/linear_ce_split": "h200/linear_ce_split_s6",
    "h200/linear_ce_rerun": "h200/linear_ce",
    "h200/linear_ce_s6_run1": "h200/linear_ce",
    "h200/linear_ce_refactor_check": "h200/linear_ce",
    "h200/linear_ce_review_check": "h200/linear_ce",
    "h200/race-smollm-135m-h200-packages": "h200/race-smollm-135m-h200-packages-samehead",
}
#: Archived files that are test or verification logs rather than superseded runs (any ``gpu_tests*.log``, too).
LOG_REASON = "test / verification log of a past session"

_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*(?:<([^>]+)>|([^)\s]+))(?:\s+\"[^\"]*\")?\s*\)")


@dataclass
class Run:
    """What the result files say about the run that made them."""

    device: str = ""
    utc: str = ""
    command: str = ""


def stem(path: Path) -> str:
    """``race-x.md`` -> ``race-x``; ``moe_run1.breakdown.txt`` -> ``moe_run1``."""
    return path.name.split(".", 1)[0]


def rel(path: Path) -> str:
    return path.relative_to(RESULTS).as_posix()


def run_of(path: Path) -> Run:
    """Device, date and command of the run behind ``path``, from ``<stem>.json`` (its ``environment``)."""
    js = path.with_name(stem(path) + ".json")
    if js.is_file():
        try:
            record = json.loads(js.read_text())
        except json.JSONDecodeError:
            record = {}
        env = record.get("environment", {}) if isinstance(record, dict) else {}
        if isinstance(env, dict) and env:
            return Run(str(env.get("device", "")), str(env.get("utc", "")), str(env.get("command", "")))
        sources = record.get("sources") if isinstance(record, dict) else None
        if isinstance(sources, list) and sources:  # a table combined from other results (their runs: their rows)
            return Run(command="combined from " + ", ".join(Path(str(src)).name for src in sources))
    if path.suffix in (".log", ".txt") and path.is_file():
        first = path.read_text(errors="replace").splitlines()[:1]
        return Run(command=first[0].lstrip("# ").strip() if first else "")
    return Run()


def _cell(text: str, limit: int | None = None) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    if limit and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


def _code(text: str, limit: int = 160) -> str:
    text = _cell(text, limit)
    return f"`{text}`" if text else "—"


def _claim(lines: list[str], i: int, col: int) -> str:
    """The claim behind the link at column ``col`` of README line ``i``: a table row's first cell, an image's alt
    text, the bold lead of its paragraph, else the sentence of the paragraph that the link belongs to."""
    line = lines[i]
    if line.lstrip().startswith("|"):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        return cells[0] if cells else ""
    image = re.match(r"\s*!\[([^\]]*)\]", line)
    if image:
        return image.group(1)
    j = i
    while j > 0 and lines[j - 1].strip() and not lines[j - 1].lstrip().startswith(("#", "|", "```")):
        j -= 1
    lead = re.match(r"\s*\*\*(.+?)\*\*", lines[j])
    if lead:
        return lead.group(1)
    text = " ".join([*lines[j:i], lines[i][:col]])  # the paragraph up to the link
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # earlier links -> their text
    sentence = re.split(r"(?<=[.:;])\s+(?=[A-Z(`*])", text)[-1]
    return sentence.rstrip(" ([").strip()


def readme_results() -> list[tuple[str, str]]:
    """(claim, target relative to benchmarks/results/) of every README link into benchmarks/results/, in order."""
    lines = README.read_text().splitlines()
    out: list[tuple[str, str]] = []
    in_fence = False
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        masked = re.sub(r"`[^`\n]*`", lambda m: " " * len(m.group()), line)  # code spans hide no link
        for m in _LINK.finditer(masked):
            target = m.group(1) or m.group(2)
            if target.startswith("benchmarks/results/"):
                out.append((_claim(lines, i, m.start()), target[len("benchmarks/results/"):]))
    return out


def cited_by(path: Path) -> list[str]:
    """README / docs files that link to ``path`` directly."""
    names = []
    for doc in [README, *DOCS]:
        text = doc.read_text()
        for angled, bare in _LINK.findall(text):
            target = (angled or bare).partition("#")[0]
            if target and (doc.parent / target).resolve() == path.resolve():
                names.append(doc.relative_to(ROOT).as_posix())
                break
    return names


def archive_anchor(path: Path) -> str:
    """``h200/archive/moe_run1.md`` -> ``archive-h200-moe_run1``."""
    device = path.relative_to(RESULTS).parts[0]
    return f"archive-{device}-{stem(path)}"


def result_files() -> tuple[list[Path], list[Path]]:
    """(current files, archived files) under benchmarks/results/<device>/, sorted."""
    current, archived = [], []
    for path in sorted(RESULTS.rglob("*")):
        if not path.is_file() or path == INDEX:
            continue
        parts = path.relative_to(RESULTS).parts
        (archived if len(parts) > 2 and parts[1] == "archive" else current).append(path)
    return current, archived


def _by_stem(paths: list[Path]) -> dict[tuple[str, str], list[Path]]:
    groups: dict[tuple[str, str], list[Path]] = {}
    for p in paths:
        groups.setdefault((p.relative_to(RESULTS).parts[0], stem(p)), []).append(p)
    return groups


def _links(paths: list[Path]) -> str:
    return ", ".join(f"[{p.name}]({rel(p)})" for p in paths)


def render() -> str:
    current, archived = result_files()
    out = [
        "# Benchmark results: index",
        "",
        "Generated by `python benchmarks/results_index.py` from README.md and the files here; do not edit by hand.",
        "Device, date (UTC) and command come from each result's JSON (`environment`). Superseded runs and test logs",
        "are under `<device>/archive/` (last section); the README links to current results only.",
        "",
        "## Claims of the README",
        "",
        "| claim | file | device | date (UTC) | command |",
        "|---|---|---|---|---|",
    ]
    linked: set[tuple[str, str]] = set()  # (device, stem) of every run the README links
    missing: list[str] = []
    seen: set[tuple[str, str]] = set()
    for claim, target in readme_results():
        path = RESULTS / target.partition("#")[0]
        if target.startswith("INDEX.md") or (claim, target) in seen:
            continue  # an archived run cited as context (listed in the archive section), or a repeated link
        seen.add((claim, target))
        if not path.is_file():
            missing.append(target)
            out.append(f"| {_cell(claim, 100)} | `{target}` (**missing**) | | | |")
            continue
        key = (path.relative_to(RESULTS).parts[0], stem(path))
        linked.add(key)
        run = run_of(path)
        out.append(f"| {_cell(claim, 100)} | [{target}]({target}) | {_cell(run.device)} | {run.utc} | "
                   f"{_code(run.command)} |")

    out += ["", "## Other current results", "",
            "Runs none of whose files the README links; one row per run (`<stem>.json` / `.md` / `.png` / logs).", "",
            "| run | files | cited by | device | date (UTC) | command |", "|---|---|---|---|---|---|"]
    for (device, name), paths in _by_stem(current).items():
        if (device, name) in linked:
            continue
        run = run_of(paths[0])
        docs = sorted({d for p in paths for d in cited_by(p)})
        out.append(f"| {device}/{name} | {_links(paths)} | {', '.join(docs) or '—'} | {_cell(run.device)} | "
                   f"{run.utc} | {_code(run.command)} |")

    out += ["", "## Archive", "",
            "Superseded runs (a later run of the same benchmark replaced them) and test logs. The README cites an",
            "archived run only through its anchor here.", "",
            "| run | files | superseded by | cited by | device | date (UTC) | command |",
            "|---|---|---|---|---|---|---|"]
    readme = README.read_text()
    for (device, name), paths in _by_stem(archived).items():
        anchor = archive_anchor(paths[0])
        docs = sorted({d for p in paths for d in cited_by(p)})
        if f"INDEX.md#{anchor})" in readme:
            docs.insert(0, "README.md (this anchor)")
        run = run_of(paths[0])
        successor = SUPERSEDED_BY.get(f"{device}/{name}")
        if successor:
            hits = sorted(RESULTS.glob(successor + ".*"))
            md = [p for p in hits if p.suffix == ".md"] or hits
            why = f"[{successor}]({rel(md[0])})" if md else f"{successor} (**missing**)"
        else:
            why = LOG_REASON
        out.append(f"| <a id=\"{anchor}\"></a>{device}/{name} | {_links(paths)} | {why} | {', '.join(docs) or '—'} | "
                   f"{_cell(run.device)} | {run.utc} | {_code(run.command)} |")
    if missing:
        out += ["", "**Missing files linked from the README:** " + ", ".join(f"`{m}`" for m in missing)]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if INDEX.md differs from what would be written")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        if not INDEX.is_file() or INDEX.read_text() != text:
            print(f"{INDEX.relative_to(ROOT)} is out of date: run python benchmarks/results_index.py", file=sys.stderr)
            return 1
        return 0
    INDEX.write_text(text)
    print(f"wrote {INDEX.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Every relative link in README.md, docs/*.md and the results' Markdown (benchmarks/results/, INDEX.md included)
leads to a file of this repository, and to an anchor that exists.

Links are Markdown ``[text](target)`` and images ``![alt](target)``; web links (``http(s)://``, ``mailto:``) are
not followed. An anchor (``file.md#section``) must be a heading of the target file (GitHub's slugs) or an explicit
``<a id="...">`` in it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "benchmarks").rglob("*.md"))]

_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*(?:<([^>]+)>|([^)\s]+))(?:\s+\"[^\"]*\")?\s*\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", flags=re.S | re.M)


def links(text: str) -> list[str]:
    """Link targets of a Markdown text, outside fenced code blocks and inline code."""
    text = _FENCE.sub("", text)
    text = re.sub(r"`[^`\n]*`", "", text)
    return [angled or bare for angled, bare in _LINK.findall(text)]


def github_slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (except '-' and '_'), spaces to '-'."""
    text = re.sub(r"<[^>]+>", "", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = _FENCE.sub("", path.read_text())
    found: set[str] = set(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", text))
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, flags=re.M):
        slug = github_slug(heading)
        n = seen.get(slug, 0)
        found.add(slug if n == 0 else f"{slug}-{n}")
        seen[slug] = n + 1
    return found


def test_the_link_parser_sees_what_a_reader_sees():
    text = "a [x](a.md) ![img](b.png) [`c`](c.md#sec) [d](<d e.md>) `[no](no.md)`\n```\n[no](fence.md)\n```\n"
    assert links(text) == ["a.md", "b.png", "c.md#sec", "d e.md"]
    assert github_slug("One LM head for every arm: `--head`") == "one-lm-head-for-every-arm---head"
    assert github_slug("4.5 Selection rules") == "45-selection-rules"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc: Path):
    broken = []
    for target in links(doc.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.is_file():
            broken.append(f"{target}: no such file")
            continue
        if not dest.is_relative_to(ROOT):
            broken.append(f"{target}: outside the repository")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{doc.relative_to(ROOT)}:\n" + "\n".join(broken)

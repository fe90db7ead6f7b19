"""The text corpora of ``cggr race``: which documents a ``--data`` source is made of. No downloads.

A document is what the train / held-out split (:mod:`cggr.cli.split`) hashes and keeps whole: a file, a JSONL
line, or a ~100-line chunk of a single text file. Sources:

* ``code``: the ``.py`` files of the running Python's standard library (:func:`stdlib_documents`).
* ``code+packages``: the standard library plus every installed package's ``.py`` files
  (:func:`code_package_documents`).
* a path: a text file, a folder of text files or a JSONL file (:func:`path_documents`), or a glob pattern that is
  not an existing path (:func:`glob_documents`).

(The ``arithmetic`` source is generated, not read: :mod:`cggr.cli.arithmetic`.)
"""

from __future__ import annotations

import hashlib
import json
import os
import site
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cggr.cli.presets import CLIError

CODE_PACKAGES = "code+packages"
MAX_FILE_BYTES = 1_000_000  # code+packages: larger .py files are generated tables or data, not code
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass
class Document:
    key: str  # what the split hashes: relative path (+ part) of the document
    text: str


def stdlib_documents() -> tuple[Path, list[Document]]:
    """The ``.py`` files of this Python's standard library, sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _EXCLUDED_DIRS.intersection(rel.parts[:-1]):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip():
            docs.append(Document(rel.as_posix(), text))
    return root, docs


def path_documents(path: Path) -> list[Document]:
    """Documents from a text file, a folder of text files, or a JSONL file with a ``text`` field."""
    if not path.exists():
        raise CLIError(f"--data: path {str(path)!r} does not exist (expected 'code', 'arithmetic' or a path)")
    docs: list[Document] = []
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            try:
                text = file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if text.strip():
                docs.append(Document(file.relative_to(path).as_posix(), text))
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CLIError(f"--data: line {i + 1} of {str(path)!r} is not JSON ({exc.msg})") from exc
                text = record.get("text") if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise CLIError(f"--data: line {i + 1} of {str(path)!r} has no string field 'text'")
                if text.strip():
                    docs.append(Document(f"{i}:{text[:200]}", text))
    else:
        try:
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        except UnicodeDecodeError as exc:
            raise CLIError(f"--data: {str(path)!r} is not a UTF-8 text file") from exc
        for i in range(0, len(lines), 100):  # ~100-line documents, so a single file still splits
            text = "".join(lines[i : i + 100])
            if text.strip():
                docs.append(Document(f"{i}:{text[:200]}", text))
    return docs


def stdlib_root() -> Path:
    """The running Python's standard library folder (``sysconfig`` ``stdlib`` path)."""
    return Path(sysconfig.get_paths()["stdlib"])


def package_dirs() -> list[Path]:
    """The running interpreter's installed-package folders, in import priority order, each once.

    ``site-packages`` / ``dist-packages`` entries of ``sys.path`` first, then ``site.getsitepackages()``, the
    user site (when enabled) and ``sysconfig``'s ``purelib`` / ``platlib``; folders that do not exist are dropped,
    and two names of one folder (symlinks) count once.
    """
    paths = sysconfig.get_paths()
    candidates = [p for p in sys.path if p and Path(p).name in ("site-packages", "dist-packages")]
    candidates += site.getsitepackages()
    if site.ENABLE_USER_SITE:
        candidates.append(site.getusersitepackages())
    candidates += [paths["purelib"], paths["platlib"]]
    out: list[Path] = []
    seen: set[str] = set()
    for candidate in candidates:
        real = os.path.realpath(candidate)
        if real not in seen and os.path.isdir(real):
            seen.add(real)
            out.append(Path(candidate))
    return out


def _walk_py(root: Path) -> list[str]:
    """Relative POSIX paths of the ``.py`` files under ``root``, sorted; folders in ``_EXCLUDED_DIRS`` and
    symlinked folders are not entered (so a symlink loop cannot recurse)."""
    rels: list[str] = []
    for folder, dirs, files in os.walk(root):  # followlinks=False
        dirs[:] = [d for d in dirs if d not in _EXCLUDED_DIRS]
        base = Path(folder).relative_to(root)
        rels.extend((base / name).as_posix() for name in files if name.endswith(".py"))
    return sorted(rels)


def _read_source(path: Path, max_bytes: int) -> tuple[str | None, str]:
    """(text, '') or (None, why skipped): 'too_large', 'unreadable', 'not_utf8' or 'empty'."""
    try:
        if path.stat().st_size > max_bytes:
            return None, "too_large"
        raw = path.read_bytes()
    except OSError:
        return None, "unreadable"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not_utf8"
    return (text, "") if text.strip() else (None, "empty")


def code_package_documents(*, max_file_bytes: int = MAX_FILE_BYTES) -> tuple[list[Document], dict[str, Any]]:
    """The ``code+packages`` corpus: standard library then installed packages, and a description of it.

    Documents are keyed ``stdlib/<rel>`` (relative to :func:`stdlib_root`, package folders excluded as for
    ``code``) and ``packages/<rel>`` (relative to their folder in :func:`package_dirs`), in sorted order per
    folder. Skipped, and counted: files over ``max_file_bytes``, unreadable, not UTF-8 or blank; files
    byte-identical to one already taken (vendored copies: they would leak across the split); and a relative path
    already found in an earlier package folder (``shadowed``, as for imports).

    Returns:
        (documents, info) with info's ``origin``, ``parts`` (documents and characters from ``stdlib`` and
        ``packages``, and their folders), ``skipped`` (counts by reason) and ``max_file_bytes``.

    Raises:
        ValueError: ``max_file_bytes`` is not a positive integer.
        CLIError: No package documents were found.
    """
    if isinstance(max_file_bytes, bool) or not isinstance(max_file_bytes, int) or max_file_bytes < 1:
        raise ValueError(f"max_file_bytes must be a positive integer, got {max_file_bytes!r}")
    stdlib, roots = stdlib_root(), package_dirs()
    skipped = dict.fromkeys(("too_large", "not_utf8", "empty", "unreadable", "duplicate", "shadowed"), 0)
    parts: dict[str, dict[str, Any]] = {
        "stdlib": {"folders": [str(stdlib)], "documents": 0, "characters": 0},
        "packages": {"folders": [str(r) for r in roots], "documents": 0, "characters": 0},
    }
    docs: list[Document] = []
    keys: set[str] = set()
    contents: set[bytes] = set()
    with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) + 4)) as pool:
        for part, root in [("stdlib", stdlib)] + [("packages", r) for r in roots]:
            found = _walk_py(root)
            rels = [rel for rel in found if f"{part}/{rel}" not in keys]
            skipped["shadowed"] += len(found) - len(rels)
            keys.update(f"{part}/{rel}" for rel in rels)
            read = pool.map(_read_source, [root / rel for rel in rels], [max_file_bytes] * len(rels))
            for rel, (text, why) in zip(rels, read):
                if text is None:
                    skipped[why] += 1
                    continue
                digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
                if digest in contents:
                    skipped["duplicate"] += 1
                    continue
                contents.add(digest)
                docs.append(Document(f"{part}/{rel}", text))
                parts[part]["documents"] += 1
                parts[part]["characters"] += len(text)
    if not parts["packages"]["documents"]:
        raise CLIError(f"--data {CODE_PACKAGES}: no installed-package .py files found in "
                       f"{[str(r) for r in roots]} (use --data code for the standard library alone)")
    origin = (f"Python {sysconfig.get_python_version()} standard library ({stdlib}) + installed packages "
              f"({', '.join(map(str, roots))})")
    return docs, {"origin": origin, "parts": parts, "skipped": skipped, "max_file_bytes": max_file_bytes}


def _has_wildcard(text: str) -> bool:
    return any(c in text for c in "*?[")


def glob_documents(pattern: str) -> tuple[str, list[Document]]:
    """The text files matching a glob ``pattern`` (``**`` recursive; symlinked folders not entered), keyed by
    their path relative to the folder before the first wildcard; files that are not UTF-8 are skipped.

    Returns:
        (the pattern with its folder made absolute, documents in sorted path order).
    """
    parts = Path(pattern).expanduser().parts
    first = next(i for i, part in enumerate(parts) if _has_wildcard(part))
    root = Path(*parts[:first]) if first else Path(".")
    if not root.is_dir():
        raise CLIError(f"--data: folder {str(root)!r} of the pattern {pattern!r} does not exist")
    root, rest = root.resolve(), str(Path(*parts[first:]))
    docs: list[Document] = []
    for file in sorted(p for p in root.glob(rest) if p.is_file()):
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip():
            docs.append(Document(file.relative_to(root).as_posix(), text))
    return str(root / rest), docs


def source_documents(source: str) -> tuple[str, list[Document], dict[str, Any]]:
    """The documents of a text ``--data`` source: ``'code'``, ``'code+packages'``, a glob pattern that is not an
    existing path, or a path (file, folder, JSONL).

    Returns:
        (origin: where the documents came from, in words (recorded in the results and in the cache key),
        documents, extra data-info entries: ``code+packages``'s ``parts``, ``skipped`` and ``max_file_bytes``,
        else empty).

    Raises:
        CLIError: ``code`` finds no ``.py`` file; a path that does not exist; see also :func:`path_documents`,
            :func:`glob_documents` and :func:`code_package_documents`.
    """
    corpus: dict[str, Any] = {}
    if source == "code":
        root, docs = stdlib_documents()
        origin = f"Python {sysconfig.get_python_version()} standard library ({root})"
        if not docs:
            raise CLIError(f"--data code: no .py files found under {str(root)!r}")
    elif source == CODE_PACKAGES:
        docs, corpus = code_package_documents()
        origin = corpus.pop("origin")
    elif _has_wildcard(source) and not Path(source).expanduser().exists():
        origin, docs = glob_documents(source)
    else:
        path = Path(source).expanduser().resolve()
        docs = path_documents(path)
        origin = str(path)
    return origin, docs, corpus


__all__ = ["CODE_PACKAGES", "MAX_FILE_BYTES", "Document", "code_package_documents", "glob_documents",
           "package_dirs", "path_documents", "source_documents", "stdlib_documents", "stdlib_root"]

"""Data for ``cggr race``: corpora, tokenizer, train / held-out split, batches in a fixed order. No downloads.

Shape legend: T tokens per sequence; N_train / N_eval sequences.

Sources (``--data``):

* ``code`` (default): the ``.py`` files of the running Python's standard library, its own test suite included
  (``sysconfig`` ``stdlib`` path; ``site-packages`` and ``dist-packages`` excluded): ~30 MB of real code for
  CPython 3.11, ~9M tokens with a 4k vocabulary.
* ``code+packages``: the same standard library plus the ``.py`` files of every installed package (the
  interpreter's ``site-packages`` / ``dist-packages`` folders), for races that would otherwise repeat ``code``
  many times (GPU presets): keys ``stdlib/<rel>`` and ``packages/<rel>``; files over 1 MB (generated tables),
  not UTF-8, empty, byte-identical to one already read (vendored copies) or shadowed by the same relative path
  in an earlier package folder are skipped and counted in the data info.
* ``arithmetic``: generated GSM8K-style word problems (:mod:`cggr.cli.arithmetic`), one problem per sequence,
  padded; held-out accuracy by greedy decoding.
* a path: a text file, a folder of text files (recursively; files that are not UTF-8 are skipped), or a
  ``.jsonl`` file whose lines are objects with a ``text`` field; or a glob pattern that is not an existing path,
  e.g. ``'~/src/**/*.py'``: its matching files, keyed relative to the folder before the first wildcard.

Split: by document (file, JSONL line, or ~100-line chunk of a single text file), held out iff a SHA-256 of its
key (relative path / line number and content) falls in the held-out 10%, so nothing of a held-out document is
ever trained on. Tokenizer: byte-level BPE (digits split individually) trained on the training split (at most
8M characters of it, spread over the files) with the ``tokenizers`` library, cached with the token ids under
``$CGGR_CACHE_DIR`` or ``$XDG_CACHE_HOME/cggr`` or ``~/.cache/cggr``, keyed by a hash of the settings and of
every document (key, length, content hash). A pretrained ``--model`` folder brings its own tokenizer instead.

Code and text documents are joined with an end-of-text token and cut into blocks of T tokens (every token is a
target). Held-out set (:func:`select_heldout_blocks`): the held-out documents' blocks, each attributed to the
document it starts in, at most ``max_blocks_per_file`` per document, picked breadth first (one block of every
document before a second of any) so that no single file dominates; each block is labelled ``code``, ``tests``
or ``prose`` (:func:`block_group`) so that the race can report the three separately. The training order is a
seeded permutation of the blocks, reshuffled every epoch (:class:`BatchStream`); every arm of a race draws from an
identical stream.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import site
import sys
import sysconfig
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cggr.cli.arithmetic import Problem, generate_split, is_heldout_text
from cggr.cli.presets import CLIError

EOS = "<|endoftext|>"
HELDOUT_PERCENT = 10
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_CACHE_VERSION = 1
CODE_PACKAGES = "code+packages"
MAX_FILE_BYTES = 1_000_000  # code+packages: larger .py files are generated tables or data, not code
_ENCODE_CHUNK_CHARS = 4_000_000  # characters per tokenizer call: parallel enough, bounded memory


def cache_dir() -> Path:
    """Where tokenizers and token ids are cached (created on demand)."""
    root = os.environ.get("CGGR_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "cggr"


# ----------------------------------------------------------------------------------------------- tokenizers
class TextTokenizer:
    """The few operations the race needs, over a ``tokenizers.Tokenizer`` or a transformers tokenizer."""

    def __init__(self, backend: Any, *, eos_id: int, vocab_size: int, kind: str) -> None:
        self.backend, self.eos_id, self.vocab_size, self.kind = backend, int(eos_id), int(vocab_size), kind

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        if self.kind == "bpe":  # encode_batch_fast (tokenizers >= 0.21): the same ids, no offsets computed
            encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
            return [e.ids for e in encode(list(texts))]
        return self.backend(list(texts), add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=True)


def train_bpe(texts: Sequence[str], vocab_size: int) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` (digits split one by one) trained on ``texts``."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError as exc:  # pragma: no cover
        raise CLIError("the race needs the tokenizers library: pip install 'cggr[bench]'") from exc
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[EOS],
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def _bpe_adapter(tokenizer: Any) -> TextTokenizer:
    return TextTokenizer(tokenizer, eos_id=tokenizer.token_to_id(EOS), vocab_size=tokenizer.get_vocab_size(),
                         kind="bpe")


def pretrained_tokenizer(path: Path) -> TextTokenizer:
    """The tokenizer saved with a pretrained model folder."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise CLIError(f"--model: no usable tokenizer in {str(path)!r} ({exc})") from exc
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.pad_token_id
    if eos is None:
        raise CLIError(f"--model: the tokenizer in {str(path)!r} has neither an eos nor a pad token")
    return TextTokenizer(tok, eos_id=eos, vocab_size=len(tok), kind="hf")


# ------------------------------------------------------------------------------------------------- corpora
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


def split_documents(docs: Sequence[Document]) -> tuple[list[Document], list[Document]]:
    """(train, held-out) by a hash of each document's key; raises when either side ends up empty."""
    train = [d for d in docs if not is_heldout_text(d.key, HELDOUT_PERCENT)]
    heldout = [d for d in docs if is_heldout_text(d.key, HELDOUT_PERCENT)]
    if not docs:
        raise CLIError("--data: the corpus is empty (no non-empty UTF-8 text documents found)")
    if not heldout or not train:
        # tiny corpora: hold out the last document rather than nothing
        if len(docs) < 2:
            raise CLIError(f"--data: the corpus has {len(docs)} document; at least 2 are needed for a held-out split")
        train, heldout = list(docs[:-1]), [docs[-1]]
    return train, heldout


# ------------------------------------------------------------------------------------------------- dataset
@dataclass
class RaceData:
    """Tokenised train and held-out sequences.

    Attributes:
        train_ids: (N_train, T) long. train_mask: (N_train, T) bool, False at padding.
        eval_ids / eval_mask: (N_eval, T) held-out sequences for the held-out loss.
        eval_groups: (N_eval,) group of each held-out block: ``code``, ``tests`` or ``prose`` (text corpora), or
            ``problems`` (arithmetic).
        eval_files: (N_eval,) held-out document each block starts in (index into ``heldout_keys``).
        problems: Held-out arithmetic problems for accuracy (empty for text corpora).
        tokenizer: For decoding (arithmetic accuracy).
        info: Description recorded in the results (source, documents, tokens, cache key).
    """

    train_ids: torch.Tensor
    train_mask: torch.Tensor
    eval_ids: torch.Tensor
    eval_mask: torch.Tensor
    tokenizer: TextTokenizer
    problems: list[Problem] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    train_keys: list[str] = field(default_factory=list)
    heldout_keys: list[str] = field(default_factory=list)
    eval_groups: list[str] = field(default_factory=list)
    eval_files: list[int] = field(default_factory=list)

    @property
    def seq_len(self) -> int:
        return int(self.train_ids.shape[1])


TOKENIZER_SAMPLE_CHARS = 8_000_000


def _tokenizer_sample(docs: Sequence[Document], budget: int = TOKENIZER_SAMPLE_CHARS) -> list[str]:
    """Training documents evenly spread over ``docs`` until ``budget`` characters (BPE training time is linear)."""
    total = sum(len(d.text) for d in docs)
    if total <= budget:
        return [d.text for d in docs]
    stride = total / budget
    picked, acc = [], 0.0
    for i, d in enumerate(docs):  # keep document i when the running share crosses the next multiple of stride
        acc += 1.0
        if acc >= stride or i == 0:
            picked.append(d.text)
            acc -= stride
    return picked


def _cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()[:20]


def _flat_ids(tokenizer: TextTokenizer, docs: Sequence[Document]) -> np.ndarray:
    """Every document's ids followed by the end-of-text id, concatenated (int64).

    Encoded in chunks of ~``_ENCODE_CHUNK_CHARS`` characters (each chunk a parallel batch call), so the
    tokenizer's per-token objects of a few hundred MB of text never exist at once.
    """
    eos = np.asarray([tokenizer.eos_id], dtype=np.int64)
    pieces: list[np.ndarray] = []
    start = 0
    while start < len(docs):
        stop, chars = start, 0
        while stop < len(docs) and (stop == start or chars < _ENCODE_CHUNK_CHARS):
            chars += len(docs[stop].text)
            stop += 1
        for ids in tokenizer.encode([d.text for d in docs[start:stop]]):
            pieces += [np.asarray(ids, dtype=np.int64), eos]
        start = stop
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def _blocks(flat: np.ndarray, seq_len: int) -> torch.Tensor:
    n = len(flat) // seq_len
    return torch.from_numpy(flat[: n * seq_len].copy()).view(n, seq_len)  # (n, T)


def _spread(blocks: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` blocks evenly spaced over ``blocks`` (the whole held-out set when it is smaller)."""
    if blocks.shape[0] <= count:
        return blocks
    idx = torch.linspace(0, blocks.shape[0] - 1, count).round().long()
    return blocks[idx]


GROUPS = ("code", "tests", "prose")
MAX_BLOCKS_PER_FILE = 16
_WORD = re.compile(r"\(?[A-Za-z][a-z]*[,.;:!?)]?")
_CODE_SYMBOLS = frozenset("()[]{}=_;<>+*/%&|^~@")


def is_test_path(key: str) -> bool:
    """Whether a document key is a test file: a ``test``/``tests`` folder or a ``test_*`` / ``*_test`` file."""
    parts = key.replace("\\", "/").split("/")
    name = parts[-1].rsplit(".", 1)[0]
    folders = {p.lower() for p in parts[:-1]}
    return bool(folders & {"test", "tests", "testing"}) or name.startswith("test_") or name.endswith("_test")


def prose_share(text: str) -> float:
    """How much ``text`` reads as English rather than code, a heuristic in [-4, 1]: the share of its
    whitespace-separated words that look like English words (letters, lower case after the first, at most one
    trailing punctuation mark) minus 4 × the share of its non-space characters that are code symbols
    (``()[]{}=_;<>+*/%&|^~@``). On ~500-character pieces of the standard library: docstrings and documentation
    strings (``pydoc_data/topics.py``) mostly 0.5-0.8, code and tests mostly below 0.5 (down to -0.3)."""
    words = text.split()
    chars = [c for c in text if not c.isspace()]
    if not words:
        return 0.0
    english = sum(1 for w in words if _WORD.fullmatch(w)) / len(words)
    return english - 4.0 * sum(c in _CODE_SYMBOLS for c in chars) / len(chars)


def block_group(key: str, text: str, *, prose_threshold: float = 0.5) -> str:
    """``prose`` when the block reads as English (:func:`prose_share` >= ``prose_threshold``: docstrings,
    documentation strings), else ``tests`` for a test file (:func:`is_test_path`), else ``code``."""
    if prose_share(text) >= prose_threshold:
        return "prose"
    return "tests" if is_test_path(key) else "code"


def select_heldout_blocks(block_files: np.ndarray, count: int, max_blocks_per_file: int) -> np.ndarray:
    """Indices of at most ``count`` held-out blocks, at most ``max_blocks_per_file`` per file, breadth first.

    Args:
        block_files: (N,) file (document) index of each candidate block, non-decreasing (blocks in file order).
        count: Blocks wanted.
        max_blocks_per_file: Cap per file.

    Round r (r = 0, 1, ...) offers the r-th pick of every file that still has one (a file's picks are its blocks
    evenly spaced, at most the cap); when a round offers more than are still needed, an evenly spaced subset of the
    round (in file order) is taken, so the set spreads over the files rather than the first ones alphabetically.
    Returns sorted indices.
    """
    if count < 1 or max_blocks_per_file < 1:
        raise ValueError(f"count and max_blocks_per_file must be >= 1, got {count} and {max_blocks_per_file}")
    block_files = np.asarray(block_files)
    if block_files.size and np.any(np.diff(block_files) < 0):
        raise ValueError("block_files must be non-decreasing (blocks in file order)")
    _, starts, sizes = np.unique(block_files, return_index=True, return_counts=True)
    picks = []  # per file: its evenly spaced candidate blocks
    for start, size in zip(starts.tolist(), sizes.tolist()):
        k = min(size, max_blocks_per_file)
        picks.append(start + np.unique(np.linspace(0, size - 1, k).round().astype(np.int64)))
    chosen: list[int] = []
    for r in range(max_blocks_per_file):
        offer = [int(p[r]) for p in picks if len(p) > r]
        need = count - len(chosen)
        if not offer or need <= 0:
            break
        if len(offer) > need:
            offer = [offer[i] for i in np.linspace(0, len(offer) - 1, need).round().astype(np.int64)]
        chosen += offer
    return np.sort(np.asarray(chosen, dtype=np.int64))


def _heldout_blocks(eval_flat: np.ndarray, seq_len: int, eos_id: int, count: int, cap: int, keys: Sequence[str],
                    tokenizer: TextTokenizer) -> tuple[torch.Tensor, list[int], list[str]]:
    """(blocks (n, T), file of each block, group of each block) of the held-out token stream ``eval_flat``
    (documents joined by EOS, in ``keys`` order)."""
    n = len(eval_flat) // seq_len
    blocks = eval_flat[: n * seq_len].reshape(n, seq_len)
    eos_before = np.concatenate([[0], np.cumsum(eval_flat == eos_id)[:-1]])
    files = np.minimum(eos_before[: n * seq_len : seq_len], len(keys) - 1)  # the document each block starts in
    idx = select_heldout_blocks(files, count, cap)
    chosen = torch.from_numpy(blocks[idx].copy())  # (n_eval, T)
    texts = [tokenizer.decode(row) for row in chosen.tolist()]
    block_files = files[idx].tolist()
    groups = [block_group(keys[f], t) for f, t in zip(block_files, texts)]
    return chosen, block_files, groups


def load_text_data(
    source: str, *, seq_len: int, vocab_size: int, eval_sequences: int, tokenizer: TextTokenizer | None = None,
    max_blocks_per_file: int = MAX_BLOCKS_PER_FILE,
) -> RaceData:
    """The code corpus (``source='code'`` or ``'code+packages'``) or a path, tokenised and cut into (·, T) blocks.

    Args:
        source: ``'code'``, ``'code+packages'``, a path (file, folder, JSONL) or a glob pattern of files.
        seq_len: T.
        vocab_size: BPE vocabulary to train (ignored when ``tokenizer`` is given).
        eval_sequences: Held-out blocks to evaluate on (:func:`select_heldout_blocks`: spread over the held-out
            documents, fewer when the held-out documents have fewer blocks under the cap).
        tokenizer: A pretrained model's tokenizer; ``None`` trains (or loads the cached) BPE.
        max_blocks_per_file: At most this many held-out blocks start in any one held-out document.
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
    train_docs, heldout_docs = split_documents(docs)
    fingerprint = [(d.key, len(d.text), hashlib.sha1(d.text.encode("utf-8")).hexdigest()[:8]) for d in docs]
    key = _cache_key({"v": _CACHE_VERSION, "origin": origin, "docs": fingerprint, "vocab": vocab_size,
                      "tok": tokenizer.backend.name_or_path if tokenizer is not None else "bpe"})
    folder = cache_dir() / f"text-{key}"
    tok_file, train_file, eval_file = folder / "tokenizer.json", folder / "train.npy", folder / "heldout.npy"
    if tokenizer is None and tok_file.is_file():
        from tokenizers import Tokenizer

        tokenizer = _bpe_adapter(Tokenizer.from_file(str(tok_file)))
    if tokenizer is None:
        bpe = train_bpe(_tokenizer_sample(train_docs), vocab_size)
        tokenizer = _bpe_adapter(bpe)
        folder.mkdir(parents=True, exist_ok=True)
        bpe.save(str(tok_file))
    if train_file.is_file() and eval_file.is_file():
        train_flat, eval_flat = np.load(train_file).astype(np.int64), np.load(eval_file).astype(np.int64)
        cached = True
    else:
        train_flat, eval_flat = _flat_ids(tokenizer, train_docs), _flat_ids(tokenizer, heldout_docs)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(train_file, train_flat.astype(np.int32))  # half the disk of int64; vocabularies are < 2**31
        np.save(eval_file, eval_flat.astype(np.int32))
        cached = False
    train = _blocks(train_flat, seq_len)
    if train.shape[0] < 1:
        raise CLIError(f"--data: the training split has {len(train_flat)} tokens, fewer than one sequence of {seq_len}")
    if len(eval_flat) < seq_len:  # short held-out text: one padded sequence
        held = torch.full((1, seq_len), tokenizer.eos_id, dtype=torch.long)
        held[0, : len(eval_flat)] = torch.from_numpy(eval_flat[:seq_len])
        held_mask = torch.zeros(1, seq_len, dtype=torch.bool)
        held_mask[0, : len(eval_flat)] = True
        held_files = [0]
        held_groups = [block_group(heldout_docs[0].key, tokenizer.decode(eval_flat[:seq_len].tolist()))]
    else:
        held, held_files, held_groups = _heldout_blocks(
            eval_flat, seq_len, tokenizer.eos_id, eval_sequences, max_blocks_per_file,
            [d.key for d in heldout_docs], tokenizer)
        held_mask = torch.ones_like(held, dtype=torch.bool)
    info = {
        "source": source, "origin": origin, "documents": len(docs), "train_documents": len(train_docs),
        "heldout_documents": len(heldout_docs), "train_tokens": len(train_flat), "heldout_tokens": len(eval_flat),
        "train_sequences": int(train.shape[0]), "eval_sequences": int(held.shape[0]), "seq_len": seq_len,
        "heldout_files_used": len(set(held_files)), "max_blocks_per_file": max_blocks_per_file,
        "heldout_groups": {g: held_groups.count(g) for g in GROUPS},
        "vocab_size": tokenizer.vocab_size, "tokenizer": tokenizer.kind, "cache": str(folder), "cache_hit": cached,
        **corpus,
    }
    return RaceData(train, torch.ones_like(train, dtype=torch.bool), held, held_mask, tokenizer, info=info,
                    train_keys=[d.key for d in train_docs], heldout_keys=[d.key for d in heldout_docs],
                    eval_groups=held_groups, eval_files=held_files)


def _pad(rows: Sequence[Sequence[int]], seq_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (or cut) ``rows`` to (len(rows), T) ids and a bool mask that is False at padding."""
    lengths = np.fromiter((min(len(r), seq_len) for r in rows), dtype=np.int64, count=len(rows))
    ids = np.full((len(rows), seq_len), pad_id, dtype=np.int64)
    mask = np.arange(seq_len)[None, :] < lengths[:, None]  # (n, T)
    ids[mask] = np.fromiter((t for r in rows for t in list(r)[:seq_len]), dtype=np.int64, count=int(lengths.sum()))
    return torch.from_numpy(ids), torch.from_numpy(mask)


def load_arithmetic_data(
    *, vocab_size: int, eval_sequences: int, num_train: int = 50_000, tokenizer: TextTokenizer | None = None
) -> RaceData:
    """Generated word problems: one per sequence, followed by end-of-text, right-padded to the longest.

    The task is fixed (generator seed 1234, independent of ``--seed``); ids are cached like the text corpora.
    """
    key = _cache_key({"v": _CACHE_VERSION, "arith": num_train, "eval": eval_sequences, "vocab": vocab_size,
                      "tok": tokenizer.backend.name_or_path if tokenizer is not None else "bpe"})
    folder = cache_dir() / f"arith-{key}"
    tok_file, arrays_file, problems_file = folder / "tokenizer.json", folder / "ids.npz", folder / "problems.json"
    if tokenizer is None and tok_file.is_file():
        from tokenizers import Tokenizer

        tokenizer = _bpe_adapter(Tokenizer.from_file(str(tok_file)))
    if tokenizer is not None and arrays_file.is_file() and problems_file.is_file():
        arrays = np.load(arrays_file)
        train_ids, train_mask = torch.from_numpy(arrays["train_ids"]), torch.from_numpy(arrays["train_mask"])
        eval_ids, eval_mask = torch.from_numpy(arrays["eval_ids"]), torch.from_numpy(arrays["eval_mask"])
        stored = json.loads(problems_file.read_text(encoding="utf-8"))
        heldout = [Problem(**p) for p in stored["heldout"]]
        train_keys = stored["train_questions"]
        cached = True
    else:
        train_problems, heldout = generate_split(num_train, eval_sequences, seed=1234)
        if tokenizer is None:
            bpe = train_bpe([p.text for p in train_problems], vocab_size)
            folder.mkdir(parents=True, exist_ok=True)
            bpe.save(str(tok_file))
            tokenizer = _bpe_adapter(bpe)
        train_rows = [[*ids, tokenizer.eos_id] for ids in tokenizer.encode([p.text for p in train_problems])]
        eval_rows = [[*ids, tokenizer.eos_id] for ids in tokenizer.encode([p.text for p in heldout])]
        seq_len = max(max(map(len, train_rows)), max(map(len, eval_rows)))
        seq_len = -(-seq_len // 8) * 8  # round up to a multiple of 8
        train_ids, train_mask = _pad(train_rows, seq_len, tokenizer.eos_id)
        eval_ids, eval_mask = _pad(eval_rows, seq_len, tokenizer.eos_id)
        train_keys = [p.question for p in train_problems]
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(arrays_file, train_ids=train_ids.numpy(), train_mask=train_mask.numpy(),
                 eval_ids=eval_ids.numpy(), eval_mask=eval_mask.numpy())
        problems_file.write_text(json.dumps({"heldout": [p.__dict__ for p in heldout],
                                             "train_questions": train_keys}), encoding="utf-8")
        cached = False
    info = {
        "source": "arithmetic", "origin": "generated GSM8K-style word problems (cggr.cli.arithmetic)",
        "train_sequences": int(train_ids.shape[0]), "eval_sequences": len(heldout), "seq_len": int(train_ids.shape[1]),
        "train_tokens": int(train_mask.sum()), "heldout_tokens": int(eval_mask.sum()),
        "vocab_size": tokenizer.vocab_size, "tokenizer": tokenizer.kind, "cache": str(folder), "cache_hit": cached,
    }
    return RaceData(train_ids, train_mask, eval_ids, eval_mask, tokenizer, problems=heldout, info=info,
                    train_keys=train_keys, heldout_keys=[p.question for p in heldout],
                    eval_groups=["problems"] * len(heldout), eval_files=list(range(len(heldout))))


class BatchStream:
    """Indices of training sequences in a seeded order: a fresh permutation every epoch.

    Two streams built with the same ``num_sequences`` and ``seed`` yield the same indices whatever batch sizes
    they are read with, so arms that scan more sequences per step read further along the same order.
    """

    def __init__(self, num_sequences: int, seed: int) -> None:
        if num_sequences < 1:
            raise ValueError(f"num_sequences must be >= 1, got {num_sequences}")
        self.num_sequences = num_sequences
        self.generator = torch.Generator().manual_seed(seed)
        self._order = torch.randperm(num_sequences, generator=self.generator)
        self._pos = 0
        self.epoch = 0
        self.consumed = 0

    def clone(self) -> BatchStream:
        """An independent copy at the same position (its generator state copied): both yield the same indices."""
        other = BatchStream.__new__(BatchStream)
        other.num_sequences, other._pos, other.epoch, other.consumed = (
            self.num_sequences, self._pos, self.epoch, self.consumed)
        other.generator = torch.Generator().manual_seed(0)
        other.generator.set_state(self.generator.get_state())
        other._order = self._order.clone()
        return other

    def take(self, count: int) -> torch.Tensor:
        """The next ``count`` sequence indices, (count,) long."""
        parts, need = [], count
        while need:
            if self._pos == self.num_sequences:
                self._order = torch.randperm(self.num_sequences, generator=self.generator)
                self._pos, self.epoch = 0, self.epoch + 1
            piece = self._order[self._pos : self._pos + need]
            parts.append(piece)
            self._pos += len(piece)
            need -= len(piece)
        self.consumed += count
        return torch.cat(parts)


__all__ = ["CODE_PACKAGES", "GROUPS", "MAX_BLOCKS_PER_FILE", "MAX_FILE_BYTES", "BatchStream", "Document", "RaceData",
           "TextTokenizer", "block_group", "cache_dir", "code_package_documents", "glob_documents", "is_test_path",
           "load_arithmetic_data", "load_text_data", "package_dirs", "path_documents", "prose_share",
           "select_heldout_blocks", "split_documents", "stdlib_documents", "stdlib_root", "train_bpe"]

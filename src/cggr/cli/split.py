"""The train / held-out split of ``cggr race``'s text corpora, and the held-out blocks the race evaluates on.

Shape legend: T tokens per sequence (block); N candidate held-out blocks.

Split by document (:func:`split_documents`): a document is held out iff a SHA-256 of its key falls in the held-out
:data:`HELDOUT_PERCENT`, so nothing of a held-out document is ever trained on. Held-out set
(:func:`heldout_blocks`): the held-out token stream cut into blocks of T tokens, each attributed to the document it
starts in, at most ``max_blocks_per_file`` per document, picked breadth first (:func:`select_heldout_blocks`: one
block of every document before a second of any) so that no single file dominates; each block is labelled
``code``, ``tests`` or ``prose`` (:func:`block_group`) so that the race can report the three separately.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch

from cggr.cli.arithmetic import is_heldout_text
from cggr.cli.corpora import Document
from cggr.cli.presets import CLIError
from cggr.cli.tokenizer import TextTokenizer

HELDOUT_PERCENT = 10
GROUPS = ("code", "tests", "prose")
MAX_BLOCKS_PER_FILE = 16
_WORD = re.compile(r"\(?[A-Za-z][a-z]*[,.;:!?)]?")
_CODE_SYMBOLS = frozenset("()[]{}=_;<>+*/%&|^~@")


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


def heldout_blocks(eval_flat: np.ndarray, seq_len: int, eos_id: int, count: int, cap: int, keys: Sequence[str],
                   tokenizer: TextTokenizer) -> tuple[torch.Tensor, list[int], list[str]]:
    """(blocks (n, T), file of each block, group of each block) of the held-out token stream ``eval_flat``
    (documents joined by EOS, in ``keys`` order): at most ``count`` blocks, at most ``cap`` starting in any one
    document (:func:`select_heldout_blocks`); groups by :func:`block_group` of the decoded block."""
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


__all__ = ["GROUPS", "HELDOUT_PERCENT", "MAX_BLOCKS_PER_FILE", "block_group", "heldout_blocks", "is_test_path",
           "prose_share", "select_heldout_blocks", "split_documents"]

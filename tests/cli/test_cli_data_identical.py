"""The race's data is bit-for-bit what it was before ``cli/data.py`` was split into modules.

The digests below were recorded with the single-module loader (commit 1e4e25e) on the same generated corpora;
a digest covers every tensor (dtype, shape, bytes), the document keys of both sides of the split, the held-out
blocks' documents and groups, the arithmetic problems and the data info. A character-level tokenizer (one id
per character) keeps the text and arithmetic cases independent of the ``tokenizers`` library's version; the BPE
case pins the trained tokenizer too, so it is compared only under the ``tokenizers`` version it was recorded with.
The cache key is checked against its formula, recomputed here from the files, so that caches written before the
split stay valid.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest

from cggr.cli.data import RaceData, TextTokenizer, load_arithmetic_data, load_text_data

TEXT_DIGEST = "558b0c161afab0c805336cc8833fbdab29ea4d62f9e6e9a88a6be14aabbcdd59"
SHORT_DIGEST = "41936f7520f9274d783433f74ad9a4dcf820e7ed1cc97607a0001245f1db31b3"
ARITHMETIC_DIGEST = "2f6d95e7cb9b465770bceca33cca1946cedb7a7329dfddb5b25290b83cbcbf56"
ARITHMETIC_CACHE = "arith-27d53cf7a0005fa883aa"  # the cache key of these settings (no path in it)
BPE_DIGEST = "f22afa21cba5aa07431edd0077cb182bed8541df286ec4364761fcc1069eeec5"
BPE_RECORDED_WITH = "0.23.3"  # tokenizers version of BPE_DIGEST


class CharTokenizer:
    """A transformers-style tokenizer: id = the character's code point (ASCII text only), 0 = end of text."""

    name_or_path = "char-level-test"

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict[str, list[list[int]]]:
        assert not add_special_tokens
        return {"input_ids": [[ord(c) for c in t] for t in texts]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if i or not skip_special_tokens)


def _char_tokenizer() -> TextTokenizer:
    return TextTokenizer(CharTokenizer(), eos_id=0, vocab_size=128, kind="hf")


def _digest(data: RaceData, *, drop: tuple[str, ...] = ("origin", "cache", "cache_hit")) -> str:
    h = hashlib.sha256()
    for t in (data.train_ids, data.train_mask, data.eval_ids, data.eval_mask):
        h.update(f"{t.dtype} {tuple(t.shape)}".encode())
        h.update(t.contiguous().numpy().tobytes())
    info = {k: v for k, v in data.info.items() if k not in drop}
    rest = [data.train_keys, data.heldout_keys, data.eval_groups, data.eval_files, info,
            [p.__dict__ for p in data.problems], data.seq_len]
    h.update(json.dumps(rest, sort_keys=True).encode())
    return h.hexdigest()


def _write_corpus(root: Path) -> None:
    """80 documents of code, tests and prose, of uneven lengths, from a fixed seed."""
    rng = random.Random(0)
    for i in range(80):
        lines = rng.randint(1, 40)
        if i % 7 == 0:
            path = root / "docs" / f"page{i}.txt"
            body = "".join(f"Paragraph {j} of page {i} explains the module in plain words.\n" for j in range(lines))
        elif i % 5 == 0:
            path = root / "tests" / f"test_m{i}.py"
            body = "".join(f"def test_{j}():\n    assert f{i}({j}) == {j * i}\n" for j in range(lines))
        else:
            path = root / f"m{i}.py"
            body = "".join(f"def f{i}_{j}(x):\n    return x * {rng.randint(0, 99)} + {j}\n" for j in range(lines))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body, encoding="utf-8")


def _expected_cache_name(root: Path, vocab_size: int, tok: str) -> str:
    """``text-<key>``: the cache key's formula (version 1), recomputed from the files."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    fingerprint = [(p.relative_to(root).as_posix(), len(p.read_text()), hashlib.sha1(p.read_bytes()).hexdigest()[:8])
                   for p in files]
    parts = {"v": 1, "origin": str(root.resolve()), "docs": fingerprint, "vocab": vocab_size, "tok": tok}
    return "text-" + hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("CGGR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # the data info records the source as given: a relative path
    _write_corpus(tmp_path / "corpus")
    return tmp_path / "corpus"


def test_text_corpus_blocks_are_unchanged(corpus):
    first = load_text_data("corpus", seq_len=48, vocab_size=999, eval_sequences=40, tokenizer=_char_tokenizer(),
                           max_blocks_per_file=3)
    again = load_text_data("corpus", seq_len=48, vocab_size=999, eval_sequences=40, tokenizer=_char_tokenizer(),
                           max_blocks_per_file=3)
    assert not first.info["cache_hit"] and again.info["cache_hit"]
    assert Path(first.info["cache"]).name == _expected_cache_name(corpus, 999, "char-level-test")
    assert set(first.eval_groups) == {"code", "tests", "prose"}  # every group is exercised
    assert _digest(first) == _digest(again) == TEXT_DIGEST


def test_short_heldout_text_is_one_padded_sequence_as_before(tmp_path, monkeypatch):
    monkeypatch.setenv("CGGR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "a.py").write_text("def a(x):\n    return x + 1\n" * 30)
    (tmp_path / "tiny" / "z.py").write_text("b = 2\n")  # the held-out document (the last one), shorter than T
    data = load_text_data("tiny", seq_len=64, vocab_size=999, eval_sequences=8, tokenizer=_char_tokenizer())
    assert data.heldout_keys == ["z.py"] and data.eval_ids.shape == (1, 64) and not data.eval_mask.all()
    assert _digest(data) == SHORT_DIGEST


def test_arithmetic_sequences_are_unchanged(tmp_path, monkeypatch):
    monkeypatch.setenv("CGGR_CACHE_DIR", str(tmp_path / "cache"))
    first = load_arithmetic_data(vocab_size=999, eval_sequences=20, num_train=300, tokenizer=_char_tokenizer())
    again = load_arithmetic_data(vocab_size=999, eval_sequences=20, num_train=300, tokenizer=_char_tokenizer())
    assert not first.info["cache_hit"] and again.info["cache_hit"]
    assert Path(first.info["cache"]).name == Path(again.info["cache"]).name == ARITHMETIC_CACHE
    digests = {_digest(d, drop=("cache", "cache_hit")) for d in (first, again)}
    assert digests == {ARITHMETIC_DIGEST}


def test_bpe_text_corpus_is_unchanged(corpus):
    tokenizers = pytest.importorskip("tokenizers", reason="the BPE tokenizer needs the tokenizers library")
    first = load_text_data("corpus", seq_len=32, vocab_size=400, eval_sequences=40)
    again = load_text_data("corpus", seq_len=32, vocab_size=400, eval_sequences=40)
    assert again.info["cache_hit"] and _digest(first) == _digest(again)
    assert Path(first.info["cache"]).name == _expected_cache_name(corpus, 400, "bpe")
    if tokenizers.__version__ == BPE_RECORDED_WITH:  # another version may train other merges
        assert _digest(first) == BPE_DIGEST


def test_data_module_keeps_every_public_name_of_the_single_module():
    """``cggr.cli.data`` still offers what the single module did (its ``__all__`` and the public names that
    callers imported without it), each the very object of the module that now defines it."""
    from cggr.cli import batching, cache, corpora, data, dataset, split, tokenizer

    before = ["CODE_PACKAGES", "GROUPS", "MAX_BLOCKS_PER_FILE", "MAX_FILE_BYTES", "BatchStream", "Document",
              "RaceData", "TextTokenizer", "block_group", "cache_dir", "code_package_documents", "glob_documents",
              "is_test_path", "load_arithmetic_data", "load_text_data", "package_dirs", "path_documents",
              "prose_share", "select_heldout_blocks", "split_documents", "stdlib_documents", "stdlib_root",
              "train_bpe", "EOS", "HELDOUT_PERCENT", "TOKENIZER_SAMPLE_CHARS", "pretrained_tokenizer"]
    assert set(before) <= set(data.__all__)
    homes = (batching, cache, corpora, dataset, split, tokenizer)
    for name in before:
        defined = [m for m in homes if name in m.__all__]
        assert len(defined) == 1 and getattr(data, name) is getattr(defined[0], name), name

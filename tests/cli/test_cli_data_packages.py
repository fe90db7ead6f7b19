"""``--data code+packages`` (standard library + installed packages) and glob patterns for ``cggr race``."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("transformers")

from cggr.cli import corpora
from cggr.cli import tokenizer as tokenizer_mod
from cggr.cli.data import (
    CODE_PACKAGES,
    MAX_FILE_BYTES,
    Document,
    code_package_documents,
    glob_documents,
    load_text_data,
    package_dirs,
    split_documents,
)
from cggr.cli.main import main
from cggr.cli.presets import CLIError


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CGGR_CACHE_DIR", str(tmp_path / "cggr-cache"))


def _write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def test_real_corpus_has_stdlib_and_package_documents_within_the_size_limit():
    import tokenizers

    site_dir = Path(tokenizers.__file__).resolve().parents[1]  # the folder the tokenizers package is installed in
    assert site_dir.resolve() in [p.resolve() for p in package_dirs()]
    docs, info = code_package_documents()
    keys = [d.key for d in docs]
    assert len(set(keys)) == len(keys)
    assert {"stdlib/os.py", "stdlib/json/__init__.py", "packages/tokenizers/__init__.py"} <= set(keys)
    stdlib_keys = [k for k in keys if k.startswith("stdlib/")]
    package_keys = [k for k in keys if k.startswith("packages/")]
    assert len(stdlib_keys) + len(package_keys) == len(keys)  # nothing else
    assert stdlib_keys == sorted(stdlib_keys) and keys[: len(stdlib_keys)] == stdlib_keys  # stdlib first, in order
    assert not any(p in ("site-packages", "dist-packages", "__pycache__") for k in keys for p in k.split("/")[:-1])
    parts = info["parts"]
    assert parts["stdlib"]["documents"] == len(stdlib_keys) > 100
    assert parts["packages"]["documents"] == len(package_keys) > 100
    assert parts["stdlib"]["characters"] + parts["packages"]["characters"] == sum(len(d.text) for d in docs)
    # the size limit, against an independent scan of the package folders
    assert max(len(d.text.encode("utf-8")) for d in docs) <= MAX_FILE_BYTES
    large = set()
    for root in package_dirs():
        for folder, _, files in os.walk(root):
            large.update(f"packages/{Path(folder, f).relative_to(root).as_posix()}" for f in files
                         if f.endswith(".py") and os.path.getsize(os.path.join(folder, f)) > MAX_FILE_BYTES)
    assert large.isdisjoint(keys)
    assert info["skipped"]["too_large"] >= len(large) and info["max_file_bytes"] == MAX_FILE_BYTES
    train, heldout = split_documents(docs)
    assert {d.key for d in train}.isdisjoint(d.key for d in heldout)
    assert len(train) + len(heldout) == len(docs) and 0.07 < len(heldout) / len(docs) < 0.13


@pytest.fixture
def fake_python(tmp_path, monkeypatch):
    """A small standard library and two package folders with every kind of file the corpus must skip."""
    std = tmp_path / "std"
    _write(std / "os.py", "import sys\n\n\ndef getcwd():\n    return '.'\n")
    _write(std / "json" / "__init__.py", "from .decoder import JSONDecoder\n")
    _write(std / "site-packages" / "inside.py", "x = 1\n")  # package folder inside the stdlib: not stdlib
    _write(std / "__pycache__" / "cached.py", "y = 2\n")
    a, b = tmp_path / "site-a", tmp_path / "site-b"
    mod = "def f(x):\n    return x + 1\n"
    _write(a / "pkg" / "__init__.py", "from .mod import f\n")
    _write(a / "pkg" / "mod.py", mod)
    _write(a / "big.py", "TABLE = [" + "0, " * 200 + "]\n")  # over the 300-byte limit used below
    _write(a / "latin.py", b"name = '\xe9t\xe9'\n")  # Latin-1, not UTF-8
    _write(a / "blank.py", "  \n\n")
    _write(a / "vendored" / "copy.py", mod)  # byte-identical to pkg/mod.py
    _write(a / "notes.txt", "not python\n")
    (a / "z_link.py").symlink_to(a / "pkg" / "mod.py")  # a second name of pkg/mod.py
    (a / "broken.py").symlink_to(tmp_path / "missing.py")
    (a / "loop").symlink_to(a, target_is_directory=True)  # a symlink loop: must not be entered
    _write(b / "pkg" / "mod.py", "def f(x):\n    return x - 1\n")  # shadowed by site-a's pkg/mod.py
    _write(b / "other" / "x.py", "VALUE = 3\n")
    monkeypatch.setattr(corpora, "stdlib_root", lambda: std)
    monkeypatch.setattr(corpora, "package_dirs", lambda: [a, b])
    return tmp_path


def test_fake_corpus_keys_skips_and_counts(fake_python):
    docs, info = code_package_documents(max_file_bytes=300)
    assert [d.key for d in docs] == [
        "stdlib/json/__init__.py", "stdlib/os.py",
        "packages/pkg/__init__.py", "packages/pkg/mod.py",  # site-a, sorted
        "packages/other/x.py",  # site-b
    ]
    assert dict(zip((d.key for d in docs), (d.text for d in docs)))["packages/pkg/mod.py"].endswith("x + 1\n")
    assert info["skipped"] == {"too_large": 1, "not_utf8": 1, "empty": 1, "unreadable": 1, "duplicate": 2,
                               "shadowed": 1}
    assert info["parts"]["stdlib"]["documents"] == 2 and info["parts"]["packages"]["documents"] == 3
    assert info["parts"]["packages"]["characters"] == sum(len(d.text) for d in docs[2:])
    assert info["parts"]["packages"]["folders"] == [str(fake_python / "site-a"), str(fake_python / "site-b")]
    assert code_package_documents(max_file_bytes=300) == (docs, info)  # stable
    # the limit is a limit: raising it takes big.py back
    assert "packages/big.py" in [d.key for d in code_package_documents(max_file_bytes=MAX_FILE_BYTES)[0]]
    for bad in (0, -1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="max_file_bytes"):
            code_package_documents(max_file_bytes=bad)


def test_no_packages_is_an_error(fake_python, monkeypatch):
    monkeypatch.setattr(corpora, "package_dirs", lambda: [])
    with pytest.raises(CLIError, match="no installed-package"):
        code_package_documents()


def test_package_dirs_in_import_order_each_once(tmp_path, monkeypatch):
    a, b = tmp_path / "a" / "site-packages", tmp_path / "b" / "dist-packages"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    (tmp_path / "alias").symlink_to(a, target_is_directory=True)
    monkeypatch.setattr(sys, "path", ["", str(tmp_path), str(b)])
    monkeypatch.setattr(corpora.site, "getsitepackages", lambda: [str(a), str(tmp_path / "alias"), str(b)])
    monkeypatch.setattr(corpora.site, "ENABLE_USER_SITE", True)
    monkeypatch.setattr(corpora.site, "getusersitepackages", lambda: str(tmp_path / "missing" / "site-packages"))
    monkeypatch.setattr(corpora.sysconfig, "get_paths", lambda: {"purelib": str(a), "platlib": str(b)})
    assert package_dirs() == [b, a]


def test_train_and_heldout_never_overlap_on_the_fake_corpus(fake_python):
    pkgs = fake_python / "site-b" / "many"
    for i in range(60):  # enough documents for both sides of the 10% split
        _write(pkgs / f"m{i:02d}.py", f"def f{i}(x):\n    return x * {i} + {i * i}\n" * 20)
    data = load_text_data(CODE_PACKAGES, seq_len=16, vocab_size=300, eval_sequences=4)
    assert data.train_keys and data.heldout_keys and set(data.train_keys).isdisjoint(data.heldout_keys)
    assert sorted(data.train_keys + data.heldout_keys) == sorted(d.key for d in code_package_documents()[0])
    # 4 + 60 package files (big.py is under the default 1 MB limit); vendored/copy.py and z_link.py are copies
    assert data.info["parts"]["packages"]["documents"] == 64 and data.info["skipped"]["duplicate"] == 2
    again = load_text_data(CODE_PACKAGES, seq_len=16, vocab_size=300, eval_sequences=4)
    assert again.info["cache_hit"] and again.train_ids.dtype == data.train_ids.dtype
    assert again.train_ids.equal(data.train_ids) and again.eval_ids.equal(data.eval_ids)


def test_chunked_encoding_matches_a_document_by_document_reference(monkeypatch):
    from cggr.cli.tokenizer import bpe_tokenizer, encode_documents, train_bpe

    texts = [f"def f{i}(x):\n    return x ** {i}  # {'é' * (i % 3)}\n" * (1 + i % 5) for i in range(40)]
    tok = bpe_tokenizer(train_bpe(texts, 300))
    monkeypatch.setattr(tokenizer_mod, "_ENCODE_CHUNK_CHARS", 150)  # many chunks, of uneven sizes
    flat = encode_documents(tok, [Document(str(i), t) for i, t in enumerate(texts)])
    reference = []
    for t in texts:
        reference += [*tok.backend.encode(t).ids, tok.eos_id]
    assert flat.dtype.name == "int64" and flat.tolist() == reference
    assert encode_documents(tok, []).shape == (0,)


def test_glob_pattern_source(tmp_path):
    root = tmp_path / "src"
    _write(root / "x.py", "a = 1\n")
    _write(root / "b" / "y.py", "b = 2\n")
    _write(root / "b" / "z.txt", "not matched\n")
    _write(root / "c.py", b"\xff\xfe\x81")  # not UTF-8: skipped
    (root / "b" / "loop").symlink_to(root, target_is_directory=True)
    origin, docs = glob_documents(str(root / "**" / "*.py"))
    assert origin == str(root.resolve() / "**" / "*.py")
    assert [d.key for d in docs] == ["b/y.py", "x.py"]
    with pytest.raises(CLIError, match="does not exist"):
        glob_documents(str(tmp_path / "nowhere" / "*.py"))
    # a folder whose name looks like a pattern is still read as a folder
    odd = tmp_path / "odd[1]"
    for i in range(12):
        _write(odd / f"f{i}.txt", f"text {i}\n" * 5)
    assert len(load_text_data(str(odd), seq_len=8, vocab_size=300, eval_sequences=2).train_keys) >= 10


def test_race_on_code_packages_with_the_tiny_preset(tmp_path, monkeypatch, capsys):
    """A few-second race through the command line on a small real corpus: the stdlib's email package and
    torch.optim, standing in for this venv's 200 MB of packages (measured by hand: see docs/race.md)."""
    import torch

    stdlib = Path(corpora.sysconfig.get_paths()["stdlib"])
    monkeypatch.setattr(corpora, "stdlib_root", lambda: stdlib / "email")
    monkeypatch.setattr(corpora, "package_dirs", lambda: [Path(torch.__file__).parent / "optim"])
    out = tmp_path / "race"
    code = main(["race", "--model", "tiny", "--data", "code+packages", "--minutes", "0.004", "--seq-len", "32",
                 "--batch-size", "2", "--evals", "2", "--eval-sequences", "4", "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    payload = json.loads((out / "race.json").read_text())
    info = payload["settings"]["data_info"]
    assert info["source"] == "code+packages"
    assert info["parts"]["stdlib"]["documents"] > 10 and info["parts"]["packages"]["documents"] > 10
    assert info["train_documents"] + info["heldout_documents"] == info["documents"]
    assert len(payload["arms"]) == 4
    for arm in payload["arms"]:
        # at least the initial and one later evaluation (one step slowed by a busy machine can cross several
        # evaluation points: race.py records the first of them)
        assert arm["steps"] >= 1 and len(arm["curve"]) >= 2 and arm["curve"][0]["fraction"] == 0.0
        assert all(math.isfinite(p["heldout_loss"]) for p in arm["curve"])
    assert len({a["curve"][0]["heldout_loss"] for a in payload["arms"]}) == 1


def test_race_help_documents_the_sources(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["race", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "code+packages (the standard library plus every installed package's .py files" in text
    assert "quoted glob" in text

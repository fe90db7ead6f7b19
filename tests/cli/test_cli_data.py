"""Data of ``cggr race``: splits never overlap, the arithmetic task is right, the sequence order is fixed."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
import torch

from cggr.cli.arithmetic import exact_match_accuracy, extract_answer, generate_split, make_problem
from cggr.cli.data import BatchStream, Document, path_documents, split_documents, stdlib_documents
from cggr.cli.presets import CLIError


def _solve_story(question: str) -> int:
    """Independent reference: read the story sentence by sentence and apply each operation."""
    sentences = re.split(r"(?<=[.?])\s+", question)
    value = int(re.search(r"has (\d+) ", sentences[0]).group(1))
    for s in sentences[1:-1]:
        if m := re.search(r"buys (\d+) \w+ with (\d+) ", s):
            value += int(m.group(1)) * int(m.group(2))
        elif m := re.search(r"gives (\d+) ", s):
            value -= int(m.group(1))
        elif m := re.search(r"finds (\d+) more", s):
            value += int(m.group(1))
        elif "doubles" in s:
            value *= 2
        elif m := re.search(r"among (\d+) people", s):
            assert value % int(m.group(1)) == 0, s
            value //= int(m.group(1))
        else:
            raise AssertionError(f"unparsed sentence {s!r}")
        assert value >= 0
    assert sentences[-1].startswith("How many")
    return value


def test_arithmetic_answers_match_an_independent_solver():
    rng = random.Random(7)
    for _ in range(3000):
        p = make_problem(rng)
        assert int(p.answer) == _solve_story(p.question), p.text
        # every worked equation is true and the chain ends at the answer
        for a, op, b, c in re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", p.solution):
            a, b, c = int(a), int(b), int(c)
            assert {"+": a + b, "-": a - b, "*": a * b, "/": a // b if a % b == 0 else None}[op] == c
        assert p.solution.rstrip(".").split(" = ")[-1] == p.answer
        assert p.text.endswith(f"\n#### {p.answer}") and p.text.startswith(p.prompt)


def test_arithmetic_split_is_disjoint_and_deterministic():
    train, heldout = generate_split(4000, 200, seed=3)
    assert len(train) == 4000 and len(heldout) == 200
    assert not {p.question for p in train} & {p.question for p in heldout}
    assert len({p.question for p in heldout}) == 200
    train2, heldout2 = generate_split(4000, 200, seed=3)
    assert train2 == train and heldout2 == heldout


def test_extract_answer_and_accuracy_on_hand_made_predictions():
    assert extract_answer(" 3 + 4 = 7.\n#### 7") == "7"
    assert extract_answer("#### 1,234 apples") == "1234"
    assert extract_answer("####-5") == "-5"
    assert extract_answer("the answer is 7") is None
    assert extract_answer("#### 12\n#### 13") == "12"  # the first answer counts
    completions = [
        " 2 * 3 = 6. 6 + 1 = 7.\n#### 7",  # right
        " 2 * 3 = 6.\n#### 6",  # wrong number
        " no marker 7",  # no answer
        "#### 1,024\nQuestion: more text",  # right, with a thousands separator and trailing text
        "####  007",  # right as an integer
        "#### 70",  # wrong: 70 is not 7
    ]
    answers = ["7", "7", "7", "1024", "7", "7"]
    assert exact_match_accuracy(completions, answers) == pytest.approx(3 / 6)
    assert exact_match_accuracy(["#### 5"], ["5"]) == 1.0
    with pytest.raises(ValueError, match="differ in length"):
        exact_match_accuracy(["#### 1"], ["1", "2"])


def test_stdlib_split_never_overlaps_and_excludes_site_packages():
    _, docs = stdlib_documents()
    assert len(docs) > 100
    keys = [d.key for d in docs]
    assert len(set(keys)) == len(keys)
    assert not any(part in ("site-packages", "dist-packages") for k in keys for part in k.split("/"))
    train, heldout = split_documents(docs)
    assert {d.key for d in train}.isdisjoint(d.key for d in heldout)
    assert len(train) + len(heldout) == len(docs)
    assert 0.03 < len(heldout) / len(docs) < 0.2
    assert split_documents(docs) == (train, heldout)  # deterministic


def test_path_sources_and_their_split(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    for i in range(30):
        (folder / ("sub" if i % 2 else "") / f"f{i}.txt").write_text(f"document {i}\n" * 5)
    (folder / "binary.bin").write_bytes(b"\xff\xfe\x00\x81")  # not UTF-8: skipped
    docs = path_documents(folder)
    assert len(docs) == 30
    train, heldout = split_documents(docs)
    assert heldout and {d.key for d in train}.isdisjoint(d.key for d in heldout)

    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"row {i}", "id": i}) for i in range(12)) + "\n")
    assert [d.text for d in path_documents(jsonl)] == [f"row {i}" for i in range(12)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "x"}\n')
    with pytest.raises(CLIError, match="no string field 'text'"):
        path_documents(bad)

    single = tmp_path / "one.txt"
    single.write_text("".join(f"line {i}\n" for i in range(450)))
    parts = path_documents(single)
    assert len(parts) == 5 and "".join(d.text for d in parts) == single.read_text()


def test_empty_corpus_and_missing_path_raise(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("   \n")
    with pytest.raises(CLIError, match="empty"):
        split_documents(path_documents(tmp_path / "empty"))
    with pytest.raises(CLIError, match="does not exist"):
        path_documents(tmp_path / "missing")
    with pytest.raises(CLIError, match="at least 2"):
        split_documents([Document("a", "x")])


def test_batch_stream_order_is_independent_of_read_size():
    a, b = BatchStream(37, seed=5), BatchStream(37, seed=5)
    seq_a = torch.cat([a.take(3) for _ in range(40)])  # 120 indices, crosses 3 epochs
    seq_b = torch.cat([b.take(8) for _ in range(15)])
    assert torch.equal(seq_a, seq_b)
    for epoch in range(3):  # every epoch is a permutation of all sequences
        assert sorted(seq_a[epoch * 37 : (epoch + 1) * 37].tolist()) == list(range(37))
    assert not torch.equal(BatchStream(37, seed=6).take(37), BatchStream(37, seed=5).take(37))


def test_tokenizer_sample_is_spread_and_bounded():
    from cggr.cli.tokenizer import tokenizer_sample

    docs = [Document(f"f{i}", "x" * (100 + i)) for i in range(1000)]
    sample = tokenizer_sample(docs, budget=20_000)
    assert 0.8 * 20_000 <= sum(map(len, sample)) <= 20_000 + 1100
    picked = [len(t) - 100 for t in sample]  # the document indices
    assert picked[0] == 0 and picked[-1] > 900  # spread over the whole list, in order
    assert picked == sorted(picked)
    assert tokenizer_sample(docs[:3], budget=10**9) == [d.text for d in docs[:3]]


# ----------------------------------------------------------------------------------- the held-out set
def test_select_heldout_blocks_caps_per_file_and_spreads_breadth_first():
    from cggr.cli.data import select_heldout_blocks

    rng = np.random.default_rng(5)
    sizes = rng.integers(1, 40, size=60)  # blocks per file; file 7 is huge (a documentation string file)
    sizes[7] = 500
    files = np.repeat(np.arange(60), sizes)  # (N,) file of each block, in file order
    for count, cap in ((1024, 16), (100, 16), (45, 3), (7, 4)):
        idx = select_heldout_blocks(files, count, cap)
        picked = files[idx]
        per_file = np.bincount(picked, minlength=60)
        assert len(idx) == min(count, int(np.minimum(sizes, cap).sum()))
        assert len(set(idx.tolist())) == len(idx) and np.all(np.diff(idx) > 0)
        assert per_file.max() <= cap
        # breadth first: no file has two blocks while another file with blocks left has none... more precisely,
        # per-file counts differ by at most one among files that were not exhausted
        open_files = per_file[np.minimum(sizes, cap) > per_file]
        if len(open_files):
            assert per_file.max() - open_files.min() <= 1
    with pytest.raises(ValueError, match="non-decreasing"):
        select_heldout_blocks(np.array([1, 0]), 2, 2)


def test_heldout_set_never_overlaps_training_files_and_caps_blocks_per_file(tmp_path, monkeypatch):
    """A folder corpus whose every file carries its own marker word: each held-out block's markers belong to
    held-out files only, at most ``max_blocks_per_file`` blocks start in any one file, and the groups are right."""
    pytest.importorskip("tokenizers")
    from collections import Counter

    from cggr.cli.data import load_text_data

    monkeypatch.setenv("CGGR_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus"
    (corpus / "tests").mkdir(parents=True)
    rng = random.Random(3)
    for i in range(240):
        lines = rng.randint(2, 60)
        body = "".join(f"def marker{i}_{j}(x):\n    return x * {j} + marker{i}\n" for j in range(lines))
        folder = corpus / "tests" if i % 5 == 0 else corpus
        name = f"test_m{i}.py" if i % 5 == 0 else f"m{i}.py"
        if i % 7 == 0:  # prose files
            body = "".join(f"marker{i} This paragraph explains how the module works, in plain words.\n"
                           for _ in range(lines))
        (folder / name).write_text(body)
    data = load_text_data(str(corpus), seq_len=32, vocab_size=400, eval_sequences=300, max_blocks_per_file=3)
    train, held = set(data.train_keys), set(data.heldout_keys)
    assert train.isdisjoint(held) and held
    counts = Counter(data.eval_files)
    assert max(counts.values()) <= 3
    assert data.eval_ids.shape[0] == len(data.eval_files) == len(data.eval_groups) <= 300
    number = {k: int(re.search(r"m(\d+)\.py$", k).group(1)) for k in train | held}
    held_numbers = {number[k] for k in held}
    train_numbers = {number[k] for k in train}
    for row, f, group in zip(data.eval_ids.tolist(), data.eval_files, data.eval_groups):
        text = data.tokenizer.decode(row)
        found = {int(m) for m in re.findall(r"marker(\d+)(?=[_\s])", text)}  # whole markers only
        assert found <= held_numbers and not found & train_numbers, (found, text)
        key = data.heldout_keys[f]
        # the block starts inside its file (or at the file's end-of-text boundary)
        if group == "tests":
            assert key.startswith("tests/")
        if group == "prose":
            assert number[key] % 7 == 0 or "This paragraph" in text
    assert data.info["heldout_groups"] == {g: data.eval_groups.count(g) for g in ("code", "tests", "prose")}
    assert data.info["heldout_files_used"] == len(counts)


def test_batch_stream_clone_continues_identically_and_independently():
    stream = BatchStream(37, seed=4)
    stream.take(30)
    twin = stream.clone()
    a = torch.cat([stream.take(11) for _ in range(9)])  # crosses several epochs
    b = torch.cat([twin.take(11) for _ in range(9)])
    assert torch.equal(a, b) and twin.epoch == stream.epoch and twin.consumed == stream.consumed
    fresh = BatchStream(37, seed=4)
    fresh.take(30 + 99)
    assert torch.equal(fresh.take(8), twin.take(8))

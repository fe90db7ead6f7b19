"""Fixtures of the race tests (tests/cli/test_cli_race*.py): a private data cache per module, a small Llama config
file and a small JSONL corpus (its BPE tokenizer trains in well under a second)."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def race_cache(tmp_path_factory):
    """CGGR_CACHE_DIR pointed at a fresh folder for the whole module (its races share one tokenizer cache)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("CGGR_CACHE_DIR", str(tmp_path_factory.mktemp("cggr-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def small_config(tmp_path_factory):
    """A 3-layer, 32-wide Llama config file (vocabulary 384, 256 positions)."""
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("model") / "config.json"
    transformers.LlamaConfig(
        vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
    ).to_json_file(path)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small JSONL corpus (the default code corpus's tokenizer takes minutes on a busy CPU)."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    lines = [json.dumps({"text": f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * 6}) for i in range(300)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)

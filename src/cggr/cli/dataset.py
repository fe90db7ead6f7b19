"""The tokenised data of one ``cggr race``: :class:`RaceData` and the two loaders that build it from a corpus
(:mod:`cggr.cli.corpora`), a tokenizer (:mod:`cggr.cli.tokenizer`), the cache (:mod:`cggr.cli.cache`) and the
split (:mod:`cggr.cli.split`).

Shape legend: T tokens per sequence; N_train / N_eval sequences.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cggr.cli.arithmetic import Problem, generate_split
from cggr.cli.batching import cut_blocks, pad_rows
from cggr.cli.cache import CACHE_VERSION, cache_dir, cache_key, load_token_ids, save_token_ids
from cggr.cli.corpora import source_documents
from cggr.cli.presets import CLIError
from cggr.cli.split import GROUPS, MAX_BLOCKS_PER_FILE, block_group, heldout_blocks, split_documents
from cggr.cli.tokenizer import TextTokenizer, bpe_tokenizer, encode_documents, load_bpe, tokenizer_sample, train_bpe


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
    origin, docs, corpus = source_documents(source)
    train_docs, heldout_docs = split_documents(docs)
    fingerprint = [(d.key, len(d.text), hashlib.sha1(d.text.encode("utf-8")).hexdigest()[:8]) for d in docs]
    key = cache_key({"v": CACHE_VERSION, "origin": origin, "docs": fingerprint, "vocab": vocab_size,
                     "tok": tokenizer.backend.name_or_path if tokenizer is not None else "bpe"})
    folder = cache_dir() / f"text-{key}"
    tok_file, train_file, eval_file = folder / "tokenizer.json", folder / "train.npy", folder / "heldout.npy"
    if tokenizer is None and tok_file.is_file():
        tokenizer = load_bpe(tok_file)
    if tokenizer is None:
        bpe = train_bpe(tokenizer_sample(train_docs), vocab_size)
        tokenizer = bpe_tokenizer(bpe)
        folder.mkdir(parents=True, exist_ok=True)
        bpe.save(str(tok_file))
    if train_file.is_file() and eval_file.is_file():
        train_flat, eval_flat = load_token_ids(train_file), load_token_ids(eval_file)
        cached = True
    else:
        train_flat, eval_flat = encode_documents(tokenizer, train_docs), encode_documents(tokenizer, heldout_docs)
        save_token_ids(train_file, train_flat)
        save_token_ids(eval_file, eval_flat)
        cached = False
    train = cut_blocks(train_flat, seq_len)
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
        held, held_files, held_groups = heldout_blocks(
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


def load_arithmetic_data(
    *, vocab_size: int, eval_sequences: int, num_train: int = 50_000, tokenizer: TextTokenizer | None = None
) -> RaceData:
    """Generated word problems: one per sequence, followed by end-of-text, right-padded to the longest.

    The task is fixed (generator seed 1234, independent of ``--seed``); ids are cached like the text corpora.
    """
    key = cache_key({"v": CACHE_VERSION, "arith": num_train, "eval": eval_sequences, "vocab": vocab_size,
                     "tok": tokenizer.backend.name_or_path if tokenizer is not None else "bpe"})
    folder = cache_dir() / f"arith-{key}"
    tok_file, arrays_file, problems_file = folder / "tokenizer.json", folder / "ids.npz", folder / "problems.json"
    if tokenizer is None and tok_file.is_file():
        tokenizer = load_bpe(tok_file)
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
            tokenizer = bpe_tokenizer(bpe)
        train_rows = [[*ids, tokenizer.eos_id] for ids in tokenizer.encode([p.text for p in train_problems])]
        eval_rows = [[*ids, tokenizer.eos_id] for ids in tokenizer.encode([p.text for p in heldout])]
        seq_len = max(max(map(len, train_rows)), max(map(len, eval_rows)))
        seq_len = -(-seq_len // 8) * 8  # round up to a multiple of 8
        train_ids, train_mask = pad_rows(train_rows, seq_len, tokenizer.eos_id)
        eval_ids, eval_mask = pad_rows(eval_rows, seq_len, tokenizer.eos_id)
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


__all__ = ["RaceData", "load_arithmetic_data", "load_text_data"]

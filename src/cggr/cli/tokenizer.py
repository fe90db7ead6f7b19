"""Tokenizers of ``cggr race``: the byte-level BPE trained on a corpus's training split, a pretrained model's own
tokenizer, and the encoding of documents into one token stream.

The BPE (``tokenizers`` library; digits split one by one) is trained on at most
:data:`TOKENIZER_SAMPLE_CHARS` characters of the training documents, spread over all of them
(:func:`tokenizer_sample`), never on held-out text. Documents are encoded in chunks and joined with the
end-of-text token :data:`EOS` (:func:`encode_documents`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cggr.cli.corpora import Document
from cggr.cli.presets import CLIError

EOS = "<|endoftext|>"
TOKENIZER_SAMPLE_CHARS = 8_000_000
_ENCODE_CHUNK_CHARS = 4_000_000  # characters per tokenizer call: parallel enough, bounded memory


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


def bpe_tokenizer(tokenizer: Any) -> TextTokenizer:
    """A :class:`TextTokenizer` over a ``tokenizers.Tokenizer`` of :func:`train_bpe` (its :data:`EOS` the
    end-of-text id)."""
    return TextTokenizer(tokenizer, eos_id=tokenizer.token_to_id(EOS), vocab_size=tokenizer.get_vocab_size(),
                         kind="bpe")


def load_bpe(path: Path) -> TextTokenizer:
    """The BPE tokenizer saved (``Tokenizer.save``) at ``path``, as a :class:`TextTokenizer`."""
    from tokenizers import Tokenizer

    return bpe_tokenizer(Tokenizer.from_file(str(path)))


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


def tokenizer_sample(docs: Sequence[Document], budget: int = TOKENIZER_SAMPLE_CHARS) -> list[str]:
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


def encode_documents(tokenizer: TextTokenizer, docs: Sequence[Document]) -> np.ndarray:
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


__all__ = ["EOS", "TOKENIZER_SAMPLE_CHARS", "TextTokenizer", "bpe_tokenizer", "encode_documents", "load_bpe",
           "pretrained_tokenizer", "tokenizer_sample", "train_bpe"]

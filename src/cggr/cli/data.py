"""Data for ``cggr race``: corpora, tokenizer, train / held-out split, batches in a fixed order. No downloads.

This module gathers the public names of the modules that do the work, so that ``from cggr.cli.data import ...``
keeps working; each concept lives in its own module:

* :mod:`cggr.cli.corpora`: which documents a ``--data`` source is made of.
* :mod:`cggr.cli.tokenizer`: the BPE trained on the training split, a pretrained model's tokenizer, encoding.
* :mod:`cggr.cli.cache`: where tokenizers and token ids are cached, under which key.
* :mod:`cggr.cli.split`: the train / held-out split by document and the held-out blocks.
* :mod:`cggr.cli.batching`: blocks, padding and the seeded training order (:class:`BatchStream`).
* :mod:`cggr.cli.dataset`: :class:`RaceData` and the loaders that put the above together.

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

from cggr.cli.batching import BatchStream
from cggr.cli.cache import cache_dir
from cggr.cli.corpora import (
    CODE_PACKAGES,
    MAX_FILE_BYTES,
    Document,
    code_package_documents,
    glob_documents,
    package_dirs,
    path_documents,
    stdlib_documents,
    stdlib_root,
)
from cggr.cli.dataset import RaceData, load_arithmetic_data, load_text_data
from cggr.cli.split import (
    GROUPS,
    HELDOUT_PERCENT,
    MAX_BLOCKS_PER_FILE,
    block_group,
    is_test_path,
    prose_share,
    select_heldout_blocks,
    split_documents,
)
from cggr.cli.tokenizer import EOS, TOKENIZER_SAMPLE_CHARS, TextTokenizer, pretrained_tokenizer, train_bpe

__all__ = ["CODE_PACKAGES", "EOS", "GROUPS", "HELDOUT_PERCENT", "MAX_BLOCKS_PER_FILE", "MAX_FILE_BYTES",
           "TOKENIZER_SAMPLE_CHARS", "BatchStream", "Document", "RaceData", "TextTokenizer", "block_group", "cache_dir",
           "code_package_documents", "glob_documents", "is_test_path", "load_arithmetic_data", "load_text_data",
           "package_dirs", "path_documents", "pretrained_tokenizer", "prose_share", "select_heldout_blocks",
           "split_documents", "stdlib_documents", "stdlib_root", "train_bpe"]

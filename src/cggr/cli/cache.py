"""Where ``cggr race`` caches its tokenizers and token ids, and under which key.

A cache entry is a folder ``<cache_dir>/<kind>-<key>`` (kind ``text`` or ``arith``) whose key is a hash of
everything the entry depends on (:data:`CACHE_VERSION`, the settings, and for text corpora every document's key,
length and content hash): a changed corpus or setting gets a new folder, never a stale one. Token ids are stored
as int32 (half the disk of int64; vocabularies are < 2**31) and read back as int64.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

CACHE_VERSION = 1  # part of every key: bump it when what a cache folder holds changes


def cache_dir() -> Path:
    """Where tokenizers and token ids are cached (created on demand): ``$CGGR_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/cggr``, else ``~/.cache/cggr``."""
    root = os.environ.get("CGGR_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "cggr"


def cache_key(parts: dict[str, Any]) -> str:
    """A 20-hex-digit SHA-256 of ``parts`` (JSON with sorted keys): equal settings, equal key."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()[:20]


def save_token_ids(path: Path, ids: np.ndarray) -> None:
    """Write a flat id stream to ``path`` (``.npy``, int32), creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, ids.astype(np.int32))


def load_token_ids(path: Path) -> np.ndarray:
    """A flat id stream written by :func:`save_token_ids`, as int64."""
    return np.load(path).astype(np.int64)


__all__ = ["CACHE_VERSION", "cache_dir", "cache_key", "load_token_ids", "save_token_ids"]

"""Reading the per-arm rows of a race record (``payload["arms"]``), shared by the report and the plot."""

from __future__ import annotations

from typing import Any


def row_seed(row: dict[str, Any], settings: dict[str, Any] | None = None) -> int:
    """The init seed of an arm row (records written before ``--seeds`` carry it in the settings only)."""
    seed = row.get("seed")
    return int(seed if seed is not None else (settings or {}).get("seed", 0))


def arm_names(arms: list[dict[str, Any]]) -> list[str]:
    """The arms in order of first appearance."""
    return list(dict.fromkeys(a["arm"] for a in arms))


def seeds_of(arms: list[dict[str, Any]], settings: dict[str, Any] | None = None) -> list[int]:
    """The seeds the rows cover, sorted."""
    return sorted({row_seed(a, settings) for a in arms})


__all__ = ["arm_names", "row_seed", "seeds_of"]

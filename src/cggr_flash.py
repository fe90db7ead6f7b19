"""Seed-compatible import path: ``from cggr_flash import enable_flash_attention`` (same as ``cggr.flash``)."""

from cggr.flash import enable_flash_attention, get_flash_attention_info, load_model_with_flash_attention

__all__ = ["enable_flash_attention", "get_flash_attention_info", "load_model_with_flash_attention"]

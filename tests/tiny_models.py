"""Tiny random-weight Hugging Face models shared by the tests (built from a config: no download).

Shape legend: V vocabulary.
"""

from __future__ import annotations

import torch


def tiny_llama(vocab_size: int, *, seed: int = 0, layers: int = 2, intermediate_size: int = 48,
               max_position_embeddings: int = 64):
    """A ``LlamaForCausalLM`` with hidden size 32, 2 attention heads and 1 key-value head, its weights drawn after
    ``torch.manual_seed(seed)`` (so the same arguments give the same model)."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=intermediate_size,
                                   num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=max_position_embeddings)
    return transformers.LlamaForCausalLM(cfg)

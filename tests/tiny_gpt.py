"""A hand-written nanoGPT-style causal LM (no transformers): ``forward(idx)`` returns the logits tensor.

Shape legend: B batch, T sequence length, C channels, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, c: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(c)
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)
        self.ln2 = nn.LayerNorm(c)
        self.mlp = nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c))

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor | None = None) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()  # (T, T) causal
        if key_padding is not None:  # (B, T) 1 = token: pads are never attended to (a pad attends to itself)
            mask = mask & (key_padding.bool()[:, None, None, :] | torch.eye(t, dtype=torch.bool, device=x.device))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, T, C / heads)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """``forward(idx)`` -> logits (B, T, V). ``blocks`` is the layer list (not a Hugging Face path)."""

    def __init__(self, vocab: int = 67, c: int = 32, layers: int = 3, heads: int = 2, max_t: int = 64) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, c)
        self.wpe = nn.Embedding(max_t, c)
        self.blocks = nn.ModuleList(Block(c, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(c)
        self.head = nn.Linear(c, vocab, bias=False)

    def hidden(self, idx: torch.Tensor, num_layers: int | None = None, key_padding=None) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in list(self.blocks)[:num_layers]:
            x = block(x, key_padding)
        return self.ln_f(x)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(idx))


class TupleGPT(TinyGPT):
    """nanoGPT's convention: ``forward(idx, targets=None)`` returns ``(logits, loss)``."""

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        logits = self.head(self.hidden(idx))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


class Out:
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


class MaskedGPT(TinyGPT):
    """``forward(tokens, attention_mask=None)`` returning an object with ``.logits`` (litgpt/torchtitan-like)."""

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Out:
        return Out(self.head(self.hidden(tokens, key_padding=attention_mask)))


class IdsGPT(TinyGPT):
    """Hugging Face argument names, but the logits tensor as output: ``forward(input_ids, attention_mask=None)``."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.hidden(input_ids, key_padding=attention_mask))


class KwGPT(TinyGPT):
    """A signature no default call fits: ``forward(*, tokens, pad)``; needs a ``forward_fn`` adapter."""

    def forward(self, *, tokens: torch.Tensor, pad: torch.Tensor | None = None) -> dict:
        return {"scores": self.head(self.hidden(tokens, key_padding=pad))}

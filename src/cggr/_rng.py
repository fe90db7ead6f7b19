"""Counter-based random numbers that ``torch.compile`` can trace and CUDA graphs can capture.

A ``torch.Generator`` cannot enter a compiled graph (dynamo graph-breaks on every op that receives one), so the
``stratified`` and ``random`` strategies of the modules (:class:`cggr.CGGRLoss`, :class:`cggr.CGGRScorer`,
:class:`cggr.CGGRModel`) draw from :class:`CounterRNG` instead: value ``i`` of draw ``c`` is a 32-bit integer hash
of ``(seed, c, i)`` (three rounds of the "lowbias32" mixer), so a draw is a handful of elementwise integer ops,
its state is a single int64 tensor (the draw counter, a module buffer: saved in ``state_dict``, moved by
``.to()``) advanced in place by every draw, with no host synchronisation, and the same seed gives the same numbers
on every device. It is a hash, not a cryptographic generator; its 24-bit uniforms are for picking tokens and
sequences.

All integer arithmetic stays in [0, 2^48) inside int64 tensors (no overflow, logical shifts); the per-draw key is
computed on the counter's device, or on the host when the counter is a CPU tensor (reading it never waits for a
GPU), so a module left on the CPU can draw for CUDA inputs without a host-device copy.
"""

from __future__ import annotations

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x · c) mod 2^32 for int64 ``x`` in [0, 2^32) and a constant ``c`` < 2^32 (16-bit halves: no overflow)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: Tensor) -> Tensor:
    """The 'lowbias32' integer hash (C. Wellons) of int64 values in [0, 2^32); output in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


class CounterRNG:
    """Uniform random numbers from a hash of (seed, draw counter, index).

    Args:
        seed: Any Python int (its low 64 bits are used), or a 0-d int64 tensor holding them (two's complement;
            typically the module's ``rng_seed`` buffer). A tensor is read at every draw, so whatever writes it in
            place (DDP's buffer broadcast from rank 0, ``load_state_dict``, ``copy_``) takes effect at once.
        counter: 0-d int64 tensor holding the number of draws made so far; every :meth:`uniform` call adds 1 to
            it in place (typically a module buffer, so the stream resumes from a ``state_dict``).
    """

    def __init__(self, seed: int | Tensor, counter: Tensor) -> None:
        if isinstance(seed, Tensor):
            if seed.dim() != 0 or seed.dtype != torch.int64:
                raise TypeError(f"seed must be an int or a 0-d int64 tensor, got {seed!r}")
        elif isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int or a 0-d int64 tensor, got {type(seed).__name__}")
        if not isinstance(counter, Tensor) or counter.dim() != 0 or counter.dtype != torch.int64:
            raise TypeError(f"counter must be a 0-d int64 tensor, got {counter!r}")
        self.seed = seed
        self.counter = counter

    def _seed_halves(self, device: torch.device | str) -> tuple[int | Tensor, int | Tensor]:
        """Low and high 32 bits of the seed: Python ints for an int or a CPU tensor read eagerly (which never
        waits for a GPU), else 0-d int64 tensors on ``device`` (a device buffer, or any buffer while tracing)."""
        seed = self.seed
        if isinstance(seed, Tensor):
            if seed.device.type != "cpu" or torch.compiler.is_compiling():
                seed = seed.to(device)
                return seed & _M32, (seed >> 32) & _M32  # arithmetic shift, then the low 32 bits: exact
            seed = int(seed)
        seed &= (1 << 64) - 1
        return seed & _M32, seed >> 32

    def uniform(self, shape: tuple[int, ...] | torch.Size, device: torch.device | str) -> Tensor:
        """fp32 values in [0, 1) (multiples of 2^-24) of the given shape on ``device``; advances the counter."""
        shape = torch.Size(shape)
        if self.counter.device.type == "cpu" and not torch.compiler.is_compiling():
            if _capturing():  # int(counter) would freeze this draw into the graph: every replay would repeat it
                raise RuntimeError(
                    "CounterRNG: the draw counter is a CPU tensor while a CUDA graph is being captured; move the "
                    "module that owns it (e.g. the CGGRModel) to the GPU so that the counter advances in the graph"
                )
            c = int(self.counter)  # a host value already: no copy to the device, no sync
        else:
            c = self.counter.to(device)  # 0-d (no copy when it lives there, e.g. a module moved with .to())
        seed_lo, seed_hi = self._seed_halves(device)
        key = _mix32(_mix32((c & _M32) ^ seed_lo) ^ ((c >> 32) & _M32) ^ seed_hi)  # 0-d, per draw
        idx = torch.arange(shape.numel(), device=device, dtype=torch.int64)  # (n,)
        h = _mix32(_mix32((idx & _M32) ^ key) ^ (idx >> 32) ^ seed_lo)
        h = _mix32(h ^ key)
        self.counter.add_(1)
        return ((h >> 8).to(torch.float32) * (2.0**-24)).reshape(shape)

    def permutation(self, n: int, device: torch.device | str) -> Tensor:
        """A uniformly random permutation of ``range(n)`` (long, on ``device``); advances the counter."""
        return torch.argsort(self.uniform((n,), device), stable=True)


def _capturing() -> bool:
    """True while the current CUDA stream is being captured into a graph (False without CUDA)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def uniform(shape: tuple[int, ...] | torch.Size, device: torch.device | str,
            generator: torch.Generator | CounterRNG | None) -> Tensor:
    """fp32 uniforms in [0, 1) from ``generator`` (a :class:`CounterRNG`, a ``torch.Generator`` or the global one)."""
    if isinstance(generator, CounterRNG):
        return generator.uniform(shape, device)
    return torch.rand(shape, device=device, generator=generator)


def permutation(n: int, device: torch.device | str, generator: torch.Generator | CounterRNG | None) -> Tensor:
    """A random permutation of ``range(n)`` from ``generator`` (as :func:`uniform`)."""
    if isinstance(generator, CounterRNG):
        return generator.permutation(n, device)
    return torch.randperm(n, device=device, generator=generator)


__all__ = ["CounterRNG", "permutation", "uniform"]

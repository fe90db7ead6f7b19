"""Argument checks shared by the public API.

Every check raises ``ValueError`` or ``TypeError`` whose message names the argument, the value received and
what was expected (docs/design.md §8). Checks that need a value from the device are skipped while ``torch.compile``
traces, and on accelerators they run as device-side asserts so the host never waits.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

SCORING_MODES = ("entropy", "margin", "loss", "combined")
SELECTION_STRATEGIES = ("topk", "stratified", "sequence_aware", "fixed_quota", "random")
REDUCTIONS = ("mean", "sum")


def check_choice(name: str, value: object, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_ratio(name: str, value: object) -> float:
    """A ratio in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in (0, 1], got {type(value).__name__} {value!r}")
    value = float(value)
    if not (0.0 < value <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return value


def check_ratio_tensor(ratio: torch.Tensor, device: torch.device, name: str = "ratio") -> None:
    """A 0-d floating-point tensor in (0, 1] on ``device`` or the CPU, checked without a host sync.

    Shape, dtype and device are metadata (free). The value: a CPU tensor is read eagerly (reading host memory
    never waits for a device) and a bad one is a ``ValueError``; a tensor on an accelerator, or any tensor while
    ``torch.compile`` traces, is checked by a device-side assert (``torch._assert_async``), which raises a
    ``RuntimeError`` at the next synchronisation instead of stalling the host now (on CUDA a device-side assert:
    the context is unusable afterwards, as with an out-of-range target).
    """
    if not ratio.is_floating_point():
        raise TypeError(f"{name} must be a float or a 0-d floating-point tensor, got {ratio.dtype}")
    if ratio.dim() != 0:
        raise ValueError(f"{name} must be a 0-d tensor, got shape {tuple(ratio.shape)}")
    if ratio.device != device and ratio.device.type != "cpu":
        raise ValueError(f"{name} is on {ratio.device} but difficulty is on {device}; move them together")
    ok = (ratio > 0) & (ratio <= 1)  # NaN fails both
    if ratio.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok):
            raise ValueError(f"{name} must be in (0, 1], got {float(ratio)!r}")
    else:
        torch._assert_async(ok, f"{name} must be in (0, 1]")


def check_int(name: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return value


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def check_ignore_index(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"ignore_index must be an int, got {value!r}")
    return value


def check_seed(value: object) -> int | None:
    """``None`` or an int >= 0."""
    return None if value is None else check_int("seed", value, minimum=0)


def check_finite_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a finite number, got {type(value).__name__} {value!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_sensitivity(value: object, name: str = "threshold_sensitivity") -> float:
    """The dynamic threshold's strength: a number in [0, 1], the range the original ``cggr`` accepted."""
    value = check_finite_float(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return value


def check_logits_targets(
    logits: object, targets: object | None, *, ignore_index: int, allowed_ranks: tuple[int, ...] = (2, 3)
) -> None:
    """Validate ``logits`` (..., V), optional ``targets`` (...) and ``ignore_index``, as every scoring/loss entry
    point uses them."""
    check_ignore_index(ignore_index)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() not in allowed_ranks:
        ranks = " or ".join(f"{r}-D" for r in allowed_ranks)
        raise ValueError(f"logits must be {ranks} ((N, V) or (B, T, V)), got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    if logits.shape[-1] < 1:
        raise ValueError(f"logits must have a vocabulary dimension V >= 1, got shape {tuple(logits.shape)}")
    if targets is None:
        return
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor of class indices, got dtype {targets.dtype}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"targets shape {tuple(targets.shape)} does not match logits batch/seq shape "
            f"{tuple(logits.shape[:-1])}"
        )
    if targets.device != logits.device:
        raise ValueError(f"targets are on {targets.device} but logits are on {logits.device}; move them together")
    check_target_range(targets, logits.shape[-1], ignore_index=ignore_index)


def check_target_range(targets: torch.Tensor, vocab_size: int, *, ignore_index: int, name: str = "targets") -> None:
    """Targets must lie in [0, V) or equal ``ignore_index`` (``name``: the argument named in the message).

    On CPU this is an eager ``ValueError``. On accelerators it is a device-side assert (no host sync), which
    surfaces as a ``RuntimeError`` at the next synchronisation. Skipped while ``torch.compile`` traces.
    """
    if torch.compiler.is_compiling() or targets.numel() == 0:
        return
    bad = ((targets < 0) | (targets >= vocab_size)) & (targets != ignore_index)
    if targets.device.type == "cpu":
        if bool(bad.any()):
            first = targets[bad][0].item()
            raise ValueError(
                f"{name} must be in [0, {vocab_size}) or equal ignore_index={ignore_index}, found {first}"
            )
    else:
        torch._assert_async(~bad.any(), f"{name} must be in [0, {vocab_size}) or equal ignore_index={ignore_index}")

"""Attention-backend helpers: pick FlashAttention-2, PyTorch SDPA or eager attention for a Hugging Face model.

Backends, fastest first:

=====================  ===========================================================================
``flash_attention_2``  needs the ``flash-attn`` package, a CUDA device and fp16/bf16 weights
``sdpa``               ``torch.nn.functional.scaled_dot_product_attention`` (any device/dtype)
``eager``              the model's plain matmul-softmax attention (always available)
=====================  ===========================================================================

Switching goes through transformers' own ``model.set_attn_implementation`` (or the ``attn_implementation``
argument of ``from_pretrained``), so a :class:`cggr.TruncatedRouter` built earlier follows the change.
A backend that is requested explicitly but cannot run raises ``ValueError`` saying why; ``'auto'`` picks the
fastest usable one.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from torch import nn

BACKENDS = ("auto", "flash_attention_2", "sdpa", "eager")
_HALF = (torch.float16, torch.bfloat16)


def _flash_attn_version() -> str | None:
    if importlib.util.find_spec("flash_attn") is None:
        return None
    try:
        import flash_attn
    except ImportError:
        return None
    return getattr(flash_attn, "__version__", "unknown")


def _transformers_version() -> str | None:
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


def get_flash_attention_info() -> dict[str, Any]:
    """What this machine can run.

    Returns:
        dict with ``flash_attn_available`` (package importable), ``flash_attn_version``, ``sdpa_available``,
        ``cuda_available``, ``device_name``, ``bf16_supported``, ``transformers_version`` and
        ``recommended_backend`` (for a CUDA model in fp16/bf16).
    """
    fa = _flash_attn_version()
    cuda = torch.cuda.is_available()
    sdpa = hasattr(torch.nn.functional, "scaled_dot_product_attention")
    return {
        "flash_attn_available": fa is not None,
        "flash_attn_version": fa,
        "sdpa_available": sdpa,
        "cuda_available": cuda,
        "device_name": torch.cuda.get_device_name() if cuda else "cpu",
        "bf16_supported": bool(cuda and torch.cuda.is_bf16_supported()),
        "transformers_version": _transformers_version(),
        "recommended_backend": "flash_attention_2" if (fa and cuda) else ("sdpa" if sdpa else "eager"),
    }


def _flash_unusable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    if _flash_attn_version() is None:
        return "the flash-attn package is not installed (pip install cggr[flash])"
    if device.type != "cuda":
        return f"it needs a CUDA device, the model is on {device}"
    if dtype not in _HALF:
        return f"it needs fp16 or bf16 weights, the model is {dtype}"
    return None


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def _choose(backend: str, device: torch.device, dtype: torch.dtype, supports: dict[str, bool], what: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    if backend == "auto":
        if supports.get("flash_attention_2", True) and _flash_unusable_reason(device, dtype) is None:
            return "flash_attention_2"
        if supports.get("sdpa", True) and hasattr(torch.nn.functional, "scaled_dot_product_attention"):
            return "sdpa"
        return "eager"
    if backend == "flash_attention_2":
        reason = _flash_unusable_reason(device, dtype)
        if reason is not None:
            raise ValueError(f"backend 'flash_attention_2' is unusable for {what}: {reason}")
    if not supports.get(backend, True):
        raise ValueError(f"backend {backend!r} is not supported by {what}")
    return backend


def _supports(model_or_cls: Any) -> dict[str, bool]:
    return {
        "flash_attention_2": bool(getattr(model_or_cls, "_supports_flash_attn", True)),
        "sdpa": bool(getattr(model_or_cls, "_supports_sdpa", True)),
        "eager": True,
    }


def enable_flash_attention(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Switch a loaded Hugging Face model's attention implementation in place.

    Args:
        model: A transformers ``PreTrainedModel`` (its weights' device and dtype decide what is usable).
        backend: ``'auto'`` (flash_attention_2 if usable, else sdpa, else eager), ``'flash_attention_2'``,
            ``'sdpa'`` or ``'eager'``.

    Returns:
        The same model (for chaining).

    Raises:
        ValueError: unknown backend, a backend that cannot run here (with the reason), or a model whose
            implementation cannot be switched after loading.
        TypeError: ``model`` has no ``set_attn_implementation`` (not a transformers model).
    """
    if not callable(getattr(model, "set_attn_implementation", None)):
        raise TypeError(
            f"model must be a transformers PreTrainedModel with set_attn_implementation, got {type(model).__name__}"
        )
    device, dtype = _model_device_dtype(model)
    impl = _choose(backend, device, dtype, _supports(model), type(model).__name__)
    model.set_attn_implementation(impl)
    current = getattr(model.config, "_attn_implementation", None)
    if current != impl:
        if backend == "auto":
            return model  # the model keeps what it has (e.g. Falcon cannot switch after loading)
        raise ValueError(
            f"{type(model).__name__} kept attention implementation {current!r} instead of {impl!r}: it cannot "
            "switch after loading; pass attn_implementation to from_pretrained (load_model_with_flash_attention)"
        )
    return model


def load_model_with_flash_attention(
    name_or_path: str,
    backend: str = "auto",
    model_class: Any = None,
    **kwargs: Any,
) -> nn.Module:
    """``from_pretrained`` with the fastest usable attention backend.

    Args:
        name_or_path: Hub id or local folder.
        backend: As in :func:`enable_flash_attention`.
        model_class: transformers class to load with (default ``AutoModelForCausalLM``).
        **kwargs: Passed to ``from_pretrained``. ``dtype`` (or ``torch_dtype``) defaults to bf16 when CUDA is
            available; ``device_map`` is passed through. The backend is chosen for CUDA when CUDA is available
            and ``device_map`` is ``None``, ``'auto'`` or names a CUDA device: with ``None`` the model loads on
            the CPU and must be moved to the GPU before use (flash_attention_2 does not run on a CPU); pass
            ``device_map='cpu'`` to choose for the CPU.

    Returns:
        The loaded model.
    """
    if model_class is None:
        from transformers import AutoModelForCausalLM

        model_class = AutoModelForCausalLM
    dtype_key = "torch_dtype" if "torch_dtype" in kwargs else "dtype"
    dtype = kwargs.get(dtype_key)
    if dtype is None and torch.cuda.is_available():
        dtype = torch.bfloat16
        kwargs[dtype_key] = dtype
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    device_map = kwargs.get("device_map")
    on_cuda = torch.cuda.is_available() and (
        device_map is None
        or (isinstance(device_map, str | torch.device) and "cuda" in str(device_map))
        or device_map == "auto"
    )
    device = torch.device("cuda" if on_cuda else "cpu")
    eff_dtype = dtype if isinstance(dtype, torch.dtype) else torch.get_default_dtype()
    impl = _choose(backend, device, eff_dtype, {}, str(name_or_path))
    return model_class.from_pretrained(name_or_path, attn_implementation=impl, **kwargs)


__all__ = ["enable_flash_attention", "get_flash_attention_info", "load_model_with_flash_attention"]

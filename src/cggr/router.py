"""Truncated router: the model's own embeddings, its first k layers and its own final norm and head.

Shape legend: B batch, T sequence length, V vocabulary, L the model's layer count, k router layers.

How it is built (docs/design.md §5.2, the "shallow shell"): new objects are made only along the path from the root
module to the decoder-layer ``ModuleList`` (a new object of each module's class sharing its attributes, with its
own copy of the ``_modules`` dict), that list is replaced by ``nn.ModuleList(layers[:k])`` and every config
on the path by a copy with ``num_hidden_layers = k`` (and ``layer_types[:k]`` where present). The router then
calls the shell's OWN ``forward``, so every family-specific detail (Gemma's embedding scale and final softcap,
ALiBi, GPT-2's ``wpe``, BERT's MLM head, Mamba's mixer) applies unchanged. No parameter or buffer is copied:
every tensor the router touches is the model's.

    model ──path──> shell root ──path──> shell body ──> ModuleList(layers[:k])      (new objects: path only)
       └── embeddings, norms, head, layers: the very same modules (shared, never copied)

The router holds the model by a plain (non-module) reference, so it registers no submodules: its
``state_dict()`` and ``parameters()`` are empty, an optimizer over ``CGGRModel.parameters()`` sees every
parameter once, and ``router.eval()`` does not change the model's mode.

A shell goes stale when the model's structure changes (``set_attn_implementation``, ``resize_token_embeddings``
replacing the embeddings or head, PEFT wrapping a module). The router keys a cache on the identity of every
object on the path, their direct children and tensors, the first k layers and the attention implementation,
and rebuilds the shell when the key changes (checked on every eager call; skipped while ``torch.compile``
traces, where dynamo's own guards apply).
"""

from __future__ import annotations

import copy
import types
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from cggr._calling import ForwardFn, call_model, call_style, check_forward_fn, logits_of, unwrap_model
from cggr._validation import check_int
from cggr.integrations.peft_models import prompt_learning_reason

# Attribute paths from a (task-head) model to its layer list, per family.
_LAYER_PATHS: tuple[tuple[str, ...], ...] = (
    ("model", "layers"),  # Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2, Gemma3 (text), Phi-3
    ("transformer", "h"),  # GPT-2, GPT-J, Falcon
    ("gpt_neox", "layers"),  # GPT-NeoX
    ("bert", "encoder", "layer"),  # BERT
    ("roberta", "encoder", "layer"),  # RoBERTa
    ("backbone", "layers"),  # Mamba, Mamba2
    ("layers",),  # bare decoder models (LlamaModel, MambaModel, ...)
    ("h",),  # GPT2Model, GPTJModel, FalconModel
    ("encoder", "layer"),  # BertModel, RobertaModel
)


def find_layer_path(model: nn.Module) -> tuple[str, ...] | None:
    """Attribute path from ``model`` to its list of transformer/SSM blocks, or ``None`` when unknown."""
    for path in _LAYER_PATHS:
        obj: Any = model
        for name in path:
            obj = obj._modules.get(name) if isinstance(obj, nn.Module) else None
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return path
    return None


def _attn_impl(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "_attn_implementation", None) if cfg is not None else None


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A new object of the module's class with the module's attributes and a copy of its child dict.

    Not ``copy.copy``: FSDP2's ``fully_shard`` swaps the class for one whose ``__new__`` re-runs ``__init__``
    (which needs the model's constructor arguments). The parameter and buffer dicts are the module's own, not
    copies: FSDP2 swaps sharded and unsharded parameters in them around every forward, and the shell must see
    what the module sees. Hooks are shared too, so FSDP2's pre-forward hook gathers a sharded root's parameters
    before the shell's forward runs.
    """
    shell = object.__new__(type(module))
    shell.__dict__.update(module.__dict__)
    shell._modules = dict(module._modules)
    # Methods patched onto the instance and bound to it (Accelerate's mixed precision and ``prepare`` wrap
    # ``model.forward`` this way, and so do Trainer runs with bf16/fp16) would still run the ORIGINAL module, i.e.
    # every layer: bind them to the shell instead, keeping the wrapper (e.g. its autocast).
    for name, value in vars(module).items():
        if isinstance(value, types.MethodType) and value.__self__ is module:
            shell.__dict__[name] = types.MethodType(value.__func__, shell)
    return shell


def _truncated_config(config: Any, k: int) -> Any:
    cfg = copy.copy(config)
    cfg.num_hidden_layers = k  # attribute_map turns this into n_layer / num_layers where the family uses them
    layer_types = getattr(config, "layer_types", None)
    derived = isinstance(getattr(type(config), "layer_types", None), property)  # Mamba: computed from the count
    if isinstance(layer_types, list | tuple) and not derived:
        cfg.layer_types = list(layer_types[:k])
    return cfg


class TruncatedRouter(nn.Module):
    """Cheap difficulty model: the model's embeddings + its first ``num_layers`` layers + its own norm and head.

    Build it with :func:`create_truncated_router`. Calling it runs under ``torch.no_grad()`` and returns the
    logits ``(B, T, V)`` of the truncated model (the full model's logits when the architecture is unknown:
    ``passthrough``). It shares every parameter with the model and registers none of them.

    Args:
        model: A Hugging Face model (causal LM, masked LM or bare backbone), possibly wrapped in DDP/PEFT, or a
            plain PyTorch model (see ``layer_path`` and ``forward_fn``).
        num_layers: Layers kept, >= 1. ``num_layers >= L`` gives the full model.
        forward_fn: How to call the (truncated) model, ``forward_fn(model, input_ids, attention_mask, **kwargs)``
            returning logits or an output holding them (see :mod:`cggr._calling`); ``None``: by its signature
            (``model(input_ids=..., attention_mask=...)`` for Hugging Face models, ``model(input_ids)`` for a
            plain ``forward(idx)``).
        layer_path: Dotted attribute path from ``model`` to its ``nn.ModuleList`` of blocks (e.g. ``'blocks'``,
            ``'transformer.h'``) for models outside the known families; its ``forward`` must loop over that
            list. ``None``: the known Hugging Face paths, else passthrough.
    """

    def __init__(
        self,
        model: nn.Module,
        num_layers: int = 4,
        forward_fn: ForwardFn | None = None,
        layer_path: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.num_layers = check_int("num_layers", num_layers, minimum=1)
        self.forward_fn = check_forward_fn(forward_fn)
        self._layer_path = _check_layer_path(unwrap_model(model), layer_path)
        reason = prompt_learning_reason(model)
        if reason:  # the router calls the base model (LoRA layers sit inside it; a prompt or prefix does not)
            warnings.warn(f"create_truncated_router: {reason}: the router scores the base model's first layers "
                          "without them (pass router= to score another way)", stacklevel=3)
        self._call_style = call_style(model)
        # Plain references (object.__setattr__ bypasses nn.Module registration): no duplicate parameters.
        object.__setattr__(self, "_wrapped", model)
        self._shell: nn.Module | None = None
        self._key: tuple | None = None
        self._path: tuple[str, ...] | None = None
        self.passthrough = False
        self._refresh()

    # ------------------------------------------------------------------ structure
    @property
    def model(self) -> nn.Module:
        """The (unwrapped) model this router reads from."""
        return unwrap_model(self._wrapped)

    def _path_objects(self, root: nn.Module) -> list[nn.Module]:
        objs = [root]
        for name in self._path or ():
            objs.append(objs[-1]._modules[name])
        return objs

    def _find_path(self, root: nn.Module) -> tuple[str, ...] | None:
        return self._layer_path if self._layer_path is not None else find_layer_path(root)

    def _cache_key(self, root: nn.Module) -> tuple:
        path = self._find_path(root)
        if path is None:
            return (id(root), None, _attn_impl(root))
        key: list[Any] = [id(root), path, _attn_impl(root), getattr(getattr(root, "config", None), "vocab_size", None)]
        obj: Any = root
        for name in path:
            key.append(tuple((n, id(m)) for n, m in obj._modules.items()))
            key.append(tuple((n, id(p)) for n, p in obj._parameters.items()))
            key.append(tuple((n, id(b)) for n, b in obj._buffers.items()))
            key.append(id(vars(obj).get("forward")))  # a forward patched onto the instance (Accelerate's prepare)
            obj = obj._modules[name]
        key.append(tuple(id(layer) for layer in list(obj)[: self.num_layers]))
        return tuple(key)

    def _refresh(self) -> None:
        root = self.model
        key = self._cache_key(root)
        if key == self._key:
            return
        self._key = key
        self._path = self._find_path(root)
        if self._path is None:
            if not self.passthrough:
                warnings.warn(
                    f"create_truncated_router: no known layer list in {type(root).__name__}; "
                    "using the full model as its own router (passthrough, no speed-up from the router).",
                    stacklevel=3,
                )
            self.passthrough = True
            object.__setattr__(self, "_shell", root)
        else:
            self.passthrough = False
            object.__setattr__(self, "_shell", self._build_shell(root))  # plain attribute, not a submodule

    def _build_shell(self, root: nn.Module) -> nn.Module:
        originals = self._path_objects(root)  # root, ..., layer list
        layers = originals[-1]
        k = min(self.num_layers, len(layers))
        configs: dict[int, Any] = {}
        shells = [_shallow_copy(m) for m in originals[:-1]]
        for shell, orig in zip(shells, originals[:-1], strict=True):
            cfg = getattr(orig, "config", None)
            if cfg is not None and hasattr(cfg, "num_hidden_layers"):
                if id(cfg) not in configs:
                    configs[id(cfg)] = _truncated_config(cfg, k)
                shell.__dict__["config"] = configs[id(cfg)]
        for parent, child, name in zip(shells[:-1], shells[1:], self._path[:-1], strict=True):
            parent._modules[name] = child
        shells[-1]._modules[self._path[-1]] = nn.ModuleList(list(layers)[:k])
        return shells[0]

    @property
    def layers_used(self) -> int:
        """Number of layers the router runs; -1 for a passthrough router (the whole model, layers not counted)."""
        if self.passthrough or self._path is None:
            return -1
        return len(self._path_objects(self._shell)[-1])

    # ------------------------------------------------------------------ forward
    def _sync_training(self) -> None:
        # The shells are snapshots: keep their train/eval flag equal to the module they copy.
        root = self.model
        if self._shell is root:
            return
        for shell, orig in zip(self._path_objects(self._shell)[:-1], self._path_objects(root)[:-1], strict=True):
            shell.training = orig.training

    @torch.no_grad()
    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        """Logits of the truncated model.

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T) 1 = real token, 0 = padding (optional).
            **kwargs: Forwarded to the model's forward (e.g. ``position_ids``, ``token_type_ids``).

        Returns:
            (B, T, V) logits in the model's dtype, without grad.
        """
        if not torch.compiler.is_compiling():
            self._refresh()
            self._sync_training()
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        # ``use_cache`` is left at the model's default on purpose: with ``use_cache=False``, no attention mask and
        # no cache, transformers (5.x) inspects position_ids for packed sequences, a host sync on CUDA that
        # serialises the router with the training step (seen on the H200). The standard training call keeps a
        # cache object and skips that check; the router does exactly what a standard forward does.
        mask = kwargs.pop("attention_mask", None)
        out = call_model(self._shell, self._call_style, input_ids, mask, self.forward_fn, **kwargs)
        return logits_of(out, f"router model {type(self._shell).__name__}")

    def extra_repr(self) -> str:
        kind = "passthrough" if self.passthrough else f"layers={self.layers_used}, path={'.'.join(self._path)}"
        return f"model={type(self.model).__name__}, num_layers={self.num_layers}, {kind}"

    # The router owns no tensors: keep it that way even if someone calls .to()/.cuda() on it.
    def _apply(self, fn, recurse: bool = True):
        return self


def _check_layer_path(model: nn.Module, layer_path: str | None) -> tuple[str, ...] | None:
    if layer_path is None:
        return None
    if not isinstance(layer_path, str) or not layer_path:
        raise TypeError(f"layer_path must be a dotted attribute path such as 'blocks', got {layer_path!r}")
    path = tuple(layer_path.split("."))
    obj: Any = model
    for name in path:
        obj = obj._modules.get(name) if isinstance(obj, nn.Module) else None
    if not isinstance(obj, nn.ModuleList) or len(obj) == 0:
        raise ValueError(
            f"layer_path={layer_path!r} does not lead from {type(model).__name__} to a non-empty nn.ModuleList "
            f"(found {type(obj).__name__})"
        )
    return path


def create_truncated_router(
    model: nn.Module, num_layers: int = 4, forward_fn: ForwardFn | None = None, layer_path: str | None = None
) -> TruncatedRouter:
    """Router over the first ``num_layers`` layers of ``model``, sharing all of its weights (nothing copied).

    Supported families (exact logits, tested): Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2, Gemma3 (text),
    Phi-3, GPT-2, GPT-J, Falcon (rotary and ALiBi), GPT-NeoX, BERT, RoBERTa, Mamba, Mamba2. Any other model
    whose layer list is not found is used whole (``passthrough``) with a warning naming its class.

    Plain PyTorch models: give ``layer_path`` (the attribute path to their ``nn.ModuleList`` of blocks) for a
    truncated router, else the model is used whole (passthrough); ``forward_fn`` adapts a call signature that is
    neither ``forward(input_ids=..., attention_mask=...)`` nor ``forward(idx)``.

    Args:
        model: The model to route for (DDP/FSDP/PEFT/compile wrappers are unwrapped).
        num_layers: Layers the router runs, >= 1.
        forward_fn: ``forward_fn(model, input_ids, attention_mask, **kwargs)`` (see :class:`TruncatedRouter`).
        layer_path: Dotted path to the block list, e.g. ``'blocks'`` (see :class:`TruncatedRouter`).

    Returns:
        A :class:`TruncatedRouter`; ``router(input_ids, attention_mask=...)`` gives (B, T, V) logits.
    """
    return TruncatedRouter(model, num_layers, forward_fn=forward_fn, layer_path=layer_path)


__all__ = ["TruncatedRouter", "create_truncated_router", "find_layer_path", "unwrap_model"]

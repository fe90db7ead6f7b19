"""Model presets for ``cggr race`` / ``cggr bench`` and the resolution of ``--model``.

``--model`` is one of:

* a preset name (:data:`PRESETS`): a Llama-architecture shape, built with random weights;
* a path to a Hugging Face ``config.json`` (or a folder holding only a config): random init from that config;
* a path to a local pretrained model folder (config + weights): loaded with ``from_pretrained``.

Random-init models get the vocabulary of the race's own tokenizer (the config's ``vocab_size`` is replaced, and
said so in the results); a pretrained model brings its own tokenizer, which the race then uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


class CLIError(Exception):
    """A user error: the command line prints its message on one line and exits non-zero (no traceback)."""


@dataclass(frozen=True)
class Preset:
    """A model shape plus the race defaults that suit it.

    Attributes:
        config: ``LlamaConfig`` keyword arguments (``vocab_size`` is set from the tokenizer).
        vocab_size: Size of the BPE vocabulary trained for this preset.
        seq_len: Tokens per training sequence (T).
        batch_size: Sequences per optimizer step of the ``standard`` arm (B).
        minutes: Default wall-clock budget per arm.
        router_layers: Default depth of the truncated router.
        lr: Peak learning rate (AdamW), reached after warm-up.
    """

    config: dict[str, Any]
    vocab_size: int
    seq_len: int
    batch_size: int
    minutes: float
    router_layers: int
    lr: float
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    # Sized so `cggr race` (4 arms, budget ladder, 1024 held-out blocks) takes ~3 minutes on 2 CPU cores,
    # tokenizer and evaluations included.
    "tiny": Preset(
        config=dict(
            hidden_size=192, intermediate_size=512, num_hidden_layers=6, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, rope_theta=10000.0,
        ),
        vocab_size=4096, seq_len=128, batch_size=8, minutes=0.4, router_layers=2, lr=2e-3,
        description="6 x 192 Llama, 4k BPE vocab (~3.3M parameters): CPU-sized",
    ),
    # The shape of HuggingFaceTB/SmolLM-135M (random init, our own tokenizer with the same vocabulary size).
    # Batch 32 x 1024 (32k tokens per standard step): a step bound by compute on an H100/H200-class GPU rather than
    # by kernel launches (at 8 x 512 every arm's step cost about the same whatever its work; docs/race.md).
    "smollm-135m": Preset(
        config=dict(
            hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=10000.0,
            rms_norm_eps=1e-5,
        ),
        vocab_size=49152, seq_len=1024, batch_size=32, minutes=10.0, router_layers=4, lr=1e-3,
        description="SmolLM-135M shape: 30 x 576 Llama, 49k vocab (~135M parameters)",
    ),
    # The shape of HuggingFaceTB/SmolLM-360M.
    "smollm-360m": Preset(
        config=dict(
            hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
            num_key_value_heads=5, max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=10000.0,
            rms_norm_eps=1e-5,
        ),
        vocab_size=49152, seq_len=512, batch_size=8, minutes=10.0, router_layers=4, lr=6e-4,
        description="SmolLM-360M shape: 32 x 960 Llama, 49k vocab (~360M parameters)",
    ),
}


@dataclass
class ModelSpec:
    """What ``--model`` resolved to.

    Attributes:
        name: The preset name or the path as given.
        kind: ``'preset'``, ``'config'`` (random init from a config.json) or ``'pretrained'``.
        preset: Race defaults (for a path: the ``tiny`` defaults scaled to the model, see :func:`resolve_model`).
        config: The transformers config object (``vocab_size`` not yet adjusted).
        path: Folder of a pretrained model (its tokenizer is used), else ``None``.
    """

    name: str
    kind: str
    preset: Preset
    config: Any
    path: Path | None = None

    @property
    def num_layers(self) -> int:
        return int(getattr(self.config, "num_hidden_layers", 0) or getattr(self.config, "n_layer", 0))


def _require_transformers():
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - transformers is a dependency of the bench extra
        raise CLIError("the race needs transformers: pip install 'cggr[bench]'") from exc
    return transformers


def resolve_model(spec: str) -> ModelSpec:
    """Turn ``--model`` into a :class:`ModelSpec`; raises :class:`CLIError` for unknown names and bad paths."""
    transformers = _require_transformers()
    if spec in PRESETS:
        preset = PRESETS[spec]
        config = transformers.LlamaConfig(vocab_size=preset.vocab_size, **preset.config)
        return ModelSpec(name=spec, kind="preset", preset=preset, config=config)
    path = Path(spec).expanduser()
    looks_like_path = any(ch in spec for ch in "/\\.") or path.exists()
    if not looks_like_path:
        raise CLIError(f"--model: unknown preset {spec!r}; expected one of {', '.join(PRESETS)} or a path")
    if not path.exists():
        raise CLIError(f"--model: path {str(path)!r} does not exist (expected a config.json or a model folder)")
    folder = path if path.is_dir() else path.parent
    config_file = path if path.is_file() else path / "config.json"
    if not config_file.is_file():
        raise CLIError(f"--model: no config.json in {str(path)!r}")
    try:
        config_dict = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CLIError(f"--model: cannot read {str(config_file)!r}: {exc}") from exc
    model_type = config_dict.get("model_type")
    if model_type is None:
        raise CLIError(f"--model: {str(config_file)!r} has no 'model_type'")
    config_dict = {k: v for k, v in config_dict.items() if k != "model_type"}
    try:
        config = transformers.AutoConfig.for_model(model_type, **config_dict)
    except (ValueError, KeyError) as exc:
        raise CLIError(f"--model: unsupported model_type {model_type!r} in {str(config_file)!r}") from exc
    weights = [*folder.glob("*.safetensors"), *folder.glob("pytorch_model*.bin")] if path.is_dir() else []
    kind = "pretrained" if weights else "config"
    base = PRESETS["smollm-135m"] if getattr(config, "hidden_size", 0) >= 512 else PRESETS["tiny"]
    layers = int(getattr(config, "num_hidden_layers", 4) or 4)
    preset = Preset(
        config={}, vocab_size=int(getattr(config, "vocab_size", base.vocab_size)), seq_len=base.seq_len,
        batch_size=base.batch_size, minutes=base.minutes, router_layers=max(1, min(base.router_layers, layers // 2)),
        lr=5e-5 if kind == "pretrained" else base.lr, description=f"{model_type} from {spec}",
    )
    return ModelSpec(name=spec, kind=kind, preset=preset, config=config, path=folder if kind == "pretrained" else None)


def build_model(spec: ModelSpec, vocab_size: int | None, *, seed: int, dtype: torch.dtype = torch.float32):
    """Instantiate the causal LM (random init seeded by ``seed``, or the pretrained weights) on the CPU.

    Args:
        spec: From :func:`resolve_model`.
        vocab_size: Vocabulary of the race's tokenizer for random-init models (``None``: keep the config's).
        seed: Seed of the random initialisation.
        dtype: Parameter dtype.
    """
    transformers = _require_transformers()
    if spec.kind == "pretrained":
        return transformers.AutoModelForCausalLM.from_pretrained(str(spec.path), torch_dtype=dtype)
    config = spec.config.__class__.from_dict(spec.config.to_dict())
    if vocab_size is not None:
        config.vocab_size = int(vocab_size)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # ids from another vocabulary would be wrong
        if getattr(config, key, None) is not None and getattr(config, key) >= config.vocab_size:
            setattr(config, key, None)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return model.to(dtype)


__all__ = ["PRESETS", "CLIError", "ModelSpec", "Preset", "build_model", "resolve_model"]

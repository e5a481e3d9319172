"""Per-architecture knowledge, declarative (Optimum style): where the embeddings, the decoder stack and the LM head
live, and how the KV cache is laid out. One subclass per family, registered by ``model_type``."""

from __future__ import annotations

from typing import ClassVar

from ...errors import BaseModelError

_REGISTRY: dict[str, type["Arch"]] = {}


def register(cls: type["Arch"]) -> type["Arch"]:
    for mt in cls.model_types:
        _REGISTRY[mt] = cls
    return cls


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def arch_for(config: dict) -> "Arch":
    """The architecture adapter for a base model's ``config.json`` (a plain dict: no transformers needed)."""
    mt = config.get("model_type")
    if mt not in _REGISTRY:
        raise BaseModelError(
            f"base model type {mt!r} is not supported; supported: {', '.join(supported_model_types())}"
        )
    return _REGISTRY[mt](config)


class Arch:
    """How a model family is wired. Attributes are dotted paths on the HF model with its LM head."""

    task_type: ClassVar[str] = "CAUSAL_LM"
    head_suffixes: ClassVar[tuple[str, ...]] = ("ForCausalLM", "LMHeadModel")
    model_types: ClassVar[tuple[str, ...]] = ()
    decoder_attr: ClassVar[str] = ""  # the stack that takes inputs_embeds/attention_mask/position_ids/cache
    embed_attr: ClassVar[str] = ""  # token embedding (nn.Embedding)
    lm_head_attr: ClassVar[str] = "lm_head"
    # config keys, first present wins
    hidden_keys: ClassVar[tuple[str, ...]] = ("hidden_size",)
    layers_keys: ClassVar[tuple[str, ...]] = ("num_hidden_layers",)
    heads_keys: ClassVar[tuple[str, ...]] = ("num_attention_heads",)
    kv_heads_keys: ClassVar[tuple[str, ...]] = ("num_key_value_heads",)
    positions_keys: ClassVar[tuple[str, ...]] = ("max_position_embeddings",)

    def __init__(self, config: dict):
        self.config = config

    def _get(self, keys: tuple[str, ...], default=None):
        for k in keys:
            if self.config.get(k) is not None:
                return self.config[k]
        if default is None:
            raise BaseModelError(f"base model config lacks {' / '.join(keys)}; expected a complete config.json")
        return default

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def hidden_size(self) -> int:
        return int(self._get(self.hidden_keys))

    @property
    def num_layers(self) -> int:
        return int(self._get(self.layers_keys))

    @property
    def num_heads(self) -> int:
        return int(self._get(self.heads_keys))

    @property
    def num_kv_heads(self) -> int:
        return int(self._get(self.kv_heads_keys, self.num_heads))

    @property
    def head_dim(self) -> int:
        hd = self.config.get("head_dim")
        return int(hd) if hd else self.hidden_size // self.num_heads

    @property
    def max_positions(self) -> int:
        return int(self._get(self.positions_keys))

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    @staticmethod
    def _resolve(module, dotted: str):
        for part in dotted.split("."):
            module = getattr(module, part)
        return module

    def decoder(self, model):
        return self._resolve(model, self.decoder_attr)

    def embed_tokens(self, model):
        return self._resolve(model, self.embed_attr)

    def lm_head(self, model):
        return self._resolve(model, self.lm_head_attr)

    def identity(self) -> dict:
        return {
            "arch": self.name,
            "task_type": self.task_type,
            "model_type": self.config.get("model_type"),
            "architectures": self.config.get("architectures"),
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_positions": self.max_positions,
            "eos_token_id": self.config.get("eos_token_id"),
            "bos_token_id": self.config.get("bos_token_id"),
        }


class CausalArch(Arch):
    """A decoder-only family (the decoder stack takes inputs_embeds/attention_mask/position_ids/cache)."""

"""Per-architecture knowledge, declarative (Optimum style): where the embeddings, the decoder stack and the LM head
live, how the config names the sizes, and how the KV cache is laid out. One subclass per family, registered by
``model_type``; a causal LM of another type gets :class:`GenericCausal` (tried, accepted only when validation passes).

Everything a family *computes* (sliding windows, soft-caps, q/k norms, partial rotary, NoPE layers, multipliers,
ALiBi, rope scaling) is traced from the family's own transformers code; what the export must know about it is
declared here, and :meth:`Arch.features` names the features a given config uses (for the manifest and the report)."""

from __future__ import annotations

from typing import ClassVar

from ...errors import BaseModelError

_REGISTRY: dict[str, type["Arch"]] = {}

SUPPORTED_MODELS_PAGE = "reference/supported-models.md"  # in the docs site (generated from the declarations)


def register(cls: type["Arch"]) -> type["Arch"]:
    for mt in cls.model_types:
        _REGISTRY[mt] = cls
    return cls


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def listed_archs() -> list[type["Arch"]]:
    """Every declared family, once each, in declaration order."""
    out: list[type[Arch]] = []
    for cls in _REGISTRY.values():
        if cls not in out:
            out.append(cls)
    return out


def _is_causal_lm(config: dict) -> bool:
    return any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in config.get("architectures") or [])


def arch_for(config: dict) -> "Arch":
    """The architecture adapter for a base model's ``config.json`` (a plain dict: no transformers needed)."""
    mt = config.get("model_type")
    if mt in _REGISTRY:
        return _REGISTRY[mt](config)
    if mt and _is_causal_lm(config):
        return GenericCausal(config)
    what = f"base model type {mt!r}" if mt else "a config.json without model_type"
    found = ", ".join(config.get("architectures") or []) or "no architectures entry"
    raise BaseModelError(
        f"{what} is not supported ({found}): expected a listed family ({', '.join(supported_model_types())}) or a "
        f"causal LM saved with its LM head (architectures ending in ForCausalLM), which is tried through the generic "
        f"path; see the supported models page ({SUPPORTED_MODELS_PAGE} in the docs)"
    )


def window_of(config) -> tuple[int | None, bool]:
    """(the sliding window, whether some layers attend fully) of a config — ``config.json`` as a dict or a loaded
    transformers config; (None, True) where no window limits attention within the model's positions."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    window = get("sliding_window")
    if get("use_sliding_window", True) is False or not window:
        return None, True
    types = get("layer_types")
    if types is not None and "sliding_attention" not in types:
        return None, True
    limit = get("max_position_embeddings")
    if limit is not None and int(window) >= int(limit):
        return None, True  # never reached
    return int(window), types is not None and "full_attention" in types


def _rope_sets(config: dict) -> list[dict]:
    """The rotary parameter sets of a config: transformers 5's ``rope_parameters`` (one set, or one per layer type)
    or the older ``rope_scaling``."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if params and all(isinstance(v, dict) for v in params.values()):
        return list(params.values())
    return [params] if params else []


def _rope_types(config: dict) -> set[str]:
    return {str(p.get("rope_type", p.get("type", "default"))) for p in _rope_sets(config)}


def _rope_value(config: dict, key: str, default) -> float:
    for p in _rope_sets(config):
        if p.get(key) is not None:
            return float(p[key])
    return float(config.get(key) or default or 1.0)


# feature name -> (predicate over config.json, what it means), in the order reports list them
FEATURES: dict[str, tuple] = {
    "sliding window": (lambda c: window_of(c)[0] is not None, "attention limited to the last N positions on some or all layers"),
    "attention soft-cap": (lambda c: bool(c.get("attn_logit_softcapping")), "tanh soft-capped attention scores"),
    "logit soft-cap": (lambda c: bool(c.get("final_logit_softcapping")), "tanh soft-capped final logits"),
    "embedding scale": (lambda c: c.get("model_type") in ("gemma", "gemma2", "gemma3_text")
                        or c.get("embedding_multiplier", 1.0) != 1.0, "embeddings multiplied before the decoder"),
    "q/k norm": (lambda c: c.get("model_type") in ("qwen3", "gemma3_text", "olmo2", "olmo3")
                 or bool(c.get("qk_layernorm")), "RMS/layer norms on queries and keys"),
    "partial rotary": (lambda c: _rope_value(c, "partial_rotary_factor", c.get("rotary_pct", 1.0)) < 1.0,
                       "rotary embeddings on part of each head"),
    "NoPE layers": (lambda c: bool(c.get("no_rope_layers") or c.get("no_rope_layer_interval")),
                    "layers without positional encoding"),
    "multipliers": (lambda c: any(k in c for k in ("residual_multiplier", "attention_multiplier", "logits_scaling")),
                    "residual, attention and logit multipliers"),
    "parallel block": (lambda c: bool(c.get("use_parallel_residual") or c.get("parallel_attn"))
                       or c.get("model_type") == "phi", "attention and MLP side by side"),
    "ALiBi": (lambda c: c.get("model_type") == "bloom" or bool(c.get("alibi")), "linear attention biases, no rotary"),
    "learned positions": (lambda c: c.get("model_type") in ("opt", "gpt2"), "a position table (OPT's offset 2)"),
    "rope scaling": (lambda c: bool(_rope_types(c) - {"default"}),
                     "scaled rotary frequencies (linear, dynamic, yarn, longrope, llama3)"),
    "grouped-query attention": (lambda c: c.get("num_key_value_heads") not in (None, c.get("num_attention_heads"))
                                or bool(c.get("multi_query")), "fewer key/value heads than query heads"),
    "tied head": (lambda c: c.get("tie_word_embeddings", True) is not False, "LM head shares the token embeddings"),
}


class Arch:
    """How a model family is wired. Attributes are dotted paths on the HF model with its LM head."""

    task_type: ClassVar[str] = "CAUSAL_LM"
    head_suffixes: ClassVar[tuple[str, ...]] = ("ForCausalLM", "LMHeadModel")
    model_types: ClassVar[tuple[str, ...]] = ()
    listed: ClassVar[bool] = True  # False: not a declared family (the generic path)
    family: ClassVar[str] = ""  # the name users know it by (docs)
    checkpoints: ClassVar[str] = ""  # released models of the family (docs)
    handles: ClassVar[str] = ""  # what the family needs and how it is handled (docs)
    fused: ClassVar[bool] = False  # the fused ONNX Runtime graph covers it (export/fusedgraph.py)
    decoder_attr: ClassVar[str] = ""  # the stack that takes inputs_embeds/attention_mask/position_ids/cache
    embed_attr: ClassVar[str] = ""  # token embedding (nn.Embedding)
    lm_head_attr: ClassVar[str] = "lm_head"
    # config keys, first present wins
    hidden_keys: ClassVar[tuple[str, ...]] = ("hidden_size",)
    layers_keys: ClassVar[tuple[str, ...]] = ("num_hidden_layers",)
    heads_keys: ClassVar[tuple[str, ...]] = ("num_attention_heads",)
    kv_heads_keys: ClassVar[tuple[str, ...]] = ("num_key_value_heads",)
    positions_keys: ClassVar[tuple[str, ...]] = ("max_position_embeddings",)
    default_positions: ClassVar[int | None] = None  # where the config names no limit (ALiBi)

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
        return int(self._get(self.positions_keys, self.default_positions))

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    def features(self) -> list[str]:
        """The features this config uses (names of :data:`FEATURES`)."""
        return [name for name, (uses, _) in FEATURES.items() if uses(self.config)]

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
            "listed_family": self.listed,
            "features": self.features() if self.task_type == "CAUSAL_LM" else [],
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
    """A decoder-only family: its decoder stack takes ``inputs_embeds``, an attention mask, position ids and a cache;
    :meth:`logits` does what its ``*ForCausalLM`` does after the head."""

    # what the family's *ForCausalLM does to the head's output, read from these config keys when set (in this order):
    # multiplied by logit_scale (Cohere), divided by logits_scaling (Granite), tanh soft-capped (Gemma 2/3)
    logit_keys: ClassVar[tuple[str, ...]] = ()

    def logits(self, logits):
        """The LM head's output -> the logits the family's ``*ForCausalLM`` returns (traced: torch ops only)."""
        c = self.config
        if "logit_scale" in self.logit_keys and c.get("logit_scale") not in (None, 1, 1.0):
            logits = logits * float(c["logit_scale"])
        if "logits_scaling" in self.logit_keys and c.get("logits_scaling") not in (None, 1, 1.0):
            logits = logits / float(c["logits_scaling"])
        if "final_logit_softcapping" in self.logit_keys and c.get("final_logit_softcapping"):
            cap = float(c["final_logit_softcapping"])
            logits = (logits / cap).tanh() * cap
        return logits

    def decoder(self, model):
        return model.base_model if not self.decoder_attr else self._resolve(model, self.decoder_attr)

    def embed_tokens(self, model):
        return model.get_input_embeddings() if not self.embed_attr else self._resolve(model, self.embed_attr)

    def lm_head(self, model):
        return model.get_output_embeddings() if not self.lm_head_attr else self._resolve(model, self.lm_head_attr)


LOGIT_TRANSFORMS = ("logit_scale", "logits_scaling", "final_logit_softcapping")


class GenericCausal(CausalArch):
    """A causal LM of a type no family declares: the usual config keys, the model's own input/output embeddings.
    Accepted only when the exported graph validates against PEFT; the manifest says it is not a listed family."""

    listed = False
    family = "other causal LMs"
    logit_keys = LOGIT_TRANSFORMS  # whichever the config sets (validation tells whether that was all)
    decoder_attr = ""
    embed_attr = ""
    lm_head_attr = ""
    hidden_keys = ("hidden_size", "n_embd", "d_model")
    layers_keys = ("num_hidden_layers", "n_layer", "num_layers")
    heads_keys = ("num_attention_heads", "n_head", "num_heads")
    kv_heads_keys = ("num_key_value_heads", "num_kv_heads")
    positions_keys = ("max_position_embeddings", "n_positions", "seq_length", "max_seq_len")
    default_positions = 2048

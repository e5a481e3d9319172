"""What one family's fused graph computes (``fusedgraph.py`` writes it): the facts ONNX Runtime GenAI's model builder
uses per family, read from the loaded model — norms (RMS, Gemma's (1 + w), Phi's LayerNorm), block layout (pre-norm,
Gemma 2/3's sandwich, OLMo 2's post-norms, Phi-2's parallel branches), q/k norms (per head or over the projection),
embedding and residual multipliers, attention scale and soft-cap, per-layer windows and rotary tables (NoPE layers
without, Gemma 3's local and global bases, Phi-3's short and long factors)."""

from __future__ import annotations

import numpy as np

from ..errors import ExportError
from ..source.archs import listed_archs, window_of

# the model types whose family declares ``fused`` (source/archs/)
FUSED_TYPES = tuple(mt for cls in listed_archs() if cls.fused for mt in cls.model_types)
GATED_SILU = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "granite", "olmo2")  # gate/up/down, silu
GEMMA = ("gemma", "gemma2", "gemma3_text")  # (1 + w) norms, tanh-GELU, embeddings scaled by sqrt(hidden)
SILU = ("SiLUActivation", "SiLU")  # transformers' activation modules the graph's Sigmoid * x computes
TANH_GELU = ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation", "FastGELUActivation")  # ONNX Gelu(approximate=tanh)


class Plan:
    """What one family's fused graph computes, read from the loaded model (the facts ONNX Runtime GenAI's builder
    uses per family; the graph is ours). Per layer: its rotary table (or none: NoPE) and its window."""

    def __init__(self, model, arch):
        cfg = model.config
        self.type = mt = cfg.model_type
        if not arch.fused:
            raise ExportError(f"no fast graph for model type {mt!r} (it covers {', '.join(FUSED_TYPES)})")
        if arch.head_dim % 16:
            raise ExportError(f"fast graph: head size {arch.head_dim} (ONNX Runtime's GroupQueryAttention needs a "
                              "multiple of 16)")
        mlp = model.model.layers[0].mlp  # the activation the model really runs (configs name it several ways)
        act = type(getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn", None)).__name__
        if mt in GATED_SILU + ("phi3",) and act not in SILU:
            raise ExportError(f"fast graph: activation {act} (only SiLU for {mt})")
        if mt in GEMMA + ("phi",) and act not in TANH_GELU:
            raise ExportError(f"fast graph: activation {act} (only tanh-approximated GELU for {mt})")
        self.gelu = act in TANH_GELU  # else SiLU
        if mt == "phi" and getattr(cfg, "qk_layernorm", False):
            raise ExportError("fast graph: Phi with qk_layernorm")
        self.eps = float(getattr(cfg, "rms_norm_eps", None) or getattr(cfg, "layer_norm_eps", 1e-5))
        self.norm_plus_one = mt in GEMMA
        self.layer_norm = mt == "phi"  # LayerNorm with bias; the others RMS norms
        self.layout = {"gemma2": "sandwich", "gemma3_text": "sandwich", "olmo2": "post", "phi": "parallel"}.get(
            mt, "pre")
        self.qk_norm = {"qwen3": "head", "gemma3_text": "head", "olmo2": "all"}.get(mt)
        # Gemma scales token embeddings inside its embedding module (a prompt handed in as embeddings is not scaled);
        # Granite multiplies every input embedding, the prompt's too
        self.token_scale = float(cfg.hidden_size) ** 0.5 if mt in GEMMA else 1.0
        self.embed_scale = float(getattr(cfg, "embedding_multiplier", 1.0) or 1.0)
        self.residual_scale = float(getattr(cfg, "residual_multiplier", 1.0) or 1.0)
        self.logits_divisor = float(getattr(cfg, "logits_scaling", 1.0) or 1.0)
        self.final_softcap = float(getattr(cfg, "final_logit_softcapping", 0.0) or 0.0)
        self.attn_softcap = float(getattr(cfg, "attn_logit_softcapping", 0.0) or 0.0)
        if mt == "granite":
            self.scale = float(cfg.attention_multiplier)
        elif mt in ("gemma2", "gemma3_text"):
            self.scale = float(cfg.query_pre_attn_scalar) ** -0.5
        else:
            self.scale = float(arch.head_dim) ** -0.5
        window, _ = window_of(cfg)
        types = getattr(cfg, "layer_types", None) or ["sliding_attention" if window else "full_attention"] * \
            arch.num_layers
        self.windows = [window if window and t == "sliding_attention" else None for t in types]
        use_rope = getattr(cfg, "no_rope_layers", None) or [1] * arch.num_layers  # SmolLM3: 0 = NoPE layer
        self.tables, self.layer_table = self._rotary(model, arch, types)
        for name, (cos, _) in self.tables.items():
            half = cos.shape[1]
            if half % 8 or 2 * half > arch.head_dim:
                raise ExportError(f"fast graph: rotary dimension {2 * half} of head size {arch.head_dim} (ONNX "
                                  "Runtime's GroupQueryAttention takes rotary halves that are multiples of 8)")
        self.layer_table = [t if use_rope[i] else None for i, t in enumerate(self.layer_table)]

    def _rotary(self, model, arch, types):
        """-> ({name: (cos, sin) float64 (positions, rotary_dim / 2)}, per layer the table name); for long-rope a
        second pair, the layers reading the one the graph chooses by the longest position (``long_rope``)."""
        rot = model.model.rotary_emb
        self.long_rope = None
        if isinstance(getattr(rot, "rope_type", None), dict):  # Gemma 3: one table per layer type
            tables = {t: self._table(getattr(rot, f"{t}_inv_freq"), getattr(rot, f"{t}_attention_scaling", 1.0), arch)
                      for t in sorted(set(types))}
            return tables, list(types)
        rope_type = str(getattr(rot, "rope_type", "default"))
        inv = getattr(rot, "original_inv_freq", None)
        inv = rot.inv_freq if inv is None else inv
        tables = {"cache": self._table(inv, getattr(rot, "attention_scaling", 1.0), arch)}
        if rope_type == "longrope":
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            orig = int(model.config.rope_parameters["original_max_position_embeddings"])
            long_inv, _ = ROPE_INIT_FUNCTIONS["longrope"](model.config, "cpu", seq_len=orig + 1)
            tables["cache_long"] = self._table(long_inv, getattr(rot, "attention_scaling", 1.0), arch)
            self.long_rope = orig  # the graph chooses between the two: its layers read "cache_chosen"
            return tables, ["cache_chosen"] * arch.num_layers
        return tables, ["cache"] * arch.num_layers

    @staticmethod
    def _table(inv_freq, scale, arch):
        inv = inv_freq.detach().double().numpy()
        angles = np.arange(arch.max_positions, dtype=np.float64)[:, None] * inv[None]
        return np.cos(angles) * float(scale), np.sin(angles) * float(scale)

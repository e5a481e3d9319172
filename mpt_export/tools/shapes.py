"""The real model shapes ``mpt-export bench-export`` builds with random weights (data only: importing it costs
nothing, so a mistyped shape answers at once)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Shape:
    family: str  # llama | t5 | another transformers model_type (its config built from ``extra``)
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    max_positions: int
    dtype: str = "fp32"
    validate_full: bool = True  # False: validation on a 4-layer copy of the shape (see the module docstring)
    extra: dict = field(default_factory=dict)  # the released config's other fields (head_dim, windows, rope, ...)


def _longrope(n: int) -> dict:
    """Phi-4-mini's long-rope parameters for ``n`` rotary frequencies (factors of its released config's range)."""
    return {"rope_type": "longrope", "short_factor": [1.0 + 0.05 * i / n for i in range(n)],
            "long_factor": [1.0 + 40.0 * i / n for i in range(n)], "original_max_position_embeddings": 4096}


SHAPES = {
    "tinyllama-1.1b": Shape("llama", 2048, 22, 32, 4, 5632, 32000, 2048),
    "llama-3b": Shape("llama", 3200, 26, 32, 32, 8640, 32000, 2048),  # OpenLLaMA-3B
    "t5-xl": Shape("t5", 2048, 24, 32, 32, 5120, 32128, 512),  # T5 v1.1 XL: gated-gelu, untied head, d_kv 64
    "llama-7b": Shape("llama", 4096, 32, 32, 32, 11008, 32000, 4096, dtype="fp16", validate_full=False),
    # the families of 2025-26 (released configs' features; random weights)
    "qwen3-0.6b": Shape("qwen3", 1024, 28, 16, 8, 3072, 151936, 40960, extra=dict(
        head_dim=128, tie_word_embeddings=True, rope_theta=1_000_000.0)),
    "qwen3-1.7b": Shape("qwen3", 2048, 28, 16, 8, 6144, 151936, 40960, extra=dict(
        head_dim=128, tie_word_embeddings=True, rope_theta=1_000_000.0)),
    "gemma-3-1b": Shape("gemma3_text", 1152, 26, 4, 1, 6912, 262144, 32768, extra=dict(
        head_dim=256, query_pre_attn_scalar=256, sliding_window=512, sliding_window_pattern=6,
        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})),
    "phi-4-mini": Shape("phi3", 3072, 32, 24, 8, 8192, 200064, 131072, dtype="fp16", validate_full=False, extra=dict(
        partial_rotary_factor=0.75, tie_word_embeddings=True, rope_scaling=_longrope(48))),
    "smollm3-3b": Shape("smollm3", 2048, 36, 16, 4, 11008, 128256, 65536, dtype="fp16", validate_full=False,
                        extra=dict(no_rope_layer_interval=4, tie_word_embeddings=True, rope_theta=5_000_000.0)),
}

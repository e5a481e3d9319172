"""The workloads ``mpt-export bench`` (and bench-serve, the peer comparison) build in code: model shapes with random
weights, the prompt and the batch. Data only: importing it costs nothing, so a mistyped preset answers at once."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InputError


@dataclass
class Preset:
    arch: str
    hidden: int
    layers: int
    heads: int
    vocab: int
    max_positions: int
    virtual_tokens: int
    num_tasks: int
    rank: int
    batch: int
    input_len: int
    new_tokens: int
    ffn: int | None = None
    nts: int | None = None
    tokenizer: bool = True  # the demo's byte-level BPE (its ids are a subset of the model's): text in and out
    extra: dict = field(default_factory=dict)  # a family's config fields (arch: its transformers model_type)

    seq2seq = property(lambda self: self.arch in ("t5", "flan-t5"))


DERIVED = [f"bundle-{x}" for x in ("int8", "int4", "int8-dynamic", "fp16")] + [f"peer-{x}" for x in ("fp32", "int8", "int4", "cache", "llama-cpp")]


PRESETS = {
    # GPT-2 small's shape, random weights; 100 virtual tokens as in the MPT paper; a mixed-task batch of 8 x 64.
    "gpt2-small-shape": Preset("gpt2", 768, 12, 12, 50257, 1024, 100, 4, 1, 8, 64, 8),
    # T5-Base's shape (12+12 layers, d_model 768, d_ff 3072), 100 virtual tokens on the encoder as in the paper,
    # 8 x 64-token inputs, 4 new tokens (classification-style outputs as in GLUE).
    "t5-base-shape": Preset("t5", 768, 12, 12, 32128, 512, 100, 4, 1, 8, 64, 4, ffn=3072, nts=1),
    # the Llama of the edge comparison with ONNX Runtime GenAI (bench --peer): hidden 768, 12 layers, vocab 32000
    "llama-small": Preset("llama", 768, 12, 12, 32000, 1024, 100, 4, 1, 8, 64, 8, ffn=2048),
    # the llama-small workload on families of 2025-26 (their released configs' features at that size): Qwen3
    # (q/k norms, head size apart from hidden / heads), Gemma 3 (5 windowed layers to 1 global, two rotary bases,
    # multi-query, (1 + w) norms, tanh-GELU) and, below, Gemma 2
    "qwen3-small": Preset("qwen3", 768, 12, 12, 32000, 1024, 100, 4, 1, 8, 64, 8, ffn=2048, extra=dict(
        num_key_value_heads=4, head_dim=96, tie_word_embeddings=True, rope_theta=1_000_000.0)),
    "gemma3-small": Preset("gemma3_text", 768, 12, 4, 32000, 1024, 100, 4, 1, 8, 64, 8, ffn=2048, extra=dict(
        num_key_value_heads=1, head_dim=192, query_pre_attn_scalar=192, sliding_window=512,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(12)],
        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})),
    # Gemma 2 (soft-caps 50/30, windows on alternate layers, query_pre_attn_scalar, sandwich norms): ONNX Runtime
    # GenAI 0.18's builder reads it, where it cannot read transformers 5's Gemma 3 config (nested rope_parameters)
    "gemma2-small": Preset("gemma2", 768, 12, 8, 32000, 1024, 100, 4, 1, 8, 64, 8, ffn=2048, extra=dict(
        num_key_value_heads=4, head_dim=96, query_pre_attn_scalar=96, sliding_window=512,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(12)],
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True)),
    # seconds-long smoke runs of the same code paths (tests)
    "tiny": Preset("llama-gqa", 64, 2, 4, 512, 256, 10, 2, 2, 4, 16, 4),
    "tiny-t5": Preset("t5", 64, 2, 4, 512, 256, 10, 2, 2, 4, 16, 4, nts=1),
}


def check_preset(preset: str) -> None:
    if preset not in PRESETS:
        raise InputError(f"unknown bench preset {preset!r}; choose one of: {', '.join(PRESETS)}")

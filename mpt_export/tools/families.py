"""Tiny base models of every listed family, with the features their real ``config.json`` files carry (built in code,
random weights, nothing downloaded): the cases the tests and ``mpt-export bench`` use to prove each family against
PEFT.

A feature is kept at a size where it changes the result on a tiny model: a sliding window shorter than a test's
generation, soft-caps of the order of a tiny model's logits (a real 30 or 50 would never bend them), a long-rope
switch point inside the test's lengths, multipliers other than 1. Each entry names the released checkpoint whose
config it follows.
"""

from __future__ import annotations

from pathlib import Path
from .tinytext import make_tokenizer

# model_type, real checkpoint it follows, config fields (on top of the common tiny sizes)
TINY_FAMILIES: dict[str, tuple[str, str, dict]] = {
    "qwen3": ("qwen3", "Qwen/Qwen3-0.6B", dict(
        head_dim=32, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1_000_000.0,
        attention_bias=False, use_sliding_window=False)),  # q/k RMS norms; head_dim != hidden / heads
    "qwen2-window": ("qwen2", "Qwen/Qwen2.5-0.5B (use_sliding_window on)", dict(
        num_key_value_heads=2, tie_word_embeddings=True, use_sliding_window=True, sliding_window=8,
        max_window_layers=1)),  # layers from max_window_layers on use the window
    "mistral-window": ("mistral", "mistralai/Mistral-7B-v0.1", dict(num_key_value_heads=2, sliding_window=8)),
    "gemma": ("gemma", "google/gemma-2b", dict(
        head_dim=16, num_key_value_heads=1, hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True)),  # embeddings scaled by sqrt(hidden); (1 + w) RMS norms; multi-query
    "gemma2": ("gemma2", "google/gemma-2-2b", dict(
        head_dim=32, num_key_value_heads=2, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
        sliding_window=8, layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=24,
        attn_logit_softcapping=2.0, final_logit_softcapping=1.5)),
    "gemma3": ("gemma3_text", "google/gemma-3-1b-it", dict(
        head_dim=32, num_key_value_heads=1, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
        sliding_window=8, layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=32,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})),
    "phi3": ("phi3", "microsoft/Phi-4-mini-instruct", dict(
        hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1,
        tie_word_embeddings=True, partial_rotary_factor=0.75, original_max_position_embeddings=24,
        rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.02 * i for i in range(24)],
                      "long_factor": [1.5 + 0.25 * i for i in range(24)]})),  # head 64: rotary 48
    "phi": ("phi", "microsoft/phi-2", dict(
        num_attention_heads=2, partial_rotary_factor=0.5, hidden_act="gelu_new", qk_layernorm=False,
        tie_word_embeddings=False)),  # head 32: rotary 16
    "smollm3": ("smollm3", "HuggingFaceTB/SmolLM3-3B", dict(
        num_key_value_heads=2, tie_word_embeddings=True, no_rope_layer_interval=2, rope_theta=5_000_000.0,
        use_sliding_window=False)),  # every 2nd layer without rotary (NoPE): 3B uses every 4th
    "granite": ("granite", "ibm-granite/granite-3.3-2b-instruct", dict(
        num_key_value_heads=2, tie_word_embeddings=True, embedding_multiplier=12.0, attention_multiplier=0.0625,
        residual_multiplier=0.22, logits_scaling=8.0)),
    "olmo2": ("olmo2", "allenai/OLMo-2-0425-1B", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "gpt_neox": ("gpt_neox", "EleutherAI/pythia-160m", dict(
        rotary_pct=0.25, use_parallel_residual=True, hidden_act="gelu", tie_word_embeddings=False)),
    "opt": ("opt", "facebook/opt-125m", dict(
        do_layer_norm_before=True, activation_function="relu", ffn_dim=128, enable_bias=True,
        word_embed_proj_dim=64)),  # learned positions at position + 2
    "falcon": ("falcon", "tiiuae/falcon-rw-1b (ALiBi) / falcon-7b (parallel, multi-query)", dict(
        new_decoder_architecture=False, multi_query=True, parallel_attn=True, alibi=False, bias=False)),
    "falcon-rw": ("falcon", "tiiuae/falcon-rw-1b", dict(
        new_decoder_architecture=False, multi_query=False, parallel_attn=False, alibi=True, bias=True)),
    "falcon-40b": ("falcon", "tiiuae/falcon-40b", dict(
        new_decoder_architecture=True, num_kv_heads=2, parallel_attn=True, alibi=False, bias=False)),
    "bloom": ("bloom", "bigscience/bloom-560m", dict(n_head=4, n_layer=2, apply_residual_connection_post_layernorm=False)),
    "starcoder2": ("starcoder2", "bigcode/starcoder2-3b", dict(
        num_key_value_heads=2, sliding_window=8, use_bias=True, norm_type="layer_norm")),
    # rope scaling types on the Llama layout (each as its released config writes it)
    "llama3-rope": ("llama", "meta-llama/Llama-3.2-1B", dict(
        num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16})),
    "yarn-rope": ("qwen2", "Qwen/Qwen2.5-7B-Instruct with YaRN", dict(
        num_key_value_heads=2, use_sliding_window=False,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})),
    "dynamic-rope": ("llama", "a Llama with dynamic NTK scaling", dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
    "linear-rope": ("llama", "lmsys/vicuna-7b-v1.5-16k", dict(rope_scaling={"rope_type": "linear", "factor": 4.0})),
}

# unlisted causal LMs: the generic path (accepted by validation) and one it cannot take
UNLISTED = {
    "cohere": ("cohere", "CohereForAI/c4ai-command-r7b (logit_scale)", dict(num_key_value_heads=2, logit_scale=0.5)),
    "stablelm": ("stablelm", "stabilityai/stablelm-2-1_6b", dict(num_key_value_heads=4, partial_rotary_factor=0.25)),
    "mamba": ("mamba", "state-spaces/mamba-130m-hf", dict(state_size=4, expand=2, conv_kernel=4)),
}
ALL_TINY = {**TINY_FAMILIES, **UNLISTED}

# head size 16: ONNX Runtime's GroupQueryAttention (the fused graph) takes multiples of 16
TINY_SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  max_position_embeddings=64)


def make_family_model(out_dir: str | Path, family: str, seed: int = 0):
    """Save a tiny random model of ``family`` (a key of :data:`ALL_TINY`) and the tiny tokenizer to ``out_dir``;
    returns the model. Biases and norms get random values too (a fresh init leaves them at 0 and 1)."""
    model_type, _, fields = ALL_TINY[family]
    # BLOOM names its sizes its own way and has no position limit (ALiBi)
    sizes = dict(hidden_size=64) if model_type == "bloom" else dict(TINY_SIZES)
    return _save_model(out_dir, model_type, {"pad_token_id": 0, **sizes, **fields}, seed, spread=True)


def make_sized_model(out_dir: str | Path, model_type: str, hidden: int, layers: int, heads: int, vocab_size: int,
                     max_positions: int, ffn: int, seed: int = 0, **fields):
    """Save a random model of ``model_type`` at a bench's size (transformers' own initialisation) and the demo's
    tokenizer to ``out_dir``; ``fields``: the family's other config fields. -> the model."""
    return _save_model(out_dir, model_type, dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                                                 num_attention_heads=heads, intermediate_size=ffn,
                                                 max_position_embeddings=max_positions, **fields), seed)


def _save_model(out_dir: str | Path, model_type: str, fields: dict, seed: int, spread: bool = False):
    """A random ``model_type`` causal LM from config ``fields`` (the tokenizer's vocabulary unless they name one),
    saved with the demo's tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out_dir, seq2seq=False)
    cfg = AutoConfig.for_model(model_type, **{"vocab_size": tok.get_vocab_size(), "bos_token_id": 0, "eos_token_id": 0,
                                              **fields})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    if spread:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias") or "norm" in name or "ln" in name.split(".")[-2:-1]:
                    p.normal_(float(p.mean()) if p.numel() > 1 else 0.0, 0.05)
    model.save_pretrained(str(out_dir))
    return model

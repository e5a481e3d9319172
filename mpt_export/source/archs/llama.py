"""Llama family: Llama (2, 3, 3.1–3.3 with llama3 rope scaling), Mistral, Qwen2/2.5 (grouped-query attention via
num_key_value_heads; Qwen2's q/k/v biases are part of the modules). Rotary positions come from the explicit
``position_ids`` input; Mistral's and Qwen2's sliding windows are masked by position in the traced graph."""

from .base import CausalArch, register


@register
class LlamaFamily(CausalArch):
    model_types = ("llama", "mistral", "qwen2")
    family = "Llama, Mistral, Qwen2 / Qwen2.5"
    checkpoints = "meta-llama/Llama-3.2-1B, TinyLlama-1.1B, mistralai/Mistral-7B-v0.1, Qwen/Qwen2.5-0.5B"
    handles = ("rope scaling (llama3, linear, dynamic, yarn); Mistral's and Qwen2's sliding windows (masked by position "
               "in the traced graph, GroupQueryAttention's local window in the fused one)")
    fused = True
    decoder_attr = "model"
    embed_attr = "model.embed_tokens"

"""Llama family: Llama, Mistral, Qwen2 (grouped-query attention via num_key_value_heads; Qwen2's q/k/v biases are
part of the modules, nothing to do here). Rotary positions come from the explicit ``position_ids`` input."""

from .base import CausalArch, register


@register
class LlamaFamily(CausalArch):
    model_types = ("llama", "mistral", "qwen2")
    decoder_attr = "model"
    embed_attr = "model.embed_tokens"

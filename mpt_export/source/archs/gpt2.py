"""GPT-2: learned absolute positions (``wpe``) indexed by ``position_ids``; LM head tied to ``wte`` (the exporter
stores the shared weight once — checked by the tests)."""

from .base import CausalArch, register


@register
class GPT2(CausalArch):
    family = "GPT-2"
    checkpoints = "openai-community/gpt2, gpt2-medium, distilgpt2"
    handles = "learned positions; a head tied to the token table (stored once)"
    model_types = ("gpt2",)
    decoder_attr = "transformer"
    embed_attr = "transformer.wte"
    hidden_keys = ("n_embd", "hidden_size")
    layers_keys = ("n_layer", "num_hidden_layers")
    heads_keys = ("n_head", "num_attention_heads")
    kv_heads_keys = ("n_head",)
    positions_keys = ("n_positions", "max_position_embeddings")

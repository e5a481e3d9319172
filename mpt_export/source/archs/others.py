"""Decoder families laid out their own way: where their embeddings, stack and head live and how their configs name
the sizes. Positions: GPT-NeoX and Falcon rotate by ``position_ids``; OPT looks its learned table up at
``position_ids`` + 2; BLOOM (and Falcon-RW) add ALiBi biases computed from the attention mask, which counts a row's
real tokens as our positions do."""

from .base import CausalArch, register


@register
class GPTNeoX(CausalArch):
    model_types = ("gpt_neox",)
    family = "GPT-NeoX / Pythia"
    checkpoints = "EleutherAI/pythia-160m … pythia-12b, gpt-neox-20b"
    handles = "partial rotary (rotary_pct); parallel attention and MLP"
    decoder_attr = "gpt_neox"
    embed_attr = "gpt_neox.embed_in"
    lm_head_attr = ""  # embed_out in older checkpoints, lm_head in transformers 5: the model says which


@register
class OPT(CausalArch):
    model_types = ("opt",)
    family = "OPT"
    checkpoints = "facebook/opt-125m, opt-1.3b, opt-6.7b (opt-350m's narrower embeddings cannot take PEFT prompts)"
    handles = "learned positions looked up at position + 2; post- or pre-norm layers"
    decoder_attr = "model.decoder"
    embed_attr = "model.decoder.embed_tokens"
    hidden_keys = ("word_embed_proj_dim", "hidden_size")  # what the embeddings (and PEFT's prompt) are
    positions_keys = ("max_position_embeddings",)

    @property
    def head_dim(self) -> int:
        return int(self.config["hidden_size"]) // self.num_heads


@register
class Falcon(CausalArch):
    model_types = ("falcon",)
    family = "Falcon"
    checkpoints = "tiiuae/falcon-7b, falcon-rw-1b (ALiBi), falcon-40b (new decoder architecture)"
    handles = "multi-query or grouped KV heads; parallel attention and MLP; rotary or ALiBi"
    decoder_attr = "transformer"
    embed_attr = "transformer.word_embeddings"
    kv_heads_keys = ("num_kv_heads",)
    default_positions = 2048

    @property
    def num_kv_heads(self) -> int:
        c = self.config
        if c.get("new_decoder_architecture"):
            return int(c.get("num_kv_heads") or self.num_heads)
        return 1 if c.get("multi_query", True) else self.num_heads


@register
class Bloom(CausalArch):
    model_types = ("bloom",)
    family = "BLOOM"
    checkpoints = "bigscience/bloom-560m, bloomz-1b7, bloom-7b1"
    handles = "ALiBi (no position limit in the config: 2048, its training length, is the limit we check)"
    decoder_attr = "transformer"
    embed_attr = "transformer.word_embeddings"
    hidden_keys = ("hidden_size", "n_embed")
    layers_keys = ("n_layer", "num_hidden_layers")
    heads_keys = ("n_head", "num_attention_heads")
    kv_heads_keys = ("n_head", "num_attention_heads")
    positions_keys = ("seq_length",)
    default_positions = 2048

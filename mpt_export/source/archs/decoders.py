"""Decoder families laid out as Llama is (``model.embed_tokens``, the ``model`` stack, ``lm_head``) whose layers
compute something else: each declared here with what it needs. The computation itself is the family's own
transformers code, traced; what the export adds is in ``export/backbone.py``: masks built from positions (sliding
windows in mixed, left-padded batches) and, after the head, the logit transforms named in ``logit_keys``."""

from .base import CausalArch, register


class _LlamaLayout(CausalArch):
    decoder_attr = "model"
    embed_attr = "model.embed_tokens"


@register
class Qwen3(_LlamaLayout):
    fused = True
    model_types = ("qwen3",)
    family = "Qwen3"
    checkpoints = "Qwen/Qwen3-0.6B, Qwen3-1.7B, Qwen3-4B, Qwen3-8B"
    handles = "q/k RMS norms; head size set apart from hidden / heads; optional sliding window"


@register
class Gemma(_LlamaLayout):
    fused = True
    model_types = ("gemma",)
    family = "Gemma"
    checkpoints = "google/gemma-2b, gemma-7b, gemma-1.1-2b-it"
    handles = ("token embeddings scaled by sqrt(hidden) inside the embedding (a prompt, handed in as embeddings, is "
               "not); (1 + w) RMS norms; tanh-GELU MLP; multi-query")


@register
class Gemma2(_LlamaLayout):
    fused = True
    logit_keys = ("final_logit_softcapping",)
    model_types = ("gemma2",)
    family = "Gemma 2"
    checkpoints = "google/gemma-2-2b, gemma-2-9b"
    handles = ("attention and final-logit soft-caps; sliding window on alternate layers (masked by position); "
               "query_pre_attn_scalar; sandwich norms")


@register
class Gemma3Text(_LlamaLayout):
    fused = True
    logit_keys = ("final_logit_softcapping",)
    model_types = ("gemma3_text",)
    family = "Gemma 3 (text)"
    checkpoints = "google/gemma-3-1b-it, gemma-3-270m (text-only Gemma3ForCausalLM)"
    handles = ("q/k norms; 5 sliding-window layers to 1 global (masked by position); local and global rotary bases; "
               "linear rope scaling on global layers")


@register
class Phi3(_LlamaLayout):
    fused = True
    model_types = ("phi3",)
    family = "Phi-3 / Phi-3.5 / Phi-4"
    checkpoints = "microsoft/Phi-3.5-mini-instruct, Phi-4-mini-instruct, phi-4"
    handles = ("longrope scaling (short and long factors, switched on the position as transformers does per call); "
               "partial rotary (Phi-4-mini); fused qkv and gate/up projections")


@register
class Phi(_LlamaLayout):
    fused = True
    model_types = ("phi",)
    family = "Phi-1 / Phi-1.5 / Phi-2"
    checkpoints = "microsoft/phi-2, phi-1_5"
    handles = "partial rotary; attention and MLP in parallel off one layer norm; a biased LM head"


@register
class SmolLM3(_LlamaLayout):
    fused = True
    model_types = ("smollm3",)
    family = "SmolLM3"
    checkpoints = "HuggingFaceTB/SmolLM3-3B"
    handles = "NoPE layers (every 4th layer without rotary)"


@register
class Granite(_LlamaLayout):
    fused = True
    logit_keys = ("logits_scaling",)
    model_types = ("granite",)
    family = "Granite 3"
    checkpoints = "ibm-granite/granite-3.3-2b-instruct, granite-3.1-8b"
    handles = "embedding, attention and residual multipliers; logits divided by logits_scaling"


@register
class OLMo2(_LlamaLayout):
    fused = True
    model_types = ("olmo2",)
    family = "OLMo 2"
    checkpoints = "allenai/OLMo-2-0425-1B, OLMo-2-1124-7B"
    handles = "q/k RMS norms over all heads; norms after attention and MLP"


@register
class StarCoder2(_LlamaLayout):
    model_types = ("starcoder2",)
    family = "StarCoder2"
    checkpoints = "bigcode/starcoder2-3b, starcoder2-7b"
    handles = "sliding window (masked by position); layer norms and biases"

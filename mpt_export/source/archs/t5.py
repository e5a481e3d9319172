"""T5 family (T5 v1.0/v1.1, flan-T5, mT5): encoder-decoder with relative position buckets (no position ids — a row's
real tokens are kept contiguous instead) and an LM head that is tied and rescaled by ``d_model**-0.5`` in v1.0."""

from typing import ClassVar

from .base import Arch, register


@register
class T5(Arch):
    family = "T5, flan-T5, mT5 (encoder-decoder)"
    checkpoints = "google-t5/t5-small, google/flan-t5-base, google/mt5-small"
    handles = "relative position buckets; encoder and decoder prompts; the v1.0 head rescaled by d_model**-0.5"
    task_type: ClassVar[str] = "SEQ_2_SEQ_LM"
    head_suffixes: ClassVar[tuple[str, ...]] = ("ForConditionalGeneration",)
    model_types = ("t5", "mt5")
    embed_attr = "shared"
    hidden_keys = ("d_model",)
    layers_keys = ("num_decoder_layers", "num_layers")
    heads_keys = ("num_heads",)
    kv_heads_keys = ("num_heads",)
    # Relative positions set no hard limit; T5 was trained on 512-token inputs (config may say otherwise).
    positions_keys = ("n_positions",)

    @property
    def head_dim(self) -> int:
        return int(self.config["d_kv"])

    @property
    def num_encoder_layers(self) -> int:
        return int(self.config["num_layers"])

    @property
    def max_positions(self) -> int:
        return int(self.config.get("n_positions") or 512)

    def identity(self) -> dict:
        return {**super().identity(), "num_encoder_layers": self.num_encoder_layers,
                "decoder_start_token_id": self.config.get("decoder_start_token_id", self.config.get("pad_token_id", 0)),
                "pad_token_id": self.config.get("pad_token_id", 0)}

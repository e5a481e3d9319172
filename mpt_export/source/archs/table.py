"""The supported-models page, written from the family declarations (the docs build calls it: never by hand)."""

from __future__ import annotations

from .base import FEATURES, GenericCausal, listed_archs

TESTED = ("Each listed family is tested against PEFT with a tiny model that carries its released config's features "
          "(sliding windows shorter than the generation, soft-caps, multipliers, rope scaling, ...): the export "
          "validates at the default tolerance and greedy tokens equal PEFT's, alone, in a mixed-task left-padded "
          "batch and through the server's continuous batching.")


def supported_models_markdown() -> str:
    rows = ["| Family | `model_type` | Released models it follows | What it needs, how it is handled | Traced graph "
            "| Fused graph | int8 / int4 | TensorRT |",
            "|---|---|---|---|---|---|---|---|"]
    for cls in listed_archs():
        seq2seq = cls.task_type == "SEQ_2_SEQ_LM"
        rows.append(" | ".join([
            f"| {cls.family}", ", ".join(f"`{t}`" for t in cls.model_types), cls.checkpoints, cls.handles,
            "encoder + decoder" if seq2seq else "yes",
            "yes (head size a multiple of 16)" if cls.fused else "no (traced graph)",
            "no" if seq2seq else "yes",
            "plain graph (checked, not built here)"]) + " |")
    g = GenericCausal
    rows.append(f"| {g.family} | any other | any `*ForCausalLM` | tried through the generic traced path; kept only "
                "if validation against PEFT passes (the manifest says `listed_family: false`) | if it validates | no "
                "| yes | plain graph |")
    features = "\n".join(f"- **{name}**: {what}" for name, (_, what) in FEATURES.items())
    return f"""{TESTED}

{chr(10).join(rows)}

## Features named in a bundle

The export report and the manifest (`base_model.features`) name the features a base model's config uses:

{features}

## Limits

- **Dynamic NTK rope scaling** (`rope_type: dynamic`) changes nothing below `max_position_embeddings`, and a bundle
  never runs past that limit (every request is checked at admission): the graph computes what transformers computes
  there. Its rescaling beyond the limit is not exported.
- **Models that are not attention-based causal LMs** (state-space models such as Mamba, encoder-only models) are
  refused in one line naming the model type and what is missing.
- **Phi-3 long-rope past `original_max_position_embeddings`**: a generation that crosses that length keeps the keys
  it cached before with the short factors, as transformers' own cached generation does (a forward over the whole
  sequence uses the long factors everywhere). Released Phi-3.5 / Phi-4-mini switch at 4,096 positions. The switch is
  decided per call over the batch, as transformers decides it: in a batch where one row has passed it, every row
  uses the long factors.
- **Sliding windows keep the whole cache**: a window is a mask over positions, so key/value memory grows with the
  sequence as on a model without a window (results are the window's).
"""

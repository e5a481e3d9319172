"""PEFT itself as the reference: one ``PeftModel`` per adapter over the same frozen base, its weights set through
PEFT's own ``set_peft_model_state_dict``. The init path (``prompt_tuning_init_state_dict_path``) is never read —
PEFT's ``from_pretrained`` would fail when that file is gone, so the config is rebuilt with a RANDOM init and the
trained tensors loaded over it."""

from __future__ import annotations

import numpy as np

from ..source.adapters import AdapterCheckpoint
from .backbone import cache_keyword


def peft_model_for(base_model, ckpt: AdapterCheckpoint):
    import torch
    from peft import MultitaskPromptTuningConfig, TaskType, set_peft_model_state_dict
    from peft import MODEL_TYPE_TO_PEFT_MODEL_MAPPING

    cfg = MultitaskPromptTuningConfig(
        task_type=TaskType(ckpt.task_type),
        num_virtual_tokens=ckpt.num_virtual_tokens,
        num_transformer_submodules=ckpt.num_transformer_submodules,
        token_dim=ckpt.token_dim,
        num_tasks=ckpt.num_tasks,
        num_ranks=ckpt.num_ranks,
        prompt_tuning_init="RANDOM",
        inference_mode=True,
    )
    # the task-specific class (PeftModelForCausalLM, ...): its forward is the one that prepends the prompt
    pm = MODEL_TYPE_TO_PEFT_MODEL_MAPPING[ckpt.task_type](base_model, cfg)
    set_peft_model_state_dict(pm, {
        "prompt_embeddings": torch.from_numpy(ckpt.prompt_embeddings),
        "prefix_task_cols": torch.from_numpy(ckpt.cols),
        "prefix_task_rows": torch.from_numpy(ckpt.rows),
    })
    return pm.eval()


def peft_causal_forward(pm, input_ids: np.ndarray, task_index: int) -> dict[str, np.ndarray]:
    """PEFT's forward (no past) on one unpadded row: last-position logits and the full present KV."""
    import torch
    from transformers.cache_utils import DynamicCache

    ids = torch.from_numpy(input_ids.astype(np.int64))
    # A cache without the model's config keeps every position on every layer (a sliding-window layer's own cache
    # keeps only the window): the same attention, and the whole present KV to compare with the bundle's. The last
    # position's logits only: a 150k vocabulary over 100 virtual tokens and the text is ~70 MB of logits a row.
    cache = {cache_keyword(pm.get_base_model().forward): DynamicCache()}
    with torch.no_grad():
        out = pm(input_ids=ids, attention_mask=torch.ones_like(ids), task_ids=torch.tensor([task_index] * ids.shape[0]),
                 use_cache=True, logits_to_keep=1, **cache)  # logits (B, 1, V)
    res = {"logits": out.logits[:, -1, :].float().numpy()}
    cache = getattr(out, "cache", None) or out.past_key_values
    for i, layer in enumerate(cache.layers):
        res[f"present.{i}.key"] = layer.keys.float().numpy()
        res[f"present.{i}.value"] = layer.values.float().numpy()
    return res


def shift_right(labels: np.ndarray, start: int) -> np.ndarray:
    """Teacher forcing: decoder inputs are the labels shifted right behind the decoder start token."""
    out = np.full_like(labels, start)
    out[:, 1:] = labels[:, :-1]
    return out


def peft_seq2seq_forward(pm, input_ids: np.ndarray, labels: np.ndarray, task_index: int) -> dict[str, np.ndarray]:
    """PEFT's teacher-forced forward (with ``labels``: PEFT's forward fails with ``decoder_input_ids`` alone) on one
    unpadded row: encoder output, last-position logits, decoder self-attention KV and cross-attention KV."""
    import torch

    ids = torch.from_numpy(input_ids.astype(np.int64))
    with torch.no_grad():
        out = pm(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.from_numpy(labels.astype(np.int64)),
                 task_ids=torch.tensor([task_index] * ids.shape[0]), use_cache=True)
    res = {"encoder_hidden_states": out.encoder_last_hidden_state.float().numpy(),
           "logits": out.logits[:, -1, :].float().numpy()}
    cache = getattr(out, "cache", None) or out.past_key_values
    for i, layer in enumerate(cache.self_attention_cache.layers):
        res[f"present.{i}.key"] = layer.keys.float().numpy()
        res[f"present.{i}.value"] = layer.values.float().numpy()
    for i, layer in enumerate(cache.cross_attention_cache.layers):
        res[f"cross.{i}.key"] = layer.keys.float().numpy()
        res[f"cross.{i}.value"] = layer.values.float().numpy()
    return res

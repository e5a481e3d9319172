"""What ``mpt-export bench`` measures the runtime against: PEFT eager generation (its forward for the prefill, then
a KV-cache loop over the base model) and the floor (matmul FLOPs over this machine's measured matmul rate)."""

from __future__ import annotations

import inspect
import time

import numpy as np


def machine_rates(threads: int) -> dict:
    """Measured fp32 matmul rate (torch, ``threads`` threads) and memory bandwidth (large array copy)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    n, t0 = 10, time.perf_counter()
    for _ in range(n):
        a @ b
    flops = 2 * 1024**3 * n / (time.perf_counter() - t0)
    src = np.ones(64 * 2**20 // 4, np.float32)  # 64 MiB, far past the caches
    dst = np.empty_like(src)
    np.copyto(dst, src)
    t0 = time.perf_counter()
    for _ in range(5):
        np.copyto(dst, src)
    bw = 2 * src.nbytes * 5 / (time.perf_counter() - t0)  # read + write
    return {"matmul_flops_per_s": flops, "mem_bytes_per_s": bw}


def flops_causal(p, body_params: int, prompt_len: int, with_prompt: bool, all_lm_rows: bool) -> float:
    """Matmul FLOPs for one batch: weights x tokens, attention scores/values, and the LM-head rows computed."""
    B, S, N, H, L, V = p.batch, p.input_len, p.new_tokens, p.hidden, p.layers, p.vocab
    pre = (prompt_len + S) if with_prompt else S  # tokens run through the body in the prefill
    tokens = B * (pre + N - 1)
    ctx_prefill = sum(range(prompt_len + 1, prompt_len + S + 1)) if not with_prompt else sum(range(1, prompt_len + S + 1))
    ctx_decode = sum(prompt_len + S + i for i in range(1, N))
    attn = 4 * H * L * B * (ctx_prefill + ctx_decode)
    lm_rows = B * ((prompt_len + S) if all_lm_rows else 1) + B * (N - 1)
    return 2 * body_params * tokens + attn + 2 * H * V * lm_rows


def flops_seq2seq(p, enc_params: int, dec_params: int) -> float:
    """Encoder over prompt + input once, decoder one token per step (no prompt-KV cache is possible here)."""
    B, N, H, V, L = p.batch, p.new_tokens, p.hidden, p.vocab, p.layers
    E = p.virtual_tokens + p.input_len
    attn = 4 * H * L * B * (E * E + sum(range(1, N + 1)) + N * E)
    return 2 * enc_params * B * E + 2 * dec_params * B * N + attn + 2 * H * V * B * N


def peft_seq2seq_loop(pm, ids_t, task_ids, new_tokens: int, start: int):
    """PEFT's forward (with labels: its forward needs them) for the encoder and the first decoder step, then a
    KV-cache loop over the base model reusing the encoder output."""
    import torch

    base = pm.base_model
    cache_kw = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    with torch.no_grad():
        B = ids_t.shape[0]
        out = pm(input_ids=ids_t, attention_mask=torch.ones_like(ids_t), task_ids=task_ids, use_cache=True,
                 labels=torch.full((B, 1), start, dtype=torch.long))
        enc = (out.encoder_last_hidden_state,)
        enc_mask = torch.ones(B, enc[0].shape[1], dtype=torch.long)
        cache = getattr(out, "cache", None) or out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        toks = [nxt]
        for _ in range(new_tokens - 1):
            out = base(encoder_outputs=enc, attention_mask=enc_mask, decoder_input_ids=nxt, use_cache=True,
                       **{cache_kw: cache})
            cache = getattr(out, "cache", None) or out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            toks.append(nxt)
    return torch.cat(toks, dim=1).numpy()


def peft_loop(pm, ids_t, task_ids, new_tokens: int):
    """PEFT forward (prefill, all positions' logits as PEFT computes them), then a KV-cache loop over the base."""
    import torch

    cache_kw = "cache" if "cache" in inspect.signature(pm.base_model.forward).parameters else "past_key_values"
    with torch.no_grad():
        mask = torch.ones_like(ids_t)
        out = pm(input_ids=ids_t, attention_mask=mask, task_ids=task_ids, use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        toks = [nxt]
        full_mask = torch.ones(ids_t.shape[0], cache.get_seq_length(), dtype=torch.long, device=ids_t.device)
        for _ in range(new_tokens - 1):
            full_mask = torch.cat([full_mask, torch.ones_like(nxt)], dim=1)
            out = pm.base_model(input_ids=nxt, attention_mask=full_mask, use_cache=True, **{cache_kw: cache})
            cache = getattr(out, "cache", None) or out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            toks.append(nxt)
    return torch.cat(toks, dim=1).cpu().numpy()

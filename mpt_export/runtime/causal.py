"""Decoder-only models: one backbone graph, explicit positions, per-task prompt KV cache."""

from __future__ import annotations

import numpy as np

from .base import Session
from ..errors import InputError
from .sampling import token_logprobs


class CausalSession(Session):
    state_layout = {"attention_mask": (1, "attention_mask"), "past_key_values.*": (2, "attention_mask"),
                    "position_ids": (None, None)}
    def __init__(self, bundle, options=None):
        super().__init__(bundle, options)
        self._past = self._past_inputs("backbone")

    def _run_backbone_impl(self, feed):
        return self._run_graph_impl("backbone", feed)

    def task_kv(self, name: str):
        """The task's prompt keys/values in this kind's layout (here one (1, KV, T, Dh) array per ``present``
        output; the fused graph's kind: {cache name: (KV, T, Dh)}).

        Virtual tokens come first and a causal model lets them attend only to each other, so their KV depends on
        the task alone: computed once, kept (LRU, keyed by the task's content), and every request starts from it."""
        hit = self.cached_task_kv(name)
        if hit is not None:
            return hit
        kv = self._prompt_kv(self.task_prompt(name))
        self.keep_task_kv(name, kv)
        return kv

    def _tasks_kv(self, tasks: list[str]) -> list:
        """Each row's task prompt KV: the cached ones, and the missing ones computed together — one batched call
        per prompt length rather than one call per task."""
        found = {t: self.cached_task_kv(t) for t in dict.fromkeys(tasks)}
        missing = [t for t, kv in found.items() if kv is None]
        by_len: dict[int, list[str]] = {}
        for t in missing:
            by_len.setdefault(self.prompt_len(t), []).append(t)
        for group in by_len.values():
            prompts = np.stack([self.task_prompt(t) for t in group])  # (m, P, H)
            for t, kv in zip(group, self._prompts_kv(prompts)):
                self.keep_task_kv(t, kv)
                found[t] = kv
        return [found[t] for t in tasks]

    def _prompts_kv(self, prompts: np.ndarray) -> list:
        """Composed prompts of one length (m, P, H) -> each one's keys/values, as :meth:`_prompt_kv` gives them."""
        m, P = prompts.shape[:2]
        feed = {"input_ids": np.zeros((m, 0), np.int64), "prompt_embeds": prompts,
                "attention_mask": np.ones((m, P), np.int64), "position_ids": np.tile(np.arange(P, dtype=np.int64), (m, 1)),
                **self._empty_past(m)}
        present = list(self._present_as_past(self._run_backbone_impl(feed)).values())
        return [[a[i: i + 1].copy() for a in present] for i in range(m)]  # (copies: a view would hold the batch)

    def cached_task_kv(self, name: str):
        """The task's prompt keys/values if the cache holds them (counted as a hit or a miss), else None."""
        return self._task_kv.get(self._task(name)[2])

    def keep_task_kv(self, name: str, kv) -> None:
        """Keep ``kv`` as the task's prompt keys/values (computed by whoever missed them)."""
        self._task_kv.put(self._task(name)[2], kv)

    def _prompt_kv(self, prompt: np.ndarray):
        """A composed prompt's (P, H) keys/values, in this kind's cache layout."""
        return self._prompts_kv(prompt[None])[0]

    def prepare(self, input_ids, tasks, attention_mask=None) -> dict[str, np.ndarray]:
        """The backbone feed for a prefill with no past: prompts, mask and positions laid out as in ``base``."""
        ids, tasks, mask = self._check(input_ids, tasks, attention_mask)
        B, S = ids.shape
        prompts = [self.task_prompt(t) for t in tasks]
        pmax = max(p.shape[0] for p in prompts)
        embeds = np.zeros((B, pmax, self.hidden_size), self.dtype)  # (B, Pmax, H)
        pmask = np.zeros((B, pmax), np.int64)
        for b, p in enumerate(prompts):
            if p.shape[0]:
                embeds[b, pmax - p.shape[0]:] = p
                pmask[b, pmax - p.shape[0]:] = 1
        full = np.concatenate([pmask, mask], axis=1)  # (B, Pmax+S)
        pos = np.maximum(np.cumsum(full, axis=1) - 1, 0)  # (B, Pmax+S)
        return {"input_ids": ids, "prompt_embeds": embeds, "attention_mask": full, "position_ids": pos,
                **self._empty_past(B)}

    def prepare_cached(self, input_ids, tasks, attention_mask=None) -> dict[str, np.ndarray]:
        """The backbone feed for a prefill that starts from each row's cached task KV: the prompt is not run again.

        Same row layout as :meth:`prepare`, with the prompt part held in ``past_key_values`` instead of
        ``prompt_embeds`` (which is empty)."""
        ids, tasks, mask = self._check(input_ids, tasks, attention_mask)
        B, S = ids.shape
        kvs = self._tasks_kv(tasks)
        plens = [kv[0].shape[2] for kv in kvs]
        pmax = max(plens)
        pmask = np.zeros((B, pmax), np.int64)
        past = {}
        for j, (name, (kv_heads, hd)) in enumerate(self._past.items()):
            buf = np.zeros((B, kv_heads, pmax, hd), self.dtype)  # (B, KV, Pmax, Dh)
            for b, kv in enumerate(kvs):
                buf[b, :, pmax - plens[b]:] = kv[j][0]
            past[name] = buf
        for b, p in enumerate(plens):
            pmask[b, pmax - p:] = 1
        full = np.concatenate([pmask, mask], axis=1)  # (B, Pmax+S)
        pos = np.maximum(np.cumsum(full, axis=1) - 1, 0)[:, pmax:]  # (B, S): text positions only
        return {"input_ids": ids, "prompt_embeds": np.zeros((B, 0, self.hidden_size), self.dtype),
                "attention_mask": full, "position_ids": pos, **past}

    def forward(self, input_ids, tasks, attention_mask=None) -> dict[str, np.ndarray]:
        """Prefill: every backbone output (``logits`` and ``present.*``) for a left-padded, mixed-task batch."""
        return self._run_backbone_impl(self.prepare(input_ids, tasks, attention_mask))

    def row_outputs(self, input_ids, tasks, attention_mask=None) -> list[dict]:
        """Per row: ``logits`` (1, V) at its last real id and ``present.{i}.key/value`` (1, KV, T, Dh) over its real
        positions (prompt + text), as PEFT computes them for the row alone — what validation compares."""
        feed = self.prepare(input_ids, tasks, attention_mask)
        outs = self._run_backbone_impl(feed)
        rows = []
        for b, keep in enumerate(feed["attention_mask"] == 1):
            row = {"logits": outs["logits"][b:b + 1]}
            row.update({k: v[b:b + 1][:, :, keep] for k, v in outs.items() if k.startswith("present.")})
            rows.append(row)
        return rows

    def prompt_logprobs(self, ids: list[int], task: str, k: int = 0) -> list:
        """Each token of the prompt ``ids`` scored given the task's virtual tokens and the tokens before it:
        ``[None, (log-probability, [(alternative, log-probability)] k best), ...]`` — the first has no context of its
        own (OpenAI's ``echo``). One call of the bundle's scoring graph over the task's cached prompt KV."""
        logits = self.position_logits(ids, task)  # (S, V): position t predicts token t + 1
        return [None] + [token_logprobs(logits[t - 1], int(ids[t]), k) for t in range(1, len(ids))]

    def position_logits(self, ids: list[int], task: str) -> np.ndarray:
        """The logits after every prefix of ``ids`` (S, V) float32, given the task's virtual tokens: one call of the
        bundle's scoring graph over the task's cached prompt KV."""
        arr, _, _ = self._check(np.asarray([ids]), [task], None)
        return self._run_scoring_impl(self._score_feed(arr, task))[0]

    def _score_feed(self, ids: np.ndarray, task: str) -> dict:
        return self.prepare_cached(ids, [task])

    def _run_scoring_impl(self, feed: dict) -> np.ndarray:
        """The scoring graph's ``logits_all`` (B, S, V) for a backbone feed (backends that have one override this)."""
        raise InputError("scoring a prompt (echo) runs on ONNX Runtime (CPU or CUDA), not on this backend")

    def logits(self, input_ids, tasks, attention_mask=None) -> np.ndarray:
        """Last-position logits, np.float32 [batch, vocab]."""
        return self.forward(input_ids, tasks, attention_mask)["logits"]

    # -- decode loop hooks ---------------------------------------------------------------------------------------
    def _start(self, ids, tasks, mask, use_cache, new_tokens=0):
        feed = self.prepare_cached(ids, tasks, mask) if use_cache else self.prepare(ids, tasks, mask)
        past_len = feed[next(iter(self._past))].shape[2]
        processed = ids.shape[0] * (feed["attention_mask"].shape[1] - past_len)
        out = self._run_step_impl("backbone", feed)  # the KV may stay where the backend keeps it, as in a step
        att = feed["attention_mask"]
        state = {"attention_mask": att, "position_ids": att.sum(1, keepdims=True).astype(np.int64),
                 **self._present_as_past(out)}
        return out["logits"], state, processed

    def _step(self, state, tokens):
        b = len(tokens)
        att = np.concatenate([state["attention_mask"], np.ones((b, 1), np.int64)], axis=1)
        feed = {**state, "input_ids": tokens[:, None], "attention_mask": att,
                "prompt_embeds": np.zeros((b, 0, self.hidden_size), self.dtype)}
        out = self._run_step_impl("backbone", feed)
        return out["logits"], {"attention_mask": att, "position_ids": state["position_ids"] + 1, **self._present_as_past(out)}

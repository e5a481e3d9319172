"""Backend-independent session logic (Polygraphy-style: the base owns the public API and input checks, backends
override ``*_impl``).

Batch layout for a left-padded, mixed-task batch. Prompts may differ in length per task, so they are left-padded
too; every row then reads ``[pad | prompt_k | pad | text]``:

    prompt_embeds   (B, Pmax, H)      zeros where a row's prompt is shorter
    attention_mask  (B, Pmax + S)     1 on the prompt and the text, 0 on padding
    position_ids    (B, Pmax + S)     cumsum(mask) - 1: the prompt sits at 0..P_k-1 and the text follows at P_k..

Masked slots attend to nothing and are attended by nothing, and each row's positions are those it has alone, so a
row's result does not depend on what else is in the batch (PEFT's own positions shift with padding; we do not).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from ..errors import InputError, TaskNameError


class Session:
    def __init__(self, bundle, prompt_cache_size: int = 64):
        self.bundle = bundle
        m = bundle.manifest
        self.io = m["graphs"]["backbone"]
        self.num_layers = int(m["base_model"]["num_layers"])
        self.vocab_size = int(m["base_model"]["vocab_size"])
        self.max_positions = int(m["base_model"]["max_positions"])
        self.hidden_size = int(m["base_model"]["hidden_size"])
        self.bank = bundle.task_bank()
        self._prompts: OrderedDict[str, np.ndarray] = OrderedDict()  # digest -> (T, H)
        self._prompt_cache_size = prompt_cache_size
        self._lock = threading.Lock()

    # -- to override ---------------------------------------------------------------------------------------------
    def _run_backbone_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _run_composer_impl(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- tasks ---------------------------------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        return self.bank.names

    def task_prompt(self, name: str) -> np.ndarray:
        """The composed prompt of ``name`` (T, H), computed by the composer graph once and cached by content."""
        task = self.bank.task(name)
        shared = self.bank.shared[task.shared]
        key = task.digest(shared)
        with self._lock:
            hit = self._prompts.get(key)
            if hit is not None:
                self._prompts.move_to_end(key)
                return hit
        out = self._run_composer_impl({
            "shared_prompt": shared[None].astype(np.float32),  # (1, T, H)
            "task_cols": task.cols[None].astype(np.float32),  # (1, T, r)
            "task_rows": task.rows[None].astype(np.float32),  # (1, r, H)
        })[0]
        with self._lock:
            self._prompts[key] = out
            while len(self._prompts) > self._prompt_cache_size:
                self._prompts.popitem(last=False)
        return out

    # -- inputs --------------------------------------------------------------------------------------------------
    def _check(self, input_ids, tasks, attention_mask):
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
            raise InputError(f"input_ids must be a non-empty 2-D array [batch, seq], got shape {list(ids.shape)}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"input_ids must be integers (int64), got {ids.dtype}")
        ids = ids.astype(np.int64)
        if isinstance(tasks, str):
            tasks = [tasks] * ids.shape[0]
        tasks = list(tasks)
        if len(tasks) != ids.shape[0]:
            raise InputError(f"tasks has {len(tasks)} name(s) but input_ids has {ids.shape[0]} row(s); give one task per row")
        for t in set(tasks):
            if t not in self.bank.names:
                raise TaskNameError(f"unknown task {t!r}; this bundle has: {', '.join(self.bank.names)}")
        if attention_mask is None:
            mask = np.ones_like(ids)
        else:
            mask = np.asarray(attention_mask)
            if mask.shape != ids.shape:
                raise InputError(f"attention_mask has shape {list(mask.shape)}, expected {list(ids.shape)} (same as input_ids)")
            if not np.isin(mask, (0, 1)).all():
                raise InputError("attention_mask must hold only 0 and 1")
            mask = mask.astype(np.int64)
            if (mask[:, -1] != 1).any() or (np.diff(mask, axis=1) < 0).any():
                raise InputError("attention_mask must be left-padded: zeros (if any) first, then ones, ending with a 1")
        if ((ids < 0) | (ids >= self.vocab_size))[mask == 1].any():
            raise InputError(f"input_ids must be in [0, {self.vocab_size}) (the model's vocabulary)")
        longest = int(mask.sum(1).max())
        plen = max(self.bank.shared[self.bank.task(t).shared].shape[0] for t in set(tasks))
        limit = self.max_positions - plen
        if longest > limit:
            raise InputError(
                f"input of {longest} tokens is too long: the model has {self.max_positions} positions and the prompt "
                f"takes {plen}, so at most {limit} tokens fit"
            )
        return ids, tasks, mask

    def prepare(self, input_ids, tasks, attention_mask=None) -> dict[str, np.ndarray]:
        """The backbone feed for a prefill with no past: prompts, mask and positions laid out as described above."""
        ids, tasks, mask = self._check(input_ids, tasks, attention_mask)
        B, S = ids.shape
        prompts = [self.task_prompt(t) for t in tasks]
        pmax = max(p.shape[0] for p in prompts)
        embeds = np.zeros((B, pmax, self.hidden_size), np.float32)  # (B, Pmax, H)
        pmask = np.zeros((B, pmax), np.int64)
        for b, p in enumerate(prompts):
            if p.shape[0]:
                embeds[b, pmax - p.shape[0]:] = p
                pmask[b, pmax - p.shape[0]:] = 1
        full = np.concatenate([pmask, mask], axis=1)  # (B, Pmax+S)
        pos = np.maximum(np.cumsum(full, axis=1) - 1, 0)  # (B, Pmax+S)
        feed = {"input_ids": ids, "prompt_embeds": embeds, "attention_mask": full, "position_ids": pos}
        for i in range(self.num_layers):
            spec = next(s for s in self.io["inputs"] if s["name"] == f"past_key_values.{i}.key")
            kv, hd = spec["shape"][1], spec["shape"][3]
            empty = np.zeros((B, kv, 0, hd), np.float32)  # past_len 0
            feed[f"past_key_values.{i}.key"] = empty
            feed[f"past_key_values.{i}.value"] = empty
        return feed

    def forward(self, input_ids, tasks, attention_mask=None) -> dict[str, np.ndarray]:
        """Prefill: every backbone output (``logits`` and ``present.*``) for a left-padded, mixed-task batch."""
        return self._run_backbone_impl(self.prepare(input_ids, tasks, attention_mask))

    def logits(self, input_ids, tasks, attention_mask=None) -> np.ndarray:
        """Last-position logits, np.float32 [batch, vocab]."""
        return self.forward(input_ids, tasks, attention_mask)["logits"]

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
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError, TaskNameError
from .sampling import SamplingConfig, select


class _LRU:
    """A small thread-safe LRU keyed by task digest (content hash: a changed task never hits a stale entry)."""

    def __init__(self, size: int):
        self.size, self._d, self._lock = size, OrderedDict(), threading.Lock()

    def get(self, key):
        with self._lock:
            v = self._d.get(key)
            if v is not None:
                self._d.move_to_end(key)
            return v

    def put(self, key, value):
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > max(self.size, 0):
                self._d.popitem(last=False)

    def __len__(self):
        return len(self._d)


@dataclass
class GenerationResult:
    """``ids`` (B, N) int64, rows padded with ``pad_id`` after they stop; ``lengths`` tokens generated per row."""

    ids: np.ndarray
    lengths: np.ndarray
    finish: list[str]  # "eos" | "stop" | "length" per row
    timings: dict = field(default_factory=dict)
    tokens_processed: int = 0  # tokens the backbone ran over (prompt rows included when not cached)


class Session:
    def __init__(self, bundle, prompt_cache_size: int = 64, prompt_kv_cache: bool = True, kv_cache_size: int = 32):
        self.bundle = bundle
        m = bundle.manifest
        self.io = m["graphs"]["backbone"]
        self.num_layers = int(m["base_model"]["num_layers"])
        self.vocab_size = int(m["base_model"]["vocab_size"])
        self.max_positions = int(m["base_model"]["max_positions"])
        self.hidden_size = int(m["base_model"]["hidden_size"])
        self.bank = bundle.task_bank()
        self.eos_token_id = m["base_model"].get("eos_token_id")
        if isinstance(self.eos_token_id, list):
            self.eos_token_id = self.eos_token_id[0] if self.eos_token_id else None
        self._kv_shape = {}
        for spec in self.io["inputs"]:
            if spec["name"].startswith("past_key_values."):
                self._kv_shape[spec["name"]] = (spec["shape"][1], spec["shape"][3])  # (kv_heads, head_dim)
        self._prompts = _LRU(prompt_cache_size)  # digest -> composed prompt (T, H)
        self.prompt_kv_cache = prompt_kv_cache
        self._task_kv = _LRU(kv_cache_size)  # digest -> [present.i.key/value (1, KV, T, Dh)]
        self._bank_lock = threading.Lock()
        self._tokenizer = None

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
        task, shared, key = self._task(name)
        hit = self._prompts.get(key)
        if hit is not None:
            return hit
        out = self._run_composer_impl({
            "shared_prompt": shared[None].astype(np.float32),  # (1, T, H)
            "task_cols": task.cols[None].astype(np.float32),  # (1, T, r)
            "task_rows": task.rows[None].astype(np.float32),  # (1, r, H)
        })[0]
        self._prompts.put(key, out)
        return out

    def _task(self, name: str):
        with self._bank_lock:
            task = self.bank.task(name)
            shared = self.bank.shared[task.shared]
        return task, shared, task.digest(shared)

    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
        return {n: np.zeros((batch, kv, 0, hd), np.float32) for n, (kv, hd) in self._kv_shape.items()}

    def task_kv(self, name: str) -> list[np.ndarray]:
        """The task's prompt keys/values, one (1, KV, T, Dh) array per ``present`` output.

        Virtual tokens come first and a causal model lets them attend only to each other, so their KV depends on
        the task alone: computed once, kept (LRU, keyed by the task's content), and every request starts from it."""
        task, shared, key = self._task(name)
        hit = self._task_kv.get(key)
        if hit is not None:
            return hit
        prompt = self.task_prompt(name)
        P = prompt.shape[0]
        feed = {"input_ids": np.zeros((1, 0), np.int64), "prompt_embeds": prompt[None],
                "attention_mask": np.ones((1, P), np.int64), "position_ids": np.arange(P, dtype=np.int64)[None],
                **self._empty_past(1)}
        out = self._run_backbone_impl(feed)
        kv = [out[f"present.{i}.{k}"] for i in range(self.num_layers) for k in ("key", "value")]
        self._task_kv.put(key, kv)
        return kv

    def add_task(self, name: str, shared_prompt, cols, rows) -> None:
        """Make a task usable in this session at once (in memory; ``mpt-export tasks add`` persists one).

        ``shared_prompt`` (T, H), ``cols`` (T, r), ``rows`` (r, H)."""
        from ..checkpoint import Task, check_task_name

        P, C, R = (np.asarray(a, np.float32) for a in (shared_prompt, cols, rows))
        H = self.hidden_size
        if P.ndim != 2 or P.shape[1] != H or C.ndim != 2 or C.shape[0] != P.shape[0] or R.ndim != 2 \
                or R.shape != (C.shape[1], H):
            raise InputError(
                f"task {name!r} has shapes shared_prompt {list(P.shape)}, cols {list(C.shape)}, rows {list(R.shape)}; "
                f"expected [T, {H}], [T, r], [r, {H}] (this bundle's hidden size is {H})"
            )
        if P.shape[0] + 1 > self.max_positions:
            raise InputError(f"task {name!r} has {P.shape[0]} virtual tokens; the model has only {self.max_positions} positions")
        check_task_name(name)
        with self._bank_lock:
            if name in self.bank.names:
                raise TaskNameError(f"task {name!r} already exists in this session; remove it first or pick another name")
            si = self.bank._shared_index(P)
            self.bank.tasks.append(Task(name, si, C, R, source="session"))

    def remove_task(self, name: str) -> None:
        with self._bank_lock:
            self.bank.remove(name)

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
        feed.update(self._empty_past(B))  # past_len 0
        return feed

    def prepare_cached(self, input_ids, tasks, attention_mask=None) -> dict[str, np.ndarray]:
        """The backbone feed for a prefill that starts from each row's cached task KV: the prompt is not run again.

        Row layout is the same as :meth:`prepare` (``[pad | prompt_k | pad | text]``), with the prompt part held
        in ``past_key_values`` instead of ``prompt_embeds`` (which is empty)."""
        ids, tasks, mask = self._check(input_ids, tasks, attention_mask)
        B, S = ids.shape
        kvs = [self.task_kv(t) for t in tasks]
        plens = [kv[0].shape[2] for kv in kvs]
        pmax = max(plens)
        pmask = np.zeros((B, pmax), np.int64)
        past = {}
        for j, name in enumerate(self._kv_shape):
            kv_heads, hd = self._kv_shape[name]
            buf = np.zeros((B, kv_heads, pmax, hd), np.float32)  # (B, KV, Pmax, Dh)
            for b, kv in enumerate(kvs):
                buf[b, :, pmax - plens[b]:] = kv[j][0]
            past[name] = buf
        for b, p in enumerate(plens):
            pmask[b, pmax - p:] = 1
        full = np.concatenate([pmask, mask], axis=1)  # (B, Pmax+S)
        pos = np.maximum(np.cumsum(full, axis=1) - 1, 0)[:, pmax:]  # (B, S): text positions only
        return {"input_ids": ids, "prompt_embeds": np.zeros((B, 0, self.hidden_size), np.float32),
                "attention_mask": full, "position_ids": pos, **past}

    def forward(self, input_ids, tasks, attention_mask=None) -> dict[str, np.ndarray]:
        """Prefill: every backbone output (``logits`` and ``present.*``) for a left-padded, mixed-task batch."""
        return self._run_backbone_impl(self.prepare(input_ids, tasks, attention_mask))

    def logits(self, input_ids, tasks, attention_mask=None) -> np.ndarray:
        """Last-position logits, np.float32 [batch, vocab]."""
        return self.forward(input_ids, tasks, attention_mask)["logits"]

    # -- generation ----------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from .tokenizer import BundleTokenizer

            self._tokenizer = BundleTokenizer(self.bundle.path, self.bundle.manifest)
        return self._tokenizer

    def generate_detailed(self, input_ids, tasks, attention_mask=None, max_new_tokens: int = 16,
                          temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                          eos_token_id: int | None | str = "auto", stop: list[str] | None = None,
                          prompt_kv_cache: bool | None = None, on_step=None) -> GenerationResult:
        """Prefill, then one-token steps feeding ``present`` back as ``past_key_values``.

        Rows stop at EOS, at a stop string (needs the tokenizer) or after ``max_new_tokens``; finished rows are
        dropped from the batch so they stop costing work. ``on_step(step, rows, tokens)`` is called with the
        original row indices and their new tokens after every step (for streaming)."""
        cfg = SamplingConfig(int(max_new_tokens) if isinstance(max_new_tokens, (int, np.integer)) else max_new_tokens,
                             float(temperature), int(top_k), float(top_p), seed)
        ids, tasks, mask = self._check(input_ids, tasks, attention_mask)
        B = ids.shape[0]
        plen = max(self.bank.shared[self.bank.task(t).shared].shape[0] for t in set(tasks))
        longest = int(mask.sum(1).max())
        if plen + longest + cfg.max_new_tokens > self.max_positions:
            raise InputError(
                f"{longest} input tokens + {cfg.max_new_tokens} new tokens do not fit: the model has "
                f"{self.max_positions} positions and the prompt takes {plen}, so input + max_new_tokens <= "
                f"{self.max_positions - plen}"
            )
        eos = self.eos_token_id if eos_token_id == "auto" else eos_token_id
        use_cache = self.prompt_kv_cache if prompt_kv_cache is None else prompt_kv_cache
        rngs = cfg.generators(B)
        t0 = time.perf_counter()
        feed = self.prepare_cached(ids, tasks, mask) if use_cache else self.prepare(ids, tasks, mask)
        processed = int(feed["attention_mask"].shape[1] - (feed[next(iter(self._kv_shape))].shape[2]))
        processed *= B
        out = self._run_backbone_impl(feed)
        t_prefill = time.perf_counter() - t0
        att = feed["attention_mask"]  # (b, total) for the rows still running
        pos = att.sum(1, keepdims=True).astype(np.int64)  # next position per row = tokens seen so far
        kv = {n: out[n.replace("past_key_values", "present")] for n in self._kv_shape}
        logits = out["logits"]
        rows = np.arange(B)  # original index of each running row
        pad = eos if eos is not None else 0
        result = np.full((B, cfg.max_new_tokens), pad, np.int64)
        lengths = np.zeros(B, np.int64)
        finish = ["length"] * B
        tok = self.tokenizer if stop else None
        for step in range(cfg.max_new_tokens):
            nxt = select(logits, cfg, [rngs[r] for r in rows])  # (b,)
            result[rows, step] = nxt
            lengths[rows] += 1
            if on_step:
                on_step(step, rows.copy(), nxt.copy())
            done = np.zeros(len(rows), bool)
            if eos is not None:
                done |= nxt == eos
                for r in rows[nxt == eos]:
                    finish[r] = "eos"
            if stop:
                for j, r in enumerate(rows):
                    if not done[j] and any(s in tok.decode(result[r, : lengths[r]]) for s in stop):
                        done[j], finish[r] = True, "stop"
            if step == cfg.max_new_tokens - 1 or done.all():
                break
            keep = ~done
            if not keep.all():  # finished rows leave the batch
                rows, nxt, att, pos = rows[keep], nxt[keep], att[keep], pos[keep]
                kv = {n: v[keep] for n, v in kv.items()}
            att = np.concatenate([att, np.ones((len(rows), 1), np.int64)], axis=1)
            step_feed = {"input_ids": nxt[:, None], "prompt_embeds": np.zeros((len(rows), 0, self.hidden_size), np.float32),
                         "attention_mask": att, "position_ids": pos, **kv}
            out = self._run_backbone_impl(step_feed)
            processed += len(rows)
            pos = pos + 1
            kv = {n: out[n.replace("past_key_values", "present")] for n in self._kv_shape}
            logits = out["logits"]
        total = time.perf_counter() - t0
        return GenerationResult(result[:, : int(lengths.max())], lengths, finish,
                                {"prefill_s": t_prefill, "decode_s": total - t_prefill, "total_s": total},
                                tokens_processed=processed)

    def generate_ids(self, input_ids, tasks, attention_mask=None, max_new_tokens: int = 16, **kw) -> np.ndarray:
        """New token ids, np.int64 [batch, new]; a row that stopped early is padded with EOS."""
        return self.generate_detailed(input_ids, tasks, attention_mask, max_new_tokens=max_new_tokens, **kw).ids

    def generate(self, texts, tasks, max_new_tokens: int = 16, stop: list[str] | None = None, **kw) -> list[str]:
        """Text in, text out; one task per text (or one task name for all)."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise InputError("no prompt given")
        ids, mask = self.tokenizer.encode_batch(list(texts))
        res = self.generate_detailed(ids, tasks, mask, max_new_tokens=max_new_tokens, stop=stop, **kw)
        return [self.decode_row(res, b, stop) for b in range(len(texts))]

    def decode_row(self, res: GenerationResult, b: int, stop: list[str] | None = None) -> str:
        toks = res.ids[b, : res.lengths[b]]
        if res.finish[b] == "eos":
            toks = toks[:-1]
        text = self.tokenizer.decode(toks)
        for s in stop or ():
            if s in text:
                text = text[: text.index(s)]
        return text

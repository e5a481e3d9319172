"""Backend-independent session logic (Polygraphy style: the base owns the public API and the input checks,
backends implement ``_run_graph_impl(graph, feed)``; model kinds — causal, seq2seq — implement ``_start``/``_step``
of the shared decode loop).

Batch layout (causal): prompts may differ in length per task, so they are left-padded too; every row then reads
``[pad | prompt_k | pad | text]`` with positions ``cumsum(mask) - 1`` — the prompt at 0..P_k-1, the text from P_k.
Masked slots attend to nothing and are attended by nothing, and each row's positions are those it has alone, so a
row's result does not depend on what else is in the batch (PEFT's own positions shift with padding; we do not).
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np

from ..errors import InputError, TaskNameError
from .cache import LRU
from .graphio import present_of
from .limits import BackendLimits
from .options import SessionOptions
from .decode import GenerationResult, generate_rows  # noqa: F401 (GenerationResult: re-exported)
from .sampling import SamplingParams, check_stop
from .streaming import cut_at_stop
from .tokenizer import BundleTokenizer


class Session:
    """What every model kind and backend shares: the task bank, prompt composition, tokenizer, decode loop."""

    def __init__(self, bundle, options: SessionOptions | None = None):
        options = options if options is not None else SessionOptions()
        self.bundle, self.options = bundle, options
        info = bundle.info  # the bundle's typed manifest
        bm = info.base_model
        self.num_layers, self.vocab_size = bm.num_layers, bm.vocab_size
        self.max_positions, self.hidden_size = bm.max_positions, bm.hidden_size
        self.bank = bundle.task_bank()
        # prompt embeddings and KV travel in the graph's dtype; numpy has no bf16, so host-side arrays of a bf16
        # bundle are fp32 and a backend that can run bf16 (TensorRT) casts them on the device
        self.dtype = info.numpy_dtype
        self.eos_token_id = bm.first_eos
        self._prompts = LRU(options.prompt_cache_size)  # digest -> composed prompt (T, H)
        self.prompt_kv_cache = options.prompt_kv_cache
        self._task_kv = LRU(options.kv_cache_size, max_bytes=int(options.kv_cache_mib * (1 << 20)))
        self._bank_lock = threading.Lock()
        self._tokenizer = None

    # -- to override ---------------------------------------------------------------------------------------------
    def _run_graph_impl(self, graph: str, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one graph of the bundle (``backbone``, ``encoder``, ``decoder``, ``composer``) -> outputs by name."""
        raise NotImplementedError

    def _run_step_impl(self, graph: str, feed: dict) -> dict:
        """A decode step: like ``_run_graph_impl``, but the KV outputs may stay backend values (e.g. device
        buffers) that the next step takes back as inputs; ``logits`` must be a numpy array."""
        return self._run_graph_impl(graph, feed)

    def _start(self, ids, tasks, mask, use_cache: bool, new_tokens: int = 0):
        """Prefill: -> (last-position logits (B, V), loop state {name: (B, ...)}, tokens processed). ``new_tokens``:
        how many steps will follow at most (a kind with preallocated buffers sizes them for it)."""
        raise NotImplementedError

    def _step(self, state: dict, tokens: np.ndarray):
        """One decode step for the running rows: -> (logits (b, V), new state)."""
        raise NotImplementedError

    # -- the step protocol (what the serving scheduler drives; ``generate_detailed`` runs the same two calls) --------
    def prefill(self, ids: np.ndarray, tasks: list[str], mask: np.ndarray, use_cache: bool | None = None,
                new_tokens: int = 0):
        """A first pass over padded ``ids`` (B, S) with ``mask``, one task per row -> (last-position logits (B, V),
        decode state {name: (B, ...)} laid out as :attr:`state_layout` says, tokens processed). ``new_tokens``: the
        most tokens any row will generate (room reserved where the kind preallocates its cache)."""
        return self._start(ids, tasks, mask, self.prompt_kv_cache if use_cache is None else use_cache, new_tokens)

    def decode_step(self, state: dict, tokens: np.ndarray):
        """One new token per row of ``state`` -> (logits (b, V), the next state). Use the returned state: a kind whose
        cache is updated in place (the fused graph's) changes the one it is given."""
        return self._step(state, tokens)

    # -- decode-state operations: what the decode loop and the serving scheduler do to a state between steps. Host
    # numpy arrays here; a backend that keeps the cache on a device (TensorRT) overrides them, so the scheduler runs
    # over any backend without knowing where the state lives. Masks and positions are always host arrays.
    def state_array(self, value):
        """A step's state value as an array that can be sliced and assigned (numpy here, a device tensor there)."""
        return value

    def state_zeros(self, like, shape):
        """A zero-filled state array of ``shape``, of ``like``'s kind and dtype (where ``like`` lives)."""
        return np.zeros(shape, like.dtype)

    def take_rows(self, value, keep: np.ndarray):
        """Rows ``keep`` (bool (B,)) of a state value."""
        return self.state_array(value)[keep]

    def state_edit(self):
        """A context in which the scheduler edits state arrays (copies rows, zeroes slots): ordered with the backend's
        own work on them (a device backend's stream)."""
        return contextlib.nullcontext()

    # How the decode-loop state of this model kind is laid out, for merging rows that joined at different times
    # (continuous batching): state name -> (length axis, group); the group's mask is the state named "<group>"
    # and marks real slots with 1. Values without a length axis (None) are per-row only.
    state_layout: dict[str, tuple[int | None, str | None]] = {}

    # Where a row's slots sit along the length axes: "right" (left-padded: the traced graphs) or "left" (from slot 0:
    # the fused graph's cache), and the free slots a buffer of n used ones is given when it is (re)built.
    state_align = "right"
    graph = "plain"  # which backbone graph runs: "plain" (traced) or "fast" (fused)

    @staticmethod
    def state_room(n: int) -> int:
        return 0

    # A backend's fixed maxima (TensorRT profiles, Triton's max_batch_size), checked with every input; None: any
    # shape the model's positions allow.
    limits: BackendLimits | None = None

    def state_group_of(self, name: str) -> tuple[int | None, str | None]:
        if name in self.state_layout:
            return self.state_layout[name]
        for prefix, spec in self.state_layout.items():
            if prefix.endswith("*") and name.startswith(prefix[:-1]):
                return spec
        return None, None

    def replace_bank(self, bank) -> None:
        """Serve ``bank``'s tasks from now on (a reloaded bundle whose graphs did not change). Rows in flight keep
        their prompts; caches are keyed by content, so changed tasks never reuse stale entries."""
        with self._bank_lock:
            self.bank = bank

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

    def cache_stats(self) -> dict:
        """Hits, misses, evictions, entries and size of the composed-prompt cache and the per-task prompt-KV cache."""
        return {"prompt": self._prompts.stats(), "prompt_kv": self._task_kv.stats()}

    # -- KV plumbing shared by every model kind -------------------------------------------------------------------
    def _past_inputs(self, graph: str) -> dict[str, tuple[int, int]]:
        """``past_key_values.*`` inputs of ``graph`` -> (kv heads, head dim), in graph order."""
        return {s.name: (s.shape[1], s.shape[3]) for s in self.bundle.info.graphs[graph].past_inputs}

    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
        return {n: np.zeros((batch, h, 0, d), self.dtype) for n, (h, d) in self._past.items()}

    def _present_as_past(self, out: dict) -> dict:
        """A step's ``present.*`` outputs, named as the next step's ``past_key_values.*`` inputs."""
        return {n: out[present_of(n)] for n in self._past}

    def _task(self, name: str):
        with self._bank_lock:
            task = self.bank.task(name)
            shared = self.bank.shared[task.shared]
        return task, shared, task.digest(shared)

    def task_prompt(self, name: str) -> np.ndarray:
        """The composed prompt of ``name`` (T, H) in the graph's dtype: composed by the (fp32) composer graph once,
        cast once, cached by content."""
        task, shared, key = self._task(name)
        hit = self._prompts.get(key)
        if hit is not None:
            return hit
        out = self._run_graph_impl("composer", {
            "shared_prompt": shared[None].astype(np.float32),  # (1, T, H)
            "task_cols": task.cols[None].astype(np.float32),  # (1, T, r)
            "task_rows": task.rows[None].astype(np.float32),  # (1, r, H)
        })["prompt_embeds"][0].astype(self.dtype)
        self._prompts.put(key, out)
        return out

    def add_task(self, name: str, shared_prompt, cols, rows) -> None:
        """Make a task usable in this session at once (in memory; ``mpt-export tasks add`` persists one).

        ``shared_prompt`` (T, H), ``cols`` (T, r), ``rows`` (r, H)."""
        try:
            P, C, R = (np.asarray(a, np.float32) for a in (shared_prompt, cols, rows))
        except (TypeError, ValueError) as e:
            raise InputError(f"task {name!r}: shared_prompt, cols and rows must be numeric arrays ({e})") from None
        with self._bank_lock:
            if name in self.bank:
                raise TaskNameError(f"task {name!r} already exists in this session; remove it first or pick another name")
            self.bank.add(name, P, C, R, source="session", hidden_size=self.hidden_size,
                          max_positions=self.max_positions, task_type=self.bundle.task_type)

    def remove_task(self, name: str) -> None:
        with self._bank_lock:
            self.bank.remove(name)

    def prompt_len(self, name: str) -> int:
        """Virtual tokens in front of the (encoder) input for ``name``."""
        with self._bank_lock:  # no content digest needed for a length
            shared = self.bank.shared[self.bank.task(name).shared]
        return int(shared.shape[0]) // self.bank.num_transformer_submodules

    # -- inputs --------------------------------------------------------------------------------------------------
    def _check(self, input_ids, tasks, attention_mask, padding: str = "left"):
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
            raise InputError(f"input_ids must be a non-empty 2-D array [batch, seq], got shape {list(ids.shape)}",
                             param="input_ids")
        if not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"input_ids must be integers (int64), got {ids.dtype}", param="input_ids")
        ids = ids.astype(np.int64)
        if isinstance(tasks, str):
            tasks = [tasks] * ids.shape[0]
        if not isinstance(tasks, (list, tuple, np.ndarray)) or not all(isinstance(t, str) for t in tasks):
            raise InputError(f"tasks must be a task name or a list of one task name per row, got {tasks!r:.80}",
                             param="tasks")
        tasks = list(tasks)
        if len(tasks) != ids.shape[0]:
            raise InputError(f"tasks has {len(tasks)} name(s) but input_ids has {ids.shape[0]} row(s); give one task "
                             "per row", param="tasks")
        for t in set(tasks):
            if t not in self.bank:
                raise TaskNameError(f"unknown task {t!r}; this bundle has: {self.bank.listing()}", param="tasks")
        mask = np.ones_like(ids) if attention_mask is None else _check_mask(attention_mask, ids.shape, padding)
        if ((ids < 0) | (ids >= self.vocab_size))[mask == 1].any():
            raise InputError(f"input_ids must be in [0, {self.vocab_size}) (the model's vocabulary)", param="input_ids")
        longest = int(mask.sum(1).max())
        if self.limits is not None:
            self.limits.check(batch=ids.shape[0], longest=longest)
        plen = max(self.prompt_len(t) for t in set(tasks))
        limit = self.max_positions - plen
        if longest > limit:
            raise InputError(f"input of {longest} tokens is too long: the model has {self.max_positions} positions and "
                             f"the task's virtual tokens take {plen}, so at most {limit} input tokens fit",
                             param="input_ids")
        return ids, tasks, mask

    def _check_new_tokens(self, tasks, mask, max_new_tokens: int) -> None:
        plen = max(self.prompt_len(t) for t in set(tasks))
        longest = int(mask.sum(1).max())
        if plen + longest + max_new_tokens > self.max_positions:
            raise InputError(f"{longest} input tokens + {max_new_tokens} new tokens do not fit: the model has "
                             f"{self.max_positions} positions and the task's virtual tokens take {plen}, so input + "
                             f"max_new_tokens <= {self.max_positions - plen}", param="max_new_tokens")

    def check_request(self, n_tokens: int, task: str, max_new_tokens: int) -> None:
        """Raise the error a request of ``n_tokens`` input tokens for ``task`` with ``max_new_tokens`` would raise
        (unknown task, too long for the model's positions) without running anything."""
        mask = np.ones((1, max(int(n_tokens), 1)), np.int64)
        self._check(np.zeros_like(mask), [task], mask, padding=self.padding_side)
        self._check_new_tokens([task], mask, int(max_new_tokens))
        if self.limits is not None:
            self.limits.check(new_tokens=int(max_new_tokens))

    # -- generation ----------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = BundleTokenizer(self.bundle)
        return self._tokenizer

    padding_side = "left"

    def generate_detailed(self, input_ids, tasks, attention_mask=None, sampling: SamplingParams | int | None = None,
                          *, on_step=None, on_text=None, forced_tokens: np.ndarray | None = None,
                          prompt_kv_cache: bool | None = None, raise_errors: bool = True,
                          **settings) -> GenerationResult:
        """Prefill, then one-token steps feeding each step's KV back in (the loop is :func:`.decode.generate`).

        ``sampling``: a :class:`~.sampling.SamplingParams`; its fields may also be given as keywords
        (``max_new_tokens=8, temperature=0.7``), applied over ``sampling`` (or the defaults) — one object, checked
        once, that every row reads (an integer in its place is ``max_new_tokens``, once the fourth argument).
        Rows stop at EOS (``eos_token_id``: "auto" the model's, None none), at a stop string or after
        ``max_new_tokens``; finished rows leave the batch. ``logprobs`` k: each token's log-probability and the k
        most likely alternatives (``result.logprobs``), untempered; ``min_tokens``: no EOS before that many tokens;
        ``ignore_eos``: EOS does not end a row.

        ``on_step(step, rows, tokens)``: the row indices and their new tokens after every step; ``on_text(row,
        text)``: each row's text as it becomes final (the pieces add up to :meth:`decode_row`'s). ``forced_tokens``
        (B, N): teacher forcing (the loop feeds these, records the model's own choices). ``prompt_kv_cache``: start
        from each task's cached prompt KV (None: as the session was opened).

        One row never fails another: a row whose own numbers fail (NaN logits) ends with finish ``"error"`` while
        the others go on, and a graph call that fails for the batch is retried row by row. Then the first row's
        error is raised, naming its task, with the whole result as its ``result`` attribute; ``raise_errors=False``
        returns the result instead (``result.errors[b]`` per row, ``result.failed()``)."""
        if isinstance(sampling, (int, np.integer)) and not isinstance(sampling, bool):
            settings, sampling = {"max_new_tokens": sampling, **settings}, None
        params = SamplingParams.of(sampling, **settings)
        ids, tasks, mask = self._check(input_ids, tasks, attention_mask, padding=self.padding_side)
        self._check_new_tokens(tasks, mask, params.max_new_tokens)
        if self.limits is not None:
            self.limits.check(new_tokens=params.max_new_tokens)
        use_cache = self.prompt_kv_cache if prompt_kv_cache is None else prompt_kv_cache
        res = generate_rows(self, ids, tasks, mask, params, use_cache, on_step, on_text, forced_tokens)
        return res.raise_failed() if raise_errors else res

    def generate_ids(self, input_ids, tasks, attention_mask=None, max_new_tokens: int | None = None,
                     **kw) -> np.ndarray:
        """New token ids, np.int64 [batch, new]; a row that stopped early is padded with EOS. Takes what
        :meth:`generate_detailed` takes."""
        kw.update({} if max_new_tokens is None else {"max_new_tokens": max_new_tokens})
        return self.generate_detailed(input_ids, tasks, attention_mask, **kw).ids

    def encode_texts(self, texts: list[str]):
        return self.tokenizer.encode_batch(list(texts), padding=self.padding_side)

    def generate(self, texts, tasks, max_new_tokens: int | None = None, stop: list[str] | None = None,
                 sampling: SamplingParams | None = None, **kw) -> list[str]:
        """Text in, text out; one task per text (or one task name for all). Settings as :meth:`generate_detailed`
        takes them (a :class:`~.sampling.SamplingParams`, and/or its fields as keywords)."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise InputError("no prompt given", param="texts")
        changes = {k: v for k, v in (("max_new_tokens", max_new_tokens), ("stop", stop)) if v is not None}
        params = SamplingParams.of(sampling, **changes)  # the keywords in ``kw`` apply over it in generate_detailed
        ids, mask = self.encode_texts(texts)
        res = self.generate_detailed(ids, tasks, mask, params, **kw)
        return [self.decode_row(res, b, params.stop) for b in range(len(texts))]

    def decode_row(self, res: GenerationResult, b: int, stop: list[str] | None = None) -> str:
        toks = res.ids[b, : res.lengths[b]]
        if res.finish[b] == "eos":
            toks = toks[:-1]
        return cut_at_stop(self.tokenizer.decode(toks), check_stop(stop))


def _check_mask(attention_mask, shape, padding: str) -> np.ndarray:
    mask = np.asarray(attention_mask)
    if mask.shape != shape:
        raise InputError(f"attention_mask has shape {list(mask.shape)}, expected {list(shape)} (same as input_ids)",
                         param="attention_mask")
    if not np.isin(mask, (0, 1)).all():
        raise InputError("attention_mask must hold only 0 and 1", param="attention_mask")
    mask = mask.astype(np.int64)
    d = np.diff(mask, axis=1)
    if ((mask[:, -1] != 1).any() or (d < 0).any()) if padding == "left" else ((mask[:, 0] != 1).any() or (d > 0).any()):
        raise InputError(f"attention_mask must be {padding}-padded: " + ("zeros (if any) first, then ones, ending with "
                         "a 1" if padding == "left" else "ones first, starting with a 1, then zeros"),
                         param="attention_mask")
    return mask

"""Continuous (iteration-level) batching over one session: every task shares the backbone's batches.

One scheduler thread owns the session's graph calls. Each iteration it

1. **admits** waiting requests into the running batch (up to ``max_batch`` rows), whatever their tasks, prompt
   lengths or sampling settings, and **prefills** them together in one graph call — for causal models each from its
   task's cached prompt KV, so a newcomer runs only its own tokens — which also yields their first token;
2. **joins** the newcomers to the running batch: a newcomer takes over the slot of a row that finished, copied in
   place (its keys/values right-aligned, zeros and mask 0 before them), when it fits the batch's length; otherwise
   the batch is rebuilt once — every live row and newcomer copied, right-aligned, left-padded to the longest need
   (explicit position ids keep each row's positions its own; T5's relative positions come from slot distances,
   which left padding keeps), so rows that joined at different times share one graph call;
3. runs **one decode step** for every slot, samples each live row with its own settings and generator, and lets
   finished rows (EOS, a stop string, ``max_new_tokens``, a cancelled request) leave at once: their requests end
   now, their slots wait a few steps for newcomers; a slot nobody takes, or columns no row needs any more (a
   quarter of the length), are dropped by one compaction copy.

Prefill and decode are separate graph calls: a prefill runs tens of tokens per row and a decode step one, and one
graph call over both would pad every running row to the newcomers' length. Copies of the whole batch state are
rare (a newcomer longer than the batch, a compaction); decoding costs what ``Session.generate`` costs per step,
plus, for a few steps, the rows of slots waiting for a newcomer.

A request's tokens at temperature 0 are what ``Session.generate`` gives for it alone (the batch layout does not
change a row's result); with a seed, row ``i`` of a request draws from the generator ``Session.generate`` gives row
``i``, so sampled requests equal it too. T5 bundles are batched the same way (the encoder runs in the prefill; its
cross-attention keys/values join the state).

The scheduler knows nothing of HTTP: ``submit`` a :class:`Request`, receive events through its ``on_event`` callback
(called from the scheduler thread), ``cancel`` it, ``drain`` and ``stop`` the scheduler.
"""

from __future__ import annotations

import collections
import threading
import time


from ..errors import InputError
from ..runtime.sampling import SamplingParams
from .request import Draining, QueueFull, Request
from .steps import BatchSteps


class Scheduler(BatchSteps):
    def __init__(self, session, max_batch: int = 16, max_queue: int = 256, step_log: int = 10000):
        if max_batch < 1 or max_queue < 1:
            raise InputError(f"max_batch and max_queue must be >= 1, got {max_batch} and {max_queue}")
        self.session = session
        self.max_batch, self.max_queue = int(max_batch), int(max_queue)
        limits = getattr(session, "limits", None)
        if limits is not None and limits.max_batch is not None:  # the backend cannot run more rows in one call
            self.max_batch = min(self.max_batch, limits.max_batch)
        self.tokenizer = session.tokenizer
        self.eos = session.eos_token_id
        self.pad_id = getattr(self.tokenizer, "pad_token_id", 0) or 0
        self._cond = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._cancel: set[str] = set()
        self._rows: list = []  # None: a free slot (its row finished; decoded, ignored)
        self._free_since: dict[int, int] = {}  # free slot -> step it was freed
        self._state: dict | None = None
        self._layout: dict | None = None  # mask name -> [(state name, length axis)]
        self._accepting = True
        self._stopping = False
        self._admitting = 0
        self._thread: threading.Thread | None = None
        self.steps: collections.deque = collections.deque(maxlen=step_log)  # what ran in each graph call
        self.step_count = 0
        self.tokens_generated = 0
        self.joins = {"in_place": 0, "rebuild": 0, "compact": 0}  # how rows entered and left the batch
        self.retries = 0  # failed batched graph calls that were run again row by row

    # -- public ------------------------------------------------------------------------------------------------
    def start(self) -> "Scheduler":
        self._thread = threading.Thread(target=self._loop, name="mpt-export-scheduler", daemon=True)
        self._thread.start()
        return self

    def alive(self) -> bool:
        """The scheduler thread is running (it stops only when told to, or when the process is failing)."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def check(self, req: Request) -> SamplingParams:
        """The errors ``submit`` would raise for ``req`` (unknown task, too long for the model or the backend); its
        settings were checked when its :class:`~mpt_export.runtime.sampling.SamplingParams` was built."""
        if not isinstance(req.sampling, SamplingParams):
            raise InputError(f"a request's sampling must be a SamplingParams, got {type(req.sampling).__name__}",
                             param="sampling")
        self.session.check_request(len(req.ids), req.task, req.sampling.max_new_tokens)
        return req.sampling

    def submit(self, req: Request) -> Request:
        self.check(req)
        with self._cond:
            if not self._accepting:
                raise Draining("the server is shutting down and takes no new requests")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (the queue holds {self.max_queue}); "
                                "retry shortly")
            req.t_submit = time.perf_counter()
            self._waiting.append(req)
            self._cond.notify()
        return req

    def cancel(self, request_id: str) -> None:
        """Drop a request (waiting or running); its row leaves the batch at the next step."""
        with self._cond:
            self._cancel.add(request_id)
            self._cond.notify()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return sum(r is not None for r in self._rows)

    def idle(self) -> bool:
        return not self._waiting and not self._rows and not self._admitting

    def drain(self, timeout: float) -> bool:
        """Take no new requests; wait (up to ``timeout`` s) for the waiting and running ones to finish."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._accepting = False
            while not self.idle():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
        return True

    def stop(self) -> None:
        """Stop the scheduler thread; requests still waiting or running end as cancelled."""
        with self._cond:
            self._accepting = False
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # -- the loop ----------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._rows and not self._cancel:
                    self._cond.wait()
                if self._stopping:
                    leftover = list(self._waiting) + [r.req for r in self._live()]
                    self._waiting.clear()
                    break
                cancel, self._cancel = self._cancel, set()
                room = self.max_batch - self.running
                newcomers = []
                while room > 0 and self._waiting:
                    req = self._waiting.popleft()
                    if req.id in cancel:
                        self._end(req, "cancelled")
                        continue
                    newcomers.append(req)
                    room -= 1
                self._admitting = len(newcomers)  # neither waiting nor running yet: not idle
                for req in [r for r in self._waiting if r.id in cancel]:
                    self._waiting.remove(req)
                    self._end(req, "cancelled")
            if cancel:
                self._leave([i for i, row in enumerate(self._rows) if row is not None and row.req.id in cancel], "cancelled")
            try:
                if newcomers:
                    self._prefill(newcomers)
                if self._rows:
                    self._decode()
            except Exception as e:  # a bug in the scheduler itself (graph calls are isolated per row below)
                for row in self._live():
                    self._fail(row.req, e)
                for req in newcomers:
                    if req.t_done is None:
                        self._fail(req, e)
                self._rows, self._state, self._free_since = [], None, {}
            with self._cond:
                self._admitting = 0
                self._cond.notify_all()  # drain() waits on idleness
        for req in leftover:
            self._end(req, "cancelled")
        self._rows, self._state = [], None

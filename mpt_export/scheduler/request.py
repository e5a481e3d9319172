"""What a caller hands the scheduler (:class:`Request`) and the scheduler's refusals (:class:`QueueFull`,
:class:`Draining`)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Callable

from ..errors import Draining, QueueFull
from ..runtime.sampling import SamplingParams


@dataclass
class Request:
    """One sequence to generate. ``on_event(kind, data)`` is called from the scheduler thread with
    ``("token", {"text": delta, "token": id, "logprobs": entry})`` for every generated token (``delta``: the text
    that became final with it, often ""; ``entry``: its log-probabilities when asked, else None), then
    ``("done", request)`` or
    ``("error", exception)``. ``sampling``: every generation setting, checked when it was built and read as it is
    by the decode loop (the same object ``Session.generate_detailed`` takes)."""

    task: str
    ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed_row: int = 0  # the row index Session.generate would give this sequence (a prompt list's position)
    on_event: Callable | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    # filled by the scheduler
    tokens: list[int] = field(default_factory=list)
    token_logprobs: list | None = None  # per token (log-probability, [(alternative, log-probability)]) when asked
    text: str = ""
    finish: str | None = None  # "eos" | "stop" | "length" | "cancelled"
    error: Exception | None = None
    t_submit: float = 0.0
    t_first: float | None = None
    t_done: float | None = None

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's name: EOS and stop strings are both "stop"."""
        return {"eos": "stop"}.get(self.finish, self.finish)

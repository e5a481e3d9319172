"""What a caller hands the engine (:class:`Request`) and the engine's refusals (:class:`QueueFull`,
:class:`Draining`)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Callable

from ..errors import Draining, QueueFull


@dataclass
class Request:
    """One sequence to generate. ``on_event(kind, data)`` is called from the engine thread with
    ``("token", {"text": delta, "token": id, "logprobs": entry})`` for every generated token (``delta``: the text
    that became final with it, often ""; ``entry``: its log-probabilities when asked, else None), then
    ``("done", request)`` or
    ``("error", exception)``."""

    task: str
    ids: list[int]
    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    seed_row: int = 0  # the row index Session.generate would give this sequence (a prompt list's position)
    stop: list[str] | None = None
    logprobs: int | None = None  # each token's log-probability and this many alternatives (see Row.logprobs)
    min_tokens: int = 0
    ignore_eos: bool = False
    on_event: Callable | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    # filled by the engine
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

"""Continuous batching over a session (no HTTP): :class:`Scheduler` takes requests of every task into one running
batch."""

from .batching import Scheduler
from .request import Draining, QueueFull, Request

__all__ = ["Scheduler", "Request", "QueueFull", "Draining"]

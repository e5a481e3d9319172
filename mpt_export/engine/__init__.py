"""Continuous batching over a session (no HTTP): :class:`Engine` takes requests of every task into one running
batch."""

from .batching import Engine
from .request import Draining, QueueFull, Request

__all__ = ["Engine", "Request", "QueueFull", "Draining"]

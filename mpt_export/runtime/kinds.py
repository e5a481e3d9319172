"""Which Session subclass a bundle needs (a backend mixes it with its own graph calls)."""

from __future__ import annotations


def session_kind(bundle):
    """The Session subclass for the bundle's model kind (causal or seq2seq); a backend mixes it with its own."""
    if bundle.task_type == "SEQ_2_SEQ_LM":
        from .seq2seq import Seq2SeqSession

        return Seq2SeqSession
    from .causal import CausalSession

    return CausalSession

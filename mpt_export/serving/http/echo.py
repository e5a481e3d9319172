"""OpenAI's ``echo``: the prompt's text (and, with ``logprobs``, each prompt token's log-probability, the first
null) in front of the completion — what lm-evaluation-harness asks for to score choices by log-likelihood
(``max_tokens`` 0 or 1). The prompt is scored in one call of the bundle's scoring graph (``prompt_logprobs``)."""

from __future__ import annotations

import math

from ...errors import InputError
from ...runtime.streaming import prefix_lengths
from .logprobs import completion_logprobs
from .errors import APIError


def score_prompts(session, task: str, prompts: list[list[int]], k: int | None) -> list[list | None]:
    """Per prompt: its tokens' entries (``None`` first), or None when log-probabilities were not asked for."""
    if not hasattr(session, "prompt_logprobs"):
        raise APIError(400, "echo scores a prompt with a decoder-only model; this bundle is an encoder-decoder",
                       param="echo")
    if k is None:
        return [None] * len(prompts)
    try:
        scored = [session.prompt_logprobs(p, task, k) for p in prompts]
    except InputError as e:
        raise APIError(400, str(e), param="echo") from None
    for i, entries in enumerate(scored):
        if not all(_finite(e) for e in entries):
            # this request's own numbers (its task's vectors, its prompt): it alone fails, as a row whose logits
            # turn NaN in generation does
            raise APIError(500, f"generation failed: scoring prompt {i} gave NaN or infinite log-probabilities "
                           f"(task {task!r}: its vectors or this prompt overflow the model's numbers)",
                           code="generation_failed")
    return scored


def _finite(entry) -> bool:
    """A scored token's entry ``(log-probability, [(alternative, log-probability)])`` (None: the first token)."""
    return entry is None or (math.isfinite(entry[0]) and all(math.isfinite(lp) for _, lp in entry[1]))


def echoed(tok, prompt: list[int], scored: list | None, tokens: list[int], text: str, entries: list | None):
    """-> (the choice's text: the prompt's then the completion's, its logprobs or None): one entry per prompt token
    and per generated token, EOS included; text offsets count from the prompt text's start, worked out in one pass
    over the tokens (:func:`~mpt_export.runtime.streaming.prefix_lengths`). Runs in a worker thread: it grows with
    the prompt."""
    head = tok.decode(prompt)
    if scored is None:
        return head + text, None
    both = prompt + list(tokens)
    offsets = prefix_lengths(tok, prompt) + [len(head) + n for n in prefix_lengths(tok, list(tokens))]
    lp = completion_logprobs(tok, both, [e if e is not None else (None, None) for e in scored + list(entries or [])],
                             offsets)
    lp["top_logprobs"] = [None if e is None else t for e, t in zip(scored + list(entries or []), lp["top_logprobs"])]
    return head + text, lp

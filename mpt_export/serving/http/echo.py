"""OpenAI's ``echo``: the prompt's text (and, with ``logprobs``, each prompt token's log-probability, the first
null) in front of the completion — what lm-evaluation-harness asks for to score choices by log-likelihood
(``max_tokens`` 0 or 1). The prompt is scored in one call of the bundle's scoring graph (``prompt_logprobs``)."""

from __future__ import annotations

from ...errors import InputError
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
        return [session.prompt_logprobs(p, task, k) for p in prompts]
    except InputError as e:
        raise APIError(400, str(e), param="echo") from None


def echoed(tok, prompt: list[int], scored: list | None, tokens: list[int], text: str, entries: list | None):
    """-> (the choice's text: the prompt's then the completion's, its logprobs or None): one entry per prompt token
    and per generated token, EOS included; text offsets count from the prompt text's start."""
    head = tok.decode(prompt)
    if scored is None:
        return head + text, None
    both = prompt + list(tokens)
    offsets = [len(tok.decode(prompt[:i])) for i in range(len(prompt))]
    offsets += [len(head) + len(tok.decode(tokens[:i])) for i in range(len(tokens))]
    lp = completion_logprobs(tok, both, [e if e is not None else (None, None) for e in scored + list(entries or [])],
                             offsets)
    lp["top_logprobs"] = [None if e is None else t for e, t in zip(scored + list(entries or []), lp["top_logprobs"])]
    return head + text, lp

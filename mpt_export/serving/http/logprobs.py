"""Log-probabilities in OpenAI's shapes, from the scheduler's per-token records ``(log-probability, [(alternative,
log-probability)])``: the completions (legacy) shape — ``tokens``, ``token_logprobs``, ``top_logprobs`` as ``{token:
log-probability}``, ``text_offset`` — and the chat shape (``content: [{token, logprob, bytes, top_logprobs}]``).
Every generated token has an entry, EOS included."""

from __future__ import annotations

from ...runtime.streaming import prefix_lengths


def completion_logprobs(tok, tokens: list[int], entries: list, offsets: list[int] | None = None) -> dict:
    """The choice's ``logprobs``. ``offsets``: each token's character offset in the choice's text (default: worked
    out in one pass over the tokens)."""
    if offsets is None:
        offsets = prefix_lengths(tok, tokens)
    return {"tokens": [tok.token_text(t) for t in tokens], "token_logprobs": [e[0] for e in entries],
            "top_logprobs": [{tok.token_text(a): lp for a, lp in (e[1] or [])} for e in entries],
            "text_offset": offsets}


def _chat_entry(tok, t: int, lp: float) -> dict:
    text = tok.token_text(t)
    return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(tok, tokens: list[int], entries: list) -> dict:
    return {"content": [dict(_chat_entry(tok, t, e[0]), top_logprobs=[_chat_entry(tok, a, lp) for a, lp in e[1]])
                        for t, e in zip(tokens, entries)]}

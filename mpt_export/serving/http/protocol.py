"""The OpenAI wire protocol for the server: request bodies read and checked (one 400 naming the field for anything
malformed or unsupported), the body's generation settings as one :class:`SamplingParams` (OpenAI's defaults,
declared once: :data:`HTTP_DEFAULTS`), usage. No HTTP framework in here."""

from __future__ import annotations

import json

from ...errors import InputError, OptionError
from ...runtime.sampling import SamplingParams
from .structured import constraint_of
from .errors import APIError, api_error, error_body  # noqa: F401 (api_error, error_body: re-exported)
from .numbers import number, shown

DEFAULT_MAX_BODY = 1 << 20
# OpenAI's defaults for what a body leaves out: temperature 1, top_p 1, max_tokens 16 (completions; chat: as many as
# the positions allow) — the one place the server declares them (docs/reference/http.md lists them)
HTTP_DEFAULTS = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=1.0)
UNSUPPORTED = {"suffix": None, "logit_bias": None, "best_of": 1,
               "presence_penalty": 0, "frequency_penalty": 0, "tools": None, "functions": None}


KEY_ENV = "MPT_EXPORT_API_KEY"
NAMED_TASKS = 20  # an unknown model's 404 names the bundle's first tasks, not all of them (10,000 tasks: 80 KB)


def api_key_of(option: str | None, env: str | None = None, where: str = "--api-key") -> str | None:
    """The key to require (``option``, else the environment's), or None for no key. A key that would not protect
    the server, or that no client could send, is refused: empty or only whitespace (which would turn auth off
    without a word), with whitespace around it (HTTP strips it from the header, so no request would match), or with
    characters a header cannot carry (control characters, non-ASCII)."""
    where, key = (where, option) if option is not None else (KEY_ENV, env)
    if key is None:
        return None
    off = f"to serve without a key, omit --api-key and unset {KEY_ENV}"
    if not isinstance(key, str) or not key.strip():
        raise OptionError(f"{where} is {'empty' if not key else 'only whitespace'}; an API key must be a non-empty "
                          f"string (the one clients send); {off}", param="api_key")
    if key != key.strip():
        raise OptionError(f"{where} begins or ends with whitespace, which HTTP strips from the Authorization header, "
                          f"so no client could send it; pass the key without it ({off})", param="api_key")
    if not all(" " <= c <= "~" for c in key):
        raise OptionError(f"{where} holds a character an HTTP header cannot carry (a control character or non-ASCII); "
                          f"use printable ASCII ({off})", param="api_key")
    return key


async def read_json(request, limit: int) -> dict:
    cl = request.headers.get("content-length")
    if cl is not None and cl.isdigit() and int(cl) > limit:
        raise APIError(413, f"request body of {cl} bytes exceeds the server's limit of {limit}",
                       code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"request body exceeds the server's limit of {limit} bytes", code="request_too_large")
    try:
        data = json.loads(bytes(body))
    except (ValueError, RecursionError):
        raise APIError(400, "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    return data


def logprobs_of(data: dict, chat: bool) -> int | None:
    """How many alternatives per token to return, or None for no log-probabilities: completions' ``logprobs``
    (0-5, OpenAI's legacy limit), chat's ``logprobs: true`` with ``top_logprobs`` (0-20)."""
    if not chat:
        if data.get("top_logprobs") is not None:
            raise APIError(400, "top_logprobs belongs to chat completions; completions take logprobs: 0-5",
                           param="top_logprobs")
        return number(data, "logprobs", None)
    want = data.get("logprobs", False)
    if not isinstance(want, bool) and want is not None:
        raise APIError(400, "logprobs must be true or false for chat completions (top_logprobs: how many "
                       "alternatives)", param="logprobs")
    top = data.get("top_logprobs")
    if top is not None and not want:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    return number(data, "top_logprobs", 0) if want else None


def answer_options(data: dict, chat: bool = False) -> dict:
    """How to answer (not what to generate): ``stream``, ``include_usage``, ``echo``; fields this server does not
    support are refused here, naming the field."""
    for key, neutral in UNSUPPORTED.items():
        if key in data and data[key] not in (neutral, None):
            raise APIError(400, f"{key} is not supported by this server", param=key)
    if number(data, "n", 1) != 1:
        raise APIError(400, "n must be 1: this server returns one choice per prompt", param="n")
    stream = data.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise APIError(400, f"stream must be true or false, got {shown(stream)}", param="stream")
    opts = data.get("stream_options")
    opts = {} if opts is None else opts
    if not isinstance(opts, dict):
        raise APIError(400, f"stream_options must be an object (or null), got {shown(opts)}", param="stream_options")
    usage = opts.get("include_usage", False)
    if not isinstance(usage, bool) and usage is not None:
        raise APIError(400, f"stream_options.include_usage must be true or false, got {shown(usage)}",
                       param="stream_options")
    echo = data.get("echo", False)
    if not isinstance(echo, bool) or (echo and chat):
        raise APIError(400, "echo must be true or false (completions only)", param="echo")
    if echo and stream:
        raise APIError(400, "echo is answered in one response: drop stream", param="echo")
    return {"stream": bool(stream), "include_usage": bool(usage), "echo": echo}


def sampling(data: dict, chat: bool, max_tokens: int) -> SamplingParams:
    """The body's generation settings, OpenAI's defaults (:data:`HTTP_DEFAULTS`) for what it leaves out, as the one
    object the scheduler's decode loop reads. The wire's own bounds (temperature 0-2, up to 16 stop strings, logprobs
    0-5 or top_logprobs 0-20) are checked here; the settings' own checks name their field (a 400 with ``param``)."""
    d = HTTP_DEFAULTS
    stop = data.get("stop")
    if isinstance(stop, list) and len(stop) > 16:
        raise APIError(400, f"stop holds {len(stop)} strings; at most 16", param="stop")
    try:
        return SamplingParams(
            max_new_tokens=max_tokens, temperature=number(data, "temperature", d.temperature),
            top_p=number(data, "top_p", d.top_p), top_k=number(data, "top_k", d.top_k),
            seed=number(data, "seed", d.seed), stop=stop, logprobs=logprobs_of(data, chat),
            min_tokens=number(data, "min_tokens", d.min_tokens),
            ignore_eos=data.get("ignore_eos", d.ignore_eos), constraint=constraint_of(data))
    except InputError as e:
        raise api_error(e) from None


def task_of(state, data: dict) -> str:
    model = data.get("model")
    if model is None and state.options.default_task is not None:  # serve --default-task
        model = state.options.default_task
    if not isinstance(model, str) or not model:
        raise APIError(400, "model is required: the task to run (see GET /v1/models)", param="model")
    model = state.aliases.get(model, model)  # serve --task-alias ALIAS=TASK
    if model not in state.session.bank:  # an index lookup: the same cost at 100,000 tasks as at 10
        tasks = state.session.tasks
        named = ", ".join(tasks[:NAMED_TASKS]) + (f" … and {len(tasks) - NAMED_TASKS} more; GET /v1/models lists them"
                                                 if len(tasks) > NAMED_TASKS else "")
        raise APIError(404, f"the model {shown(model)} does not exist; this bundle serves: {named}",
                       param="model", code="model_not_found")
    return model


def is_ids(x) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(i, int) and not isinstance(i, bool) for i in x)


def prompt_cap(session) -> int:
    """The most characters a prompt the model could take can have: its positions times the longest token's length
    in UTF-8 bytes (a character is at least one byte), so anything longer is refused without tokenizing it."""
    return session.max_positions * max(session.tokenizer.max_token_bytes, 4)


def check_size(text: str, what: str, cap: int, param: str) -> None:
    if len(text) > cap:
        raise APIError(400, f"{what} has {len(text)} characters: more than this model's {cap} (its positions times "
                       "its longest token), so it cannot fit; shorten it", param=param, code="prompt_too_long")


def prompts_of(raw, tok, state) -> list[list[int]]:
    """OpenAI's prompt forms: a string, a list of strings, a list of token ids, a list of token-id lists. Strings
    longer than :func:`prompt_cap` are refused before they are tokenized."""
    if isinstance(raw, str) or is_ids(raw):
        raw = [raw]
    if not isinstance(raw, list) or not raw or len(raw) > state.options.max_queue or not all(
            isinstance(p, str) or is_ids(p) for p in raw):
        raise APIError(400, "prompt must be a string, a list of strings, a list of token ids or a list of such lists "
                       f"(at most {state.options.max_queue})", param="prompt")
    vocab = state.session.vocab_size
    cap = prompt_cap(state.session)
    for i, p in enumerate(raw):
        if isinstance(p, str):
            check_size(p, f"prompt {i}", cap, "prompt")
    out = []
    for i, p in enumerate(raw):
        if isinstance(p, str):
            try:
                out.append(tok.encode(p, f"prompt {i}"))
            except InputError as e:
                raise APIError(400, str(e), param="prompt") from None
        else:
            if not all(0 <= t < vocab for t in p):
                raise APIError(400, f"prompt {i} holds token ids outside the vocabulary [0, {vocab})", param="prompt")
            out.append(list(p))
    return out


def room_for(state, task: str, n_prompt: int) -> int:
    s = state.session
    if s.bundle.task_type == "SEQ_2_SEQ_LM":
        return s.max_positions - s.split_prompt(task)[1].shape[0] - 1
    return s.max_positions - s.prompt_len(task) - n_prompt


def chat_prompt(state, raw) -> list[list[int]]:
    """The chat request's messages rendered with the bundle's template and tokenized -> [ids] (one prompt)."""
    if state.chat is None:
        raise APIError(400, "this bundle's base model has no chat template, so /v1/chat/completions is not "
                       "available; use /v1/completions", param="messages", code="chat_template_missing")
    messages = messages_of(raw)
    check_size("".join(m["content"] for m in messages), "the messages' content", prompt_cap(state.session),
               "messages")
    try:
        text = state.chat.render(messages)
        return [state.session.tokenizer.encode(text, "the rendered chat", add_special_tokens=False)]
    except InputError as e:
        raise APIError(400, str(e), param="messages") from None


def messages_of(raw) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise APIError(400, "messages must be a non-empty list of {role, content}", param="messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a role and content", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"messages[{i}]: only text content parts are supported", param="messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string", param="messages")
        out.append({"role": m["role"], "content": content})
    return out


def usage_of(reqs) -> dict:
    prompt = sum(len(r.ids) for r in reqs)
    completion = sum(len(r.tokens) for r in reqs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

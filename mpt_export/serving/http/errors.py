"""The server's answers to what went wrong: :class:`APIError` is an HTTP answer in OpenAI's error shape, and
:func:`api_error` turns any error of the library into one. The ``param`` of a 400 is the field the library's error
names as data (``InputError(..., param="temperature")``), in the wire's words (``max_new_tokens`` is ``max_tokens``)
— never read off the message."""

from __future__ import annotations

from ...errors import Draining, MptExportError, QueueFull, TaskNameError

# the library's names for a request's fields -> the wire's (OpenAI's) names
WIRE_NAMES = {"max_new_tokens": "max_tokens", "input_ids": "prompt", "tasks": "model", "task": "model"}


class APIError(MptExportError):
    """An HTTP answer in OpenAI's error shape: status, message, the offending parameter, a code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: dict | None = None):
        super().__init__(message, param=param)
        self.status, self.message, self.code = status, message, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}


def error_body(e: APIError) -> dict:
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}


def api_error(e: Exception, default_param: str = "prompt") -> APIError:
    """``e`` as the server answers it: an APIError as it is; the scheduler's refusals as 429/503; an unknown task as
    404; any other error of the library as a 400 naming its ``param`` (``default_param`` when it names none)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, QueueFull):
        return APIError(429, str(e), code="queue_full", type_="rate_limit_error", headers={"Retry-After": "1"})
    if isinstance(e, Draining):
        return APIError(503, str(e), code="draining")
    if isinstance(e, TaskNameError):
        return APIError(404, str(e), param="model", code="model_not_found")
    param = getattr(e, "param", None) or default_param
    return APIError(400, str(e), param=WIRE_NAMES.get(param, param))

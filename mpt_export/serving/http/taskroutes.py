"""Tasks into a running server: ``POST /admin/tasks`` ``{"name", "adapter"}`` loads a PEFT MPT adapter directory as a
task, ``DELETE /admin/tasks/{name}`` removes one (vLLM's ``/v1/load_lora_adapter`` ``{"lora_name", "lora_path"}``
and ``/v1/unload_lora_adapter`` ``{"lora_name"}`` are accepted as the same calls).

Off unless the operator names the directories adapters may come from (``serve --task-dir DIR``): an adapter path
must resolve (links followed) inside one of them. A load is what ``tasks add`` does — the same checks (shapes, base
model, finite prompts, names) and the same atomic write into the bundle — and then the server's own reload, so the
call answers once the task is served (under Ray: once every replica serves the new digest). Edits take turns.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

from ...errors import BaseModelError, CheckpointError, InputError, MptExportError, TaskNameError
from ...export.task_edits import add_tasks, remove_task
from .errors import APIError

_EDITS = threading.Lock()  # one task edit (write, then reload) at a time in this process


def _string(data: dict, key: str) -> str:
    v = data.get(key)
    if not isinstance(v, str) or not v.strip():
        raise APIError(400, f"{key} is required: a non-empty string", param=key)
    return v.strip()


def allowed_adapter(state, path: str, param: str) -> Path:
    """The adapter directory, resolved, if it lies inside a ``--task-dir``; else 403 (404 when loading is off)."""
    dirs = state.options.task_dirs
    if not dirs:
        raise APIError(404, "loading tasks into this server is off; start it with --task-dir DIR (the directory "
                            "adapters may be loaded from)", code="not_found")
    real = Path(os.path.realpath(path))
    for d in dirs:
        root = os.path.realpath(d)
        if os.path.commonpath([root, str(real)]) == root:
            return real
    raise APIError(403, f"{param} {path!r} is not inside a directory this server loads adapters from (--task-dir); "
                        "put the adapter there", param=param, code="adapter_not_allowed")


def _edit(state, fn) -> dict:
    """``fn()`` (a bundle edit on disk), then the server's reload: the edit is served when this returns."""
    with _EDITS:
        try:
            fn()
        except (TaskNameError, CheckpointError, BaseModelError, InputError) as e:
            raise APIError(400, str(e), param=getattr(e, "param", None), code="invalid_task") from None
        except MptExportError as e:
            raise APIError(409, str(e), code="task_edit_failed") from None
        return state.reload()


async def load_task(state, data: dict, vllm: bool = False) -> tuple[int, dict]:
    name = _string(data, "lora_name" if vllm else "name")
    param = "lora_path" if vllm else "adapter"
    adapter = allowed_adapter(state, _string(data, param), param)
    if name in state.session.bank:
        raise APIError(400, f"task {name!r} is already served; remove it first (DELETE /admin/tasks/{name}) or "
                            "choose another name", param="lora_name" if vllm else "name", code="invalid_task")
    result = await asyncio.to_thread(_edit, state, lambda: add_tasks(state.bundle_path, [f"{name}={adapter}"]).close())
    return 201, {"name": name, "adapter": str(adapter), "tasks": len(result["tasks"]), "digest": result["digest"]}


async def unload_task(state, name: str) -> tuple[int, dict]:
    if not state.options.task_dirs:
        raise APIError(404, "loading tasks into this server is off; start it with --task-dir DIR", code="not_found")
    if name not in state.session.bank:
        raise APIError(404, f"the model {name[:40]!r} does not exist (GET /v1/models lists the tasks)", param="name",
                       code="model_not_found")
    result = await asyncio.to_thread(_edit, state, lambda: remove_task(state.bundle_path, name).close())
    return 200, {"removed": name, "tasks": len(result["tasks"]), "digest": result["digest"]}

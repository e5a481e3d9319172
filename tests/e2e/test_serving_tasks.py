"""Tasks into a running server, for real: `mpt-export serve --task-dir DIR` loads PEFT adapters from DIR as tasks
(`POST /admin/tasks`, vLLM's `/v1/load_lora_adapter` too), removes them (`DELETE /admin/tasks/{name}`), persisted
in the bundle and served without a restart while other requests run; everything else refused with its reason."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

import mpt_export  # noqa: E402
from servers import AUTH, KEY, server  # noqa: E402


@pytest.fixture
def setup(served, tmp_path):
    from support import wide_adapter

    b = tmp_path / "bundle"
    shutil.copytree(served["bundle"], b)
    allowed = tmp_path / "adapters"
    allowed.mkdir()
    shutil.copytree(served["target"], allowed / "tgt")
    shutil.copytree(wide_adapter(tmp_path), allowed / "wide")  # trained for another base model
    (allowed / "escape").symlink_to(served["target"])  # inside by name, outside once resolved
    return {"bundle": b, "allowed": allowed, "outside": served["target"]}


def _post(s, path, body, key=KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(s.url + path, headers=headers, json=body, timeout=120)


def _complete(s, task, prompt="the movie was"):
    return httpx.post(s.url + "/v1/completions", headers=AUTH, timeout=120,
                      json={"model": task, "prompt": prompt, "max_tokens": 6, "temperature": 0})


def test_tasks_load_and_unload_in_a_running_server(setup, offline):
    b, allowed = setup["bundle"], setup["allowed"]
    with server(b, "--api-key", KEY, "--task-dir", allowed) as s:
        with ThreadPoolExecutor(4) as ex:  # loads while requests for other tasks run
            busy = [ex.submit(_complete, s, "sst2") for _ in range(3)]
            r = _post(s, "/admin/tasks", {"name": "rte2", "adapter": str(allowed / "tgt")})
            assert r.status_code == 201 and r.json()["name"] == "rte2", r.text
            assert all(f.result().status_code == 200 for f in busy)
        # served at once, as the target task it copies is, and persisted in the bundle
        got = _complete(s, "rte2")
        assert got.status_code == 200 and got.json()["choices"][0]["text"] == offline("rte", "the movie was", 6)
        assert "rte2" in mpt_export.load_bundle(b).tasks
        assert "rte2" in [m["id"] for m in httpx.get(s.url + "/v1/models", headers=AUTH).json()["data"]]
        # vLLM's route names load and unload the same way
        r = _post(s, "/v1/load_lora_adapter", {"lora_name": "rte3", "lora_path": str(allowed / "tgt")})
        assert r.status_code == 201, r.text
        r = _post(s, "/v1/unload_lora_adapter", {"lora_name": "rte3"})
        assert r.status_code == 200 and r.json()["removed"] == "rte3", r.text
        # refused, each with its reason, nothing changed
        refusals = [
            (_post(s, "/admin/tasks", {"name": "x", "adapter": str(setup["outside"])}), 403, "adapter_not_allowed"),
            (_post(s, "/admin/tasks", {"name": "x", "adapter": str(allowed / "escape")}), 403, "adapter_not_allowed"),
            (_post(s, "/admin/tasks", {"name": "x", "adapter": str(allowed / "../adapters/../..")}), 403,
             "adapter_not_allowed"),
            (_post(s, "/admin/tasks", {"name": "x", "adapter": str(allowed / "wide")}), 400, "invalid_task"),
            (_post(s, "/admin/tasks", {"name": "x", "adapter": str(allowed / "none")}), 400, "invalid_task"),
            (_post(s, "/admin/tasks", {"name": "rte2", "adapter": str(allowed / "tgt")}), 400, "invalid_task"),
            (_post(s, "/admin/tasks", {"name": "bad name!", "adapter": str(allowed / "tgt")}), 400, "invalid_task"),
            (_post(s, "/admin/tasks", {"adapter": str(allowed / "tgt")}), 400, None),
            (_post(s, "/admin/tasks", {"name": "x", "adapter": str(allowed / "tgt")}, key=None), 401,
             "invalid_api_key"),
            (httpx.delete(s.url + "/admin/tasks/rte2", timeout=30), 401, "invalid_api_key"),
            (httpx.delete(s.url + "/admin/tasks/nope", headers=AUTH, timeout=30), 404, "model_not_found"),
        ]
        for r, status, code in refusals:
            assert r.status_code == status and r.json()["error"]["code"] == code, r.text
        assert mpt_export.load_bundle(b).tasks == ["sst2", "mnli", "qnli", "rte", "rte2"]
        r = httpx.delete(s.url + "/admin/tasks/rte2", headers=AUTH, timeout=120)
        assert r.status_code == 200 and r.json()["removed"] == "rte2", r.text
        assert _complete(s, "rte2").status_code == 404 and "rte2" not in mpt_export.load_bundle(b).tasks
        assert s.stop() == 0


def test_without_task_dir_loading_is_off(setup):
    with server(setup["bundle"]) as s:
        r = _post(s, "/admin/tasks", {"name": "x", "adapter": str(setup["allowed"] / "tgt")}, key=None)
        assert r.status_code == 404 and "--task-dir" in r.json()["error"]["message"]
        assert httpx.delete(s.url + "/admin/tasks/sst2").status_code == 404
        assert "sst2" in mpt_export.load_bundle(setup["bundle"]).tasks
        assert s.stop() == 0

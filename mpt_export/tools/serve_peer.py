"""``bench-serve --peer vllm``: the concurrent load against a vLLM server of the same base model — one already
running (``--vllm-url``), or an installed ``vllm`` started here on the preset's base model and stopped after."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from ..errors import InputError, MissingDependencyError
from ..serving.ray.service import free_port
from .procs import drain_stderr, stop


PEERS = ("vllm",)
VLLM_HOW = ("vLLM's x86 CPU builds are release assets, not registry wheels (see vLLM's CPU installation guide); "
            "start one on the bench's base model, e.g. `vllm serve BASE_DIR --dtype float32 --port 8000`, and pass "
            "--vllm-url http://127.0.0.1:8000")


def check_serve_peer(peer: str | None, vllm_url: str | None, base_model) -> None:
    """Raises unless the serving peer can be measured: a URL, or an installed ``vllm`` and a base model to start it
    on."""
    if peer is None:
        if vllm_url is not None:
            raise InputError("--vllm-url goes with --peer vllm")
        return
    if peer not in PEERS:
        raise InputError(f"unknown --peer {peer!r}; the serving peer measured is: {', '.join(PEERS)}")
    if vllm_url is None and (shutil.which("vllm") is None or base_model is None):
        why = "no vllm on PATH" if shutil.which("vllm") is None else "a bundle of your own has no base model here"
        raise MissingDependencyError(f"the vllm peer needs a running vLLM server ({why}): {VLLM_HOW}")


def vllm_peer(url, model, base_model, jobs, prefixes: dict, clients: int, workdir: Path, step, load) -> dict:
    """``jobs`` from ``clients`` clients against vLLM (each task's virtual tokens as the prompt's prefix), sent by
    ``load`` (bench-serve's load generator) -> its figures, with the URL and model measured."""
    import httpx

    proc = None
    if url is None:  # an installed vLLM, started here on the base model and stopped after
        port = free_port()
        step("start vLLM on the base model (CPU)")
        proc = subprocess.Popen(["vllm", "serve", str(base_model), "--dtype", "float32", "--port", str(port),
                                 "--host", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        drain_stderr(proc)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 900
        while True:
            if proc.poll() is not None:
                raise InputError(f"vLLM exited with status {proc.returncode} before serving; {VLLM_HOW}")
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                stop(proc)
                raise InputError("vLLM did not answer /health within 15 minutes")
            time.sleep(2)
    url = url.rstrip("/")
    try:
        if model is None:
            try:
                listed = httpx.get(url + "/v1/models", timeout=30).json()["data"]
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
                raise InputError(f"--vllm-url {url}: no OpenAI-compatible /v1/models there ({e}); {VLLM_HOW}") from None
            if not listed:
                raise InputError(f"--vllm-url {url} serves no model")
            model = listed[0]["id"]
        peer_jobs = [{"task": model, "prompt": prefixes[j["task"]] + j["prompt"], "max_tokens": j["max_tokens"]}
                     for j in jobs]
        step(f"vllm: warm-up, then {clients} clients, {len(jobs)} requests")
        load(url, [dict(j, max_tokens=2) for j in peer_jobs[:clients]], clients, None, workdir)
        figs = load(url, peer_jobs, clients, None, workdir)
    finally:
        if proc is not None:
            stop(proc)
    return {"name": "vllm", "url": url, "model": model, **figs}

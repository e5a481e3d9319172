"""The benchmarks end to end, as a user runs them: `bench` on the tiny preset and on a bundle, `bench --peer
onnxruntime-genai` (and `--peer llama-cpp` where a llama.cpp build is found), and `bench-serve` (its own server and
client processes, and a serving peer at a URL). The tiny preset's runs share one
--workdir, as a user keeps one: each later run reuses the base model, the fp32 bundle and the quantized copies the
first made (the bench's rule: while the preset and the source are the same). No timing is asserted."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from support import assert_clean_failure, cli, run_cli


@pytest.fixture(scope="module")
def bench_workdir(tmp_path_factory):
    """The tiny preset's --workdir, shared by this module's runs (in file order, on one test worker)."""
    return tmp_path_factory.mktemp("bench")


def test_bench_tiny_runs_end_to_end(bench_workdir):
    res = cli("bench", "--preset", "tiny", "--workdir", bench_workdir, "--repeats", "1", "--json")
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    names = [x["name"] for x in r["rows"]]
    assert names[0].startswith("PEFT") and names[3:] == [f"ORT {s} + prompt KV" for s in ("int8", "int4", "int8-dynamic")]
    assert all(x["greedy_equal_peft"] for x in r["rows"][:3])
    assert r["rows"][2]["tokens_processed"] < r["rows"][1]["tokens_processed"]
    for row in r["rows"][3:]:
        assert 0 < row["agreement_vs_fp32"] <= 1 and 0 < row["free_running_vs_fp32"] <= 1, row


def test_bench_against_onnxruntime_genai(bench_workdir, tmp_path):
    """The peer is built from the same base model and measured in the same run (no timing asserted)."""
    pytest.importorskip("onnxruntime_genai", reason="needs the peers extra (pip install 'mpt-export[peers]')")
    res = cli("bench", "--peer", "onnxruntime-genai", "--preset", "tiny", "--workdir", bench_workdir, "--repeats", "1",
              "--json")
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    assert [(x["precision"], x["batch"]) for x in r["rows"]] == [(q, b) for q in ("fp32", "int8", "int4") for b in (1, 8)]
    for x in r["rows"]:
        for side in ("ours", "peer"):
            assert x[side]["decode"]["median"] > 0 and x[side]["e2e"]["median"] > 0, x
            assert x["peak_rss_mib"][side] > 0, x  # measured in a fresh process
    assert r["settings"]["int4"]["ours"].startswith("4-bit, block 32") and "4-bit" in r["settings"]["int4"]["peer"]
    assert r["settings"]["fp32"] == {"ours": "float", "peer": "float"}
    assert r["graphs"] == {q: "fused graph" for q in ("fp32", "int8", "int4")}  # the tiny preset's head size is 16
    # a second run reuses what the first built — the preset's bundle, its quantized copies, the peer's models (all
    # recorded as this tool's): the same preparation again builds nothing and refuses nothing
    from mpt_export.tools.bench import _quantized_bundle, _workload
    from mpt_export.tools.bench_peer import PRECISIONS, build_peer

    steps: list[str] = []
    _, base, bundle_dir, _, derived, _ = _workload("tiny", bench_workdir, None, None, 0, 0, 0, steps.append)
    for q in ("int8", "int4"):
        _quantized_bundle(bundle_dir, derived / f"bundle-{q}", q, steps.append)
    for q in PRECISIONS:
        build_peer(base, derived / f"peer-{q}", q, steps.append)
    assert steps == [], steps
    assert_clean_failure(cli("bench", "--peer", "llama.cpp", "--workdir", tmp_path), "unknown --peer 'llama.cpp'")


def test_bench_serve_tiny_runs_end_to_end(bench_workdir):
    """The bench drives its own server with a client process of its own and reports every figure."""
    for module in ("httpx", "starlette", "uvicorn"):
        pytest.importorskip(module)
    res = run_cli("bench-serve", "--preset", "tiny", "--workdir", bench_workdir, "--clients", "4", "--requests", "8",
                  "--prompt-len", "8", "--max-tokens", "6", "--json")
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["clients"] == 4 and r["requests"] == 8
    for mode in ("sequential", "concurrent"):
        row = r[mode]
        assert row["requests"] == 8 and 8 <= row["tokens"] <= 48 and row["tokens_per_s"] > 0
        assert 0 < row["ttft_p50_s"] <= row["ttft_p95_s"]
    assert r["sequential"]["tokens"] == r["concurrent"]["tokens"]  # the same greedy requests, the same tokens
    assert r["concurrent"]["mean_batch"] > 1 and r["ceiling"]["tokens_per_s"] > 0 and r["served_vs_ceiling"] > 0
    for mode in ("sequential", "concurrent"):  # every request looked its task's prompt KV up once
        assert r[mode]["cache_hits"] + r[mode]["cache_misses"] == 8


def test_bench_serve_spreads_requests_over_many_tasks(bench_workdir):
    """--tasks N builds a copy of the bundle with N tasks once (under the workdir) and spreads the requests uniformly
    over them; the cache's hits and misses come from the server's /metrics: with the cache given no memory every request
    misses; when every task fits, the server is warmed with each and every request hits."""
    for module in ("httpx", "starlette", "uvicorn"):
        pytest.importorskip(module)
    args = ("bench-serve", "--preset", "tiny", "--workdir", bench_workdir, "--clients", "4", "--requests", "8",
            "--prompt-len", "8", "--max-tokens", "4", "--json")
    res = run_cli(*args, "--tasks", "300", "--kv-cache-mib", "0")
    assert res.returncode == 0, res.stderr
    many = json.loads(res.stdout)
    assert many["tasks"] == 300 and many["bundle_tasks"] == 300 and many["cache_entries"] == 0
    for mode in ("sequential", "concurrent"):
        assert many[mode]["cache_misses"] == 8 and many[mode]["cache_hits"] == 0
    copies = list(bench_workdir.glob("serve/tasks-300/bundle/manifest.json"))
    assert len(copies) == 1  # built once, under the workdir
    again = run_cli(*args, "--tasks", "300")  # reused, not rebuilt; the default memory keeps every task here
    assert again.returncode == 0 and "a copy of the bundle" not in again.stderr, again.stderr
    warm = json.loads(again.stdout)  # so a long-running server holds them all: warmed, every request hits
    assert warm["warmed_every_task"] and warm["cache_entries"] >= 300 and 300 * warm["task_kv_bytes"] <= 2**30
    assert warm["sequential"]["cache_hit_rate"] == 1.0 == warm["concurrent"]["cache_hit_rate"]
    assert copies[0].stat().st_mtime_ns == (bench_workdir / "serve/tasks-300/bundle/manifest.json").stat().st_mtime_ns


def test_bench_a_bundle(llama, tmp_path):
    assert_clean_failure(cli("bench", llama.bundle, "--workdir", tmp_path), "needs --base-model")
    res = cli("bench", llama.bundle, "--base-model", llama.base, "--workdir", tmp_path, "--repeats", "1",
                  "--batch", "3", "--input-len", "8", "--new-tokens", "4", "--json")
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["config"]["batch"] == 3 and r["config"]["virtual_tokens"] == 5 and r["config"]["num_tasks"] == 3
    assert all(x["greedy_equal_peft"] for x in r["rows"][:3])
    assert (tmp_path / "bundle-derived" / "bundle-int8" / "manifest.json").is_file()
    assert not (llama.bundle.parent / "bundle-int8").exists()  # nothing written beside the user's bundle


def _llama_cpp() -> str | None:
    """A llama.cpp build to measure against: $MPT_EXPORT_LLAMA_CPP (its source folder) or llama-bench on PATH."""
    where = os.environ.get("MPT_EXPORT_LLAMA_CPP")
    if where and Path(where).is_dir():
        return where
    found = shutil.which("llama-bench")
    return str(Path(found).resolve().parent) if found else None


def test_bench_against_llama_cpp(bench_workdir, tmp_path):
    """Without a llama.cpp build: one line saying how to get one. With one (never built by the tests): its converter
    and quantizer on the preset's base model, llama-bench beside ours at batch 1, every figure reported."""
    env_path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if
                               not (Path(p) / "llama-bench").exists())
    res = cli("bench", "--peer", "llama-cpp", "--workdir", tmp_path, env={"PATH": env_path})
    assert_clean_failure(res, "no llama-bench on PATH", "--llama-cpp DIR")
    assert_clean_failure(cli("bench", "--peer", "llama-cpp", "--llama-cpp", tmp_path / "nowhere"), "no such folder")
    assert_clean_failure(cli("bench", "--llama-cpp", tmp_path), "--llama-cpp goes with --peer llama-cpp")
    where = _llama_cpp()
    if where is None:
        pytest.skip("no llama.cpp build here (set MPT_EXPORT_LLAMA_CPP to its source folder)")
    res = cli("bench", "--peer", "llama-cpp", "--llama-cpp", where, "--preset", "tiny", "--workdir", bench_workdir,
              "--repeats", "1", "--json")
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    assert [(x["precision"], x["batch"]) for x in r["rows"]] == [(q, 1) for q in ("fp32", "int8", "int4")]
    for x in r["rows"]:
        for side in ("ours", "peer"):
            assert x[side]["decode"]["median"] > 0 and x[side]["prefill"]["median"] > 0, x
            assert x["peak_rss_mib"][side] > 0, x
    assert [r["settings"][q]["peer"] for q in ("fp32", "int8", "int4")] == ["f32 GGUF", "q8_0 GGUF", "q4_0 GGUF"]


def test_bench_serve_against_a_serving_peer(bench_workdir, tmp_path):
    """--peer vllm measures the same concurrent load against any OpenAI-compatible server at --vllm-url (here a second
    `mpt-export serve` of the same bundle stands in for vLLM: the path, not vLLM, is what runs); without a URL or a vLLM
    on PATH, one line saying how to get one."""
    for module in ("httpx", "starlette", "uvicorn"):
        pytest.importorskip(module)
    from servers import server

    no_vllm = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if not (Path(p) / "vllm").exists())
    assert_clean_failure(cli("bench-serve", "--preset", "tiny", "--peer", "vllm", "--workdir", tmp_path,
                             env={"PATH": no_vllm}), "needs a running vLLM server", "--vllm-url")
    assert_clean_failure(cli("bench-serve", "--vllm-url", "http://127.0.0.1:9"), "--vllm-url goes with --peer vllm")
    bundle = bench_workdir / "tiny" / "bundle"
    assert (bundle / "manifest.json").is_file()  # the tiny preset's, built by the runs above
    with server(bundle) as peer:
        res = run_cli("bench-serve", "--preset", "tiny", "--workdir", bench_workdir, "--clients", "4", "--requests",
                      "8", "--prompt-len", "8", "--max-tokens", "4", "--peer", "vllm", "--vllm-url", peer.url, "--json")
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    p = r["peer"]
    assert p["url"] == peer.url and p["model"] and p["requests"] == 8 and p["tokens_per_s"] > 0
    assert 0 < p["ttft_p50_s"] <= p["ttft_p99_s"] and r["concurrent"]["ttft_p99_s"] >= r["concurrent"]["ttft_p50_s"]
    assert p["ratio_ours_vs_peer"] == pytest.approx(r["concurrent"]["tokens_per_s"] / p["tokens_per_s"])

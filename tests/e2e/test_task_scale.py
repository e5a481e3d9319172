"""One bundle, a hundred thousand tasks, built here by the library (one PEFT adapter of 100,000 tasks): added by
`tasks add --names-file`, edited one task at a time (one small file per edit, nothing else rewritten), verified,
served, reloaded with a task added on disk — and the tasks sampled from it generate what a session given that task
alone generates."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

import mpt_export  # noqa: E402
from servers import AUTH, KEY, server  # noqa: E402
from support import cli  # noqa: E402

N = 100_000


@pytest.fixture(scope="module")
def big(llama, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from mpt_export.source.adapters import read_adapter
    from mpt_export.tools.demo import make_source_adapter

    root = tmp_path_factory.mktemp("scale")
    many = make_source_adapter(AutoModelForCausalLM.from_pretrained(str(llama.base)), root / "many", num_tasks=N,
                               num_virtual_tokens=3, num_ranks=1, seed=11)
    names = root / "names.txt"
    names.write_text("".join(f"t{i:06d}\n" for i in range(N)))
    b = root / "bundle"
    shutil.copytree(llama.bundle, b)
    res = cli("tasks", "add", b, "--adapter", many, "--names-file", names)
    assert res.returncode == 0 and f"added {N} tasks: t000000" in " ".join(res.stdout.split()), res.stderr
    return {"bundle": b, "adapter": read_adapter(many), "base_tasks": mpt_export.load_bundle(llama.bundle).tasks}


def _files(b):
    return {p.relative_to(b).as_posix(): (p.stat().st_ino, p.stat().st_size) for p in b.rglob("*") if p.is_file()}


def test_a_hundred_thousand_tasks_edit_one_at_a_time(big, llama):
    b = big["bundle"]
    assert (b / "manifest.json").stat().st_size < 64 << 10  # the task list is not in the manifest
    before = _files(b)
    assert cli("tasks", "add", b, "--adapter", f"extra={llama.target}").returncode == 0
    assert cli("tasks", "remove", b, "t000007").returncode == 0
    after = _files(b)
    new = sorted(set(after) - set(before))
    # two small segments and the manifest: every other file is the same inode (nothing else rewritten)
    assert len(new) == 2 and all(after[f][1] < 4096 for f in new), new
    assert all(after[f][0] == before[f][0] for f in before if f != "manifest.json")
    bundle = mpt_export.load_bundle(b)
    assert len(bundle.tasks) == len(big["base_tasks"]) + N and "extra" in bundle.tasks and "t000007" not in bundle.tasks
    res = cli("verify", b)
    assert res.returncode == 0 and f"tasks: {big['base_tasks'][0]}" in res.stdout and "more" in res.stdout
    page = cli("tasks", "list", b, "--match", "t09999*", "--json")
    assert [line.split('"')[3] for line in page.stdout.splitlines()] == [f"t09999{i}" for i in range(10)]


def test_a_hundred_thousand_tasks_served_and_reloaded(big, llama):
    b, ck = big["bundle"], big["adapter"]
    alone = mpt_export.load_bundle(llama.bundle).session()  # the base bundle, given one task at a time
    rng = np.random.default_rng(3)
    sample = sorted({int(i) for i in rng.integers(0, N, 6)} - {7})
    prompt = [5, 6, 7, 8, 9]
    with server(b, "--api-key", KEY) as s:
        models = httpx.get(s.url + "/v1/models", headers=AUTH, timeout=60).json()
        ids = [m["id"] for m in models["data"]]
        assert models["object"] == "list" and len(ids) == len(mpt_export.load_bundle(b).tasks)
        for i in sample:
            name = f"t{i:06d}"
            alone.add_task(name, shared_prompt=ck.prompt_embeddings, cols=ck.cols[i], rows=ck.rows[i])
            want = alone.generate_ids(np.array([prompt]), [name], max_new_tokens=6, eos_token_id=None)[0].tolist()
            r = httpx.post(s.url + "/v1/completions", headers=AUTH, timeout=60,
                           json={"model": name, "prompt": prompt, "max_tokens": 6, "temperature": 0,
                                 "ignore_eos": True})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == alone.tokenizer.decode(want), name
        # a task added on disk is served after a reload, and the old ones still are
        assert cli("tasks", "add", b, "--adapter", f"late={llama.target}").returncode == 0
        r = httpx.post(s.url + "/admin/reload", headers=AUTH, json={}, timeout=120)
        assert r.status_code == 200 and r.json()["added"] == ["late"], r.text
        r = httpx.post(s.url + "/v1/completions", headers=AUTH, timeout=60,
                       json={"model": "late", "prompt": prompt, "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200, r.text
        assert s.stop() == 0


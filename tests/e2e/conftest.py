"""Fixtures the end-to-end modules share, each built once per run: the served model's bundle and its offline
generation (test_serving_*.py), and the one Ray server with its copy of the llama bundle (test_ray.py,
whose last check stops it). Ray itself is never imported here: the Ray server is a process of its own,
started only when a Ray test that needs it runs."""

from __future__ import annotations

import shutil

import pytest

import mpt_export
from support import built_once


# -- the served model (test_serving_*.py) --------------------------------------------------------------------------

@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """A Llama-GQA model big enough that a request takes a while (so others can join it), 3 source tasks + 1
    target task; its bundle."""
    def build(root):
        from transformers import AutoModelForCausalLM

        from mpt_export.tools.demo import make_base_model, make_source_adapter, make_target_adapter

        model = make_base_model(root / "base", arch="llama-gqa", hidden=128, layers=4, heads=4, max_positions=512,
                                seed=7)
        src = make_source_adapter(model, root / "src", num_tasks=3, num_virtual_tokens=8, num_ranks=2, seed=8)
        tgt = make_target_adapter(AutoModelForCausalLM.from_pretrained(str(root / "base")), root / "tgt", src,
                                  source_task=1, seed=9)
        mpt_export.export_bundle(root / "base", [f"sst2,mnli,qnli={src}", f"rte={tgt}"], root / "bundle",
                                 seed=1).close()

    root = built_once(tmp_path_factory, "served", build)  # one export for every test worker
    return {"root": root, "bundle": root / "bundle", "base": root / "base", "target": root / "tgt"}


@pytest.fixture(scope="session")
def offline(served):
    s = mpt_export.load_bundle(served["bundle"]).session()

    def gen(task, prompt, max_tokens, **kw):
        return s.generate([prompt], [task], max_new_tokens=max_tokens, **kw)[0]

    gen.session = s
    return gen


# -- the Ray server (test_ray.py) ----------------------------------------------------------------------------------
# One server serves the module's checks in order (Ray takes ~30-50 s to start): it names these `case` and
# `srv`. Its last test stops it; the finalizer only kills what is left after a failure.

@pytest.fixture(scope="session")
def ray_case(llama, tmp_path_factory):
    """The llama case's bundle copied (the reload checks change it) and the offline results the server must give."""
    from rayserver import PROMPTS

    root = tmp_path_factory.mktemp("raybundle")
    bundle = root / "bundle"
    shutil.copytree(llama.bundle, bundle)
    (root / "adapters").mkdir()  # the server's --task-dir
    shutil.copytree(llama.target, root / "adapters" / "target")
    b = mpt_export.load_bundle(bundle)
    tasks = b.tasks
    s = b.session()
    want = {(t, p): s.generate([p], [t], max_new_tokens=6)[0] for t in tasks for p in PROMPTS}
    s.close()
    # the digest served at the start (test_ray_replicas_mixed_tasks checks it), so the reload checks can run alone too
    state = {"digest": b.manifest["manifest_sha256"]}
    b.close()
    return {"bundle": bundle, "tasks": tasks, "want": want, "llama": llama, "state": state,
            "adapters": root / "adapters"}


@pytest.fixture(scope="session")
def ray_srv(ray_case):
    from rayserver import RayServer

    s = RayServer(ray_case["bundle"], "--replicas", "2", "--threads", "1", "--max-batch", "4", "--max-queue", "4",
                  "--task-dir", ray_case["adapters"])
    yield s
    s.kill()  # when a check failed before test_ray_stop_leaves_nothing

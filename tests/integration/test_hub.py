"""Hugging Face Hub ids for the base model and the adapters, read from a Hub cache this test writes (the layout
huggingface_hub keeps: models--ORG--NAME/{refs,snapshots}) with HF_HUB_OFFLINE=1: nothing is downloaded."""

from __future__ import annotations

import json
import shutil

import mpt_export
from support import assert_clean_failure, cli

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache_repo(cache, repo_id: str, src, commit: str = COMMIT, ref: str = "main"):
    root = cache / f"models--{repo_id.replace('/', '--')}"
    snap = root / "snapshots" / commit
    shutil.copytree(src, snap)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    return snap


def test_hub_ids_from_the_cache_offline(make_case, tmp_path):
    case = make_case("llama")
    cache = tmp_path / "hub"
    _cache_repo(cache, "tiny-org/tiny-llama", case.base)
    _cache_repo(cache, "tiny-org/mpt-source", case.source)
    _cache_repo(cache, "tiny-org/mpt-target", case.target, commit="f" * 40, ref="v1")
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "bundle"
    res = cli("export", "--base-model", "tiny-org/tiny-llama", "--revision", "main", "--adapter",
              "a,b,c=tiny-org/mpt-source", "--adapter", "t=tiny-org/mpt-target@v1", "--out", out, env=env)
    assert res.returncode == 0, res.stderr + res.stdout
    b = mpt_export.load_bundle(out)
    assert b.tasks == ["a", "b", "c", "t"] and b.manifest["validation"]["passed"]
    assert b.base_model["hub"] == {"repo_id": "tiny-org/tiny-llama", "revision": "main", "commit": COMMIT}
    # the same weights as the local directory: the same identity
    assert b.base_model["config_sha256"] == mpt_export.load_bundle(case.bundle).base_model["config_sha256"]

    # the other commands that name a base model or an adapter take Hub ids too
    res = cli("verify", out, "--base-model", "tiny-org/tiny-llama", env=env)
    assert res.returncode == 0, res.stderr + res.stdout
    res = cli("tasks", "add", out, "--adapter", "u=tiny-org/mpt-target@v1", env=env)
    assert res.returncode == 0, res.stderr + res.stdout
    assert "u" in mpt_export.load_bundle(out).tasks

    # offline and not cached: one line, nothing written
    res = cli("export", "--base-model", "tiny-org/not-cached", "--adapter", "a,b,c=tiny-org/mpt-source",
              "--out", tmp_path / "o2", env=env)
    assert_clean_failure(res, "tiny-org/not-cached is not in the Hugging Face cache", "HF_HUB_OFFLINE")
    assert not (tmp_path / "o2").exists()
    # a pinned revision the cache does not hold
    res = cli("export", "--base-model", "tiny-org/tiny-llama", "--revision", "v9", "--adapter",
              "a,b,c=tiny-org/mpt-source", "--out", tmp_path / "o3", env=env)
    assert_clean_failure(res, "tiny-org/tiny-llama at revision v9 is not in the Hugging Face cache")
    res = cli("export", "--base-model", "tiny-org/tiny-llama", "--adapter", "a=tiny-org/mpt-missing",
              "--out", tmp_path / "o4", env=env)
    assert_clean_failure(res, "tiny-org/mpt-missing is not in the Hugging Face cache")


def test_a_local_directory_wins_over_a_hub_id(make_case, tmp_path, monkeypatch):
    from mpt_export.source.hub import looks_like_hub_id, resolve

    case = make_case("llama")
    monkeypatch.chdir(tmp_path)
    shutil.copytree(case.base, tmp_path / "org" / "model")
    assert looks_like_hub_id("org/model") and resolve("org/model").resolve() == (tmp_path / "org" / "model")
    assert not looks_like_hub_id("./org/model") and not looks_like_hub_id("/abs/dir")
    assert json.loads((resolve("org/model") / "config.json").read_text())["model_type"] == "llama"

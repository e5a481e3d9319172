"""Verification stamps: later opens of an unchanged bundle skip hashing; a changed byte, a copy, a fresh file, a
disabled or unwritable cache all mean the files are hashed again — and ``verify`` always hashes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mpt_export
from mpt_export.bundle import reader as bundle_mod
from mpt_export.bundle import stamps
from mpt_export.errors import BundleError
from support import assert_clean_failure, cli


@pytest.fixture
def hashed(monkeypatch):
    """Counts the files hashed by load_bundle (the real hashing still runs)."""
    calls = []
    real = bundle_mod.sha256_stream

    def counting(fd):
        calls.append(fd)
        return real(fd)

    monkeypatch.setattr(bundle_mod, "sha256_stream", counting)
    return calls


@pytest.fixture
def aged(llama, tmp_path, monkeypatch):
    """A copy of the bundle whose files count as settled: the tick guard is shortened so the test need not wait."""
    monkeypatch.setattr(stamps, "FRESH_S", 0.0)
    monkeypatch.setenv(stamps.CACHE_ENV, str(tmp_path / "cache"))
    b = tmp_path / "b"
    shutil.copytree(llama.bundle, b)
    return b


def _files(b) -> int:
    with mpt_export.load_bundle(b, verify=False) as x:
        return len(x.manifest["files"])


def test_second_open_trusts_the_stamp_and_verify_still_hashes(aged, hashed, tmp_path):
    n = _files(aged)
    mpt_export.load_bundle(aged).close()
    assert len(hashed) == n  # first open: every file
    assert len(list((tmp_path / "cache" / "verified").glob("*.json"))) == 1
    hashed.clear()
    with mpt_export.load_bundle(aged) as b:
        assert len(hashed) == 0  # unchanged since: nothing hashed
        assert b.session().generate_ids([[5, 6, 7]], [b.tasks[0]], max_new_tokens=2) is not None
    from mpt_export.export.api import verify_bundle

    verify_bundle(aged)
    assert len(hashed) == n  # verify hashes every file whatever the stamp says


@pytest.mark.parametrize("keep_mtime", [False, True], ids=["plain-write", "mtime-restored"])
def test_a_changed_byte_after_the_stamp_is_refused(aged, hashed, keep_mtime):
    mpt_export.load_bundle(aged).close()
    f = aged / "backbone.onnx.data"
    st = f.stat()
    with open(f, "r+b") as fh:  # same size, one byte flipped in place
        fh.seek(st.st_size // 2)
        byte = fh.read(1)
        fh.seek(st.st_size // 2)
        fh.write(bytes([byte[0] ^ 1]))
    if keep_mtime:  # as `touch -r` or `cp -a` would: ctime still moves
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert f.stat().st_mtime_ns == st.st_mtime_ns
    with pytest.raises(BundleError, match="backbone.onnx.data does not match its sha256"):
        mpt_export.load_bundle(aged)
    assert_clean_failure(cli("verify", aged), "backbone.onnx.data", "sha256")


def test_a_copy_is_hashed_on_its_first_open(aged, hashed, tmp_path):
    mpt_export.load_bundle(aged).close()
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(aged), str(copy)], check=True)  # mtimes kept; inodes and ctimes are new
    hashed.clear()
    mpt_export.load_bundle(copy).close()
    assert len(hashed) == _files(copy)
    hashed.clear()
    mpt_export.load_bundle(copy).close()
    assert len(hashed) == 0


def test_fresh_files_are_not_stamped(llama, tmp_path, monkeypatch, hashed):
    """Files changed within a clock tick of the hashing could change again unseen: no stamp for them."""
    monkeypatch.setenv(stamps.CACHE_ENV, str(tmp_path / "cache"))
    b = tmp_path / "b"
    shutil.copytree(llama.bundle, b)  # seconds old at most
    assert stamps.FRESH_S >= 1.0
    mpt_export.load_bundle(b).close()
    hashed.clear()
    mpt_export.load_bundle(b).close()
    assert len(hashed) == _files(b)


@pytest.mark.parametrize("cache", ["off", "unwritable"])
def test_no_usable_cache_means_every_open_hashes(aged, hashed, tmp_path, monkeypatch, cache):
    if cache == "off":
        monkeypatch.setenv(stamps.CACHE_ENV, "off")
    else:
        blocker = tmp_path / "not-a-dir"
        blocker.write_text("a file where the cache directory would go")
        monkeypatch.setenv(stamps.CACHE_ENV, str(blocker))
    for _ in range(2):
        hashed.clear()
        mpt_export.load_bundle(aged).close()
        assert len(hashed) == _files(aged)
    if cache == "unwritable":
        assert blocker.read_text().startswith("a file")  # left as it was


def test_the_cli_stamps_a_settled_bundle(llama, tmp_path):
    """Real tick guard, real CLI: once the files are older than the guard, an open stamps them; the stamp names the
    manifest it vouches for."""
    import json
    import time

    b = tmp_path / "b"
    shutil.copytree(llama.bundle, b)
    time.sleep(stamps.FRESH_S + 0.2)
    cache = tmp_path / "cli-cache"
    exe = Path(sys.executable).with_name("mpt-export")  # the venv's, whether or not its bin is on PATH
    res = subprocess.run([str(exe), "generate", str(b), "hi", "--task", "a",
                          "--max-new-tokens", "2"], capture_output=True, text=True,
                         env={**os.environ, stamps.CACHE_ENV: str(cache)})
    assert res.returncode == 0, res.stderr
    (stamp,) = cache.glob("verified/*.json")
    data = json.loads(stamp.read_text())
    with mpt_export.load_bundle(b, verify=False) as x:
        assert data["manifest_sha256"] == x.manifest["manifest_sha256"]
        assert sorted(data["files"]) == sorted(x.manifest["files"])

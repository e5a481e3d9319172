"""Never lose a user's data: outputs replace only what this tool wrote — never an input, a foreign directory, a
user's file inside a folder of ours, a file that only looks like ours, or a bundle the user made read-only — and
paths are resolved as the kernel resolves them. (Writers killed during a swap: test_data_safety_swaps.py; the
manifest's integrity: test_data_safety_integrity.py.)"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import mpt_export
from data_safety import OLD, cli, leftovers
from mpt_export.errors import OutputExistsError
from support import EXE, assert_clean_failure


def tree(root: Path) -> dict:
    """Every entry under ``root`` with its content hash: what 'untouched' means."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# -- --force replaces only what this tool wrote, never an input --------------------------------------------------------

def test_force_never_replaces_a_foreign_directory_or_an_input(llama, tmp_path):
    base_copy = tmp_path / "bc"
    shutil.copytree(llama.base, base_copy)
    adapter_copy = tmp_path / "ac"
    shutil.copytree(llama.source, adapter_copy)
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("years of work")
    holder = tmp_path / "holder"
    shutil.copytree(llama.base, holder / "base")
    cases = [
        (["--base-model", base_copy, "--adapter", str(llama.source), "--out", base_copy], base_copy,
         "is the base model this command reads"),
        (["--base-model", llama.base, "--adapter", str(adapter_copy), "--out", adapter_copy], adapter_copy,
         "is the adapter this command reads"),
        (["--base-model", llama.base, "--adapter", str(llama.source), "--out", foreign], foreign,
         "was not written by mpt-export"),
        (["--base-model", holder / "base", "--adapter", str(llama.source), "--out", holder], holder,
         "holds the base model this command reads"),
    ]
    for args, victim, needle in cases:
        before = tree(victim)
        assert_clean_failure(cli("export", *args, "--force", "--no-validate"), needle, "choose another output path")
        assert tree(victim) == before, victim
        assert not leftovers(victim)
    # quantize onto its own source: refused, source untouched
    b = tmp_path / "b"
    shutil.copytree(llama.bundle, b)
    before = tree(b)
    assert_clean_failure(cli("quantize", b, "--out", b, "--force"), "is the source bundle this command reads")
    assert tree(b) == before
    # demo / bench workdirs and engines folders: only what this tool made
    assert_clean_failure(cli("demo", "--workdir", foreign), "was not written by mpt-export")
    (foreign / "tiny").mkdir()
    (foreign / "tiny" / "data.csv").write_text("1,2\n")
    assert_clean_failure(cli("bench", "--preset", "tiny", "--workdir", foreign), "was not written by mpt-export")
    assert_clean_failure(cli("build", b, "--out", foreign), "was not written by mpt-export")
    assert_clean_failure(cli("build", b, "--out", b), "is the bundle this command reads")
    assert (foreign / "thesis.txt").read_text() == "years of work" and (foreign / "tiny" / "data.csv").exists()
    from mpt_export.storage.ownership import check_replaceable, claim_workdir

    mine = claim_workdir(tmp_path / "demo", "demo-workdir", contents=["base", "adapters", "bundle"])
    (mine / "results.csv").write_text("keep me")  # the user's file inside a demo workdir: not ours to delete
    assert_clean_failure(cli("demo", "--workdir", mine), "holds files mpt-export did not write (results.csv)")
    assert (mine / "results.csv").read_text() == "keep me"
    assert tree(b) == before
    # a workdir an earlier version claimed: a newer version names what it adds before writing it, so its next run
    # takes the new part for its own (and still refuses the user's file)
    (mine / "results.csv").unlink()
    claim_workdir(mine, "demo-workdir", contents=["base", "adapters", "bundle", "report"])
    (mine / "report").mkdir()
    (mine / "report" / "r.json").write_text("{}")
    check_replaceable(mine, "demo-workdir", force=True)  # no error: all of it is ours
    (mine / "results.csv").write_text("keep me")
    assert_clean_failure(cli("demo", "--workdir", mine), "holds files mpt-export did not write (results.csv)")


def test_force_replaces_a_bundle_this_tool_wrote(llama, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(llama.bundle, out)
    res = cli("export", "--base-model", llama.base, "--adapter", f"x,y,z={llama.source}", "--out", out, "--force",
              "--no-validate")
    assert res.returncode == 0, res.stderr
    assert mpt_export.load_bundle(out).tasks == ["x", "y", "z"]
    assert not leftovers(out)
    # a bundle of ours that also holds the user's own files is not ours to delete
    (out / "notes.txt").write_text("mine")
    assert_clean_failure(cli("export", "--base-model", llama.base, "--adapter", str(llama.source), "--out", out,
                             "--force", "--no-validate"), "holds files mpt-export did not write (notes.txt)")
    assert (out / "notes.txt").read_text() == "mine"
    with pytest.raises(OutputExistsError, match="holds an mpt-export bundle, not a demo-workdir"):
        from mpt_export.tools.demo import run_demo

        run_demo(out)


# -- what another user may not read or write ---------------------------------------------------------------------------

def _as_nobody(args, cwd=None):
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(EXE), *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=cwd, env={**os.environ, "HOME": "/tmp"})


def _world_readable_copy(src: Path) -> Path:
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="mpt-perm-"))
    os.chmod(root, 0o755)
    dst = root / "bundle"
    shutil.copytree(src, dst)
    for p in [dst, *dst.rglob("*")]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    return dst


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv to run as another user")
def test_permission_problems_are_one_line(llama):
    b = _world_readable_copy(llama.bundle)
    try:
        os.chmod(b / "tasks.safetensors", 0o600)  # unreadable to the user running the command
        assert_clean_failure(_as_nobody(["verify", b]), "cannot read bundle file tasks.safetensors", "Permission denied")
        os.chmod(b / "tasks.safetensors", 0o644)
        target = _world_readable_copy(llama.target)
        os.chmod(b, 0o777)
        before = tree(b)  # the bundle is writable for that user, its parent directory is not
        res = _as_nobody(["tasks", "add", b, "--adapter", f"x={target}"])
        assert_clean_failure(res, "cannot write beside", "writable parent directory")
        assert tree(b) == before and not leftovers(b)
        os.chmod(b.parent, 0o777)
        os.chmod(b, 0o555)  # a read-only bundle in a writable parent: the user protected it, so it does not change
        res = _as_nobody(["tasks", "add", b, "--adapter", f"x={target}"])
        assert_clean_failure(res, "is read-only", "make it writable first")
        assert tree(b) == before and not leftovers(b)
        shutil.rmtree(target.parent, ignore_errors=True)
    finally:
        shutil.rmtree(b.parent, ignore_errors=True)


# -- what a new user's adversarial pass found ------------------------------------------------------------------------

def test_paths_are_resolved_as_the_kernel_resolves_them(llama, tmp_path):
    """`link/../b` names the bundle beside the link's target: that is the bundle read, and the one written."""
    real, cwd = tmp_path / "real", tmp_path / "cwd"
    (real / "sub").mkdir(parents=True)
    cwd.mkdir()
    shutil.copytree(llama.bundle, real / "b")
    shutil.copytree(llama.bundle, cwd / "b")
    (cwd / "link").symlink_to(real / "sub")
    res = subprocess.run([str(EXE), "tasks", "add", "link/../b", "--adapter", f"x={llama.target}"], cwd=cwd,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert mpt_export.load_bundle(real / "b").tasks == OLD + ["x"]
    assert mpt_export.load_bundle(cwd / "b").tasks == OLD  # untouched
    # and `tasks add .` from inside the bundle: committed, and said so
    res = subprocess.run([str(EXE), "tasks", "add", ".", "--adapter", f"y={llama.target}"], cwd=cwd / "b",
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "added y" in res.stdout, res.stderr
    assert mpt_export.load_bundle(cwd / "b").tasks == OLD + ["y"]


def test_user_files_that_look_like_ours_are_left_alone(llama, tmp_path):
    from mpt_export.export.task_edits import add_tasks

    b = tmp_path / "b"
    shutil.copytree(llama.bundle, b)
    shutil.copytree(llama.bundle, tmp_path / ".b.tmp-backup")  # a user's own backup with a temporary-like name
    (tmp_path / ".b.mpt-export-tmp-mine").mkdir()  # not a name mpt-export makes (8-character id)
    precious = tmp_path / "precious.txt"
    precious.write_text("my notes")
    (tmp_path / ".b.mpt-export.lock").symlink_to(precious)  # a link where our lock file goes: never written through
    assert_clean_failure(cli("tasks", "add", b, "--adapter", f"x={llama.target}"), "is a symbolic link")
    assert precious.read_text() == "my notes"
    (tmp_path / ".b.mpt-export.lock").unlink()
    add_tasks(b, [f"x={llama.target}"]).close()
    assert (tmp_path / ".b.tmp-backup" / "manifest.json").is_file() and (tmp_path / ".b.mpt-export-tmp-mine").is_dir()
    # links and empty directories inside a bundle are not ours either
    (b / "extra").mkdir()
    assert_clean_failure(cli("tasks", "add", b, "--adapter", f"y={llama.target}"), "did not write (extra)")
    (b / "extra").rmdir()
    (b / "elsewhere").symlink_to(tmp_path, target_is_directory=True)  # (refused already as the bundle is read)
    assert_clean_failure(cli("tasks", "add", b, "--adapter", f"y={llama.target}"), "elsewhere", "is a symbolic link")


def test_a_finished_demo_workdir_keeps_files_the_user_added_anywhere_in_it(tmp_path):
    from mpt_export.storage.ownership import claim_workdir, remove_workdir, seal_workdir
    from mpt_export.errors import OutputExistsError

    w = claim_workdir(tmp_path / "w", "demo-workdir", contents=["base", "adapters", "bundle"])
    (w / "base").mkdir()
    (w / "base" / "config.json").write_text("{}")
    seal_workdir(w)
    (w / "base" / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match=r"did not write \(base/notes.txt\)"):
        remove_workdir(w, "demo-workdir")
    (w / "base" / "notes.txt").unlink()
    (w / ".settings.lock").write_text("x")  # not a lock file of ours
    with pytest.raises(OutputExistsError, match=r"\.settings\.lock"):
        remove_workdir(w, "demo-workdir")
    (w / ".settings.lock").unlink()
    remove_workdir(w, "demo-workdir")
    assert not w.exists()


def test_outputs_inside_inputs_and_odd_paths_are_refused(llama, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(llama.bundle, b)
    before = tree(b)
    assert_clean_failure(cli("quantize", b, "--out", b / "int8"), "lies inside the source bundle")
    assert tree(b) == before
    bad = os.fsdecode(str(tmp_path).encode() + b"/caf\xe9-out")
    assert_clean_failure(cli("quantize", b, "--out", bad), "is not valid UTF-8")
    res = cli("tasks", "list", b, env={"MPT_EXPORT_LOCK_TIMEOUT": "abc"})  # readers never need the variable
    assert res.returncode == 0, res.stderr
    assert_clean_failure(cli("tasks", "add", b, "--adapter", f"x={llama.target}",
                             env={"MPT_EXPORT_LOCK_TIMEOUT": "abc"}), "MPT_EXPORT_LOCK_TIMEOUT must be a number")
    fifo = tmp_path / "fifo"
    shutil.copytree(llama.bundle, fifo)
    (fifo / "composer.onnx").unlink()
    os.mkfifo(fifo / "composer.onnx")  # must not hang a reader
    assert_clean_failure(cli("verify", fifo, timeout=60), "composer.onnx", "not a regular file")

"""Never lose a user's data: outputs replace only what this tool wrote, a bundle's path always holds a whole bundle
(writers killed or interrupted at every step, for real), readers never see a mix while writers swap, and the
manifest's own content is covered by its digest."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import mpt_export
from support import run_cli
from mpt_export.errors import BundleError, OutputExistsError
from support import assert_clean_failure

EXE = Path(sys.executable).with_name("mpt-export")
OLD = ["a", "b", "c", "t"]


def tree(root: Path) -> dict:
    """Every entry under ``root`` with its content hash: what 'untouched' means."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def leftovers(bundle: Path) -> list[str]:
    return sorted(p.name for p in bundle.parent.iterdir()
                  if p.name.startswith(f".{bundle.name}.") and not p.name.endswith(".lock"))


def cli(*args, env=None, timeout=300):
    return subprocess.run([str(EXE), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})


# -- 1. --force replaces only what this tool wrote, never an input ------------------------------------------------

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
    from mpt_export.storage.ownership import claim_workdir

    mine = claim_workdir(tmp_path / "demo", "demo-workdir", contents=["base", "adapters", "bundle"])
    (mine / "results.csv").write_text("keep me")  # the user's file inside a demo workdir: not ours to delete
    assert_clean_failure(cli("demo", "--workdir", mine), "holds files mpt-export did not write (results.csv)")
    assert (mine / "results.csv").read_text() == "keep me"
    assert tree(b) == before


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


# -- 2. readers never see a mix -------------------------------------------------------------------------------------

READER = r"""
import json, sys, time
import mpt_export
path, dur, out, allowed = sys.argv[1], float(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
ok, errors, end = 0, [], time.time() + dur
while time.time() < end:
    try:
        with mpt_export.load_bundle(path) as b:
            names = b.tasks
            assert sorted(names) in [sorted(a) for a in allowed], names
            s = b.session(intra_op_threads=1)
            s.generate(["the movie"], [names[-1]], max_new_tokens=2)
            ok += 1
    except Exception as e:
        errors.append(f"{type(e).__name__}: {e}")
json.dump({"ok": ok, "errors": errors[:10], "n_errors": len(errors)}, open(out, "w"))
"""


def test_readers_see_a_whole_bundle_while_writers_swap(llama, tmp_path):
    from mpt_export.export.task_edits import add_tasks, remove_task

    b = tmp_path / "b"
    shutil.copytree(llama.bundle, b)
    dur = 14.0
    allowed = json.dumps([OLD, OLD + ["x"]])
    readers = [subprocess.Popen([sys.executable, "-c", READER, str(b), str(dur), str(tmp_path / f"r{i}.json"), allowed])
               for i in range(3)]
    stop, cycles, werr = threading.Event(), [0], []

    def writer():
        from mpt_export.errors import TaskNameError

        while not stop.is_set():
            try:
                add_tasks(b, [f"x={llama.target}"]).close()
                remove_task(b, "x").close()
                cycles[0] += 1
            except TaskNameError:  # the re-export below replaced the bundle between our add and remove
                continue
            except Exception as e:  # noqa: BLE001 - reported below
                werr.append(repr(e))
                return

    t = threading.Thread(target=writer)
    t.start()
    try:
        time.sleep(2)
        cli_reads = []
        for _ in range(2):
            cli_reads.append(cli("generate", b, "--task", "a", "the movie", "--max-new-tokens", "2"))
        # a whole re-export over the bundle in use (same tasks), while the add/remove cycles go on
        exp = cli("export", "--base-model", llama.base, "--adapter", f"a,b,c={llama.source}", "--adapter",
                  f"t={llama.target}", "--out", b, "--force", "--no-validate")
        for r in readers:
            r.wait(timeout=120)
    finally:
        stop.set()
        t.join(timeout=60)
        for r in readers:
            if r.poll() is None:
                r.kill()
    assert not werr, werr
    assert exp.returncode == 0, exp.stderr
    assert all(r.returncode == 0 for r in cli_reads), [r.stderr for r in cli_reads]
    results = [json.loads((tmp_path / f"r{i}.json").read_text()) for i in range(3)]
    assert all(r["n_errors"] == 0 for r in results), results
    assert all(r["ok"] > 0 for r in results) and cycles[0] >= 3, (results, cycles)
    assert not b.is_symlink() and mpt_export.load_bundle(b).tasks == OLD
    remove_task(b, "c").close()  # the next write removes whatever old copies readers held
    assert not leftovers(b), leftovers(b)
    shutil.copytree(b, tmp_path / "copied")  # a bundle is a plain directory: cp -r / scp copy it whole
    mpt_export.load_bundle(tmp_path / "copied").close()


def test_a_reader_holding_the_old_bundle_never_blocks_a_writer(llama, tmp_path):
    from mpt_export.export.task_edits import remove_task

    b = tmp_path / "b"
    shutil.copytree(llama.bundle, b)
    held = mpt_export.load_bundle(b)
    s = held.session()
    t0 = time.monotonic()
    res = cli("tasks", "add", b, "--adapter", f"x={llama.target}")
    assert res.returncode == 0, res.stderr
    assert time.monotonic() - t0 < 30
    assert mpt_export.load_bundle(b).tasks == OLD + ["x"]
    # the session opened before the swap still reads its own (old) files, the lazily loaded tokenizer included
    assert held.tasks == OLD and isinstance(s.generate(["the movie"], ["a"], max_new_tokens=2)[0], str)
    assert held.file("tokenizer/tokenizer.json").is_file()
    assert any(n.startswith(".b.mpt-export-old-") for n in leftovers(b))  # kept for the reader, not deleted under it
    held.close()
    del s
    import gc

    gc.collect()
    remove_task(b, "x").close()
    assert not leftovers(b)


# -- 3. killed or interrupted at every step --------------------------------------------------------------------------

def _check_whole(b: Path, allowed: list[list[str]]) -> list[str]:
    with mpt_export.load_bundle(b) as bundle:  # every sha256 checked
        assert bundle.tasks in allowed, bundle.tasks
        return bundle.tasks


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_tasks_add_killed_at_every_step(llama, tmp_path, exchange):
    from mpt_export.export.task_edits import remove_task

    env = {} if exchange else {"MPT_EXPORT_NO_EXCHANGE": "1"}
    steps, outcomes = [], []
    for n in range(1, 40):
        b = tmp_path / f"k{n}" / "bundle"
        shutil.copytree(llama.bundle, b)
        trace = tmp_path / f"trace{n}"
        res = cli("tasks", "add", b, "--adapter", f"x={llama.target}",
                  env={**env, "MPT_EXPORT_FAULT_AT": str(n), "MPT_EXPORT_FAULT_TRACE": str(trace)})
        if res.returncode == 0:
            assert _check_whole(b, [OLD + ["x"]])
            break
        assert res.returncode == -9, (n, res.returncode, res.stderr)
        steps.append(trace.read_text().splitlines()[-1].split(" ", 1)[1])
        outcomes.append(_check_whole(b, [OLD, OLD + ["x"]]))  # the path holds a whole bundle, old or new
        remove_task(b, "a").close()  # the next write cleans what the killed one left
        assert not leftovers(b), (n, steps[-1], leftovers(b))
    else:
        pytest.fail("tasks add never completed")
    assert "swapped" in steps and "staging created" in steps
    assert ("between renames" in steps) == (not exchange)
    assert OLD in outcomes and OLD + ["x"] in outcomes  # killed before and after the swap


def test_export_force_killed_around_the_swap(llama, tmp_path):
    """export --force over an existing bundle, killed just before and just after the swap (every step of the shared
    write path is killed in tasks add's test above; an export costs ~20 s here)."""
    from mpt_export.export.task_edits import remove_task

    new_names = ["x", "y", "z"]
    seen = {}
    for n in (4, 5):  # staging complete (marker removed) and swapped; mid-export kills are tasks add's "staging" kills
        b = tmp_path / f"k{n}" / "bundle"
        shutil.copytree(llama.bundle, b)
        trace = tmp_path / f"trace{n}"
        res = cli("export", "--base-model", llama.base, "--adapter", f"x,y,z={llama.source}", "--out", b, "--force",
                  "--no-validate", env={"MPT_EXPORT_FAULT_AT": str(n), "MPT_EXPORT_FAULT_TRACE": str(trace)})
        assert res.returncode == -9, (n, res.stderr)
        seen[trace.read_text().splitlines()[-1].split(" ", 1)[1]] = _check_whole(b, [OLD, new_names])
        remove_task(b, "x" if "x" in seen[list(seen)[-1]] else "a").close()  # the next write cleans up
        assert not leftovers(b), (n, leftovers(b))
    assert seen == {"marker removed": OLD, "swapped": new_names}


def test_ctrl_c_at_every_step_tells_the_truth(llama, tmp_path):
    for n in range(1, 40):
        b = tmp_path / f"i{n}" / "bundle"
        shutil.copytree(llama.bundle, b)
        res = cli("tasks", "add", b, "--adapter", f"x={llama.target}",
                  env={"MPT_EXPORT_FAULT_AT": str(n), "MPT_EXPORT_FAULT_SIGNAL": "INT"})
        if res.returncode == 0:
            break
        assert res.returncode == 130 and "Traceback" not in res.stderr, (n, res.stderr)
        msg = " ".join(res.stderr.split())
        tasks = _check_whole(b, [OLD, OLD + ["x"]])
        if tasks == OLD:
            assert "was left as before" in msg and "written completely" not in msg, (n, msg)
        else:
            assert f"{b} was written completely" in msg, (n, msg)
        assert not any(p.startswith(".bundle.mpt-export-tmp-") for p in leftovers(b)), (n, leftovers(b))
    else:
        pytest.fail("tasks add never completed")


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
@pytest.mark.parametrize("syscalls", ["rename,renameat,renameat2", "unlink,unlinkat,rmdir"])
def test_tasks_add_killed_at_each_syscall(llama, tmp_path, syscalls):
    """SIGKILL injected by strace at the N-th rename (or unlink) the writer makes, for every N."""
    from mpt_export.export.task_edits import remove_task

    probe = subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"strace cannot trace here: {probe.stderr.decode()[:100]}")
    killed = 0
    for n in range(1, 60):
        b = tmp_path / f"s{n}" / "bundle"
        shutil.copytree(llama.bundle, b)
        res = subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "-e", f"trace={syscalls}", "-e",
                              f"inject={syscalls}:signal=SIGKILL:when={n}", str(EXE), "tasks", "add", str(b),
                              "--adapter", f"x={llama.target}"], capture_output=True, text=True, timeout=120)
        if res.returncode == 0:
            _check_whole(b, [OLD + ["x"]])
            break
        assert res.returncode in (-9, 137), (n, res.returncode, res.stderr[-500:])
        killed += 1
        _check_whole(b, [OLD, OLD + ["x"]])
        remove_task(b, "a").close()
        assert not leftovers(b), (n, leftovers(b))
    else:
        pytest.fail("tasks add never completed")
    assert killed >= 2


def test_concurrent_writers_both_land(llama, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(llama.bundle, b)
    procs = [subprocess.Popen([str(EXE), "tasks", "add", str(b), "--adapter", f"{name}={llama.target}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in ("x", "y")]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sorted(mpt_export.load_bundle(b).tasks) == sorted(OLD + ["x", "y"])  # no lost update


def test_killed_between_renames_is_recovered_on_open(llama, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(llama.bundle, b)
    n = 0
    while True:  # find the fault point "between renames"
        n += 1
        trace = tmp_path / f"t{n}"
        res = cli("tasks", "add", b, "--adapter", f"x={llama.target}",
                  env={"MPT_EXPORT_NO_EXCHANGE": "1", "MPT_EXPORT_FAULT_AT": str(n), "MPT_EXPORT_FAULT_TRACE": str(trace)})
        assert res.returncode == -9
        if trace.read_text().splitlines()[-1].endswith("between renames"):
            break
    assert not b.exists()  # the instant the two-rename fallback cannot cover ...
    assert mpt_export.load_bundle(b).tasks == OLD  # ... is repaired by the next open
    assert b.is_dir()


# -- 4. the manifest's own integrity ----------------------------------------------------------------------------------

def test_manifest_edits_are_refused(llama, tmp_path):
    edits = {
        "rename a task": lambda m: m["tasks"][0].update(name="renamed"),
        "dtype": lambda m: m.update(dtype="float16"),
        "hidden_size": lambda m: m["base_model"].update(hidden_size=64),
        "max_positions": lambda m: m["base_model"].update(max_positions=100000),
        "absolute path": lambda m: m["files"].update({"/etc/passwd": "0" * 64}),
    }
    for label, fn in edits.items():
        b = tmp_path / label.replace(" ", "_")
        shutil.copytree(llama.bundle, b)
        edit_manifest(b, fn, redigest=False)
        with pytest.raises(BundleError, match="does not match its own sha256"):
            mpt_export.load_bundle(b)
        assert_clean_failure(run_cli("verify", b), "does not match its own sha256")
        assert_clean_failure(run_cli("generate", b, "--task", "a", "hi"), "does not match its own sha256")


def test_crafted_manifests_with_a_valid_digest_are_still_refused(llama, tmp_path):
    """Someone who recomputes the digest still cannot point outside the bundle or make the runtime trust numbers
    the graphs do not have."""
    def vocab(m):
        m["base_model"]["vocab_size"] += 1
        next(o for o in m["graphs"]["backbone"]["outputs"] if o["name"] == "logits")["shape"][1] += 1

    cases = {
        "absolute": (lambda m: m["files"].update({"/etc/passwd": "0" * 64}), "must be relative and stay inside"),
        "dotdot": (lambda m: m["files"].update({"../base/config.json": "0" * 64}), "must be relative and stay inside"),
        "no files": (lambda m: m.pop("files"), "files is"),
        "hidden": (lambda m: m["base_model"].update(hidden_size=64), "hidden_size"),
        "dtype": (lambda m: m.update(dtype="float16"), "dtype"),
        "layers": (lambda m: m["base_model"].update(num_layers=5), "num_layers"),
        "bad type": (lambda m: m["base_model"].update(max_positions="lots"), "max_positions"),
    }
    for label, (fn, needle) in cases.items():
        b = tmp_path / label.replace(" ", "_")
        shutil.copytree(llama.bundle, b)
        edit_manifest(b, fn, redigest=True)
        with pytest.raises(BundleError, match=needle):
            mpt_export.load_bundle(b)
        assert_clean_failure(run_cli("verify", b), needle)
    # the task list against the task bank: by every reader, and by a verifying load (so `verify` fails there too)
    b = tmp_path / "task"
    shutil.copytree(llama.bundle, b)
    edit_manifest(b, lambda m: m["tasks"][0].update(name="renamed"), redigest=True)
    for res in (run_cli("generate", b, "--task", "renamed", "hi"), run_cli("verify", b)):
        assert_clean_failure(res, "does not match tasks.safetensors", "lacks 'renamed' and also holds 'a'")
    # fields that load cannot see are checked where they are used: the graph I/O against the graphs
    b = tmp_path / "vocab"
    shutil.copytree(llama.bundle, b)
    edit_manifest(b, vocab, redigest=True)
    with pytest.raises(BundleError, match="logits is float32 .* in the graph but float32 .* in the manifest"):
        mpt_export.load_bundle(b).session()


def test_links_and_unreadable_files_in_a_bundle(llama, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(llama.bundle, b)
    tok = b / "tokenizer" / "tokenizer.json"
    real = tmp_path / "elsewhere.json"
    shutil.move(tok, real)
    tok.symlink_to(real)
    assert_clean_failure(run_cli("verify", b), "tokenizer/tokenizer.json", "symbolic link")
    f = tmp_path / "afile"
    f.write_text("x")
    assert_clean_failure(run_cli("verify", f), "is a file, not a bundle directory")


def _retask(b: Path, fn) -> None:
    """Rewrite the bundle's task bank with ``fn(bank)`` and recompute every digest the manifest has for it (its
    sha256 in ``files`` and the manifest's own) — what someone who edits a bundle on purpose would do."""
    from mpt_export.bundle.manifest import sha256_file
    from mpt_export.bundle.taskbank import TaskBank

    bank = TaskBank.load(b / "tasks.safetensors")
    fn(bank)
    (b / "tasks.safetensors").unlink()
    bank.save(b / "tasks.safetensors")
    edit_manifest(b, lambda m: m["files"].update({"tasks.safetensors": sha256_file(b / "tasks.safetensors")}), redigest=True)


def test_a_task_bank_edited_with_digests_recomputed_fails_verify_and_every_reader(llama, tmp_path):
    def swap(bank):  # a and b have the same shapes: their vectors change places, the names stay
        x, y = bank.task("a"), bank.task("b")
        x.cols, y.cols, x.rows, y.rows = y.cols, x.cols, y.rows, x.rows

    def reorder(bank):
        bank.tasks[0], bank.tasks[1] = bank.tasks[1], bank.tasks[0]

    for label, fn, needles in (
            ("swapped", swap, ["tasks.safetensors does not hold the vectors the manifest records for task 'a'",
                               "and task 'b'", "content digest", "expected", "found", "re-export"]),
            ("reordered", reorder, ["task list (a, b, c, t) does not match tasks.safetensors (b, a, c, t)",
                                    "same tasks in another order", "re-export"])):
        b = tmp_path / label
        shutil.copytree(llama.bundle, b)
        _retask(b, fn)
        with pytest.raises(BundleError) as e:
            mpt_export.load_bundle(b)
        for n in needles:
            assert n in str(e.value), (n, str(e.value))
        with mpt_export.load_bundle(b, verify=False) as bundle, pytest.raises(BundleError) as reader:
            bundle.task_bank()  # what a session, a server and `tasks add` run: the same check, the same words
        assert str(reader.value) == str(e.value)
        for res in (run_cli("verify", b), run_cli("generate", b, "--task", "a", "hi")):
            assert_clean_failure(res, *needles)
            assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        with pytest.raises(BundleError, match="task"):  # a later open (stamps or not) still checks the task bank
            mpt_export.load_bundle(b)


def test_every_link_inside_a_bundle_is_refused(llama, tmp_path):
    """Listed or not, to a file or a directory, dangling or not, at the top or in tokenizer/: refused at every open
    (verified or not) and by `verify`; a plain file the manifest does not list is never read, so it is not."""
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    cases = {"notes.json": outside, "tokenizer/extra.json": outside, "gone": tmp_path / "nothing-here",
             "elsewhere": tmp_path, "tokenizer/up": tmp_path}
    for i, (rel, target) in enumerate(cases.items()):
        b = tmp_path / f"b{i}"
        shutil.copytree(llama.bundle, b)
        (b / rel).symlink_to(target)
        for verify in (True, False):
            with pytest.raises(BundleError, match=f"{rel} in bundle .* is a symbolic link .*pointing to "):
                mpt_export.load_bundle(b, verify=verify)
        assert_clean_failure(run_cli("verify", b), rel, "is a symbolic link", "remove it")
        (b / rel).unlink()
        (b / rel).write_text("{}")  # the same name as a plain file the manifest does not list: never read
        with mpt_export.load_bundle(b) as bundle:
            assert bundle.tasks == OLD and not bundle.has_file(rel)


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


def test_concurrent_tasks_add_reports_only_its_own_tasks(llama, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(llama.bundle, b)
    procs = {n: subprocess.Popen([str(EXE), "tasks", "add", str(b), "--adapter", f"{n}={llama.target}"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in ("aa", "bb")}
    for name, p in procs.items():
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert out.startswith(f"added {name};"), out


def test_two_rename_fallback_never_resurrects_an_old_copy(llama, tmp_path):
    """Killed right after the second rename, the swap copy is an old bundle: it is cleaned, never restored, even
    when the user then moves the bundle away."""
    b = tmp_path / "b"
    shutil.copytree(llama.bundle, b)
    n = 0
    while True:
        n += 1
        trace = tmp_path / f"t{n}"
        shutil.rmtree(b, ignore_errors=True)
        for p in tmp_path.glob(".b.*"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        shutil.copytree(llama.bundle, b)
        res = cli("tasks", "add", b, "--adapter", f"x={llama.target}",
                  env={"MPT_EXPORT_NO_EXCHANGE": "1", "MPT_EXPORT_FAULT_AT": str(n), "MPT_EXPORT_FAULT_TRACE": str(trace)})
        assert res.returncode == -9
        if trace.read_text().splitlines()[-1].endswith("swapped"):
            break
    assert any(".mpt-export-swap-" in x for x in leftovers(b))
    b.rename(tmp_path / "archived")
    with pytest.raises(BundleError, match="does not exist"):
        mpt_export.load_bundle(b)
    assert not b.exists()

"""Never lose a user's data: a bundle's path always holds a whole bundle — readers never see a mix while writers
swap, writers killed or interrupted at every step (for real: fault points, SIGINT, strace-injected SIGKILL) leave
the old bundle or the new one and the next write cleans up, concurrent writers both land. (Outputs replacing only
what this tool wrote: test_data_safety_outputs.py; the manifest's integrity: test_data_safety_integrity.py.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import mpt_export
from data_safety import OLD, cli, leftovers
from mpt_export.errors import BundleError
from support import EXE


# -- readers never see a mix -------------------------------------------------------------------------------------------

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
    dur = 10.0
    allowed = json.dumps([OLD, OLD + ["x"]])
    readers = [subprocess.Popen([sys.executable, "-c", READER, str(b), str(dur), str(tmp_path / f"r{i}.json"), allowed])
               for i in range(2)]
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
    results = [json.loads((tmp_path / f"r{i}.json").read_text()) for i in range(2)]
    assert all(r["n_errors"] == 0 for r in results), json.dumps(results, indent=1)
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


# -- killed or interrupted at every step -------------------------------------------------------------------------------

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
            assert n > 3, "tasks add was never interrupted"  # SIGINT reached it at its first steps
            break
        assert res.returncode == 130 and "Traceback" not in res.stderr, (n, res.stderr)
        msg = " ".join(res.stderr.split())
        tasks = _check_whole(b, [OLD, OLD + ["x"]])
        assert msg.startswith("error: interrupted; ") and msg.count("(") == 0, (n, msg)
        if tasks == OLD:
            assert f"{b} is as it was before" in msg and "written completely" not in msg, (n, msg)
        else:
            assert f"{b} was written completely" in msg, (n, msg)
        assert not any(p.startswith(".bundle.mpt-export-tmp-") for p in leftovers(b)), (n, leftovers(b))
    else:
        pytest.fail("tasks add never completed")
    # an output that did not exist before is never said to be "as it was": it was not created
    out = tmp_path / "new" / "int8"
    res = cli("quantize", llama.bundle, "--out", out, "--quantize", "int8", "--min-agreement", "0",
              env={"MPT_EXPORT_FAULT_AT": "1", "MPT_EXPORT_FAULT_SIGNAL": "INT"})
    msg = " ".join(res.stderr.split())
    assert res.returncode == 130 and f"error: interrupted; {out} was not created" in msg, msg
    assert not out.exists()


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


# -- what a new user's adversarial pass found ------------------------------------------------------------------------

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

"""Never lose a user's data: the manifest's own content is covered by its digest — edits without recomputing it are
refused, crafted manifests with a valid digest are still refused where they would point outside the bundle or
disagree with the graphs or the task bank — and a link or an unreadable entry inside a bundle is refused at every
open and by `verify`. (Outputs: test_data_safety_outputs.py; swaps and kills: test_data_safety_swaps.py.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import mpt_export
from data_safety import OLD
from mpt_export.errors import BundleError
from support import assert_clean_failure, edit_manifest, run_cli


# -- the manifest's own integrity --------------------------------------------------------------------------------------

def test_manifest_edits_are_refused(llama, tmp_path):
    edits = {
        "drop a task file": lambda m: m.update(task_files=[]),
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
        "a billion layers": (lambda m: m["base_model"].update(num_layers=10**9), "num_layers"),  # no 22 GB name set
        "bad type": (lambda m: m["base_model"].update(max_positions="lots"), "max_positions"),
    }
    for label, (fn, needle) in cases.items():
        b = tmp_path / label.replace(" ", "_")
        shutil.copytree(llama.bundle, b)
        edit_manifest(b, fn, redigest=True)
        with pytest.raises(BundleError, match=needle):
            mpt_export.load_bundle(b)
        assert_clean_failure(run_cli("verify", b), needle)
    # the task files must be files of the bundle, tasks.safetensors first: by every reader and by `verify`
    b = tmp_path / "task"
    shutil.copytree(llama.bundle, b)
    edit_manifest(b, lambda m: m.update(task_files=["composer.onnx"]), redigest=True)
    for res in (run_cli("generate", b, "--task", "a", "hi"), run_cli("verify", b)):
        assert_clean_failure(res, "task_files", "tasks.safetensors, then segments in tasks/")
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
    """Rewrite the bundle's task file's index with ``fn(index)`` and recompute every digest the manifest has for it
    (its sha256 in ``files`` and the manifest's own) — what someone who edits a bundle on purpose would do."""
    import json

    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    from mpt_export.bundle.manifest import sha256_file

    f = b / "tasks.safetensors"
    with safe_open(str(f), "numpy") as h:
        meta = h.metadata()
    tensors = load_file(str(f))
    meta["tasks"] = json.dumps(fn(json.loads(meta["tasks"])))
    f.unlink()
    save_file(tensors, str(f), metadata=meta)
    edit_manifest(b, lambda m: m["files"].update({"tasks.safetensors": sha256_file(f)}), redigest=True)


def test_a_task_file_whose_index_lies_is_refused_by_verify_and_every_reader(llama, tmp_path):
    """A task file's index (its names and where each task's vectors are) rewritten and every digest recomputed: an
    index that points past its stack or names a task twice is a damaged bank, one line, for every reader."""
    def past(index):
        index[0][3] = 99  # row 99 of a stack of 4
        return index

    def twice(index):
        index[1][0] = index[0][0]
        return index

    for label, fn, needles in (("past", past, ["tasks.safetensors is a damaged task bank", "re-export"]),
                               ("twice", twice, ["tasks.safetensors is a damaged task bank", "a task name appears "
                                                 "twice"])):
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

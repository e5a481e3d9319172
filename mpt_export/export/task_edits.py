"""Runtime task swap on disk: ``tasks add`` / ``tasks remove`` write one small task file and the manifest only.

An edit adds a segment (``tasks/NNNNNN.safetensors``: the tasks it adds, the names it removes) beside the task files
the bundle has, so adding or removing one task costs the same in a bank of 100,000 tasks as in one of 10; every
:data:`MAX_TASK_FILES`-th edit compacts them into one ``tasks.safetensors`` again. The backbone is untouched (same
bytes, same inode, same sha256). The update is atomic (``atomic.replace_dir``): the bundle is mirrored into a
staging directory with hard links (no weight bytes copied), the new files are written there, and the staging
directory is swapped in — a failure or a kill at any point leaves the old bundle
(or the new one, whole) at the path. The bundle is read under the writer lock, so two concurrent ``tasks add`` both
land instead of one overwriting the other.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

from ..storage.atomic import fault_point, replace_dir, resolve_output
from ..bundle.bankfile import apply, write_file
from ..bundle.info import TASK_BANK
from ..bundle.reader import Bundle, load_bundle
from ..bundle.manifest import FORMAT, TASK_FILES_DIR, write_manifest
from ..bundle.taskbank import TaskBank, name_list
from ..source.adapters import check_adapter_fits, parse_adapter_spec, read_adapter
from ..errors import BaseModelError, CheckpointError, InputError, TaskNameError
from ..source.hub import resolve_adapter_specs

MAX_TASK_FILES = 32  # task files a bundle may have before an edit compacts them into one


def _mirror(b: Bundle, dst: Path) -> dict[str, str]:
    """Hard-link (or copy, across filesystems) every file of ``b`` except the manifest into ``dst``.
    -> {file: sha256} of the files that are the bundle's own verified inodes (no need to hash them again)."""
    known = {}
    for rel, digest in b.info.files.items():
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(b.file(rel), target, follow_symlinks=False)
            known[rel] = digest
        except OSError:  # another filesystem or no hard links: copy (and hash the copy)
            shutil.copyfile(b.file(rel), target)
    return known


def check_adapter_matches(bundle: Bundle, ckpt, names: list[str] | None = None) -> None:
    """An adapter trained for another base model is refused: kind, hidden size, and — where PEFT recorded them —
    layer and head counts must be the bundle's; its prompt must fit the model's positions."""
    bm = bundle.info.base_model
    if ckpt.task_type != bundle.task_type:
        raise BaseModelError(f"{ckpt.path} is a {ckpt.task_type} adapter; this bundle serves a {bundle.task_type} model")
    checks = [("token_dim", ckpt.token_dim, bm.hidden_size, "hidden size"),
              ("num_layers", ckpt.config.get("num_layers"), bm.num_layers, "layer count"),
              ("num_attention_heads", ckpt.config.get("num_attention_heads"), bm.num_attention_heads, "head count")]
    for key, got, want, what in checks:
        if got is not None and int(got) != int(want):
            raise BaseModelError(
                f"{ckpt.path} was trained for another base model ({key} {got}, but this bundle's {what} is {want}, "
                f"base model {bm.identity.get('arch')} from {bm.identity.get('name_or_path')}); train the task on the bundle's base model"
            )
    nts = bundle.info.num_transformer_submodules
    if ckpt.num_transformer_submodules != nts:
        raise BaseModelError(f"{ckpt.path} has num_transformer_submodules {ckpt.num_transformer_submodules}, this "
                             f"bundle's tasks have {nts}; train the task with the bundle's setting")
    try:
        check_adapter_fits(ckpt, bm.max_positions, names)
    except InputError as e:
        raise BaseModelError(str(e)) from None


def add_tasks(bundle_path: str | Path, adapters: list[str]) -> Bundle:
    """Add the tasks of ``[NAMES=]DIR`` adapters to the bundle at ``bundle_path`` (every adapter is read and checked
    before anything changes)."""
    adapters = resolve_adapter_specs(list(adapters))  # Hugging Face Hub ids: their snapshots in the cache
    specs = [(names, read_adapter(path)) for names, path in map(parse_adapter_spec, adapters)]
    with load_bundle(bundle_path, verify=False) as b:  # fail early, before taking the writer lock
        for names, ck in specs:
            check_adapter_matches(b, ck, names)

    added: list[str] = []

    def change(b: Bundle, taken: set) -> tuple[TaskBank, list[str]]:
        added.clear()  # (a retried rewrite starts over)
        seg = TaskBank(b.task_type, b.info.num_transformer_submodules)
        for names, ck in specs:
            try:
                added.extend(seg.add_adapter(ck, names, taken))
            except CheckpointError as e:  # the bundle changed since the check above (another writer)
                raise BaseModelError(str(e)) from None
        return seg, []

    out = _rewrite(bundle_path, change)
    out.added_tasks = added  # what this call added (another writer may have added others meanwhile)
    return out


def remove_task(bundle_path: str | Path, name: str) -> Bundle:
    def change(b: Bundle, taken: set):
        if name not in taken:
            raise TaskNameError(f"unknown task {name!r}; this bundle has: {name_list(b.tasks)}")
        if len(taken) == 1:
            raise TaskNameError(f"{name!r} is the bundle's only task; a bundle keeps at least one (add another first)")
        return TaskBank(b.task_type, b.info.num_transformer_submodules), [name]

    return _rewrite(bundle_path, change)


def _rewrite(bundle_path, change) -> Bundle:
    """Under the writer lock: open the current bundle (its files verified, the task bank not loaded), let
    ``change(bundle, its task names)`` give the tasks to add and the names to remove, write them as one new
    segment into a hard-linked mirror, swap it in. Every :data:`MAX_TASK_FILES`-th edit compacts the task files
    into a new ``tasks.safetensors`` instead (the whole bank read and written once)."""
    path = resolve_output(bundle_path)  # read and write the same directory, however the path was spelled
    with replace_dir(path, kind="bundle", allow_replace=True, hold_lock=True) as tmp:
        b = load_bundle(path, verify=False)
        try:
            b.verify(bank=False)  # every file against its sha256 (a stamp vouches for unchanged ones)
            seg, removed = change(b, set(b.tasks))
            files = list(b.info.task_files)
            bank = apply(b.task_bank(), seg, removed) if len(files) >= MAX_TASK_FILES else None
            known = _mirror(b, tmp)
            fault_point("bundle mirrored")
        finally:
            b.close()  # our own shared lock would keep the old copy from being deleted after the swap
        if bank is not None:  # compaction: one file again
            for rel in files:
                (tmp / rel).unlink()  # hard links: never write through them into the old bundle
                known.pop(rel, None)
            if (tmp / TASK_FILES_DIR).is_dir():
                (tmp / TASK_FILES_DIR).rmdir()
            write_file(tmp / TASK_BANK, bank)
            files = [TASK_BANK]
        else:
            rel = f"{TASK_FILES_DIR}/{_next_segment(files):06d}.safetensors"
            (tmp / TASK_FILES_DIR).mkdir(exist_ok=True)
            write_file(tmp / rel, seg, removed)
            files.append(rel)
        fault_point("task bank written")
        manifest = replace(b.info, format=FORMAT, tasks=(), task_files=tuple(files)).to_manifest()
        write_manifest(tmp, manifest, known=known)
    return load_bundle(path, verify=False)


def _next_segment(files: list[str]) -> int:
    """The number after the highest segment's (``tasks/NNNNNN.safetensors``)."""
    stems = (Path(f).stem for f in files[1:])
    return max((int(s) for s in stems if s.isdigit()), default=0) + 1

"""Runtime task swap on disk: ``tasks add`` / ``tasks remove`` rewrite ``tasks.safetensors`` and the manifest only.

The backbone is untouched (same bytes, same inode, same sha256). The update is atomic (``atomic.replace_dir``): the
bundle is mirrored into a staging directory with hard links (no weight bytes copied), the two small files are
rewritten there, and the staging directory is swapped in — a failure or a kill at any point leaves the old bundle
(or the new one, whole) at the path. The bundle is read under the writer lock, so two concurrent ``tasks add`` both
land instead of one overwriting the other.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

from ..storage.atomic import fault_point, replace_dir, resolve_output
from ..bundle.info import TaskEntry
from ..bundle.reader import Bundle, load_bundle
from ..bundle.manifest import write_manifest
from ..source.adapters import check_adapter_fits, parse_adapter_spec, read_adapter
from ..errors import BaseModelError, CheckpointError, InputError, TaskNameError
from ..source.hub import resolve_adapter_specs


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

    def change(b: Bundle, bank):
        added.clear()  # (a retried rewrite starts over)
        for names, ck in specs:
            try:
                added.extend(bank.add_adapter(ck, names))
            except CheckpointError as e:  # the bundle changed since the check above (another writer)
                raise BaseModelError(str(e)) from None
        return [ck.summary() for _, ck in specs]

    out = _rewrite(bundle_path, change)
    out.added_tasks = added  # what this call added (another writer may have added others meanwhile)
    return out


def remove_task(bundle_path: str | Path, name: str) -> Bundle:
    def change(b: Bundle, bank):
        bank.task(name)  # unknown -> error listing the known ones
        if len(bank.tasks) == 1:
            raise TaskNameError(f"{name!r} is the bundle's only task; a bundle keeps at least one (add another first)")
        bank.remove(name)
        return []

    return _rewrite(bundle_path, change)


def _rewrite(bundle_path, change) -> Bundle:
    """Under the writer lock: load the current bundle (verified), apply ``change(bundle, bank)`` to its task bank,
    write the new bank and manifest into a hard-linked mirror, swap it in."""
    path = resolve_output(bundle_path)  # read and write the same directory, however the path was spelled
    with replace_dir(path, kind="bundle", allow_replace=True, hold_lock=True) as tmp:
        b = load_bundle(path)
        try:
            bank = b.task_bank()
            extra = change(b, bank)
            manifest = replace(b.info, tasks=tuple(TaskEntry.of(t) for t in bank.manifest_entries()),
                               adapters=b.info.adapters + tuple(extra or ())).to_manifest()
            known = _mirror(b, tmp)
            fault_point("bundle mirrored")
        finally:
            b.close()  # our own shared lock would keep the old copy from being deleted after the swap
        (tmp / "tasks.safetensors").unlink()  # a hard link: never write through it into the old bundle
        known.pop("tasks.safetensors", None)
        bank.save(tmp / "tasks.safetensors")
        fault_point("task bank written")
        write_manifest(tmp, manifest, known=known)
    return load_bundle(path, verify=False)

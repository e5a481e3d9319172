"""Runtime task swap on disk: ``tasks add`` / ``tasks remove`` rewrite ``tasks.safetensors`` and the manifest only.

The backbone is untouched (same bytes, same sha256). The update is atomic: the bundle is mirrored into a staging
directory with hard links (no weight bytes copied), the two small files are rewritten there, and the staging
directory replaces the bundle by rename — a failure at any point leaves the old bundle as it was.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .bundle import Bundle, load_bundle, staging_dir, write_manifest
from .checkpoint import parse_adapter_spec, read_adapter
from .errors import BaseModelError, CheckpointError, TaskNameError


def _mirror(src: Path, dst: Path) -> None:
    for p in src.rglob("*"):
        rel = p.relative_to(src)
        if p.is_dir():
            (dst / rel).mkdir(parents=True, exist_ok=True)
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(p, dst / rel)
        except OSError:  # another filesystem or no hard links: copy
            shutil.copy2(p, dst / rel)


def check_adapter_matches(bundle: Bundle, ckpt) -> None:
    """An adapter trained for another base model is refused: hidden size, and — where PEFT recorded them — layer
    and head counts must be the bundle's."""
    bm = bundle.base_model
    if ckpt.task_type != bundle.task_type:
        raise BaseModelError(f"{ckpt.path} is a {ckpt.task_type} adapter; this bundle serves a {bundle.task_type} model")
    checks = [("token_dim", ckpt.token_dim, bm["hidden_size"], "hidden size"),
              ("num_layers", ckpt.config.get("num_layers"), bm["num_layers"], "layer count"),
              ("num_attention_heads", ckpt.config.get("num_attention_heads"), bm["num_attention_heads"], "head count")]
    for key, got, want, what in checks:
        if got is not None and int(got) != int(want):
            raise BaseModelError(
                f"{ckpt.path} was trained for another base model ({key} {got}, but this bundle's {what} is {want}, "
                f"base model {bm.get('arch')} from {bm.get('name_or_path')}); train the task on the bundle's base model"
            )


def add_tasks(bundle_path: str | Path, adapters: list[str]) -> Bundle:
    b = load_bundle(bundle_path)
    bank = b.task_bank()
    pairs = []
    for spec in adapters:  # read and check every adapter before changing anything
        names, path = parse_adapter_spec(spec)
        ck = read_adapter(path)
        check_adapter_matches(b, ck)
        pairs.append((ck, names))
    ckpts = [ck for ck, _ in pairs]
    for ck, names in pairs:
        try:
            bank.add_adapter(ck, names)
        except TaskNameError as e:
            raise TaskNameError(f"{e} (the bundle has: {', '.join(b.tasks)})") from None
        except CheckpointError as e:
            raise BaseModelError(str(e)) from None
    return _rewrite(b, bank, extra_adapters=[ck.summary() for ck in ckpts])


def remove_task(bundle_path: str | Path, name: str) -> Bundle:
    b = load_bundle(bundle_path)
    bank = b.task_bank()
    bank.task(name)  # unknown -> error listing the known ones
    if len(bank.tasks) == 1:
        raise TaskNameError(f"{name!r} is the bundle's only task; a bundle keeps at least one (add another first)")
    bank.remove(name)
    return _rewrite(b, bank)


def _rewrite(b: Bundle, bank, extra_adapters: list[dict] | None = None) -> Bundle:
    manifest = dict(b.manifest)
    manifest["tasks"] = bank.manifest_entries()
    if extra_adapters:
        manifest["adapters"] = list(manifest.get("adapters", [])) + extra_adapters
    with staging_dir(b.path, force=True) as tmp:
        _mirror(b.path, tmp)
        (tmp / "tasks.safetensors").unlink()  # a hard link: never write through it into the old bundle
        bank.save(tmp / "tasks.safetensors")
        manifest = write_manifest(tmp, manifest)
    return Bundle(b.path, manifest)

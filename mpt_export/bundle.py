"""The bundle: a directory users copy to a device.

    manifest.json          format, tool versions, base-model identity, graph I/O, tasks, sha256 of every file,
                           validation report
    backbone.onnx(.data)   the frozen base model, weights stored once
    composer.onnx          shared_prompt ⊙ (task_cols @ task_rows)
    tasks.safetensors      the task bank
    tokenizer/             the base model's tokenizer files

A bundle is written into a temporary sibling directory and renamed into place, so an interrupted or failed export
leaves nothing half-written. Loading checks every sha256 listed in the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import BundleError, OutputExistsError

MANIFEST = "manifest.json"
FORMAT = "mpt-export/bundle/1"
REQUIRED = {"CAUSAL_LM": ("backbone.onnx", "backbone.onnx.data", "composer.onnx", "tasks.safetensors"),
            "SEQ_2_SEQ_LM": ("encoder.onnx", "decoder.onnx", "weights.onnx.data", "composer.onnx", "tasks.safetensors")}


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_digests(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` except the manifest, keyed by POSIX relative path."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out[p.relative_to(root).as_posix()] = sha256_file(p)
    return out


def write_manifest(root: Path, manifest: dict) -> dict:
    manifest = {**manifest, "files": file_digests(root)}
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, root / MANIFEST)
    return manifest


@contextmanager
def staging_dir(out: Path, force: bool):
    """Yield a temporary directory beside ``out``; on success it replaces ``out`` atomically, on any failure
    (exception or interrupt) it is removed and ``out`` is left as it was."""
    out = Path(out)
    check_output_path(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the bundle gets ordinary directory permissions
    try:
        yield tmp
        for p in tmp.rglob("*"):  # some writers (mkdtemp, safetensors) create owner-only files
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_output_path(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise OutputExistsError(f"output {out} already exists; choose another --out or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {out} exists and is not a directory; remove it or choose another --out")


class Bundle:
    """A loaded (and checksum-verified) bundle."""

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r}, tasks={self.tasks})"

    @property
    def tasks(self) -> list[str]:
        return [t["name"] for t in self.manifest["tasks"]]

    @property
    def task_type(self) -> str:
        return self.manifest["task_type"]

    @property
    def base_model(self) -> dict:
        return self.manifest["base_model"]

    def file(self, name: str) -> Path:
        return self.path / name

    def task_bank(self):
        from .checkpoint import TaskBank

        return TaskBank.load(self.file("tasks.safetensors"))

    def sizes(self) -> dict[str, int]:
        """Bytes per component: the model graphs and their weights, composer, task bank, tokenizer, manifest."""
        comp: dict[str, int] = {}
        for p in sorted(self.path.rglob("*")):
            if not p.is_file():
                continue
            rel = p.relative_to(self.path).as_posix()
            key = "tokenizer" if rel.startswith("tokenizer/") else rel.split(".")[0]
            key = {"weights": "weights (shared)"}.get(key, key)
            comp[key] = comp.get(key, 0) + p.stat().st_size
        return comp

    def session(self, provider: str = "cpu", backend: str = "onnxruntime", engines: str | Path | None = None,
                **options):
        """A session over this bundle: ONNX Runtime (``provider``: cpu, cuda, tensorrt — ORT's TensorRT EP — or an
        ORT provider name), or ``backend="tensorrt"`` with the engines folder written by ``mpt-export build``."""
        if backend == "tensorrt":
            if engines is None:
                raise BundleError("the TensorRT backend needs the engines folder (mpt-export build BUNDLE --out DIR)")
            from .runtime.tensorrt import trt_session

            return trt_session(self, engines, **options)
        if backend != "onnxruntime":
            raise BundleError(f"unknown backend {backend!r}; choose onnxruntime or tensorrt")
        from .runtime.onnxruntime import ort_session

        return ort_session(self, provider=provider, **options)


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Open a bundle directory; with ``verify`` (default) every file's sha256 is checked against the manifest."""
    path = Path(path)
    mf = path / MANIFEST
    if not path.is_dir():
        raise BundleError(f"bundle {path} does not exist; create one with `mpt-export export`")
    if not mf.is_file():
        raise BundleError(f"{path} has no {MANIFEST}; it is not an mpt-export bundle (or its export did not finish)")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mf} is not valid JSON ({e}); the bundle is damaged — re-export it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise BundleError(f"{mf} has format {found!r}, expected {FORMAT!r}; re-export with this version of mpt-export")
    files = manifest.get("files") or {}
    for req in REQUIRED.get(manifest.get("task_type"), ()):
        if req not in files:
            raise BundleError(f"{mf} does not list {req}; the bundle is incomplete — re-export it")
    if verify:
        for rel, digest in files.items():
            p = path / rel
            if not p.is_file():
                raise BundleError(f"bundle file {rel} is missing from {path}; the bundle is incomplete — copy it again or re-export")
            if sha256_file(p) != digest:
                raise BundleError(
                    f"bundle file {rel} does not match its sha256 in {MANIFEST}; it was modified or corrupted — "
                    "copy the bundle again or re-export it"
                )
    return Bundle(path, manifest)

"""The pinned bundle: what the service pins of a bundle (its manifest and task files: all a reload may change), and
the bundle a replica serves for a pin — the pinned manifest and task files over the graphs, weights and tokenizer of
the bundle on the replica's node (equal by sha256 to the pinned manifest's)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from ...bundle.info import BundleInfo
from ...bundle.reader import Bundle, load_bundle
from ...errors import BundleError
from ...bundle.manifest import check_manifest, manifest_digest

PINNED = "task_files"  # the pin's task files (with the manifest: all a reload may change)


def make_pin(bundle: Bundle) -> dict:
    """What the service pins for ``bundle`` (opened and verified): its manifest and task files' bytes, checked."""
    data = {}
    for rel in bundle.info.task_files:
        data[rel] = bundle.read_bytes(rel)
        if hashlib.sha256(data[rel]).hexdigest() != bundle.info.files[rel]:
            raise BundleError(f"{bundle.path}/{rel} changed while it was read; try again")
    return {"digest": bundle.info.digest, "manifest": bundle.manifest, PINNED: data}


class PinnedBundle(Bundle):
    """A bundle whose manifest and task bank are the service's pin, and whose other files (graphs, weights,
    tokenizer — equal by sha256 to the pinned manifest's) are read through a directory handle of the bundle on this
    node. The task bank sits in a private temporary directory until :meth:`drop_pin` (after the bank is loaded)."""

    def __init__(self, path: Path, manifest: dict, fd: int, pin_dir: Path, pinned: set):
        self._pin_dir, self._pinned = pin_dir, pinned
        super().__init__(path, manifest, fd)

    def file(self, name: str) -> Path:
        if name in self._pinned:
            return self._pin_dir / name
        return super().file(name)

    def read_bytes(self, name: str) -> bytes:
        return (self._pin_dir / name).read_bytes() if name in self._pinned else super().read_bytes(name)

    def drop_pin(self) -> None:
        shutil.rmtree(self._pin_dir, ignore_errors=True)


def open_pinned(bundle_path: str | Path, pin: dict, current: Bundle | None = None) -> PinnedBundle:
    """The bundle a replica serves for ``pin``: the pin's manifest and task bank (checked against the pin's digest)
    over the graphs of ``current`` (the bundle the replica already serves: a reload) or of the bundle at
    ``bundle_path`` on this node (verified, and refused when its graphs or tokenizer are not the pinned ones)."""
    manifest, digest, data = pin["manifest"], pin["digest"], pin[PINNED]
    if manifest_digest(manifest) != digest:
        raise BundleError(f"the service's pinned manifest for digest {digest[:12]} does not match its own sha256")
    check_manifest(manifest)
    info = BundleInfo.of(manifest, "the service's pinned manifest")
    if info.digest != digest or set(data) != set(info.task_files) or any(
            hashlib.sha256(b).hexdigest() != info.files.get(rel) for rel, b in data.items()):
        raise BundleError(f"the service's pinned task files for digest {digest[:12]} do not match its manifest")
    if current is not None and getattr(current, "_fd", None) is not None:
        path, fd = current.path, os.dup(current._fd)  # the replica's open bundle: nothing on disk is read again
    else:
        disk = load_bundle(bundle_path)
        changed = disk.info.changed_beyond_tasks(info)
        if changed:
            disk.close()
            raise BundleError(f"{bundle_path} on this node does not hold the graphs and tokenizer this service serves "
                              f"(digest {digest[:12]}): {', '.join(changed[:4])} differ; restart `mpt-export serve "
                              "--ray` to serve the bundle now on disk")
        path, fd, disk._fd = disk.path, disk._fd, None  # the handle moves to the pinned bundle
    pin_dir = Path(tempfile.mkdtemp(prefix="mpt-export-pin-"))
    try:
        for rel, b in data.items():
            (pin_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            fdw = os.open(pin_dir / rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fdw, "wb") as f:
                f.write(b)
        return PinnedBundle(path, manifest, fd, pin_dir, set(data))
    except BaseException:
        shutil.rmtree(pin_dir, ignore_errors=True)
        os.close(fd)
        raise

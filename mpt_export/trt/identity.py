"""Engine sidecars: what an engine was built from and for, checked before it is loaded.

``engines/NAME/engine.json`` records the bundle (path, manifest digest, the sha256 of each graph file and its
weights), the TensorRT version, the GPU name and compute capability, whether the engine is version-compatible, the
precision, the limits and the profiles. An engine built by another TensorRT version (unless version-compatible and
run by a later release of the same major), for another GPU architecture, or from a different bundle is refused
with one message that says how to rebuild.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import MptExportError

SIDECAR = "engine.json"
FORMAT = "mpt-export/engine/1"


class EngineMismatchError(MptExportError):
    """An engine does not belong to this bundle, TensorRT version or GPU."""


def bundle_fingerprint(bundle) -> dict:
    files = bundle.manifest["files"]
    graphs = {}
    for g, spec in bundle.manifest["graphs"].items():
        if g == "composer":
            continue
        graphs[g] = {"onnx_sha256": files[spec["file"]],
                     "weights_sha256": files.get(spec.get("external_data") or "", None)}
    digest = hashlib.sha256(json.dumps(graphs, sort_keys=True).encode()).hexdigest()
    return {"bundle_path": str(bundle.path), "graphs": graphs, "digest": digest}


def make_sidecar(bundle, trt_version: str, gpu_name: str, compute_capability: str, precision: dict, limits: dict,
                 profiles: dict, version_compatible: bool, engines: dict[str, str]) -> dict:
    return {"format": FORMAT, "bundle": bundle_fingerprint(bundle), "tensorrt_version": trt_version,
            "gpu_name": gpu_name, "compute_capability": compute_capability, "version_compatible": version_compatible,
            "precision": precision, "limits": limits, "profiles": profiles, "engines": engines,
            "max_prompt_len": max(int(t["prompt_len"]) for t in bundle.manifest["tasks"])}


def _major(v: str) -> int:
    return int(str(v).split(".")[0])


def _vtuple(v: str) -> tuple:
    return tuple(int(x) for x in str(v).split(".")[:3] if x.isdigit())


def check_sidecar(sidecar: dict, bundle, trt_version: str, compute_capability: str) -> None:
    """Raise EngineMismatchError when the engine cannot serve ``bundle`` on this TensorRT / GPU."""
    rebuild = f"rebuild on this machine: mpt-export build {bundle.path} --out <engines dir>"
    if sidecar.get("format") != FORMAT:
        raise EngineMismatchError(f"engine sidecar format {sidecar.get('format')!r} is not {FORMAT!r}; {rebuild}")
    built = str(sidecar["tensorrt_version"])
    if built != str(trt_version):
        ok = sidecar.get("version_compatible") and _major(built) == _major(trt_version) and \
            _vtuple(trt_version) >= _vtuple(built)
        if not ok:
            raise EngineMismatchError(
                f"engine was built with TensorRT {built}, this machine runs TensorRT {trt_version}; engines only load "
                f"on the version that built them (or later {_major(built)}.x releases when built with "
                f"--version-compatible); {rebuild}"
            )
    if str(sidecar["compute_capability"]) != str(compute_capability):
        raise EngineMismatchError(
            f"engine was built for a GPU of compute capability {sidecar['compute_capability']} "
            f"({sidecar.get('gpu_name')}), this GPU is {compute_capability}; engines are specific to a GPU "
            f"architecture; {rebuild}"
        )
    fp = bundle_fingerprint(bundle)
    if sidecar["bundle"]["digest"] != fp["digest"]:
        changed = [g for g in fp["graphs"] if sidecar["bundle"]["graphs"].get(g) != fp["graphs"][g]]
        raise EngineMismatchError(
            f"engine was built from a different bundle ({sidecar['bundle'].get('bundle_path')}; graphs that differ: "
            f"{', '.join(changed) or 'all'}); {rebuild}"
        )
    longest = max(int(t["prompt_len"]) for t in bundle.manifest["tasks"])
    if longest > int(sidecar.get("max_prompt_len", longest)):
        raise EngineMismatchError(
            f"the bundle now has a task with {longest} virtual tokens, the engine's profiles allow "
            f"{sidecar['max_prompt_len']}; {rebuild}"
        )


def read_sidecar(engines_dir: str | Path) -> dict:
    p = Path(engines_dir) / SIDECAR
    if not p.is_file():
        raise EngineMismatchError(f"{engines_dir} has no {SIDECAR}; expected a folder written by `mpt-export build`")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise EngineMismatchError(f"{p} is not valid JSON ({e}); rebuild the engines") from None

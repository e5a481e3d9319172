"""Engine sidecars: what an engine was built from and for, checked before it is loaded.

``engines/NAME/engine.json`` records the bundle (path, manifest digest, the sha256 of each graph file and its
weights), the TensorRT version, the GPU name and compute capability, whether the engine is version-compatible, the
precision, the limits and the profiles. An engine built by another TensorRT version (unless version-compatible and
run by a later release of the same major), for another GPU architecture, or from a different bundle is refused
with one message that says how to rebuild.

Version rule (TensorRT's "Version Compatibility" documentation and support matrix): an engine loads on the release
that built it; one built with ``--version-compatible`` (from 8.6 on) also loads on any later release of the same
major, and across majors exactly on the documented pairs — built with 8, run by 9 or 10; built with 10, run by 11 —
never on an older runtime.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ...errors import EngineMismatchError  # noqa: F401 (re-exported)

SIDECAR = "engine.json"
FORMAT = "mpt-export/engine/1"


def bundle_fingerprint(bundle) -> dict:
    files = bundle.info.files
    graphs = {}
    for g, spec in bundle.info.graphs.items():
        if g == "composer":
            continue
        graphs[g] = {"onnx_sha256": files[spec.file], "weights_sha256": files.get(spec.external_data or "", None)}
    digest = hashlib.sha256(json.dumps(graphs, sort_keys=True).encode()).hexdigest()
    return {"bundle_path": str(bundle.path), "graphs": graphs, "digest": digest}


def make_sidecar(bundle, trt_version: str, gpu_name: str, compute_capability: str, precision: dict, limits: dict,
                 profiles: dict, version_compatible: bool, engines: dict[str, str]) -> dict:
    return {"format": FORMAT, "bundle": bundle_fingerprint(bundle), "tensorrt_version": trt_version,
            "gpu_name": gpu_name, "compute_capability": compute_capability, "version_compatible": version_compatible,
            "precision": precision, "limits": limits, "profiles": profiles, "engines": engines,
            "max_prompt_len": bundle.info.longest_prompt}


CROSS_MAJOR = {8: (9, 10), 10: (11,)}  # version-compatible engines: built with key, loadable by these majors


def engine_loads(built: str, runtime: str, version_compatible: bool) -> bool:
    """Whether TensorRT ``runtime`` can deserialize an engine built by ``built`` (see the module docstring)."""
    b, r = _vtuple(built), _vtuple(runtime)
    if str(built) == str(runtime) or (len(b) < 3 and r[:len(b)] == b):  # "10.3" (a trtexec plan adopted): any 10.3.x
        return True
    if not version_compatible:
        return False
    if b < (8, 6) or r < b:
        return False
    return b[0] == r[0] or r[0] in CROSS_MAJOR.get(b[0], ())


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
    if not engine_loads(built, str(trt_version), bool(sidecar.get("version_compatible"))):
        later = ", ".join([f"later {_major(built)}.x"] + [f"{m}.x" for m in CROSS_MAJOR.get(_major(built), ())])
        raise EngineMismatchError(
            f"engine was built with TensorRT {built}, this machine runs TensorRT {trt_version}; engines only load on "
            f"the version that built them (or, built with --version-compatible, on {later} releases); {rebuild}"
        )
    if sidecar["compute_capability"] is not None and str(sidecar["compute_capability"]) != str(compute_capability):
        # (None: plans trtexec built and adopted without TensorRT's Python package — TensorRT checks them on load)
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
    longest = bundle.info.longest_prompt
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

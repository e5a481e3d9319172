"""Precision rules per TensorRT version, trtexec command lines, and ONNX Runtime TensorRT-EP options.

TensorRT 10 (JetPack 6 boards stay on it): builder precision flags (``--fp16``, ``--bf16``) let TensorRT pick half
kernels for an fp32 graph; an fp16 bundle is built ``--stronglyTyped`` (the graph's own types). TensorRT 11 removed
those flags and builds strongly typed networks only: the precision is the bundle's, so ``--precision fp16`` needs an
fp16 bundle (``mpt-export export --dtype fp16``).

TF32: TensorRT 10 and 11 turn ``BuilderFlag.TF32`` on by default, so an "fp32" engine would run its matrix products
with 10-bit mantissas. Engines are built without it (``--noTF32`` in the trtexec lines) unless ``--tf32`` asks.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from ...errors import InputError
from .profiles import shape_flags

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_BUNDLE_PRECISION = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def resolve_precision(precision: str, trt_major: int, bundle_dtype: str, tf32: bool = False) -> dict:
    """-> {"precision": effective, "strongly_typed": bool, "flags": [builder flags], "tf32": bool} or a clear
    error. The flags are trtexec's (``--noTF32`` unless ``tf32``)."""
    out = _resolve_precision(precision, trt_major, bundle_dtype)
    out["tf32"] = bool(tf32)
    if not tf32:
        out["flags"] = [*out["flags"], "--noTF32"]
    return out


def _resolve_precision(precision: str, trt_major: int, bundle_dtype: str) -> dict:
    if precision not in PRECISIONS:
        raise InputError(f"unknown --precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if bundle_dtype not in _BUNDLE_PRECISION:
        raise InputError(f"bundle dtype {bundle_dtype!r} cannot be built with TensorRT")
    have = _BUNDLE_PRECISION[bundle_dtype]
    want = have if precision == "auto" else precision
    if trt_major >= 11:
        if want != have:
            raise InputError(
                f"TensorRT {trt_major} builds strongly typed networks: --precision {want} needs a {want} bundle, and "
                f"this one is {have}; export one with `mpt-export export ... --dtype {want}`"
            )
        return {"precision": want, "strongly_typed": True, "flags": []}
    if have != "fp32":
        if want != have:
            raise InputError(f"this bundle is {have}; build it with --precision {have} or auto (its graph fixes the types)")
        return {"precision": want, "strongly_typed": True, "flags": ["--stronglyTyped"]}
    flags = {"fp32": [], "fp16": ["--fp16"], "bf16": ["--bf16"]}[want]
    return {"precision": want, "strongly_typed": False, "flags": flags}


def trtexec_commands(bundle, profiles: dict, engines_dir: str | Path, precision: dict, timing_cache: str | None = None,
                     workspace_mib: int | None = None, version_compatible: bool = False) -> list[list[str]]:
    """One trtexec command per graph (the traced graphs: ``fast_graphs`` are ONNX Runtime's). Each optimization
    profile is ``--profile=<index>`` followed directly by its
    ``--minShapes``/``--optShapes``/``--maxShapes`` (trtexec reads the three options right behind each
    ``--profile``, and refuses repeated shape options without it)."""
    cmds = []
    for graph, profs in profiles.items():
        spec = bundle.info.graphs[graph]
        # --skipInference: build and save only — trtexec would otherwise time the engine on random inputs, int64
        # token ids in [-128, 127] among them (out of range for a small vocabulary)
        cmd = ["trtexec", f"--onnx={Path(bundle.path) / spec.file}",
               f"--saveEngine={Path(engines_dir) / (graph + '.plan')}", "--skipInference"]
        for i, p in enumerate(profs):
            f = shape_flags(p)
            cmd += [f"--profile={i}", f"--minShapes={f['min']}", f"--optShapes={f['opt']}", f"--maxShapes={f['max']}"]
        cmd += precision["flags"]
        if timing_cache:
            cmd.append(f"--timingCacheFile={timing_cache}")
        if workspace_mib:
            cmd.append(f"--memPoolSize=workspace:{int(workspace_mib)}M")
        if version_compatible:
            cmd.append("--versionCompatible")
        cmds.append(cmd)
    return cmds


def format_commands(cmds: list[list[str]]) -> str:
    return "\n\n".join(" \\\n    ".join(shlex.quote(a) for a in c) for c in cmds)


def ort_trt_provider_options(profiles_for_graph: list[dict], cache_dir: str | Path, fp16: bool = False) -> dict:
    """ONNX Runtime TensorRT execution provider options for one graph: explicit profiles (an input listed once per
    profile) and an engine cache on disk."""
    mins, opts, maxs = [], [], []
    for p in profiles_for_graph:
        f = shape_flags(p)
        mins.append(f["min"]), opts.append(f["opt"]), maxs.append(f["max"])
    return {
        "trt_profile_min_shapes": ",".join(mins), "trt_profile_opt_shapes": ",".join(opts),
        "trt_profile_max_shapes": ",".join(maxs), "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache_dir), "trt_timing_cache_enable": True, "trt_fp16_enable": bool(fp16),
    }

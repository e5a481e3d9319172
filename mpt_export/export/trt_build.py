"""Build TensorRT engines from a bundle (``tensorrt`` imported here only).

One engine per model graph (``backbone.plan``, or ``encoder.plan`` + ``decoder.plan``) with the profiles of
``profiles.py``, written atomically to ``engines/<bundle name>/`` with the sidecar ``engine.json``. The composer is
not built: composing a task is one small matmul, done once per task on the host.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..storage.atomic import replace_dir
from ..bundle.reader import load_bundle
from ..errors import ExportError
from ..storage.ownership import check_replaceable
from ..runtime.trt.commands import resolve_precision
from ..runtime.trt.env import gpu_identity, import_tensorrt
from ..runtime.trt.sidecar import SIDECAR, make_sidecar
from ..runtime.trt.profiles import Limits, fit_limits, profiles
from ..runtime.trt.versions import check_target, opset_problem, parse_trt_version


def build_engines(bundle_path, out: str | Path | None = None, limits: Limits | None = None, precision: str = "auto",
                  timing_cache: str | Path | None = None, version_compatible: bool = False,
                  workspace_mib: int | None = None, on_step=None, tf32: bool = False) -> Path:
    step = on_step or (lambda s: None)
    b = load_bundle(bundle_path)
    out = Path(out) if out else Path("engines") / b.path.name
    inputs = [("bundle", b.path)] + ([("timing cache", Path(timing_cache))] if timing_cache else [])
    # an engines folder this tool wrote is rebuilt in place (as trtexec --saveEngine would); anything else is refused
    check_replaceable(out, "engines", force=False, inputs=inputs, allow_replace=True)
    limits = limits or fit_limits(b.manifest)
    profs = profiles(b.manifest, limits)
    trt = import_tensorrt()
    version = parse_trt_version(trt.__version__)
    check_target(version)
    said = opset_problem(int(b.manifest.get("opset", 18)), version)
    if said:
        raise ExportError(said)
    prec = resolve_precision(precision, version[0], b.manifest.get("dtype", "float32"), tf32)
    gpu_name, cc = gpu_identity()
    logger = trt.Logger(trt.Logger.WARNING)
    cache_bytes = Path(timing_cache).read_bytes() if timing_cache and Path(timing_cache).is_file() else b""
    engines = {}
    with replace_dir(out, "engines", inputs=inputs, allow_replace=True) as tmp:
        for graph, plist in profs.items():
            step(f"build {graph} ({prec['precision']}, {len(plist)} profiles)")
            t0 = time.perf_counter()
            # one graph at a time: its builder, network, parser and plan are freed before the next graph builds
            cache_bytes = _build_graph(trt, logger, b.file(b.manifest["graphs"][graph]["file"]), plist, prec,
                                       tmp / f"{graph}.plan", cache_bytes, timing_cache, version_compatible,
                                       workspace_mib, step)
            engines[graph] = {"file": f"{graph}.plan", "build_s": round(time.perf_counter() - t0, 1)}
        sidecar = make_sidecar(b, trt.__version__, gpu_name, cc, prec, limits.to_dict(), profs, version_compatible,
                               engines)
        import json

        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2))
    if timing_cache and cache_bytes:
        tc = Path(timing_cache)
        tmp_cache = tc.with_name(f".{tc.name}.tmp-{os.getpid()}")
        tmp_cache.write_bytes(cache_bytes)
        os.replace(tmp_cache, tc)  # a reader of the cache never sees half of it
    return out


def _timing_cache(config, data: bytes):
    """``create_timing_cache`` returns None where TensorRT cannot make one (NVIDIA's samples check, cacheUtils.cpp)."""
    cache = config.create_timing_cache(data)
    if cache is None:
        raise ExportError("TensorRT could not create a timing cache (out of memory, or a corrupt cache file); build "
                          "without --timing-cache or delete the cache file")
    return cache


def _build_graph(trt, logger, onnx_path: Path, plist: list, prec: dict, plan_path: Path, cache_bytes: bytes,
                 timing_cache, version_compatible: bool, workspace_mib, step) -> bytes:
    """Parse one graph, build its engine with ``plist``'s profiles, write the plan to ``plan_path`` (from TensorRT's
    buffer, no second copy in host memory). -> the timing cache's bytes after the build."""
    builder = trt.Builder(logger)
    flags = 0
    if prec["strongly_typed"] and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path.name}: {errs} (run `mpt-export check-trt` first)")
    config = builder.create_builder_config()
    if workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    if not prec["tf32"]:  # on by default in TensorRT 10/11: an fp32 engine would multiply in TF32
        config.clear_flag(trt.BuilderFlag.TF32)
    if "--fp16" in prec["flags"]:
        config.set_flag(trt.BuilderFlag.FP16)
    if "--bf16" in prec["flags"]:
        config.set_flag(trt.BuilderFlag.BF16)
    if version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if not config.set_timing_cache(_timing_cache(config, cache_bytes), ignore_mismatch=False):
        # a cache written on another GPU or TensorRT version: TensorRT refuses it; build with a fresh one
        step(f"warning: the timing cache {timing_cache} was made on another device or TensorRT version; "
             "ignoring it (it will be replaced)")
        cache_bytes = b""
        config.set_timing_cache(_timing_cache(config, b""), ignore_mismatch=False)
    for p in plist:
        prof = builder.create_optimization_profile()
        for name, s in p["shapes"].items():
            prof.set_shape(name, s["min"], s["opt"], s["max"])
        config.add_optimization_profile(prof)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(f"TensorRT failed to build {plan_path.stem}; see the log above")
    with open(plan_path, "wb") as f:
        f.write(memoryview(plan))  # IHostMemory is a buffer: written as it is
    del plan
    used = config.get_timing_cache()
    # None when no cache was attached: the engine is kept, the cache file is not written
    return bytes(used.serialize()) if used is not None else cache_bytes

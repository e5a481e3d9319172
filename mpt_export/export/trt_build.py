"""Build TensorRT engines from a bundle (``tensorrt`` imported here only).

One engine per model graph (``backbone.plan``, or ``encoder.plan`` + ``decoder.plan``) with the profiles of
``profiles.py``, written atomically to ``engines/<bundle name>/`` with the sidecar ``engine.json``. The composer is
not built: composing a task is one small matmul, done once per task on the host.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..storage.atomic import replace_dir
from ..bundle.reader import load_bundle
from ..errors import ExportError
from ..storage.ownership import check_replaceable
from ..runtime.trt.commands import resolve_precision
from ..runtime.trt.env import gpu_identity, import_tensorrt
from ..runtime.trt.sidecar import FORMAT, make_sidecar, SIDECAR
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
    limits = limits or fit_limits(b.info)
    profs = profiles(b.info, limits)
    trt = import_tensorrt()
    version = parse_trt_version(trt.__version__)
    check_target(version)
    said = opset_problem(b.info.opset, version)
    if said:
        raise ExportError(said)
    prec = resolve_precision(precision, version[0], b.info.dtype, tf32)
    gpu_name, cc = gpu_identity()
    logger = trt.Logger(trt.Logger.WARNING)
    cache_bytes = Path(timing_cache).read_bytes() if timing_cache and Path(timing_cache).is_file() else b""
    engines = {}
    with replace_dir(out, "engines", inputs=inputs, allow_replace=True) as tmp:
        for graph, plist in profs.items():
            step(f"build {graph} ({prec['precision']}, {len(plist)} profiles)")
            t0 = time.perf_counter()
            # one graph at a time: its builder, network, parser and plan are freed before the next graph builds
            cache_bytes = _build_graph(trt, logger, b.file(b.info.graphs[graph].file), plist, prec,
                                       tmp / f"{graph}.plan", cache_bytes, timing_cache, version_compatible,
                                       workspace_mib, step)
            engines[graph] = {"file": f"{graph}.plan", "build_s": round(time.perf_counter() - t0, 1)}
        sidecar = make_sidecar(b, trt.__version__, gpu_name, cc, prec, limits.to_dict(), profs, version_compatible,
                               engines)

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


def adopt_engines(bundle_path, out: str | Path | None = None, limits: Limits | None = None, precision: str = "auto",
                  version_compatible: bool = False, tf32: bool = False, trt_version: str | None = None) -> Path:
    """The trtexec route's last step: plans that trtexec built into ``out`` from ``build --print-trtexec``'s commands
    get the sidecar (``engine.json``) a build writes, so ``generate --backend tensorrt`` and ``triton
    --backend tensorrt`` take them. Called with the options the commands were printed with. Where the tensorrt
    package is here, each plan is loaded and its I/O names and profiles are checked against the bundle's; where it is
    not (a board with trtexec only), ``trt_version`` names the release that built them and the plans are checked when
    they load. Writes only ``engine.json`` (atomically); an ``engine.json`` this tool did not write is refused."""
    b = load_bundle(bundle_path)
    out = Path(out) if out else Path("engines") / b.path.name
    limits = limits or fit_limits(b.info)
    profs = profiles(b.info, limits)
    printed = f"mpt-export build {b.path} --print-trtexec --out {out}"
    missing = [f"{g}.plan" for g in profs if not (out / f"{g}.plan").is_file()]
    if missing:
        raise ExportError(f"{out} has no {', '.join(missing)}; run the trtexec commands of `{printed}` (with the same "
                          "options) first")
    side = out / SIDECAR
    if side.exists():
        try:
            ours = json.loads(side.read_text()).get("format") == FORMAT
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise ExportError(f"{side} exists and was not written by mpt-export; move it away first")
    try:
        trt = import_tensorrt()
    except Exception:  # a board with trtexec only: the plans are checked when they load
        trt = None
    if trt is None and not trt_version:
        raise ExportError("the tensorrt package is not installed here, so the plans cannot be inspected: pass "
                          "--trt-version with the release of the trtexec that built them (trtexec --version)")
    version = trt.__version__ if trt is not None else str(trt_version)
    parsed = parse_trt_version(version)
    if trt is None and len(str(trt_version).split(".")) < 2:
        raise ExportError(f"--trt-version {trt_version}: give the release that built the plans as MAJOR.MINOR (plans "
                          "load only on the release that built them; trtexec --version prints it)")
    check_target(parsed)
    prec = resolve_precision(precision, parsed[0], b.info.dtype, tf32)
    gpu_name, cc = gpu_identity() if trt is not None else (None, None)
    if trt is not None:
        for graph, plist in profs.items():
            _check_plan(trt, out / f"{graph}.plan", b.info.graphs[graph], plist, version_compatible, printed)
    engines = {g: {"file": f"{g}.plan", "built_by": "trtexec"} for g in profs}
    sidecar = make_sidecar(b, version, gpu_name, cc, prec, limits.to_dict(), profs, version_compatible, engines)
    tmp = out / f".{SIDECAR}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(sidecar, indent=2))
    os.replace(tmp, side)
    return out


def _check_plan(trt, path: Path, spec, plist: list, version_compatible: bool, printed: str) -> None:
    """One trtexec plan against the graph it must have been built from: it loads, has the graph's I/O names and the
    profiles ``plist`` says (min/opt/max of every input)."""
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    if version_compatible:
        runtime.engine_host_code_allowed = True  # the user's own plan, being adopted for this bundle
    engine = runtime.deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise ExportError(f"TensorRT {trt.__version__} cannot load {path} (see its log above: another TensorRT "
                          "release or GPU, or a damaged file); run the trtexec commands on this machine")
    names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
    want = {t.name for t in spec.inputs + spec.outputs}
    if names != want:
        raise ExportError(f"{path} was built from another graph (its tensors differ from {spec.file}'s: "
                          f"{', '.join(sorted(names ^ want)[:4])}); run `{printed}` and its commands again")
    if engine.num_optimization_profiles != len(plist):
        raise ExportError(f"{path} has {engine.num_optimization_profiles} optimization profiles, the bundle's limits "
                          f"give {len(plist)}; adopt with the options the commands were printed with")
    for i, p in enumerate(plist):
        for name, s in p["shapes"].items():
            got = [list(x) for x in engine.get_tensor_profile_shape(name, i)]
            if got != [list(s["min"]), list(s["opt"]), list(s["max"])]:
                raise ExportError(f"{path}: profile {i} ({p['name']}) gives {name} min/opt/max {got}, the bundle's "
                                  f"limits give {[s['min'], s['opt'], s['max']]}; adopt with the options the "
                                  "commands were printed with")

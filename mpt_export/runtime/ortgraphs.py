"""Opening a bundle's graphs in ONNX Runtime: the session per graph (retried over a directory renamed under it), its
I/O checked against the manifest, prepacking decided by the memory there is, the TensorRT provider's options."""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..errors import BundleError
from .memory import available_memory
from .trt.commands import ort_trt_provider_options
from .trt.profiles import fit_limits, profiles


def graph_weight_bytes(bundle) -> int:
    """Bytes of the bundle's graph weight files (what ONNX Runtime maps)."""
    files = {g.external_data for g in bundle.info.graphs.values() if g.external_data}
    total = 0
    for f in files:
        try:
            total += os.stat(bundle.file(f)).st_size
        except (OSError, BundleError):  # a missing file is reported when its graph is opened
            pass
    return total


def prepack_fits(weight_bytes: int, available: int | None) -> bool:
    """Prepacking makes a second, packed copy of every MatMul weight while the originals are read: worth it (faster
    steps) only where both copies fit in the memory available."""
    return available is None or 2 * weight_bytes <= available


def resolve_prepack(bundle, prepack: bool | str) -> bool:
    """``"auto"`` (checked by :class:`SessionOptions`): on where both copies fit in the memory available."""
    return prepack_fits(graph_weight_bytes(bundle), available_memory()) if prepack == "auto" else prepack


# What ONNX Runtime says when the directory it resolves (/proc/self/fd/N, this bundle's handle) was renamed between
# two of its system calls: while checking that external data stays inside the model's directory, and while
# canonicalising the handle's path itself (std::filesystem::weakly_canonical: readlink, then stat of the old name).
_RENAME_RACE = ("External data path", "escapes model directory", "Failed to get the weakly canonical path")


def inference_session(ort, bundle, file: str, opts, providers):
    """ORT checks that external data lies inside the model's directory by resolving both paths at different
    moments; a writer renaming the (old) directory this bundle was opened as, in between, makes that check fail
    spuriously. The directory is the same one, so a short retry settles it; a real problem fails every time."""
    for attempt in range(10):
        try:
            return ort.InferenceSession(str(bundle.file(file)), opts, providers=providers)
        except Exception as e:  # ORT raises its own Fail/InvalidGraph/RuntimeException types
            msg = str(e)
            # ORT's wording differs between releases and between the steps of its check
            if any(w in msg for w in _RENAME_RACE) and attempt < 9:
                time.sleep(0.02 * (attempt + 1))  # up to ~0.9 s in all: a loaded machine renames slowly
                continue
            raise BundleError(f"ONNX Runtime cannot load {file} of {bundle.path} ({type(e).__name__}: "
                              f"{msg.splitlines()[0][:200] if msg else ''}); copy the bundle again or "
                              "re-export it") from None


_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool"}


def check_graph_io(bundle, spec, sess) -> None:
    """The graph's real inputs and outputs must be the manifest's (``spec``: its GraphSpec): names, dtypes and fixed
    sizes (the runtime sizes its buffers from the manifest)."""
    for side, actual in (("inputs", sess.get_inputs()), ("outputs", sess.get_outputs())):
        want = {x.name: x for x in getattr(spec, side)}
        have = {a.name: a for a in actual}
        if set(want) != set(have):
            diff = sorted(set(want) ^ set(have))
            raise BundleError(f"{spec.file} of {bundle.path} has {side} that its manifest does not describe "
                              f"({', '.join(diff[:6])}); the manifest was edited or belongs to another bundle — "
                              "re-export it")
        for n, a in have.items():
            w = want[n]
            dtype = _ORT_TYPES.get(a.type, a.type)
            dims = [d if isinstance(d, int) else None for d in a.shape]
            wdims = [d if isinstance(d, int) else None for d in w.shape]
            if w.dtype != dtype or len(dims) != len(wdims) or any(
                    x is not None and y is not None and x != y for x, y in zip(dims, wdims)):
                raise BundleError(f"{spec.file} of {bundle.path}: {n} is {dtype} {a.shape} in the graph but "
                                  f"{w.dtype} {list(w.shape)} in the manifest; the manifest was edited or belongs "
                                  "to another bundle — re-export it")


def trt_ep_options(bundle, graph: str, limits=None, cache_dir=None) -> dict:
    """ONNX Runtime TensorRT-EP options for one graph: the bundle's prefill/decode profiles and an engine cache on
    disk (default ``engines/<bundle>/ort-trt-cache``). Default limits shrink to fit the model's positions."""
    if limits is None:
        limits = fit_limits(bundle.info)
    cache = cache_dir or Path("engines") / bundle.path.name / "ort-trt-cache"
    Path(cache).mkdir(parents=True, exist_ok=True)
    return ort_trt_provider_options(profiles(bundle.info, limits)[graph], cache, fp16=bundle.info.dtype == "float16")

"""How a session is opened, as one typed object from the command line (or ``Bundle.session``'s keywords) to the
backend that uses each value: checked once here, before any runtime is imported."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

from ..errors import OptionError

BACKENDS = ("onnxruntime", "tensorrt")
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")

# the short provider names every command takes -> ONNX Runtime's provider names
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}
_FULL_NAMES = {v.lower(): v for v in PROVIDER_ALIASES.values()}


def canonical_provider(name: str) -> str:
    """ONNX Runtime's name for a provider: an alias (``cpu``, ``CUDA``) or a known provider name in any case
    (``cpuexecutionprovider``) -> its ONNX Runtime name (``CPUExecutionProvider``); any other name as given. The one
    answer to "which provider is this" (no onnxruntime import: whether it is available is the session's check)."""
    if not isinstance(name, str) or not name:
        raise OptionError(f"provider must be a provider name (cpu, cuda, tensorrt, dml, coreml or an ONNX Runtime "
                          f"provider name), got {name!r}", param="provider")
    key = name.lower()
    return PROVIDER_ALIASES.get(key) or _FULL_NAMES.get(key, name)


def is_cpu_provider(name: str) -> bool:
    """Whether ``name`` is ONNX Runtime's CPU provider, however it is written (``cpu``, ``CPU``,
    ``CPUExecutionProvider``)."""
    return canonical_provider(name) == "CPUExecutionProvider"


def check_threads(value, what: str = "threads", param: str | None = None) -> int:
    """A thread count: an integer from 0 (one per core) to a sane limit; one clear error otherwise."""
    limit = max(256, 4 * (os.cpu_count() or 1))
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise OptionError(f"{what} must be an integer from 1 to {limit} (0 or none: one per core), got {value!r}",
                          param=param or what.lstrip("-").replace("-", "_"))
    return int(value)


GRAPH_CHOICES = ("auto", "fast", "plain")


@dataclass(frozen=True)
class SessionOptions:
    provider: str = "cpu"  # ONNX Runtime: cpu, cuda, tensorrt (ORT's TensorRT EP) or an ORT provider name
    backend: str = "onnxruntime"  # or "tensorrt": the engines folder written by `mpt-export build`
    engines: str | Path | None = None  # the TensorRT backend's engines folder
    intra_op_threads: int | None = None  # ONNX Runtime's threads (None or 0: one per core)
    optimization: str = "all"  # ONNX Runtime's graph optimization level
    io_binding: bool = True  # decode steps keep KV as OrtValues on the provider's device
    prepack: bool | str = "auto"  # ONNX Runtime's packed weight copies: True, False or "auto" (if both fit)
    prompt_kv_cache: bool = True  # a task's prompt keys/values computed once and kept
    prompt_cache_size: int = 64  # composed task prompts kept (LRU)
    kv_cache_size: int | None = None  # tasks' prompt keys/values kept at most (LRU; None: as many as kv_cache_mib holds)
    kv_cache_mib: float = 1024  # memory the tasks' prompt keys/values may take (MiB; evicted least recently used first)
    graph: str = "auto"  # causal bundles on ONNX Runtime: "fast" (the fused graph), "plain" (the traced one), or
    # "auto": the fused graph where the bundle has one and the provider is the CPU

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise OptionError(f"unknown backend {self.backend!r}; choose onnxruntime or tensorrt", param="backend")
        if self.backend == "tensorrt" and self.engines is None:
            raise OptionError("the TensorRT backend needs the engines folder (mpt-export build BUNDLE --out DIR)",
                              param="engines")
        canonical_provider(self.provider)
        if self.optimization not in OPTIMIZATION_LEVELS:
            raise OptionError(f"unknown graph optimization level {self.optimization!r}; choose one of "
                              f"{', '.join(OPTIMIZATION_LEVELS)}", param="optimization")
        if self.graph not in GRAPH_CHOICES:
            raise OptionError(f"unknown graph {self.graph!r}; choose one of {', '.join(GRAPH_CHOICES)}", param="graph")
        if self.graph == "fast" and self.backend != "onnxruntime":
            raise OptionError("the fused graph runs on ONNX Runtime; the TensorRT backend runs the engines built from "
                              "the traced graph (drop --graph fast)", param="graph")
        if self.prepack is None:
            object.__setattr__(self, "prepack", "auto")
        if self.prepack != "auto" and not isinstance(self.prepack, bool):
            raise OptionError(f"prepack must be True, False or 'auto', got {self.prepack!r}", param="prepack")
        if self.intra_op_threads is not None:
            check_threads(self.intra_op_threads, param="intra_op_threads")
        for name in ("prompt_cache_size", "kv_cache_size"):
            v = getattr(self, name)
            if v is None and name == "kv_cache_size":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise OptionError(f"{name} must be an integer >= 0, got {v!r}", param=name)
        v = self.kv_cache_mib
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or v == float("inf"):
            raise OptionError(f"kv_cache_mib must be a number of MiB >= 0, got {v!r}", param="kv_cache_mib")

    @classmethod
    def of(cls, options: "SessionOptions | str | None" = None, **changes) -> "SessionOptions":
        """``options`` (or the defaults; a string is the provider, as the first positional argument once was) with
        ``changes`` applied; an unknown keyword is one clear error naming the ones there are."""
        unknown = set(changes) - {f.name for f in fields(cls)}
        if unknown:
            raise OptionError(f"unknown session option(s) {', '.join(sorted(unknown))}; the options are "
                              f"{', '.join(f.name for f in fields(cls))}", param=sorted(unknown)[0])
        if isinstance(options, str):
            changes = {"provider": options, **changes}
            options = None
        base = options if options is not None else cls()
        return replace(base, **changes) if changes else base

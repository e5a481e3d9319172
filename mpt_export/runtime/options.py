"""How a session is opened, as one typed object from the command line (or ``Bundle.session``'s keywords) to the
backend that uses each value: checked once here, before any runtime is imported."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

from ..errors import BundleError, InputError

BACKENDS = ("onnxruntime", "tensorrt")
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


def check_threads(value, what: str = "threads") -> int:
    """A thread count: an integer from 0 (one per core) to a sane limit; one clear error otherwise."""
    limit = max(256, 4 * (os.cpu_count() or 1))
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise InputError(f"{what} must be an integer from 1 to {limit} (0 or none: one per core), got {value!r}")
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
    kv_cache_size: int = 32  # tasks' prompt keys/values kept (LRU)
    graph: str = "auto"  # causal bundles on ONNX Runtime: "fast" (the fused graph), "plain" (the traced one), or
    # "auto": the fused graph where the bundle has one and the provider is the CPU

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise BundleError(f"unknown backend {self.backend!r}; choose onnxruntime or tensorrt")
        if self.backend == "tensorrt" and self.engines is None:
            raise BundleError("the TensorRT backend needs the engines folder (mpt-export build BUNDLE --out DIR)")
        if self.optimization not in OPTIMIZATION_LEVELS:
            raise InputError(f"unknown graph optimization level {self.optimization!r}; choose one of "
                             f"{', '.join(OPTIMIZATION_LEVELS)}")
        if self.graph not in GRAPH_CHOICES:
            raise InputError(f"unknown graph {self.graph!r}; choose one of {', '.join(GRAPH_CHOICES)}")
        if self.graph == "fast" and self.backend != "onnxruntime":
            raise InputError("the fused graph runs on ONNX Runtime; the TensorRT backend runs the engines built from "
                             "the traced graph (drop --graph fast)")
        if self.prepack is None:
            object.__setattr__(self, "prepack", "auto")
        if self.prepack != "auto" and not isinstance(self.prepack, bool):
            raise InputError(f"prepack must be True, False or 'auto', got {self.prepack!r}")
        if self.intra_op_threads is not None:
            check_threads(self.intra_op_threads)
        for name in ("prompt_cache_size", "kv_cache_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InputError(f"{name} must be an integer >= 0, got {v!r}")

    @classmethod
    def of(cls, options: "SessionOptions | str | None" = None, **changes) -> "SessionOptions":
        """``options`` (or the defaults; a string is the provider, as the first positional argument once was) with
        ``changes`` applied; an unknown keyword is one clear error naming the ones there are."""
        unknown = set(changes) - {f.name for f in fields(cls)}
        if unknown:
            raise InputError(f"unknown session option(s) {', '.join(sorted(unknown))}; the options are "
                             f"{', '.join(f.name for f in fields(cls))}")
        if isinstance(options, str):
            changes = {"provider": options, **changes}
            options = None
        base = options if options is not None else cls()
        return replace(base, **changes) if changes else base

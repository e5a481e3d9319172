"""Runtimes over a bundle. A backend subclasses :class:`~mpt_export.runtime.base.Session` (through a model kind,
``causal`` or ``seq2seq``) and implements ``_run_graph_impl``; input checks, prompt composition, caching and the
decode loop live in the base. The runtime reads a bundle only through its public surface (manifest, ``file()``,
``task_bank()``), so it imports nothing of the bundle module: sessions are opened here, and
``Bundle.session(...)`` is a shortcut to :func:`open_session`."""

from __future__ import annotations

from pathlib import Path

from ..errors import BundleError


def open_session(bundle, provider: str = "cpu", backend: str = "onnxruntime", engines: str | Path | None = None,
                 **options):
    """A session over ``bundle``: ONNX Runtime (``provider``: cpu, cuda, tensorrt — ORT's TensorRT EP — or an ORT
    provider name), or ``backend="tensorrt"`` with the engines folder written by ``mpt-export build``."""
    if backend == "tensorrt":
        if engines is None:
            raise BundleError("the TensorRT backend needs the engines folder (mpt-export build BUNDLE --out DIR)")
        from .tensorrt import trt_session

        return trt_session(bundle, engines, **options)
    if backend != "onnxruntime":
        raise BundleError(f"unknown backend {backend!r}; choose onnxruntime or tensorrt")
    from .onnxruntime import ort_session

    return ort_session(bundle, provider=provider, **options)

"""Runtimes over a bundle. A backend subclasses :class:`~mpt_export.runtime.base.Session` (through a model kind,
``causal`` or ``seq2seq``) and implements ``_run_graph_impl``; input checks, prompt composition, caching and the
decode loop live in the base. The runtime reads a bundle only through its public surface (manifest, ``file()``,
``task_bank()``), so it imports nothing of the bundle module: sessions are opened here, and
``Bundle.session(...)`` is a shortcut to :func:`open_session`."""

from __future__ import annotations

from .options import SessionOptions
from .onnxruntime import ort_session
from .tensorrt import trt_session

__all__ = ["SessionOptions", "open_session"]


def open_session(bundle, options: SessionOptions | str | None = None, **changes):
    """A session over ``bundle``, opened as ``options`` (a :class:`SessionOptions`, or its fields as keywords) say:
    ONNX Runtime (``provider``: cpu, cuda, tensorrt — ORT's TensorRT EP — or an ORT provider name), or
    ``backend="tensorrt"`` with the ``engines`` folder written by ``mpt-export build``."""
    options = SessionOptions.of(options, **changes)
    if options.backend == "tensorrt":
        return trt_session(bundle, options)

    return ort_session(bundle, options)

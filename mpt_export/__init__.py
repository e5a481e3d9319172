"""mpt-export: ship Multitask Prompt Tuning models to ONNX Runtime and TensorRT.

``import mpt_export`` stays light: torch, onnxruntime and tensorrt are imported only by the functions that need them.
"""

from __future__ import annotations

from .version import __version__

__all__ = ["export_bundle", "verify_bundle", "load_bundle", "read_adapter", "Bundle", "Constraint", "SamplingParams",
           "errors", "__version__"]


def __getattr__(name: str):
    if name in ("export_bundle", "verify_bundle"):
        from .export import api

        return getattr(api, name)
    if name in ("load_bundle", "Bundle"):
        from .bundle import reader as bundle

        return getattr(bundle, name)
    if name == "read_adapter":
        from .source.adapters import read_adapter

        return read_adapter
    if name == "Constraint":
        from .runtime.constraints import Constraint

        return Constraint
    if name == "SamplingParams":
        from .runtime.sampling import SamplingParams

        return SamplingParams
    if name == "errors":
        from . import errors

        return errors
    raise AttributeError(f"module 'mpt_export' has no attribute {name!r}")

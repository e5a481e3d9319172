"""ONNX Runtime backend."""

from __future__ import annotations

import numpy as np

from ..errors import InputError, MissingDependencyError
from .base import Session

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}


def resolve_provider(provider: str) -> list[str]:
    import onnxruntime as ort

    name = PROVIDER_ALIASES.get(provider.lower(), provider)
    available = ort.get_available_providers()
    if name not in available:
        raise InputError(
            f"ONNX Runtime provider {provider!r} ({name}) is not available here; available providers are: "
            f"{', '.join(available)} (aliases: {', '.join(PROVIDER_ALIASES)})"
        )
    return [name] if name == "CPUExecutionProvider" else [name, "CPUExecutionProvider"]


class OrtSession(Session):
    def __init__(self, bundle, provider: str = "cpu", intra_op_threads: int | None = None, **session_options):
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingDependencyError("onnxruntime is not installed; pip install onnxruntime") from None
        super().__init__(bundle, **session_options)
        self.providers = resolve_provider(provider)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            opts.intra_op_num_threads = int(intra_op_threads)
        opts.log_severity_level = 3
        self._backbone = ort.InferenceSession(str(bundle.file("backbone.onnx")), opts, providers=self.providers)
        self._composer = ort.InferenceSession(str(bundle.file("composer.onnx")), opts, providers=self.providers)
        self._out_names = [o.name for o in self._backbone.get_outputs()]

    def _run_backbone_impl(self, feed):
        outs = self._backbone.run(self._out_names, feed)
        return dict(zip(self._out_names, outs))

    def _run_composer_impl(self, feed):
        return np.asarray(self._composer.run(["prompt_embeds"], feed)[0])

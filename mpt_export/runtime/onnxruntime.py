"""ONNX Runtime backend: one InferenceSession per graph in the bundle."""

from __future__ import annotations

from ..errors import InputError, MissingDependencyError

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


class OrtBackend:
    """Mixin: ``_run_graph_impl`` over ONNX Runtime sessions opened for every graph the manifest lists."""

    def _open_ort(self, bundle, provider: str, intra_op_threads: int | None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingDependencyError("onnxruntime is not installed; pip install onnxruntime") from None
        self.providers = resolve_provider(provider)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            opts.intra_op_num_threads = int(intra_op_threads)
        opts.log_severity_level = 3
        self._ort = {}
        for name, g in bundle.manifest["graphs"].items():
            sess = ort.InferenceSession(str(bundle.file(g["file"])), opts, providers=self.providers)
            self._ort[name] = (sess, [o.name for o in sess.get_outputs()])

    def _run_graph_impl(self, graph, feed):
        sess, names = self._ort[graph]
        return dict(zip(names, sess.run(names, feed)))


def ort_session(bundle, provider: str = "cpu", intra_op_threads: int | None = None, **options):
    """A session of the right kind (causal or seq2seq) for ``bundle`` over ONNX Runtime."""
    if bundle.task_type == "SEQ_2_SEQ_LM":
        from .seq2seq import Seq2SeqSession as Kind
    else:
        from .causal import CausalSession as Kind

    class OrtSession(OrtBackend, Kind):
        def __init__(self):
            Kind.__init__(self, bundle, **options)
            self._open_ort(bundle, provider, intra_op_threads)

    return OrtSession()

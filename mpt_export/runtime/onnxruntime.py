"""ONNX Runtime backend: one InferenceSession per graph in the bundle, and the session classes it makes with each
model kind (:class:`OrtCausalSession`, :class:`OrtSeq2SeqSession`, :class:`OrtFusedSession`)."""

from __future__ import annotations

import numpy as np

from ..errors import InputError, MissingDependencyError
from .causal import CausalSession
from .fused import FusedCausalSession
from .graphio import present_of
from .limits import BackendLimits
from .options import PROVIDER_ALIASES, SessionOptions, canonical_provider  # noqa: F401 (PROVIDER_ALIASES: re-exported)
from .ortgraphs import check_graph_io, inference_session, resolve_prepack, trt_ep_options
from .seq2seq import Seq2SeqSession
from .trt.profiles import fit_limits


def resolve_provider(provider: str) -> list[str]:
    import onnxruntime as ort

    name = canonical_provider(provider)
    available = ort.get_available_providers()
    if name not in available:
        raise InputError(
            f"ONNX Runtime provider {provider!r} ({name}) is not available here; available providers are: "
            f"{', '.join(available)} (aliases: {', '.join(PROVIDER_ALIASES)})"
        )
    return [name] if name == "CPUExecutionProvider" else [name, "CPUExecutionProvider"]


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise MissingDependencyError("onnxruntime is not installed; pip install onnxruntime") from None
    return ort


_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
           "all": "ORT_ENABLE_ALL"}


class OrtBackend:
    """The ONNX Runtime half of a session: ``_run_graph_impl`` over an InferenceSession per graph, decode steps
    through IO binding, and the in-place cache binding the fused kind asks for. A session class mixes it with a
    model kind (see the classes below); ``__init__`` opens every graph the kind runs."""

    def __init__(self, bundle, options: SessionOptions | None = None):
        options = options if options is not None else SessionOptions()
        super().__init__(bundle, options)  # the model kind's
        self._open_ort(bundle, options, self.graph_specs(bundle))

    @staticmethod
    def graph_specs(bundle) -> dict:
        """The graphs this session runs: name -> GraphSpec (the kind's choice; default every traced graph)."""
        return dict(bundle.info.graphs)

    def _open_ort(self, bundle, options: SessionOptions, graphs: dict) -> None:
        ort = _import_ort()
        if bundle.info.dtype == "bfloat16":
            raise InputError(
                "this is a bf16 bundle: numpy and ONNX Runtime's CPU provider have no bf16 support; run it with "
                "TensorRT (`mpt-export build`, then --backend tensorrt) or export with --dtype fp16 for ONNX Runtime"
            )
        self._ort_module = ort
        self.providers = resolve_provider(options.provider)
        self.io_binding = options.io_binding
        # Outputs of a decode step stay where the provider put them (the GPU for CUDA/TensorRT) and go back in as
        # the next step's inputs: no KV round trip through numpy.
        self._device = "cuda" if self.providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"
        opts = ort.SessionOptions()
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[options.optimization])
        if options.intra_op_threads is not None:
            opts.intra_op_num_threads = options.intra_op_threads
        opts.log_severity_level = 3
        self.prepacked = resolve_prepack(bundle, options.prepack)
        if not self.prepacked:
            opts.add_session_config_entry("session.disable_prepacking", "1")
        if self.providers[0] == "TensorrtExecutionProvider":  # its engines take only their profiles' shapes
            self.limits = BackendLimits.from_dict(
                fit_limits(bundle.info).to_dict(), "ONNX Runtime's TensorRT provider profiles for this bundle",
                "use mpt-export build and --backend tensorrt with larger --max-batch/--max-input/--max-new-tokens")
        self._ort = {}
        for name, spec in graphs.items():
            providers = self.providers
            if providers[0] == "TensorrtExecutionProvider" and name != "composer":
                providers = [("TensorrtExecutionProvider", trt_ep_options(bundle, name)), *providers[1:]]
            sess = inference_session(ort, bundle, spec.file, opts, providers)
            check_graph_io(bundle, spec, sess)
            self._ort[name] = (sess, [o.name for o in sess.get_outputs()])

    def _run_scoring_impl(self, feed):
        """The scoring graph (opened on first use, its weights read in place: it serves ``echo`` requests, not
        decoding)."""
        spec = self.bundle.info.scoring
        if spec is None:
            raise InputError(f"{self.bundle.path} has no scoring graph (it was exported before prompt scoring "
                             "existed): export it again to score prompts (echo)")
        with self._bank_lock:
            if "score" not in self._ort:
                ort = self._ort_module
                opts = ort.SessionOptions()
                opts.add_session_config_entry("session.disable_prepacking", "1")
                opts.log_severity_level = 3
                sess = inference_session(ort, self.bundle, spec.file, opts, self.providers)
                check_graph_io(self.bundle, spec, sess)
                self._ort["score"] = (sess, [o.name for o in sess.get_outputs()])
        sess, names = self._ort["score"]
        return sess.run(["logits_all"], {k: self.state_array(v) for k, v in feed.items()})[0]

    def _run_graph_impl(self, graph, feed):
        sess, names = self._ort[graph]
        return dict(zip(names, sess.run(names, {k: self.state_array(v) for k, v in feed.items()})))

    def _run_step_impl(self, graph, feed):
        if not self.io_binding:
            return self._run_graph_impl(graph, feed)
        sess, names = self._ort[graph]
        binding = sess.io_binding()
        for k, v in feed.items():
            if isinstance(v, np.ndarray):
                binding.bind_cpu_input(k, np.ascontiguousarray(v))
            else:
                binding.bind_ortvalue_input(k, v)
        for n in names:
            binding.bind_output(n, self._device)
        sess.run_with_iobinding(binding)
        out = dict(zip(names, binding.get_outputs()))
        out["logits"] = out["logits"].numpy()
        return out

    # -- the in-place cache (the fused kind's backend interface) ---------------------------------------------------
    def _bind_in_place(self, graph: str, buffers: dict):
        """An IO binding of ``graph`` with each cache input and its present output bound to the same host buffer
        (GroupQueryAttention then writes new keys/values in place), and ``logits`` to be allocated."""
        binding = self._ort[graph][0].io_binding()
        binding.bind_output("logits")
        for name, a in buffers.items():
            v = self._ort_module.OrtValue.ortvalue_from_numpy(a)  # the same memory
            binding.bind_ortvalue_input(name, v)
            binding.bind_ortvalue_output(present_of(name), v)
        return binding

    def _run_bound(self, graph: str, binding, feed: dict) -> np.ndarray:
        """Run ``graph`` through ``binding`` (:meth:`_bind_in_place`) with the small host inputs ``feed`` -> logits."""
        for name, a in feed.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(a))
        self._ort[graph][0].run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    # -- decode state on the host --------------------------------------------------------------------------------
    @staticmethod
    def state_array(value):
        """A step output as the array the engine slices: OrtValues (IO binding) come back to numpy."""
        return value if isinstance(value, np.ndarray) else value.numpy()


class OrtCausalSession(OrtBackend, CausalSession):
    """A decoder-only bundle's traced graph on ONNX Runtime."""


class OrtSeq2SeqSession(OrtBackend, Seq2SeqSession):
    """An encoder-decoder bundle on ONNX Runtime."""


class OrtFusedSession(OrtBackend, FusedCausalSession):
    """A decoder-only bundle's fused graph on ONNX Runtime's CPU provider (its cache bound in host memory)."""

    @staticmethod
    def graph_specs(bundle) -> dict:
        return {"composer": bundle.info.graphs["composer"], FusedCausalSession.GRAPH: bundle.info.fused}


def ort_session(bundle, options: SessionOptions):
    """A session of the right kind (causal, fused or seq2seq) for ``bundle`` over ONNX Runtime, as ``options`` say:

    ``intra_op_threads`` (default: ORT's, one per core), ``optimization`` (disable|basic|extended|all),
    ``io_binding`` (decode steps keep KV as OrtValues on the provider's device), ``prepack``: ONNX Runtime's packed
    copies of MatMul weights, made when the session opens — faster steps (1.3-1.6x generation on a 3B model), but a
    second copy of the weights in memory and seconds of start-up per GB (~20 s for 13 GB); off, the weights stay
    memory-mapped from the bundle, read in place (start-up in well under a second, pages shared with other
    processes). ``"auto"`` (default): on where both copies fit in the memory available (``MemAvailable``)."""
    if bundle.info.seq2seq:
        return OrtSeq2SeqSession(bundle, options)
    if use_fused_graph(bundle, options):
        return OrtFusedSession(bundle, options)
    return OrtCausalSession(bundle, options)


def use_fused_graph(bundle, options: SessionOptions) -> bool:
    """Whether a session runs the bundle's fused graph: ``graph="fast"`` (refused with one line where the bundle has
    none, or the provider is not the CPU), ``"auto"`` where it has one and the provider is the CPU."""
    fast = bundle.info.fused
    cpu = resolve_provider(options.provider)[0] == "CPUExecutionProvider"
    if options.graph == "fast":
        if fast is None:
            why = bundle.info.fused_skipped or "it was exported before fused graphs existed"
            raise InputError(f"{bundle.path} has no fused graph ({why}); run it with --graph plain (or auto)")
        if not cpu:
            raise InputError(f"the fused graph runs on ONNX Runtime's CPU provider (its cache is bound in host "
                             f"memory), not {options.provider}; use --graph plain (or auto) there")
    return fast is not None and cpu and options.graph != "plain"

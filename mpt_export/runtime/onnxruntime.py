"""ONNX Runtime backend: one InferenceSession per graph in the bundle."""

from __future__ import annotations

import os

import numpy as np

from ..errors import BundleError, InputError, MissingDependencyError
from .memory import available_memory
from .options import PROVIDER_ALIASES, SessionOptions, canonical_provider  # noqa: F401 (PROVIDER_ALIASES: re-exported)


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


class OrtBackend:
    """Mixin: ``_run_graph_impl`` over ONNX Runtime sessions opened for every graph the manifest lists."""

    def _open_ort(self, bundle, options: SessionOptions, graphs: dict | None = None) -> None:
        """Open ``graphs`` (name -> manifest spec; default: every graph the manifest lists)."""
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingDependencyError("onnxruntime is not installed; pip install onnxruntime") from None
        if bundle.manifest.get("dtype") == "bfloat16":
            raise InputError(
                "this is a bf16 bundle: numpy and ONNX Runtime's CPU provider have no bf16 support; run it with "
                "TensorRT (`mpt-export build`, then --backend tensorrt) or export with --dtype fp16 for ONNX Runtime"
            )
        levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        self.providers = resolve_provider(options.provider)
        self.io_binding = options.io_binding
        # Outputs of a decode step stay where the provider put them (the GPU for CUDA/TensorRT) and go back in as
        # the next step's inputs: no KV round trip through numpy.
        self._device = "cuda" if self.providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"
        opts = ort.SessionOptions()
        opts.graph_optimization_level = levels[options.optimization]
        if options.intra_op_threads is not None:
            opts.intra_op_num_threads = options.intra_op_threads
        opts.log_severity_level = 3
        self.prepacked = resolve_prepack(bundle, options.prepack)
        if not self.prepacked:
            opts.add_session_config_entry("session.disable_prepacking", "1")
        if self.providers[0] == "TensorrtExecutionProvider":  # its engines take only their profiles' shapes
            from .trt.profiles import fit_limits
            from .limits import BackendLimits

            self.limits = BackendLimits.from_dict(
                fit_limits(bundle.manifest).to_dict(), "ONNX Runtime's TensorRT provider profiles for this bundle",
                "use mpt-export build and --backend tensorrt with larger --max-batch/--max-input/--max-new-tokens")
        self._ort = {}
        for name, g in (graphs if graphs is not None else bundle.manifest["graphs"]).items():
            providers = self.providers
            if providers[0] == "TensorrtExecutionProvider" and name != "composer":
                providers = [("TensorrtExecutionProvider", trt_ep_options(bundle, name)), *providers[1:]]
            sess = _inference_session(ort, bundle, g["file"], opts, providers)
            check_graph_io(bundle, name, g, sess)
            self._ort[name] = (sess, [o.name for o in sess.get_outputs()])

    def _run_scoring_impl(self, feed):
        """The scoring graph (opened on first use, its weights read in place: it serves ``echo`` requests, not
        decoding)."""
        spec = (self.bundle.manifest.get("scoring_graphs") or {}).get("backbone")
        if spec is None:
            raise InputError(f"{self.bundle.path} has no scoring graph (it was exported before prompt scoring "
                             "existed): export it again to score prompts (echo)")
        with self._bank_lock:
            if "score" not in self._ort:
                import onnxruntime as ort

                opts = ort.SessionOptions()
                opts.add_session_config_entry("session.disable_prepacking", "1")
                opts.log_severity_level = 3
                sess = _inference_session(ort, self.bundle, spec["file"], opts, self.providers)
                check_graph_io(self.bundle, "scoring", spec, sess)
                self._ort["score"] = (sess, [o.name for o in sess.get_outputs()])
        sess, names = self._ort["score"]
        return sess.run(["logits_all"], {k: self._as_numpy(v) for k, v in feed.items()})[0]

    def _run_graph_impl(self, graph, feed):
        sess, names = self._ort[graph]
        return dict(zip(names, sess.run(names, {k: self._as_numpy(v) for k, v in feed.items()})))

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

    @staticmethod
    def _as_numpy(v):
        return v if isinstance(v, np.ndarray) else v.numpy()

    def _take_rows(self, value, keep):
        return self._as_numpy(value)[keep]


def graph_weight_bytes(bundle) -> int:
    """Bytes of the bundle's graph weight files (what ONNX Runtime maps)."""
    files = {g["external_data"] for g in bundle.manifest["graphs"].values() if g.get("external_data")}
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


def _inference_session(ort, bundle, file: str, opts, providers):
    """ORT checks that external data lies inside the model's directory by resolving both paths at different
    moments; a writer renaming the (old) directory this bundle was opened as, in between, makes that check fail
    spuriously. The directory is the same one, so a short retry settles it; a real problem fails every time."""
    import time

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


def check_graph_io(bundle, name: str, spec: dict, sess) -> None:
    """The graph's real inputs and outputs must be the manifest's: names, dtypes and fixed sizes (the runtime sizes
    its buffers from the manifest)."""
    for side, actual in (("inputs", sess.get_inputs()), ("outputs", sess.get_outputs())):
        want = {x["name"]: x for x in spec[side]}
        have = {a.name: a for a in actual}
        if set(want) != set(have):
            diff = sorted(set(want) ^ set(have))
            raise BundleError(f"{spec['file']} of {bundle.path} has {side} that its manifest does not describe "
                              f"({', '.join(diff[:6])}); the manifest was edited or belongs to another bundle — "
                              "re-export it")
        for n, a in have.items():
            w = want[n]
            dtype = _ORT_TYPES.get(a.type, a.type)
            dims = [d if isinstance(d, int) else None for d in a.shape]
            wdims = [d if isinstance(d, int) else None for d in w["shape"]]
            if w.get("dtype") not in (None, dtype) or len(dims) != len(wdims) or any(
                    x is not None and y is not None and x != y for x, y in zip(dims, wdims)):
                raise BundleError(f"{spec['file']} of {bundle.path}: {n} is {dtype} {a.shape} in the graph but "
                                  f"{w.get('dtype')} {w['shape']} in the manifest; the manifest was edited or belongs "
                                  "to another bundle — re-export it")


def trt_ep_options(bundle, graph: str, limits=None, cache_dir=None) -> dict:
    """ONNX Runtime TensorRT-EP options for one graph: the bundle's prefill/decode profiles and an engine cache on
    disk (default ``engines/<bundle>/ort-trt-cache``). Default limits shrink to fit the model's positions."""
    from .trt.commands import ort_trt_provider_options
    from .trt.profiles import fit_limits, profiles

    if limits is None:
        limits = fit_limits(bundle.manifest)
    from pathlib import Path

    cache = cache_dir or Path("engines") / bundle.path.name / "ort-trt-cache"
    Path(cache).mkdir(parents=True, exist_ok=True)
    return ort_trt_provider_options(profiles(bundle.manifest, limits)[graph], cache,
                                    fp16=bundle.manifest.get("dtype") == "float16")


def ort_session(bundle, options: SessionOptions):
    """A session of the right kind (causal or seq2seq) for ``bundle`` over ONNX Runtime, as ``options`` say:

    ``intra_op_threads`` (default: ORT's, one per core), ``optimization`` (disable|basic|extended|all),
    ``io_binding`` (decode steps keep KV as OrtValues on the provider's device), ``prepack``: ONNX Runtime's packed
    copies of MatMul weights, made when the session opens — faster steps (1.3-1.6x generation on a 3B model), but a
    second copy of the weights in memory and seconds of start-up per GB (~20 s for 13 GB); off, the weights stay
    memory-mapped from the bundle, read in place (start-up in well under a second, pages shared with other
    processes). ``"auto"`` (default): on where both copies fit in the memory available (``MemAvailable``)."""
    from .kinds import session_kind

    graphs = None
    if use_fast_graph(bundle, options):
        from .fastcausal import GRAPH, FastCausalSession

        Kind = FastCausalSession
        graphs = {"composer": bundle.manifest["graphs"]["composer"], GRAPH: bundle.manifest["fast_graphs"]["backbone"]}
    else:
        Kind = session_kind(bundle)

    class OrtSession(OrtBackend, Kind):
        def __init__(self):
            Kind.__init__(self, bundle, options)
            self._open_ort(bundle, options, graphs)

    return OrtSession()


def use_fast_graph(bundle, options: SessionOptions) -> bool:
    """Whether a session runs the bundle's fused graph: ``graph="fast"`` (refused with one line where the bundle has
    none, or the provider is not the CPU), ``"auto"`` where it has one and the provider is the CPU."""
    fast = (bundle.manifest.get("fast_graphs") or {}).get("backbone")
    cpu = resolve_provider(options.provider)[0] == "CPUExecutionProvider"
    if options.graph == "fast":
        if fast is None:
            why = bundle.manifest.get("fast_graph_skipped") or "it was exported before fused graphs existed"
            raise InputError(f"{bundle.path} has no fused graph ({why}); run it with --graph plain (or auto)")
        if not cpu:
            raise InputError(f"the fused graph runs on ONNX Runtime's CPU provider (its cache is bound in host "
                             f"memory), not {options.provider}; use --graph plain (or auto) there")
    return fast is not None and cpu and options.graph != "plain"

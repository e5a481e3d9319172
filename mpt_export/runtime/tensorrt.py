"""TensorRT backend behind the same Session interface (``tensorrt`` and torch's CUDA tensors, imported lazily).

Device buffers are torch CUDA tensors; shapes are set per call; the profile is chosen per call (the first whose
ranges hold every input shape: prefill or decode); during decoding the KV outputs stay on the GPU and go back in as
the next step's inputs. The composer runs on the host (one small matmul per task, cached).

Streams: one CUDA stream per session. Every device allocation (inputs, outputs), every engine execution and every
gather of KV rows (rows that finished early leave the batch) is issued on it, so the caching allocator's
stream-ordered reuse of freed blocks is safe and a gather never reads a buffer TensorRT is still writing.

Memory: one execution context per engine, switched between its profiles (``set_optimization_profile_async``) —
contexts per profile would each allocate activation memory for the largest profile.

API use follows TensorRT 10's Python bindings (checked by tests/unit/test_rules.py against ``tensorrt_api.json``, taken
from the bindings' source): a version-compatible plan embeds the lean runtime, so the runtime must allow engine
host code before deserialising it; ``deserialize_cuda_engine`` returns None on failure, ``set_input_shape`` and
``execute_async_v3`` return False, ``get_tensor_shape`` has -1 for a dimension it cannot infer — each is an error
here, never a garbage result.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import numpy as np

from ..errors import InputError, TrtRuntimeError
from .causal import CausalSession
from .limits import BackendLimits
from .options import SessionOptions
from .seq2seq import Seq2SeqSession
from .trt.env import gpu_identity, import_tensorrt
from .trt.sidecar import EngineMismatchError, check_sidecar, read_sidecar


class TrtBackend:
    """The TensorRT half of a session (mixed with a model kind below): engines from ``options.engines``, device
    buffers as torch CUDA tensors, the decode state's keys/values kept on the GPU between steps."""

    def __init__(self, bundle, options: SessionOptions):
        super().__init__(bundle, options)  # the model kind's
        self._open_trt(bundle, options.engines)

    def _open_trt(self, bundle, engines_dir) -> None:
        trt = import_tensorrt()
        import torch

        self._torch = torch
        sidecar = read_sidecar(engines_dir)
        _, cc = gpu_identity()
        check_sidecar(sidecar, bundle, trt.__version__, cc)
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        if sidecar.get("version_compatible"):
            # the plan carries TensorRT's lean runtime (host code): loading it must be allowed explicitly — only
            # engines whose sidecar matched this bundle get here
            runtime.engine_host_code_allowed = True
        # the profiles' maxima, checked before anything runs (a shape outside them would fail mid-batch)
        self.limits = BackendLimits.from_dict(sidecar.get("limits"), f"the TensorRT engines in {engines_dir}",
                                              f"rebuild them with larger limits (mpt-export build {bundle.path} "
                                              "--max-batch/--max-input/--max-new-tokens)")
        self._stream = torch.cuda.Stream()
        self._lock = threading.RLock()  # one stream, one execution (or state edit) at a time
        self._trt = {}
        for graph, info in sidecar["engines"].items():
            path = Path(engines_dir) / info["file"]
            engine = runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise EngineMismatchError(
                    f"TensorRT {trt.__version__} could not load {path} (see its log above: a plan from another "
                    f"TensorRT version or GPU, or a damaged file); rebuild it with `mpt-export build {bundle.path}`")
            ctx = engine.create_execution_context()
            if ctx is None:
                raise TrtRuntimeError(f"TensorRT could not create an execution context for {path} (out of GPU "
                                      "memory?)")
            names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
            outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
            dtypes = {n: self._torch_dtype(trt, engine.get_tensor_dtype(n)) for n in names}
            self._trt[graph] = {"engine": engine, "context": ctx, "profile": None, "profiles": sidecar["profiles"][graph],
                                "outputs": outputs, "dtypes": dtypes}

    @staticmethod
    def _torch_dtype(trt, dt):
        import torch

        return {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                trt.int64: torch.int64, trt.int32: torch.int32, trt.bool: torch.bool}[dt]

    def _device(self, v, dtype):
        t = self._torch.as_tensor(v) if isinstance(v, np.ndarray) else v
        return t.to(device="cuda", dtype=dtype).contiguous()

    def _profile_for(self, graph, shapes) -> int:
        for i, prof in enumerate(self._trt[graph]["profiles"]):
            if all(all(lo <= d <= hi for d, lo, hi in zip(shapes[n], s["min"], s["max"]))
                   for n, s in prof["shapes"].items() if n in shapes):
                return i
        raise InputError(f"input shapes {shapes} fall outside every {graph} engine profile; rebuild with larger "
                         "--max-batch / --max-input / --max-new-tokens")

    def _execute(self, graph, feed):
        g = self._trt[graph]
        shapes = {k: list(v.shape) for k, v in feed.items()}
        index = self._profile_for(graph, shapes)
        torch = self._torch
        stream = self._stream
        keep = []
        with self._lock, torch.cuda.stream(stream):
            ctx = g["context"]
            if g["profile"] != index:
                try:  # the bindings raise on a refused switch (IExecutionContext::setOptimizationProfileAsync is false)
                    ok = ctx.set_optimization_profile_async(index, stream.cuda_stream)
                except Exception as e:  # TensorRT's own exception types
                    ok, why = False, f": {str(e).strip().splitlines()[0][:200]}" if str(e).strip() else ""
                else:
                    why = ""
                if not ok:
                    raise TrtRuntimeError(f"TensorRT refused to switch {graph} to profile {index}{why}")
                g["profile"] = index
            for name, v in feed.items():
                t = self._device(v, g["dtypes"][name])
                keep.append(t)
                if not ctx.set_input_shape(name, list(t.shape)):
                    raise TrtRuntimeError(f"TensorRT refused shape {list(t.shape)} for {graph} input {name} (profile "
                                          f"{g['profiles'][index]['name']}); rebuild with larger limits")
                # empty tensors (no prompt, no past) still need a valid address
                _address(ctx, graph, name, t.data_ptr() if t.numel() else self._dummy().data_ptr())
            outs = {}
            for name in g["outputs"]:
                shape = tuple(ctx.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise TrtRuntimeError(f"TensorRT cannot infer the shape of {graph} output {name} ({shape}) from the "
                                          "inputs given")
                o = torch.empty(shape, dtype=g["dtypes"][name], device="cuda")
                outs[name] = o
                _address(ctx, graph, name, o.data_ptr() if o.numel() else self._dummy().data_ptr())
            if not ctx.execute_async_v3(stream.cuda_stream):
                raise TrtRuntimeError(f"TensorRT failed to run {graph} (see its log above); the outputs are not used")
            stream.synchronize()
        return outs

    def _dummy(self):
        if getattr(self, "_dummy_buf", None) is None:
            with self._torch.cuda.stream(self._stream):
                self._dummy_buf = self._torch.empty(16, device="cuda")
        return self._dummy_buf

    def _run_graph_impl(self, graph, feed):
        if graph == "composer":  # shared_prompt ⊙ (task_cols @ task_rows), on the host
            return {"prompt_embeds": feed["shared_prompt"] * (feed["task_cols"] @ feed["task_rows"])}
        return {k: v.float().cpu().numpy() if v.dtype == self._torch.bfloat16 else v.cpu().numpy()
                for k, v in self._execute(graph, feed).items()}

    def _run_step_impl(self, graph, feed):
        out = self._execute(graph, feed)
        out["logits"] = out["logits"].float().cpu().numpy()
        return out  # KV stays on the GPU for the next step

    # -- decode state on the GPU (the engine's state operations, on the session's stream) -------------------------
    def take_rows(self, value, keep):
        """Rows that stay in the batch: gathered on the session's stream (ordered after the execution that wrote
        ``value``, and before any reuse of its memory)."""
        if isinstance(value, np.ndarray):
            return value[keep]
        torch = self._torch
        with self._lock, torch.cuda.stream(self._stream):
            idx = torch.as_tensor(np.flatnonzero(keep), device=value.device)
            return value.index_select(0, idx)

    def state_zeros(self, like, shape):
        if isinstance(like, np.ndarray):
            return np.zeros(shape, like.dtype)
        with self._torch.cuda.stream(self._stream):
            return self._torch.zeros(tuple(shape), dtype=like.dtype, device=like.device)

    @contextlib.contextmanager
    def state_edit(self):
        """Row copies between device buffers run on the session's stream, one at a time with its executions."""
        with self._lock, self._torch.cuda.stream(self._stream):
            yield


class TrtCausalSession(TrtBackend, CausalSession):
    """A decoder-only bundle on its TensorRT engines."""


class TrtSeq2SeqSession(TrtBackend, Seq2SeqSession):
    """An encoder-decoder bundle on its TensorRT engines."""


def trt_session(bundle, options: SessionOptions):
    """A session of the right kind for ``bundle`` over the TensorRT engines in ``options.engines``."""
    return (TrtSeq2SeqSession if bundle.info.seq2seq else TrtCausalSession)(bundle, options)


def _address(ctx, graph: str, name: str, ptr: int) -> None:
    """``set_tensor_address`` returns False for a name the engine lacks or a misaligned address: never run on it."""
    if not ctx.set_tensor_address(name, ptr):
        raise TrtRuntimeError(f"TensorRT refused the buffer for {graph} tensor {name} (unknown name or misaligned "
                              "address); rebuild the engines from this bundle with `mpt-export build`")

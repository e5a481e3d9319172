"""TensorRT backend behind the same Session interface (``tensorrt`` and torch's CUDA tensors, imported lazily).

Device buffers are torch CUDA tensors; shapes are set per call; the profile is chosen per call (the first whose
ranges hold every input shape: prefill or decode); during decoding the KV outputs stay on the GPU and go back in as
the next step's inputs. The composer runs on the host (one small matmul per task, cached).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..trt.env import gpu_identity, import_tensorrt
from ..trt.identity import check_sidecar, read_sidecar


class TrtBackend:
    def _open_trt(self, bundle, engines_dir) -> None:
        trt = import_tensorrt()
        import torch

        self._torch = torch
        sidecar = read_sidecar(engines_dir)
        _, cc = gpu_identity()
        check_sidecar(sidecar, bundle, trt.__version__, cc)
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        self._trt = {}
        for graph, info in sidecar["engines"].items():
            engine = runtime.deserialize_cuda_engine((Path(engines_dir) / info["file"]).read_bytes())
            contexts = []
            stream = torch.cuda.Stream()
            for i, prof in enumerate(sidecar["profiles"][graph]):
                ctx = engine.create_execution_context()
                ctx.set_optimization_profile_async(i, stream.cuda_stream)
                contexts.append((ctx, prof))
            names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
            outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
            dtypes = {n: self._torch_dtype(trt, engine.get_tensor_dtype(n)) for n in names}
            self._trt[graph] = {"engine": engine, "contexts": contexts, "outputs": outputs, "dtypes": dtypes,
                                "stream": stream, "lock": threading.Lock()}
        stream.synchronize()

    @staticmethod
    def _torch_dtype(trt, dt):
        import torch

        return {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                trt.int64: torch.int64, trt.int32: torch.int32, trt.bool: torch.bool}[dt]

    def _device(self, v, dtype):
        t = self._torch.as_tensor(v) if isinstance(v, np.ndarray) else v
        return t.to(device="cuda", dtype=dtype).contiguous()

    def _execute(self, graph, feed):
        g = self._trt[graph]
        shapes = {k: list(v.shape) for k, v in feed.items()}
        for ctx, prof in g["contexts"]:
            if all(all(lo <= d <= hi for d, lo, hi in zip(shapes[n], s["min"], s["max"]))
                   for n, s in prof["shapes"].items() if n in shapes):
                break
        else:
            raise InputError(f"input shapes {shapes} fall outside every {graph} engine profile; rebuild with larger "
                             "--max-batch / --max-input / --max-new-tokens")
        torch = self._torch
        keep = []
        with g["lock"], torch.cuda.stream(g["stream"]):
            for name, v in feed.items():
                t = self._device(v, g["dtypes"][name])
                keep.append(t)
                ctx.set_input_shape(name, list(t.shape))
                # empty tensors (no prompt, no past) still need a valid address
                ctx.set_tensor_address(name, t.data_ptr() if t.numel() else self._dummy(g).data_ptr())
            outs = {}
            for name in g["outputs"]:
                o = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=g["dtypes"][name], device="cuda")
                outs[name] = o
                ctx.set_tensor_address(name, o.data_ptr() if o.numel() else self._dummy(g).data_ptr())
            ctx.execute_async_v3(g["stream"].cuda_stream)
            g["stream"].synchronize()
        return outs

    def _dummy(self, g):
        if "dummy" not in g:
            g["dummy"] = self._torch.empty(16, device="cuda")
        return g["dummy"]

    def _run_graph_impl(self, graph, feed):
        if graph == "composer":  # shared_prompt ⊙ (task_cols @ task_rows), on the host
            return {"prompt_embeds": feed["shared_prompt"] * (feed["task_cols"] @ feed["task_rows"])}
        return {k: v.float().cpu().numpy() if v.dtype == self._torch.bfloat16 else v.cpu().numpy()
                for k, v in self._execute(graph, feed).items()}

    def _run_step_impl(self, graph, feed):
        out = self._execute(graph, feed)
        out["logits"] = out["logits"].float().cpu().numpy()
        return out  # KV stays on the GPU for the next step

    def _take_rows(self, value, keep):
        if isinstance(value, np.ndarray):
            return value[keep]
        return value[self._torch.as_tensor(np.flatnonzero(keep), device=value.device)]


def trt_session(bundle, engines_dir, **options):
    if bundle.task_type == "SEQ_2_SEQ_LM":
        from .seq2seq import Seq2SeqSession as Kind
    else:
        from .causal import CausalSession as Kind

    class TrtSession(TrtBackend, Kind):
        def __init__(self):
            Kind.__init__(self, bundle, **options)
            self._open_trt(bundle, engines_dir)

    return TrtSession()

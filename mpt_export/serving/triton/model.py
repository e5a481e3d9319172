"""Triton Python-backend model ``generate`` (copied into the model repository as ``<name>/1/model.py`` by
``mpt-export triton``). A thin adapter: the scheduler, batching across tasks, sampling and streaming live in
``mpt_export.serving.triton.generate`` (install mpt-export in the Python environment Triton's Python backend uses).

Decoupled: ``execute`` hands each request to the scheduler and returns at once; the scheduler's thread sends the
responses (one per token when ``stream`` is true) and flags the last one final. A request's final response and every
look at its cancellation happen under one lock: once the final response is sent, Python backend frees the request's
response factory, and the request is never touched again. Cancellation is polled every ``CANCEL_POLL_S`` (one IPC
round trip per request in flight each time). Graph calls run in this process
through ONNX Runtime (``graph_calls: onnxruntime``) or go to the repository's graph models through BLS (``bls``).
"""

import json
import os
import threading

import numpy as np
from mpt_export.errors import GenerationError
from mpt_export.serving.triton.generate import TritonGeneration
from mpt_export.serving.triton.writer import GEN_INPUTS

CANCEL_POLL_S = 0.5


class TritonPythonModel:
    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        self.inputs = [name for name, *_ in GEN_INPUTS]  # the inputs its config declares: one list

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        self.generation = TritonGeneration(
            os.path.join(version_dir, "bundle"), graph_calls=params.get("graph_calls", "onnxruntime"),
            bls=self._bls, models=json.loads(params.get("graph_models", "{}")) or None,
            max_batch=int(params.get("max_batch", "8")), max_queue=int(params.get("max_queue", "256")),
            provider=params.get("provider", "cpu"), engine_limits=json.loads(params.get("engine_limits", "{}")))
        # requests a client cancelled (or whose connection dropped) leave the batch at the next step
        self._inflight = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch_cancelled, daemon=True)
        self._watcher.start()

    def _watch_cancelled(self):
        while not self._stop.wait(CANCEL_POLL_S):
            self._check_cancelled()

    def _check_cancelled(self):
        # under the lock: no final response (after which the request is freed) is sent while a request is looked at
        with self._lock:
            for request, req in list(self._inflight.values()):
                if request.is_cancelled():
                    self.generation.cancel(req)

    def _bls(self, model_name, feed, output_names):
        pb = self.pb
        request = pb.InferenceRequest(
            model_name=model_name, inputs=[pb.Tensor(k, np.ascontiguousarray(v)) for k, v in feed.items()],
            requested_output_names=list(output_names),
            preferred_memory=pb.PreferredMemory(pb.TRITONSERVER_MEMORY_CPU, 0))  # outputs as numpy, not on a GPU
        response = request.exec()
        if response.has_error():
            raise GenerationError(f"{model_name}: {response.error().message()}")
        return {n: pb.get_output_tensor_by_name(response, n).as_numpy() for n in output_names}

    def execute(self, requests):
        pb = self.pb
        for request in requests:
            inputs = {}
            for name in self.inputs:
                tensor = pb.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    inputs[name] = tensor.as_numpy()
            sender = request.get_response_sender()

            def send(outputs, final, error, sender=sender, request=request):
                if error is not None:
                    response = pb.InferenceResponse(output_tensors=[], error=pb.TritonError(error))
                else:
                    response = pb.InferenceResponse(output_tensors=[pb.Tensor(k, v) for k, v in outputs.items()])
                if not final:
                    sender.send(response, flags=0)
                    return
                with self._lock:  # leaves the watcher's sight and is answered in one step
                    self._inflight.pop(id(request), None)
                    sender.send(response, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

            req = self.generation.submit(inputs, send)
            if req is not None:
                with self._lock:
                    self._inflight[id(request)] = (request, req)
                    if req.t_done is not None:  # it finished before it was recorded
                        self._inflight.pop(id(request), None)
        return None

    def finalize(self):
        self._stop.set()
        self.generation.close()

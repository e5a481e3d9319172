"""What the Triton Python-backend model ``generate`` runs: the continuous-batching scheduler of ``mpt-export serve``
over the bundle in its model directory, fed by Triton requests (their input tensors as numpy arrays) and answering
through a ``send(outputs, final, error)`` callback — so the ``model.py`` Triton loads is a thin adapter, and
everything here runs (and is tested) without Triton.

- Requests of every task join one running batch (rows with different past lengths merge through left-padded KV,
  mask and explicit positions — what Triton's dynamic batcher cannot do), each task's prompt KV cached.
- ``stream``: one response per generated token (``text_output``: the text that became final with it; the last
  response carries ``finish_reason`` and is flagged final), else one response with the whole text.
- Graph calls: ONNX Runtime in this process (default), or ``bls``: a callable ``(model_name, feed, output_names)
  -> outputs`` that the adapter implements with Triton's BLS (``pb_utils.InferenceRequest(...).exec()``), so the
  graphs run in Triton's graph models (ONNX Runtime or TensorRT plans).
"""

from __future__ import annotations

import numpy as np

from ...errors import InputError, MptExportError
from ...scheduler.batching import Scheduler
from ...scheduler.request import Request
from ...runtime.causal import CausalSession
from ...runtime.limits import BackendLimits
from ...runtime.seq2seq import Seq2SeqSession
from ...runtime.sampling import SamplingParams
from ...bundle.reader import load_bundle
from ...bundle.taskbank import name_list

# what the generate model does with the optional inputs a request leaves out — greedy, 16 new tokens, no seed, no
# stop string: declared once, here (docs/guides/triton.md lists them)
TRITON_DEFAULTS = SamplingParams(max_new_tokens=16, temperature=0.0)
DEFAULT_MAX_TOKENS = TRITON_DEFAULTS.max_new_tokens  # the name it had
# the generation settings Triton's inputs carry -> the SamplingParams field each sets
SETTINGS = {"max_tokens": "max_new_tokens", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
            "seed": "seed"}


def refuse_bf16(info, where) -> None:
    """Triton's Python backend hands tensors over as numpy arrays, and numpy has no bf16 (``as_numpy`` does not
    support BF16; ``np.dtype("bfloat16")`` exists only once ``ml_dtypes`` happens to be imported): neither in-process
    ONNX Runtime nor BLS calls can move a bf16 bundle's prompts and KV. ``info``: the bundle's typed manifest."""
    if info.dtype == "bfloat16":
        raise InputError(f"{where} is a bf16 bundle: Triton's Python backend moves tensors as numpy arrays, which have "
                         "no bf16; export the bundle with --dtype fp16 for Triton")


class BlsBackend:
    """Graph calls through ``call(model_name, feed, output_names)`` (Triton's BLS, so the graphs run in Triton's
    graph models), mixed with a model kind below: at most ``max_batch`` rows per call (the graph models'
    ``max_batch_size``) and, for TensorRT plans, their profiles' ``engine_limits`` — checked before a request runs."""

    def __init__(self, bundle, call, models: dict, max_batch: int | None = None, engine_limits: dict | None = None):
        refuse_bf16(bundle.info, bundle.path)
        super().__init__(bundle)  # the model kind's
        self._call, self._models = call, models
        graphs = bundle.info.graphs
        self._outputs = {g: spec.output_names for g, spec in graphs.items()}
        self._dtypes = {g: {i.name: np.dtype(i.dtype) for i in spec.inputs} for g, spec in graphs.items()}
        fix = "rebuild the engines and the repository with larger --max-batch/--max-input/--max-new-tokens"
        base = BackendLimits.from_dict(engine_limits, "the TensorRT plans of this Triton repository", fix) or \
            BackendLimits(source="the Triton graph models", fix="write the repository with a larger --max-batch")
        self.limits = base.tighter(max_batch=max_batch)

    def _run_graph_impl(self, graph, feed):
        feed = {k: np.ascontiguousarray(v, dtype=self._dtypes[graph][k]) for k, v in feed.items()}
        out = self._call(self._models[graph], feed, self._outputs[graph])
        missing = [n for n in self._outputs[graph] if n not in out]
        if missing:
            raise MptExportError(f"the Triton model {self._models[graph]} returned no {', '.join(missing)}")
        return out


class BlsCausalSession(BlsBackend, CausalSession):
    """A decoder-only bundle whose graphs run in Triton's graph models."""


class BlsSeq2SeqSession(BlsBackend, Seq2SeqSession):
    """An encoder-decoder bundle whose graphs run in Triton's graph models."""


def bls_session(bundle, call, models: dict, max_batch: int | None = None, engine_limits: dict | None = None):
    """A session of the bundle's kind whose graphs run through ``call`` (see :class:`BlsBackend`)."""
    kind = BlsSeq2SeqSession if bundle.info.seq2seq else BlsCausalSession
    return kind(bundle, call, models, max_batch, engine_limits)


def _first(inputs: dict, name: str, default=None):
    v = inputs.get(name)
    if v is None:
        return default
    a = np.asarray(v).reshape(-1)
    if a.size != 1:
        raise InputError(f"{name} must hold one value, got {a.size}")
    return a[0]


def _text(v, name: str) -> str:
    if isinstance(v, bytes):
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{name} is not valid UTF-8") from None
    if isinstance(v, str):
        return v
    raise InputError(f"{name} must be a string (TYPE_STRING), got {type(v).__name__}")


class TritonGeneration:
    """The scheduler behind the ``generate`` model. ``submit(inputs, send)`` per Triton request; ``close()`` at
    finalize."""

    def __init__(self, bundle_dir, graph_calls: str = "onnxruntime", bls=None, models: dict | None = None,
                 max_batch: int = 8, max_queue: int = 256, provider: str = "cpu", threads: int | None = None,
                 engine_limits: dict | None = None):
        self.bundle = load_bundle(bundle_dir)
        if graph_calls == "onnxruntime":
            self.session = self.bundle.session(provider=provider, intra_op_threads=threads)
        elif graph_calls == "bls":
            if bls is None:
                raise InputError("graph_calls 'bls' needs the BLS call (the Triton adapter gives it)")
            self.session = bls_session(self.bundle, bls, models or {g: g for g in self.bundle.info.graphs},
                                       max_batch=max_batch, engine_limits=engine_limits)
        else:
            raise InputError(f"graph_calls must be onnxruntime or bls, got {graph_calls!r}")
        self.tokenizer = self.session.tokenizer
        self.scheduler = Scheduler(self.session, max_batch=max_batch, max_queue=max_queue).start()

    def request(self, inputs: dict) -> tuple[Request, bool]:
        """Triton input tensors (numpy; strings as bytes) -> the scheduler request and whether to stream. Bad input
        raises InputError with the message for the client."""
        text = _text(_first(inputs, "text_input"), "text_input") if inputs.get("text_input") is not None else None
        task = _text(_first(inputs, "task"), "task") if inputs.get("task") is not None else None
        if not text:
            raise InputError("text_input is required: the prompt to continue")
        if not task:
            raise InputError(f"task is required; this model serves: {name_list(self.session.tasks)}")
        if task not in self.session.bank:
            raise InputError(f"unknown task {task!r}; this model serves: {name_list(self.session.tasks)}")
        req = Request(task=task, ids=self.tokenizer.encode(text, "text_input"), sampling=self.sampling(inputs))
        return req, bool(_first(inputs, "stream", False))

    @staticmethod
    def sampling(inputs: dict) -> SamplingParams:
        """The request's settings: :data:`TRITON_DEFAULTS` with those its inputs give (an error names the field)."""
        given = {field: _first(inputs, name) for name, field in SETTINGS.items() if inputs.get(name) is not None}
        stop = inputs.get("stop")
        if stop is not None:
            given["stop"] = [_text(s, "stop") for s in np.asarray(stop).reshape(-1)] or None
        return SamplingParams.of(TRITON_DEFAULTS, **given)

    def submit(self, inputs: dict, send) -> Request | None:
        """Queue one Triton request. ``send(outputs: dict | None, final: bool, error: str | None)`` is called from
        the scheduler thread with each response (the last one ``final``); a refused request gets one final error at
        once."""
        try:
            req, stream = self.request(inputs)
        except (MptExportError, ValueError, TypeError) as e:
            send(None, True, str(e))
            return None

        def on_event(kind, data):
            if kind == "token" and stream:
                ids = [] if data["token"] is None else [data["token"]]
                send(self._outputs(data["text"], ids, ""), False, None)
            elif kind == "done":
                if stream:
                    send(self._outputs("", [], data.finish_reason or ""), True, None)
                else:
                    ids = data.tokens[:-1] if data.finish == "eos" else data.tokens  # as streamed: EOS not included
                    send(self._outputs(data.text, ids, data.finish_reason or ""), True, None)
            elif kind == "error":
                send(None, True, f"generation failed: {data}")

        req.on_event = on_event
        try:
            self.scheduler.submit(req)
        except MptExportError as e:  # over-long, queue full, shutting down
            send(None, True, str(e))
            return None
        return req

    def cancel(self, req: Request) -> None:
        self.scheduler.cancel(req.id)

    @staticmethod
    def _outputs(text: str, ids, finish: str) -> dict:
        return {"text_output": np.array([text.encode("utf-8")], dtype=object),
                "output_ids": np.asarray(ids, np.int64).reshape(-1),
                "finish_reason": np.array([finish.encode("utf-8")], dtype=object)}

    def close(self, timeout: float = 30.0) -> None:
        self.scheduler.drain(timeout)
        self.scheduler.stop()
        self.session.close()
        self.bundle.close()

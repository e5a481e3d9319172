"""A backend's fixed maxima — rows per graph call, input tokens, new tokens — known when the session opens and
checked before a request runs (at admission in the serving engine), never discovered mid-batch.

ONNX Runtime's CPU and CUDA providers take any shape: their sessions have no such limits (only the model's
positions, checked separately). TensorRT engines (ours, or ONNX Runtime's TensorRT provider) run only the shapes
their optimization profiles were built for, and Triton's graph models take at most their ``max_batch_size`` rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError


@dataclass(frozen=True)
class BackendLimits:
    max_batch: int | None = None  # rows in one graph call
    max_input: int | None = None  # input tokens of one row (the encoder's, for seq2seq)
    max_new_tokens: int | None = None  # tokens generated for one row
    decoder_tokens: int | None = None  # decoder tokens one call takes (TensorRT's decoder profiles: 1)
    source: str = "this backend"  # who sets them, for messages: "the TensorRT engines in engines/demo"
    fix: str = "rebuild the engines with larger limits (mpt-export build --max-batch/--max-input/--max-new-tokens)"

    @classmethod
    def from_dict(cls, limits: dict | None, source: str, fix: str | None = None) -> "BackendLimits | None":
        """From an engine sidecar's / profile's ``limits`` ({max_batch, max_input, max_new_tokens, ...}): TensorRT
        profiles, whose seq2seq decoders take one token per call."""
        if not limits:
            return None
        pick = {k: int(limits[k]) for k in ("max_batch", "max_input", "max_new_tokens") if limits.get(k) is not None}
        return cls(**pick, decoder_tokens=1, source=source, **({"fix": fix} if fix else {}))

    def tighter(self, **maxima) -> "BackendLimits":
        """These limits with some maxima lowered (never raised), e.g. Triton's ``max_batch_size``."""
        now = {k: getattr(self, k) for k in ("max_batch", "max_input", "max_new_tokens")}
        for k, v in maxima.items():
            if v is not None:
                now[k] = v if now[k] is None else min(now[k], int(v))
        return BackendLimits(**now, decoder_tokens=self.decoder_tokens, source=self.source, fix=self.fix)

    def check_decoder_tokens(self, n: int) -> None:
        if self.decoder_tokens is not None and n > self.decoder_tokens:
            raise InputError(f"{n} decoder tokens in one call: {self.source} take {self.decoder_tokens} per call (their "
                             "decoder profiles are built for generation, one token per step); score several decoder "
                             "tokens with ONNX Runtime (--backend onnxruntime, provider cpu or cuda)")

    def check(self, batch: int | None = None, longest: int | None = None, new_tokens: int | None = None) -> None:
        """Raise InputError naming the limit that ``batch`` rows, ``longest`` input tokens or ``new_tokens`` exceed
        (its ``param``: the input at fault, ``input_ids`` or ``max_new_tokens``)."""
        if batch is not None and self.max_batch is not None and batch > self.max_batch:
            raise InputError(f"{batch} rows in one call exceed {self.source}: at most {self.max_batch} rows "
                             f"(max_batch); send fewer at once or {self.fix}", param="input_ids")
        if longest is not None and self.max_input is not None and longest > self.max_input:
            raise InputError(f"input of {longest} tokens is too long for {self.source}: at most {self.max_input} "
                             f"input tokens (max_input); shorten the prompt or {self.fix}", param="input_ids")
        if new_tokens is not None and self.max_new_tokens is not None and new_tokens > self.max_new_tokens:
            raise InputError(f"{new_tokens} new tokens (max_tokens) are more than {self.source} can generate: at most "
                             f"{self.max_new_tokens} new tokens (max_new_tokens); ask for fewer or {self.fix}",
                             param="max_new_tokens")

"""What an export is told, as one typed object from the command line (or ``export_bundle``'s keywords) to where
each value is used: checked once here, the precision canonicalised once (``fp16`` -> ``float16``)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import OptionError
from ..runtime.options import is_cpu_provider
from .backbone import DEFAULT_OPSET
from .precision import canonical_dtype, tolerance
from .quantize import QuantizeOptions


@dataclass(frozen=True)
class ExportOptions:
    opset: int = DEFAULT_OPSET  # >= 18 (torch's dynamo exporter)
    dtype: str = "float32"  # the graphs' precision: fp32/fp16/bf16 accepted, kept as float32/float16/bfloat16
    atol: float | None = None  # validation: max|a-b| <= atol + rtol * max|ref| (None: the dtype's default)
    rtol: float | None = None
    validate: bool = True  # compare the bundle with PEFT before it is written
    quantize: str | None = None  # int8, int4 (weight-only) or int8-dynamic: an fp32 export, then its quantized copy
    min_agreement: float | None = None  # quantized: greedy-token agreement with fp32 required (scheme's default)
    block_size: int | None = None  # weight-only quantization: rows per scale (default 32)
    accuracy_level: int | None = None  # weight-only quantization: MatMulNBits' accuracy_level
    force: bool = False  # replace a bundle this tool wrote
    seed: int | None = None  # validation inputs
    provider: str = "cpu"  # ONNX Runtime provider for validation
    isolate: bool | None = None  # the torch phase in a child process (None: for large weights)
    fast_graph: bool = True  # also write the fused ONNX Runtime backbone where the model allows it
    revision: str | None = None  # a Hugging Face Hub base model: the branch, tag or commit to read

    def __post_init__(self):
        if isinstance(self.opset, bool) or not isinstance(self.opset, int) or self.opset < 18:
            raise OptionError(f"--opset must be an integer >= 18 (torch's dynamo exporter writes 18 and later), got "
                              f"{self.opset!r}", param="opset")
        if self.min_agreement is not None and not 0 <= self.min_agreement <= 1:
            raise OptionError(f"--min-agreement must be in [0, 1], got {self.min_agreement}", param="min_agreement")
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        self.tolerance  # noqa: B018 - --atol/--rtol checked now, not after the graphs are exported
        if self.quantize is None and (self.block_size is not None or self.accuracy_level is not None
                                      or self.min_agreement is not None):
            raise OptionError("--block-size, --accuracy-level and --min-agreement go with --quantize int8|int4",
                              param="quantize")
        if self.quantize is not None:
            self.quantization  # noqa: B018 - the scheme and its options checked now
            if self.dtype != "float32":
                raise OptionError(f"--quantize {self.quantize} starts from fp32 weights; drop --dtype or quantize an "
                                  "fp32 bundle", param="dtype")
        elif self.dtype == "bfloat16" and self.validate and is_cpu_provider(self.provider):
            raise OptionError(
                "bf16 graphs cannot be validated on ONNX Runtime's CPU provider (it has no bf16 kernels); validate on "
                "a GPU provider (--provider cuda) or pass --no-validate and check the engine with `mpt-export verify` "
                "there", param="provider")

    @property
    def quantization(self):
        """The quantization this export ends with (``--quantize``), or None."""
        if self.quantize is None:
            return None
        return QuantizeOptions(scheme=self.quantize, block_size=self.block_size, accuracy_level=self.accuracy_level,
                               min_agreement=self.min_agreement)

    @property
    def tolerance(self) -> dict:
        return tolerance(self.dtype, self.atol, self.rtol)

    def unquantized(self) -> "ExportOptions":
        """The fp32 export a ``--quantize`` export starts from: the same options without the quantization's."""
        return self.with_(quantize=None, min_agreement=None, block_size=None, accuracy_level=None)

    def with_(self, **changes) -> "ExportOptions":
        return replace(self, **changes)

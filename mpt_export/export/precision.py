"""Half-precision exports (``--dtype fp16|bf16``) with the numerically fragile parts kept in fp32.

TensorRT 11 builds strongly typed networks (no fp16 builder flag), so the precision must be in the ONNX graph itself.
Weights and activations go to half precision except:

- normalisation layers (LayerNorm, RMSNorm, T5LayerNorm): parameters stay fp32, the input is cast up and the output
  cast back, so mean/variance accumulate in fp32;
- softmax: computed in fp32 and cast back (Llama/Qwen2 already do this; GPT-2 and T5's eager attention do not, so
  ``torch.nn.functional.softmax`` is upcast while the graph is traced);
- the logits output is fp32 (the LM head runs in half, its result is cast once).

The composer stays fp32; the runtime casts each composed prompt to the graph's dtype once and caches it.
"""

from __future__ import annotations

from contextlib import contextmanager
from ..errors import ExportError, InputError

DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16", "bf16": "bfloat16",
          "bfloat16": "bfloat16"}
# Default validation tolerance per dtype: an output passes when max|a - b| <= atol + rtol * max|ref| (see
# export/validate.py). Chosen from benchmarks/tolerance_study.py (worst output's max|a-b| / max|ref|, tiny models of
# every supported family, T5 also with activations scaled x10 as real checkpoints have them):
#   fp32 healthy 2e-7 .. 3.8e-6; planted (one mid-depth k/v projection x1.01) 9.9e-3 .. 1.1e-2, o-projection
#        x1.01 7.3e-4 .. 6e-3  ->  rtol 1e-4: 25x above the worst healthy case (room for 1B-7B models, whose
#        error grows with depth and width), 7x below the weakest planted o-projection error.
#   fp16 healthy 6e-4 .. 8.7e-3; planted (x1.10) k/v 9.1e-2 .. 9.7e-2  ->  rtol 3e-2.
#   bf16 cannot run on ONNX Runtime's CPU provider: 8 mantissa bits to fp16's 11, so ~8x fp16's error  ->  6e-2.
# atol only matters for outputs that are all near zero.
DEFAULT_TOL = {"float32": {"atol": 1e-5, "rtol": 1e-4}, "float16": {"atol": 1e-3, "rtol": 3e-2},
               "bfloat16": {"atol": 1e-2, "rtol": 6e-2}}


def tolerance(dtype: str, atol: float | None = None, rtol: float | None = None) -> dict:
    """The validation tolerance for a bundle dtype, with the user's ``atol`` / ``rtol`` taking precedence."""
    tol = dict(DEFAULT_TOL[canonical_dtype(dtype)])
    for key, v in (("atol", atol), ("rtol", rtol)):
        if v is not None:
            v = float(v)
            if not v >= 0 or v == float("inf"):
                raise InputError(f"--{key} must be a finite number >= 0, got {v}")
            tol[key] = v
    return tol


def canonical_dtype(name: str) -> str:
    key = str(name).lower()
    if key not in DTYPES:
        raise InputError(f"unknown dtype {name!r}; choose one of fp32, fp16, bf16")
    return DTYPES[key]


def to_half(model, dtype: str):
    """Cast ``model`` to ``dtype`` in place, keeping normalisation layers in fp32 behind casts."""
    import torch

    tdtype = getattr(torch, dtype)

    class Fp32Norm(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner.float()

        def forward(self, x):
            return self.inner(x.float()).to(x.dtype)

    norms = []
    for name, mod in model.named_modules():
        cls = type(mod).__name__
        if cls.endswith(("LayerNorm", "RMSNorm")) and not isinstance(mod, Fp32Norm):
            norms.append(name)
    # rotary frequency tables stay fp32 as transformers computes them (they also meet fp32 tensors: long-rope's
    # long factors are a plain attribute that .to() leaves alone, and the exporter refuses the mixed where())
    rotary = [(mod, n, buf.detach().clone()) for mod in model.modules()
              for n, buf in mod.named_buffers(recurse=False) if n.endswith("inv_freq")]
    model.to(tdtype)
    for mod, n, buf in rotary:
        mod._buffers[n] = buf
    for name in norms:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, Fp32Norm(getattr(parent, attr)))
    return model


@contextmanager
def fp32_softmax():
    """While tracing: softmax over half inputs runs in fp32 and is cast back."""
    import torch

    orig = torch.nn.functional.softmax

    def softmax(x, dim=None, _stacklevel=3, dtype=None):
        if dtype is None and x.dtype in (torch.float16, torch.bfloat16):
            return orig(x, dim=dim, dtype=torch.float32).to(x.dtype)
        return orig(x, dim=dim, _stacklevel=_stacklevel, dtype=dtype)

    torch.nn.functional.softmax = softmax
    try:
        yield
    finally:
        torch.nn.functional.softmax = orig


def graph_dtype(embedding, dtype: str, what: str):
    """The torch dtype the graphs are written in: the export's ``dtype`` (canonical name), which the loaded token
    embedding must already have — the graph writer is told the precision, it never guesses it from the weights."""
    import torch

    want = getattr(torch, dtype)
    have = embedding.weight.dtype
    if have != want:
        raise ExportError(f"{what}: the model's weights are {str(have).replace('torch.', '')} but the export asked for "
                          f"{dtype}; load the model in the export dtype first")
    return want

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

DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16", "bf16": "bfloat16",
          "bfloat16": "bfloat16"}
# Default validation tolerance (max abs diff against PEFT in fp32) per dtype.
DEFAULT_ATOL = {"float32": 1e-4, "float16": 5e-2, "bfloat16": 3e-1}


def canonical_dtype(name: str) -> str:
    from ..errors import InputError

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
    model.to(tdtype)
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

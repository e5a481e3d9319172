"""torch -> ONNX for the frozen causal backbone.

The wrapper takes prompt embeddings as a graph input, so one graph (and later one TensorRT engine) serves every task:

    inputs_embeds = cat(prompt_embeds, embed_tokens(input_ids))          # (B, P+S, H)
    hidden        = decoder(inputs_embeds, attention_mask, position_ids, cache=past)
    logits        = lm_head(hidden[:, -1])                               # (B, V): last position only

Exported with the dynamo exporter (the supported one; it stores a tied LM head once) with eager attention, because
SDPA with a dynamic query length does not export. Example sizes are >= 2 on every dynamic axis so that nothing
specialises on 0/1; lengths 0 (no prompt, no past) work in the resulting graph and are tested.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

from ..source.archs import CausalArch
from ..errors import ExportError

DEFAULT_OPSET = 18


def backbone_io(arch: CausalArch, dtype: str = "float32") -> dict:
    L, kv, hd, H = arch.num_layers, arch.num_kv_heads, arch.head_dim, arch.hidden_size
    inputs = [
        {"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
        {"name": "prompt_embeds", "dtype": dtype, "shape": ["batch", "prompt_len", H]},
        {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "total_len"]},
        {"name": "position_ids", "dtype": "int64", "shape": ["batch", "prompt_len + seq"]},
    ]
    outputs = [{"name": "logits", "dtype": "float32", "shape": ["batch", arch.vocab_size]}]
    for i in range(L):
        for kind in ("key", "value"):
            inputs.append({"name": f"past_key_values.{i}.{kind}", "dtype": dtype, "shape": ["batch", kv, "past_len", hd]})
            outputs.append({"name": f"present.{i}.{kind}", "dtype": dtype, "shape": ["batch", kv, "total_len", hd]})
    return {"inputs": inputs, "outputs": outputs}


def _make_wrapper(model, arch: CausalArch):
    import torch
    from transformers.cache_utils import DynamicCache

    decoder = arch.decoder(model)
    embed = arch.embed_tokens(model)
    lm_head = arch.lm_head(model)
    L = arch.num_layers
    # transformers 5.24 renamed past_key_values= to cache=; support both.
    cache_kw = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"

    class CausalBackbone(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, prompt_embeds, attention_mask, position_ids, past):
            embeds = torch.cat([prompt_embeds.to(embed.weight.dtype), embed(input_ids)], dim=1)  # (B, P+S, H)
            # No config: plain full-length layers, so present = past + new for every layer.
            cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(L)])
            out = decoder(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=True, **{cache_kw: cache})
            logits = lm_head(out.last_hidden_state[:, -1, :]).float()  # (B, V)
            cache = getattr(out, "cache", None) or out.past_key_values
            present = []
            for i in range(L):
                present += [cache.layers[i].keys, cache.layers[i].values]  # (B, KV, past+P+S, Dh)
            return (logits, *present)

    return CausalBackbone().eval()


def export_backbone(model, arch: CausalArch, path: str | Path, opset: int = DEFAULT_OPSET,
                    dtype: str = "float32") -> dict:
    """Export ``model`` (a HF *ForCausalLM in eval mode, eager attention) to ``path`` (+ ``path.data``).

    Returns the I/O spec and the opset actually written."""
    import onnx
    import torch

    from .precision import fp32_softmax, graph_dtype

    path = Path(path)
    io = backbone_io(arch, dtype=dtype)
    dtype = graph_dtype(arch.embed_tokens(model), dtype, "backbone export")
    wrapper = _make_wrapper(model, arch)
    L, kv, hd, H = arch.num_layers, arch.num_kv_heads, arch.head_dim, arch.hidden_size
    B, S, P, PL = 2, 3, 4, 5  # every dynamic size >= 2 so none is specialised
    ids = torch.randint(0, arch.vocab_size, (B, S))
    prompt = torch.randn(B, P, H, dtype=dtype)
    mask = torch.ones(B, PL + P + S, dtype=torch.long)
    pos = torch.arange(PL, PL + P + S).expand(B, -1).contiguous()
    past = [torch.zeros(B, kv, PL, hd, dtype=dtype) for _ in range(2 * L)]
    dyn = {
        "input_ids": {0: "batch", 1: "seq"},
        "prompt_embeds": {0: "batch", 1: "prompt_len"},
        "attention_mask": {0: "batch", 1: "total_len"},
        "position_ids": {0: "batch", 1: "pos_len"},
        "past": [{0: "batch", 2: "past_len"}] * (2 * L),
    }
    names_in = [s["name"] for s in io["inputs"]]
    names_out = [s["name"] for s in io["outputs"]]
    try:
        with warnings.catch_warnings(), torch.no_grad(), fp32_softmax():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper, (ids, prompt, mask, pos, past), str(path), dynamo=True, input_names=names_in,
                output_names=names_out, dynamic_shapes=dyn, opset_version=opset, external_data=True, verbose=False,
            )
    except Exception as e:  # the exporter raises many types; report one
        raise ExportError(
            f"torch.onnx.export failed for {arch.name} ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
            "this model's code may not be exportable with this transformers release"
        ) from e
    _set_dim_names(path, io)
    written = onnx.load(str(path), load_external_data=False)
    real_opset = next(o.version for o in written.opset_import if o.domain in ("", "ai.onnx"))
    return {**io, "opset": int(real_opset)}


def _set_dim_names(path: Path, io: dict) -> None:
    """The exporter names derived axes by expression, in arbitrary term order ('prompt_len + past_len + seq');
    rewrite every graph input/output to the contract's names."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    specs = {s["name"]: s["shape"] for s in io["inputs"] + io["outputs"]}
    for vi in list(model.graph.input) + list(model.graph.output):
        shape = specs.get(vi.name)
        if shape is None:
            raise ExportError(f"exported graph has unexpected I/O {vi.name!r}; expected {sorted(specs)}")
        for dim, want in zip(vi.type.tensor_type.shape.dim, shape):
            if isinstance(want, str):
                dim.dim_param = want
            else:
                dim.dim_value = want
    onnx.save(model, str(path), save_as_external_data=False)

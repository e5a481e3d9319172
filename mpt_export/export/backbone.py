"""torch -> ONNX for the frozen causal backbone.

The wrapper takes prompt embeddings as a graph input, so one graph (and later one TensorRT engine) serves every task:

    inputs_embeds = cat(prompt_embeds, embed_tokens(input_ids))          # (B, P+S, H)
    hidden        = decoder(inputs_embeds, mask, position_ids, cache=past)
    logits        = family_logits(lm_head(hidden[:, -1]))                # (B, V): last position only

``mask`` is the 2-D attention mask, or — for a family with sliding windows — additive masks built from positions
(:func:`position_masks`), since a mixed batch's rows have holes between prompt and text. ``family_logits`` is what
the family's ``*ForCausalLM`` does after its head (``CausalArch.logits``: Granite's scaling, Gemma 2's soft-cap).
Every family's own layers (norms, q/k norms, partial rotary, NoPE, ALiBi, multipliers) are its transformers code,
traced; a model that cannot run this way is refused by a probe call before tracing (:func:`_probe`).

Exported with the dynamo exporter (the supported one; it stores a tied LM head once) with eager attention, because
SDPA with a dynamic query length does not export. Example sizes are >= 2 on every dynamic axis so that nothing
specialises on 0/1; lengths 0 (no prompt, no past) work in the resulting graph and are tested.
"""

from __future__ import annotations

import inspect
import re
import warnings
from contextlib import contextmanager
from pathlib import Path

from ..source.archs import CausalArch, window_of
from ..errors import BaseModelError, ExportError
from .precision import fp32_softmax, graph_dtype

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


def cache_keyword(forward) -> str:
    """The keyword a transformers forward takes its cache by (5.24 renamed ``past_key_values=`` to ``cache=``)."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def position_masks(attention_mask, position_ids, window: int, dtype):
    """Additive (B, 1, Q, T) masks for the new tokens, by *position* rather than cache slot: ``full`` (causal +
    padding) and ``sliding`` (also ``q_pos - k_pos < window``). A row of a mixed batch has holes between its task
    prompt and its text (each part left-padded), so slot distances are not token distances; a key's position is the
    number of real tokens before it (``cumsum(mask) - 1``, the runtime's rule), a query's is its ``position_ids``."""
    import torch

    T, Q = attention_mask.shape[1], position_ids.shape[1]
    k_pos = attention_mask.cumsum(-1) - 1  # (B, T)
    k_idx = torch.arange(T, device=attention_mask.device)
    q_idx = k_idx[T - Q:]  # (Q,): the new tokens are the last Q slots
    valid = (k_idx[None, :] <= q_idx[:, None])[None] & (attention_mask[:, None, :] == 1)  # (B, Q, T)
    near = (position_ids[:, :, None] - k_pos[:, None, :]) < window  # (B, Q, T)
    low = torch.finfo(dtype).min
    zero = torch.zeros((), dtype=dtype)
    full = torch.where(valid, zero, low)[:, None]  # (B, 1, Q, T)
    sliding = torch.where(valid & near, zero, low)[:, None]
    return full, sliding


def _takes_mask_dict(module) -> bool:
    """Whether a decoder stack takes per-layer-type masks (``{"full_attention": …, "sliding_attention": …}``)."""
    src = inspect.getsource(type(module).forward)
    return "attention_mask, dict)" in src


def _make_wrapper(model, arch: CausalArch):
    """The decoder stack over ``cat(prompt, embed(ids))``, the last position gathered, then the LM head and the
    family's logit transforms (:meth:`CausalArch.logits`: multipliers, soft-caps) — the head runs on one position
    only, and the scoring graph (``scoring.py``) clones that chain over every position."""
    import torch
    from transformers.cache_utils import DynamicCache

    decoder = arch.decoder(model)
    embed = arch.embed_tokens(model)
    lm_head = arch.lm_head(model)
    L = arch.num_layers
    cache_kw = cache_keyword(decoder.forward)
    takes_positions = "position_ids" in inspect.signature(decoder.forward).parameters
    window, mixed = window_of(model.config)
    if window is not None:
        as_dict = _takes_mask_dict(decoder)
        if mixed and not as_dict:
            raise ExportError(f"{arch.name}: layers with and without a sliding window, and a decoder that takes one "
                              "mask for all of them; this family is not supported yet")

    class CausalBackbone(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, prompt_embeds, attention_mask, position_ids, past):
            embeds = torch.cat([prompt_embeds.to(embed.weight.dtype), embed(input_ids)], dim=1)  # (B, P+S, H)
            # No config: plain full-length layers, so present = past + new for every layer (a sliding window is a
            # mask here, never a shorter cache).
            cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(L)])
            mask = attention_mask
            if window is not None:
                full, sliding = position_masks(attention_mask, position_ids, window, embeds.dtype)
                mask = {"full_attention": full, "sliding_attention": sliding} if as_dict else sliding
            kwargs = {"position_ids": position_ids} if takes_positions else {}
            out = decoder(inputs_embeds=embeds, attention_mask=mask, use_cache=True, **kwargs, **{cache_kw: cache})
            logits = arch.logits(lm_head(out.last_hidden_state[:, -1, :])).float()  # (B, V)
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
    _probe(wrapper, arch, (ids, prompt, mask, pos, past), (B, kv, PL + P + S, hd))
    try:
        with warnings.catch_warnings(), torch.no_grad(), fp32_softmax(), _dynamic_rope_unscaled(model):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper, (ids, prompt, mask, pos, past), str(path), dynamo=True, input_names=names_in,
                output_names=names_out, dynamic_shapes=dyn, opset_version=opset, external_data=True, verbose=False,
            )
    except Exception as e:  # the exporter raises many types; report one
        first = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines()[0][:300]
        raise ExportError(
            f"torch.onnx.export failed for {_family_name(arch)} ({type(e).__name__}: {first}); "
            "this model's code may not be exportable with this transformers release"
        ) from e
    _reset_rotary_state(model)
    _set_dim_names(path, io)
    if dtype == torch.float32:
        _bf16_arithmetic_in_fp32(path)
    written = onnx.load(str(path), load_external_data=False)
    real_opset = next(o.version for o in written.opset_import if o.domain in ("", "ai.onnx"))
    return {**io, "opset": int(real_opset)}


def _family_name(arch) -> str:
    mt = arch.config.get("model_type")
    return f"{arch.family} ({mt})" if arch.listed else f"model type {mt!r} (not a listed family, tried generically)"


def _probe(wrapper, arch, inputs, kv_shape) -> None:
    """One eager call before tracing: a model that cannot run our way (inputs_embeds, a mask, positions, a key/value
    cache) or whose cache is not laid out as its config says is refused in one line naming what is missing."""
    import torch

    what = _family_name(arch)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outs = wrapper(*inputs)
    except Exception as e:  # noqa: BLE001 - the model's own code raises anything
        raise BaseModelError(
            f"{what} cannot be exported: its forward does not run on prompt embeddings, an attention mask, position ids "
            f"and a key/value cache ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
            "expected an attention-based causal LM (see the supported models page)"
        ) from None
    present = outs[1]
    if tuple(present.shape) != tuple(kv_shape):
        raise BaseModelError(
            f"{what} cannot be exported: its key/value cache is laid out as {tuple(present.shape)}, expected "
            f"(batch, kv heads, length, head size) = {tuple(kv_shape)} from its config.json"
        )


@contextmanager
def _dynamic_rope_unscaled(model):
    """Dynamic NTK rope rescales only past ``max_position_embeddings`` (transformers: "if seq_len <=
    max_position_embeddings, this factor has no effect"), and a bundle never runs past that limit (the runtime checks
    it at admission); the data-dependent test that decides it cannot be traced. So while exporting, such rotary
    modules run their undecorated forward: the frequencies they use below the limit."""
    patched = []
    for module in model.modules():
        inner = getattr(type(module).forward, "__wrapped__", None)
        if getattr(module, "rope_type", None) == "dynamic" and inner is not None:
            module.forward = inner.__get__(module)
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


BF16_OPS = ("Mul", "Add", "Sub", "Div")


def _bf16_arithmetic_in_fp32(path: Path) -> None:
    """Some families compute a piece in bfloat16 inside an fp32 model (Falcon's ALiBi slopes × positions, as it was
    trained); ONNX Runtime's CPU kernels have no bfloat16 arithmetic. Each such node computes in fp32 and rounds its
    result to bfloat16: for a product of two bfloat16 values that is bit-exact (the fp32 product is exact)."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path), load_external_data=False)
    bf16 = TensorProto.BFLOAT16
    if not any(n.op_type == "Cast" and any(a.name == "to" and a.i == bf16 for a in n.attribute) for n in model.graph.node) \
            and not any(t.data_type == bf16 for t in model.graph.initializer):
        return  # nothing in bfloat16 (every family but a few): no shape inference over the graph
    typed = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(typed.graph.value_info) + list(typed.graph.input) + list(typed.graph.output)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    nodes, changed = [], 0
    for n in model.graph.node:
        if n.op_type in BF16_OPS and n.domain in ("", "ai.onnx") and types.get(n.output[0]) == TensorProto.BFLOAT16:
            ins = []
            for j, name in enumerate(n.input):
                ins.append(f"{n.output[0]}_in{j}_fp32")
                nodes.append(helper.make_node("Cast", [name], [ins[-1]], to=TensorProto.FLOAT,
                                              name=f"{n.name}_in{j}_fp32"))
            nodes.append(helper.make_node(n.op_type, ins, [f"{n.output[0]}_fp32"], name=f"{n.name}_fp32"))
            nodes.append(helper.make_node("Cast", [f"{n.output[0]}_fp32"], [n.output[0]], to=TensorProto.BFLOAT16,
                                          name=n.name))
            changed += 1
        else:
            nodes.append(n)
    if changed:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        onnx.save(model, str(path), save_as_external_data=False)


def _reset_rotary_state(model) -> None:
    """transformers' longrope keeps the long-context frequencies it computed on the first call as a plain attribute
    (and writes the chosen set into ``inv_freq``): under the exporter those were tracing values. Drop them, so the
    model computes PEFT's reference from its own frequencies."""
    import torch

    with torch.no_grad():
        for module in model.modules():
            for name in list(vars(module)):
                if name.endswith("long_inv_freq"):
                    setattr(module, name, None)
            for name, buf in list(module.named_buffers(recurse=False)):
                if not name.endswith("inv_freq"):
                    continue
                for candidate in (f"original_{name}", name.replace("inv_freq", "original_inv_freq")):
                    original = getattr(module, candidate, None)
                    if isinstance(original, torch.Tensor) and original.shape == buf.shape:
                        buf.copy_(original)
                        break


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

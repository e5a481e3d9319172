"""The fast backbone for ONNX Runtime (Llama family: Llama, Mistral, Qwen2), written from the model's weights with
``onnx.helper`` — no tracing. ONNX Runtime's fused contrib ops: ``GroupQueryAttention`` (rotary inside) reading and
writing one preallocated KV buffer per layer in place, ``SkipSimplifiedLayerNormalization`` (residual add + RMS norm),
one packed q/k/v projection: 11 nodes per layer (12 with Qwen2's biases) where the traced graph has ~60, and no
``concat(past, new)`` reallocated every step.

Cache layout (GroupQueryAttention's, not the plain graph's left-padded one): sequence b's keys/values start at slot 0
of row b of a ``(B, KV, capacity, Dh)`` buffer, with no padding inside, so a token's position is its slot (a task
prompt at 0..P-1, the text from P — the positions the plain graph gives too).

One call runs a chunk of new rows per sequence: ``prompt_embeds`` rows (a task prompt) then ``input_ids`` rows. For
a sequence with ``past`` cached slots and ``n`` new rows: ``seqlens_k = past + n - 1``, ``last_index = n - 1``.
GroupQueryAttention takes several new rows over a cache for one sequence per call, or one new row for many
(``runtime/fastkv.py`` calls it so); its ``query_seqlens`` input would allow ragged batched chunks but slows every
decode step (~10% at batch 1 on onnxruntime 1.32, measured), so the graph leaves it out.

Inputs: input_ids (B, S) int64; prompt_embeds (B, P, H); seqlens_k (B,) int32; total_sequence_length () int32
(max(seqlens_k) + 1); last_index (B,) int64; past_key.{i} / past_value.{i} (B, KV, capacity, Dh).
Outputs: logits (B, V) float32 at each sequence's last real row only (ONNX Runtime runs every node of a graph
whatever is fetched, so an all-rows (B, S, V) output would cost a second LM head on every step); present_key.{i} /
present_value.{i}, to be bound to the same buffers as the past ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ExportError

FAST_TYPES = ("llama", "mistral", "qwen2")


def fast_io(arch, dtype: str = "float32") -> dict:
    """The fast graph's inputs and outputs (names, dtypes, shapes), as the manifest records graphs."""
    L, kv, hd, H = arch.num_layers, arch.num_kv_heads, arch.head_dim, arch.hidden_size
    cache = [{"name": f"past_{k}.{i}", "dtype": dtype, "shape": ["batch", kv, "capacity", hd]}
             for i in range(L) for k in ("key", "value")]
    return {
        "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
                   {"name": "prompt_embeds", "dtype": dtype, "shape": ["batch", "prompt_len", H]},
                   {"name": "seqlens_k", "dtype": "int32", "shape": ["batch"]},
                   {"name": "total_sequence_length", "dtype": "int32", "shape": []},
                   {"name": "last_index", "dtype": "int64", "shape": ["batch"]}] + cache,
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", arch.vocab_size]}]
        + [dict(c, name=c["name"].replace("past_", "present_")) for c in cache],
    }


def _checked(model, arch) -> tuple:
    """What the fast graph cannot express is refused here, by name. -> (rotary cos, sin) as float64 tables."""
    cfg = model.config
    if cfg.model_type not in FAST_TYPES:
        raise ExportError(f"no fast graph for model type {cfg.model_type!r} (it covers {', '.join(FAST_TYPES)})")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ExportError(f"fast graph: activation {cfg.hidden_act!r} (only silu)")
    window = getattr(cfg, "sliding_window", None)
    if window is not None and getattr(cfg, "use_sliding_window", True) and window < arch.max_positions:
        raise ExportError(f"fast graph: sliding-window attention ({window} < {arch.max_positions} positions)")
    if arch.head_dim % 16:
        raise ExportError(f"fast graph: head size {arch.head_dim} (ONNX Runtime's GroupQueryAttention needs a multiple "
                          "of 16)")
    rot = model.model.rotary_emb
    if "dynamic" in str(getattr(rot, "rope_type", "default")):
        raise ExportError(f"fast graph: rotary type {rot.rope_type!r} changes with the sequence length")
    inv = rot.inv_freq.detach().double().numpy()
    if 2 * inv.shape[0] != arch.head_dim:
        raise ExportError("fast graph: partial rotary embeddings")
    angles = np.arange(arch.max_positions, dtype=np.float64)[:, None] * inv[None]
    scale = float(getattr(rot, "attention_scaling", 1.0))
    return np.cos(angles) * scale, np.sin(angles) * scale


class _Writer:
    """Nodes and initializers of one graph, in the graph's dtype."""

    def __init__(self, dtype: np.dtype):
        self.dtype, self.nodes, self.inits = dtype, [], []

    def weight(self, name: str, value) -> str:
        from onnx import numpy_helper

        a = value.detach().float().numpy() if hasattr(value, "detach") else np.asarray(value)
        if a.dtype.kind == "f":
            a = a.astype(self.dtype)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(a), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], ms: bool = False, **attrs) -> list[str]:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, outputs, name=f"{op}_{len(self.nodes)}",
                                           domain="com.microsoft" if ms else "", **attrs))
        return outputs


def _layer(w: _Writer, i: int, layer, x: str, resid: str | None, arch, eps: float) -> tuple[str, str]:
    """One decoder layer: -> (its MLP output, the residual stream before it)."""
    import torch

    a, mlp = layer.self_attn, layer.mlp
    ln1 = w.weight(f"layers.{i}.input_layernorm", layer.input_layernorm.weight)
    if resid is None:
        w.node("SimplifiedLayerNormalization", [x, ln1], [f"h.{i}"], axis=-1, epsilon=eps)
        resid = x
    else:
        w.node("SkipSimplifiedLayerNormalization", [x, resid, ln1], [f"h.{i}", "", "", f"resid.{i}"], ms=True,
               epsilon=eps)
        resid = f"resid.{i}"
    qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], 0).T
    (q,) = w.node("MatMul", [f"h.{i}", w.weight(f"layers.{i}.qkv", qkv)], [f"qkv.{i}"])
    if a.q_proj.bias is not None:
        bias = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
        (q,) = w.node("Add", [q, w.weight(f"layers.{i}.qkv_bias", bias)], [f"qkv_b.{i}"])
    w.node("GroupQueryAttention", [q, "", "", f"past_key.{i}", f"past_value.{i}", "seqlens_k",
                                   "total_sequence_length", "cos_cache", "sin_cache"],
           [f"attn.{i}", f"present_key.{i}", f"present_value.{i}"], ms=True, num_heads=arch.num_heads,
           kv_num_heads=arch.num_kv_heads, do_rotary=1, rotary_interleaved=0, scale=float(arch.head_dim ** -0.5))
    w.node("MatMul", [f"attn.{i}", w.weight(f"layers.{i}.o", a.o_proj.weight.T)], [f"attn_out.{i}"])
    w.node("SkipSimplifiedLayerNormalization", [f"attn_out.{i}", resid,
                                                w.weight(f"layers.{i}.post_attention_layernorm",
                                                         layer.post_attention_layernorm.weight)],
           [f"h2.{i}", "", "", f"resid2.{i}"], ms=True, epsilon=eps)
    w.node("MatMul", [f"h2.{i}", w.weight(f"layers.{i}.gate", mlp.gate_proj.weight.T)], [f"gate.{i}"])
    w.node("MatMul", [f"h2.{i}", w.weight(f"layers.{i}.up", mlp.up_proj.weight.T)], [f"up.{i}"])
    w.node("Sigmoid", [f"gate.{i}"], [f"gate_sig.{i}"])
    w.node("Mul", [f"gate.{i}", f"gate_sig.{i}"], [f"silu.{i}"])
    w.node("Mul", [f"silu.{i}", f"up.{i}"], [f"gated.{i}"])
    w.node("MatMul", [f"gated.{i}", w.weight(f"layers.{i}.down", mlp.down_proj.weight.T)], [f"mlp_out.{i}"])
    return f"mlp_out.{i}", f"resid2.{i}"


def write_fast_backbone(model, arch, path: str | Path, dtype: str = "float32") -> dict:
    """Write ``model``'s fast graph to ``path`` (weights beside it in ``<name>.data``) -> its I/O (:func:`fast_io`).
    Raises ExportError naming what the graph cannot express (another family, a head size GroupQueryAttention does
    not take, sliding windows, dynamic or partial rotary)."""
    import onnx
    from onnx import TensorProto, helper

    cos, sin = _checked(model, arch)
    np_dtype = np.dtype(dtype)
    w = _Writer(np_dtype)
    eps = float(model.config.rms_norm_eps)
    w.weight("cos_cache", cos)
    w.weight("sin_cache", sin)
    embed = w.weight("embed_tokens", model.model.embed_tokens.weight)
    w.node("Gather", [embed, "input_ids"], ["tokens"])
    w.node("Concat", ["prompt_embeds", "tokens"], ["x"], axis=1)
    x, resid = "x", None
    for i, layer in enumerate(model.model.layers):
        x, resid = _layer(w, i, layer, x, resid, arch, eps)
    w.node("SkipSimplifiedLayerNormalization", [x, resid, w.weight("norm", model.model.norm.weight)],
           ["hidden", "", "", "resid_final"], ms=True, epsilon=eps)
    # each sequence's last real row: (B,) -> (B, 1, H) indices -> (B, H)
    w.node("Reshape", ["last_index", w.weight("shape_b11", np.array([-1, 1, 1], np.int64))], ["last_b11"])
    w.node("Shape", ["hidden"], ["hidden_shape"])
    w.node("Mul", ["hidden_shape", w.weight("keep_b_h", np.array([1, 0, 1], np.int64))], ["b0h"])
    w.node("Max", ["b0h", w.weight("ones3", np.array([1, 1, 1], np.int64))], ["b1h"])
    w.node("Expand", ["last_b11", "b1h"], ["last_idx"])
    w.node("GatherElements", ["hidden", "last_idx"], ["last_hidden3"], axis=1)
    w.node("Reshape", ["last_hidden3", w.weight("shape_bh", np.array([0, -1], np.int64))], ["last_hidden"])
    head = model.lm_head.weight
    head_name = embed if head.data_ptr() == model.model.embed_tokens.weight.data_ptr() else w.weight("lm_head", head)
    logits = "logits" if np_dtype == np.float32 else "logits_half"
    w.node("Gemm", ["last_hidden", head_name], [logits], transB=1)
    if logits != "logits":
        w.node("Cast", [logits], ["logits"], to=TensorProto.FLOAT)
    io = fast_io(arch, dtype)
    elem = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int64": TensorProto.INT64,
            "int32": TensorProto.INT32}
    vi = [[helper.make_tensor_value_info(s["name"], elem[s["dtype"]], s["shape"]) for s in io[k]]
          for k in ("inputs", "outputs")]
    graph = helper.make_graph(w.nodes, "backbone_fast", vi[0], vi[1], w.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    path = Path(path)
    onnx.save(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data",
              size_threshold=1024)
    return io

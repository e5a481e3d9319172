"""The fast backbone for ONNX Runtime (Llama family: Llama, Mistral, Qwen2), written from the model's weights with
``onnx.helper`` — no tracing. ONNX Runtime's fused contrib ops: ``GroupQueryAttention`` (rotary inside) reading and
writing one preallocated KV buffer per layer in place, ``SkipSimplifiedLayerNormalization`` (residual add + RMS norm),
q, k and v projected apart (the traced graph's very weight tensors, so a bundle stores them once: see
``export/torchside.py``): 13 nodes per layer (16 with Qwen2's biases) where the traced graph has ~60, and no
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
    """Nodes and initializers of one graph, in the graph's dtype. Weights stream to the external data file as they
    come (one tensor in memory at a time: a 7B model is never held twice)."""

    INLINE = 1024  # bytes: smaller tensors stay inside the graph file

    def __init__(self, dtype: np.dtype, data_path: Path):
        self.dtype, self.nodes, self.inits = dtype, [], []
        self.data_path, self._data = data_path, open(data_path, "wb")

    def weight(self, name: str, value) -> str:
        from onnx import TensorProto, helper, numpy_helper

        a = value.detach().float().numpy() if hasattr(value, "detach") else np.asarray(value)
        if a.dtype.kind == "f" and a.dtype != self.dtype:
            a = a.astype(self.dtype)
        a = np.ascontiguousarray(a)
        if a.nbytes < self.INLINE:
            self.inits.append(numpy_helper.from_array(a, name))
            return name
        off = self._data.tell()
        self._data.write(a.tobytes())
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(a.dtype), dims=a.shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.data_path.name), ("offset", str(off)), ("length", str(a.nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = k, v
        self.inits.append(t)
        return name

    def close(self) -> None:
        self._data.close()

    def node(self, op: str, inputs: list[str], outputs: list[str], ms: bool = False, **attrs) -> list[str]:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, outputs, name=f"{op}_{len(self.nodes)}",
                                           domain="com.microsoft" if ms else "", **attrs))
        return outputs


def _layer(w: _Writer, i: int, layer, x: str, resid: str | None, arch, eps: float) -> tuple[str, str]:
    """One decoder layer: -> (its MLP output, the residual stream before it)."""
    a, mlp = layer.self_attn, layer.mlp
    ln1 = w.weight(f"layers.{i}.input_layernorm", layer.input_layernorm.weight)
    if resid is None:
        w.node("SimplifiedLayerNormalization", [x, ln1], [f"h.{i}"], axis=-1, epsilon=eps)
        resid = x
    else:
        w.node("SkipSimplifiedLayerNormalization", [x, resid, ln1], [f"h.{i}", "", "", f"resid.{i}"], ms=True,
               epsilon=eps)
        resid = f"resid.{i}"
    qkv = []  # q, k, v apart (GroupQueryAttention takes them so): the traced graph's very tensors, shared by content
    for p, proj in (("q", a.q_proj), ("k", a.k_proj), ("v", a.v_proj)):
        (y,) = w.node("MatMul", [f"h.{i}", w.weight(f"layers.{i}.{p}", proj.weight.T)], [f"{p}.{i}"])
        if proj.bias is not None:
            (y,) = w.node("Add", [y, w.weight(f"layers.{i}.{p}_bias", proj.bias)], [f"{p}_b.{i}"])
        qkv.append(y)
    w.node("GroupQueryAttention", [*qkv, f"past_key.{i}", f"past_value.{i}", "seqlens_k",
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
    path = Path(path)
    w = _Writer(np_dtype, path.with_name(path.name + ".data"))
    try:
        graph = _graph(w, model, arch, cos, sin, np_dtype)
    finally:
        w.close()
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    onnx.save(m, str(path))
    return fast_io(arch, dtype)


def _graph(w: _Writer, model, arch, cos, sin, np_dtype):
    from onnx import TensorProto, helper

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
    io = fast_io(arch, str(np_dtype))
    elem = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int64": TensorProto.INT64,
            "int32": TensorProto.INT32}
    vi = [[helper.make_tensor_value_info(s["name"], elem[s["dtype"]], s["shape"]) for s in io[k]]
          for k in ("inputs", "outputs")]
    return helper.make_graph(w.nodes, "backbone_fast", vi[0], vi[1], w.inits)

"""The fast backbone for ONNX Runtime — Llama (every static rope scaling), Mistral and Qwen2 (windows too), Qwen3,
Gemma 1–3, Phi-2, Phi-3/3.5/4, Granite, OLMo 2, SmolLM3: what each family computes is in ``fusedplan.py`` — written
from the model's weights with ``onnx.helper``, no tracing. ONNX Runtime's fused contrib ops: ``GroupQueryAttention``
(rotary, sliding window, scale and soft-cap inside) reading and writing one preallocated KV buffer per layer in place,
``SkipSimplifiedLayerNormalization`` (residual add + RMS norm), q/k norms as their own ops (the op's own norm inputs
are not honoured on the CPU), q, k and v projected apart or Phi-3's packed qkv (the traced graph's very weight
tensors, so a bundle stores them once: see ``export/torchside.py``): 13 nodes per Llama layer (16 with Qwen2's biases)
where the traced graph has ~60, and no ``concat(past, new)`` reallocated every step.

Cache layout (GroupQueryAttention's, not the plain graph's left-padded one): sequence b's keys/values start at slot 0
of row b of a ``(B, KV, capacity, Dh)`` buffer, with no padding inside, so a token's position is its slot (a task
prompt at 0..P-1, the text from P — the positions the plain graph gives too).

One call runs a chunk of new rows per sequence: ``prompt_embeds`` rows (a task prompt) then ``input_ids`` rows,
right-padded to the call's longest. For a sequence with ``past`` cached slots and ``n`` real new rows:
``seqlens_k = past + n - 1``, ``query_seqlens = n``, ``last_index = n - 1``; its padding rows are never written to
the cache (GroupQueryAttention's ``query_seqlens``, honoured on the CPU), so a batch of prefills of different
lengths over different cached prompts is one call, and a decode step (``query_seqlens`` all 1) the whole batch.
Bundles written before this input existed run a prefill one sequence per call (the op takes several new rows over a
cache for one sequence only without it).

Inputs: input_ids (B, S) int64; prompt_embeds (B, P, H); seqlens_k (B,) int32; total_sequence_length () int32
(max(seqlens_k) + 1); last_index (B,) int64; query_seqlens (B,) int32; past_key.{i} / past_value.{i}
(B, KV, capacity, Dh).
Outputs: logits (B, V) float32 at each sequence's last real row only (ONNX Runtime runs every node of a graph
whatever is fetched, so an all-rows (B, S, V) output would cost a second LM head on every step); present_key.{i} /
present_value.{i}, to be bound to the same buffers as the past ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .fusedplan import Plan
def fused_io(arch, dtype: str = "float32") -> dict:
    """The fast graph's inputs and outputs (names, dtypes, shapes), as the manifest records graphs."""
    L, kv, hd, H = arch.num_layers, arch.num_kv_heads, arch.head_dim, arch.hidden_size
    cache = [{"name": f"past_{k}.{i}", "dtype": dtype, "shape": ["batch", kv, "capacity", hd]}
             for i in range(L) for k in ("key", "value")]
    return {
        "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
                   {"name": "prompt_embeds", "dtype": dtype, "shape": ["batch", "prompt_len", H]},
                   {"name": "seqlens_k", "dtype": "int32", "shape": ["batch"]},
                   {"name": "total_sequence_length", "dtype": "int32", "shape": []},
                   {"name": "last_index", "dtype": "int64", "shape": ["batch"]},
                   {"name": "query_seqlens", "dtype": "int32", "shape": ["batch"]}] + cache,
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", arch.vocab_size]}]
        + [dict(c, name=c["name"].replace("past_", "present_")) for c in cache],
    }


class _Writer:
    """Nodes and initializers of one graph, in the graph's dtype. Weights stream to the external data file as they
    come (one tensor in memory at a time: a 7B model is never held twice)."""

    INLINE = 1024  # bytes: smaller tensors stay inside the graph file

    def __init__(self, dtype: np.dtype, data_path: Path):
        self.dtype, self.nodes, self.inits, self._names = dtype, [], [], set()
        self.data_path, self._data = data_path, open(data_path, "wb")

    def weight(self, name: str, value) -> str:
        """``value`` as the initializer ``name`` (a name given twice is the same constant: written once)."""
        from onnx import TensorProto, helper, numpy_helper

        if name in self._names:
            return name
        self._names.add(name)
        a = value.detach().float().numpy() if hasattr(value, "detach") else np.asarray(value)
        if a.dtype.kind == "f" and a.dtype != self.dtype:
            a = a.astype(self.dtype)
        a = np.ascontiguousarray(a)
        if a.nbytes < self.INLINE:
            self.inits.append(numpy_helper.from_array(a, name))
            return name
        off = self._data.tell()
        self._data.write(memoryview(a).cast("B"))  # no bytes copy: a 150k-token embedding table is ~600 MB
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


def _norm(w: _Writer, plan: Plan, name: str, module, x: str, out: str) -> str:
    """A standalone norm of ``x`` (RMS, Gemma's (1 + w) RMS, or LayerNorm with bias)."""
    if plan.layer_norm:
        w.node("LayerNormalization", [x, w.weight(name, module.weight), w.weight(f"{name}_bias", module.bias)], [out],
               axis=-1, epsilon=plan.eps)
    else:
        w.node("SimplifiedLayerNormalization", [x, _norm_weight(w, plan, name, module)], [out], axis=-1,
               epsilon=plan.eps)
    return out


def _norm_weight(w: _Writer, plan: Plan, name: str, module) -> str:
    return w.weight(name, 1.0 + module.weight.detach().float() if plan.norm_plus_one else module.weight)


def _skip_norm(w: _Writer, plan: Plan, name: str, module, x: str, resid: str, out: str, resid_out: str) -> str:
    """``resid_out = x + resid``; ``out = norm(resid_out)`` in one fused op."""
    w.node("SkipSimplifiedLayerNormalization", [x, resid, _norm_weight(w, plan, name, module)],
           [out, "", "", resid_out], ms=True, epsilon=plan.eps)
    return out


def _linear(w: _Writer, i: int, name: str, x: str, proj, out: str) -> str:
    (y,) = w.node("MatMul", [x, w.weight(f"layers.{i}.{name}", proj.weight.T)], [out])
    if getattr(proj, "bias", None) is not None:
        (y,) = w.node("Add", [y, w.weight(f"layers.{i}.{name}_bias", proj.bias)], [f"{out}_b"])
    return y


def _attention(w: _Writer, plan: Plan, i: int, a, h: str, arch) -> str:
    """q/k/v (or Phi-3's packed qkv), q/k norms as their own ops, GroupQueryAttention (rotary, window, scale,
    soft-cap inside) over layer ``i``'s in-place cache, the output projection. -> its output."""
    D = arch.head_dim
    if hasattr(a, "qkv_proj"):  # Phi-3: one projection, GroupQueryAttention takes it packed
        q, k, v = _linear(w, i, "qkv", h, a.qkv_proj, f"qkv.{i}"), "", ""
    else:
        q, k, v = (_linear(w, i, p, h, getattr(a, f"{p}_proj"), f"{p}.{i}") for p in ("q", "k", "v"))
    if plan.qk_norm == "head":  # per head (Qwen3, Gemma 3): (B, S, N*D) -> (B, S, N, D) -> norm -> back
        shape_h = w.weight("shape_heads", np.array([0, 0, -1, D], np.int64))
        shape_f = w.weight("shape_flat", np.array([0, 0, -1], np.int64))
        for p, mod in (("q", a.q_norm), ("k", a.k_norm)):
            src = q if p == "q" else k
            w.node("Reshape", [src, shape_h], [f"{p}_heads.{i}"])
            _norm(w, plan, f"layers.{i}.{p}_norm", mod, f"{p}_heads.{i}", f"{p}_normed.{i}")
            w.node("Reshape", [f"{p}_normed.{i}", shape_f], [f"{p}_n.{i}"])
        q, k = f"q_n.{i}", f"k_n.{i}"
    elif plan.qk_norm == "all":  # over the whole projection (OLMo 2)
        q = _norm(w, plan, f"layers.{i}.q_norm", a.q_norm, q, f"q_n.{i}")
        k = _norm(w, plan, f"layers.{i}.k_norm", a.k_norm, k, f"k_n.{i}")
    table = plan.layer_table[i]
    attrs = dict(num_heads=arch.num_heads, kv_num_heads=arch.num_kv_heads, scale=plan.scale,
                 do_rotary=int(table is not None), rotary_interleaved=0)
    if plan.windows[i]:
        attrs["local_window_size"] = int(plan.windows[i])
    if plan.attn_softcap:
        attrs["softcap"] = plan.attn_softcap
    cos, sin = (f"cos_{table}", f"sin_{table}") if table else ("", "")
    w.node("GroupQueryAttention", [q, k, v, f"past_key.{i}", f"past_value.{i}", "seqlens_k",
                                   "total_sequence_length", cos, sin] + [""] * 7 + ["query_seqlens"],
           [f"attn.{i}", f"present_key.{i}", f"present_value.{i}"], ms=True, **attrs)
    o = a.dense if hasattr(a, "dense") else a.o_proj
    return _branch_scaled(w, plan, _linear(w, i, "o", f"attn.{i}", o, f"attn_out.{i}"))


def _branch_scaled(w: _Writer, plan: Plan, out: str) -> str:
    """Granite: the stream adds ``residual_multiplier`` × each branch's output."""
    if plan.residual_scale == 1.0:
        return out
    scale = w.weight("residual_multiplier", np.array(plan.residual_scale, w.dtype))
    return w.node("Mul", [out, scale], [f"{out}_scaled"])[0]


def _mlp(w: _Writer, plan: Plan, i: int, mlp, h: str) -> str:
    if plan.type == "phi":  # fc1 -> tanh-GELU -> fc2
        y = _linear(w, i, "fc1", h, mlp.fc1, f"fc1.{i}")
        w.node("Gelu", [y], [f"act.{i}"], approximate="tanh")
        out = _linear(w, i, "fc2", f"act.{i}", mlp.fc2, f"mlp_out.{i}")
    else:
        if hasattr(mlp, "gate_up_proj"):  # Phi-3: one projection, gate first
            gu = _linear(w, i, "gate_up", h, mlp.gate_up_proj, f"gate_up.{i}")
            w.node("Split", [gu], [f"gate.{i}", f"up.{i}"], axis=-1, num_outputs=2)
            gate, up = f"gate.{i}", f"up.{i}"
        else:
            gate = _linear(w, i, "gate", h, mlp.gate_proj, f"gate.{i}")
            up = _linear(w, i, "up", h, mlp.up_proj, f"up.{i}")
        if plan.gelu:
            w.node("Gelu", [gate], [f"act.{i}"], approximate="tanh")
        else:
            w.node("Sigmoid", [gate], [f"gate_sig.{i}"])
            w.node("Mul", [gate, f"gate_sig.{i}"], [f"act.{i}"])
        w.node("Mul", [f"act.{i}", up], [f"gated.{i}"])
        out = _linear(w, i, "down", f"gated.{i}", mlp.down_proj, f"mlp_out.{i}")
    return _branch_scaled(w, plan, out)


def _layer(w: _Writer, plan: Plan, i: int, layer, x: str, resid: str | None, arch) -> tuple[str, str | None]:
    """One decoder layer. ``x`` is the previous layer's branch output and ``resid`` the stream it is added to (None
    before the first layer: ``x`` is the stream). -> (this layer's last branch output, the stream before it)."""
    a, mlp = layer.self_attn, layer.mlp
    if plan.layout == "post":  # OLMo 2: the stream itself goes in; norms after each branch
        if resid is not None:
            w.node("Add", [x, resid], [f"stream.{i}"])
            x = f"stream.{i}"
        attn = _attention(w, plan, i, a, x, arch)
        normed = _norm(w, plan, f"layers.{i}.post_attention_layernorm", layer.post_attention_layernorm, attn,
                       f"attn_post.{i}")
        w.node("Add", [normed, x], [f"resid2.{i}"])
        out = _mlp(w, plan, i, mlp, f"resid2.{i}")
        return _norm(w, plan, f"layers.{i}.post_feedforward_layernorm", layer.post_feedforward_layernorm, out,
                     f"mlp_post.{i}"), f"resid2.{i}"
    if resid is None:
        h = _norm(w, plan, f"layers.{i}.input_layernorm", layer.input_layernorm, x, f"h.{i}")
        resid = x
    elif plan.layer_norm:
        w.node("Add", [x, resid], [f"resid.{i}"])
        resid = f"resid.{i}"
        h = _norm(w, plan, f"layers.{i}.input_layernorm", layer.input_layernorm, resid, f"h.{i}")
    else:
        h = _skip_norm(w, plan, f"layers.{i}.input_layernorm", layer.input_layernorm, x, resid, f"h.{i}",
                       f"resid.{i}")
        resid = f"resid.{i}"
    attn = _attention(w, plan, i, a, h, arch)
    if plan.layout == "parallel":  # Phi-2: attention and MLP off the same norm, both added to the stream
        out = _mlp(w, plan, i, mlp, h)
        w.node("Add", [attn, out], [f"branches.{i}"])
        return f"branches.{i}", resid
    if plan.layout == "sandwich":  # Gemma 2/3: a norm after attention, one before and one after the MLP
        attn = _norm(w, plan, f"layers.{i}.post_attention_layernorm", layer.post_attention_layernorm, attn,
                     f"attn_post.{i}")
        h2 = _skip_norm(w, plan, f"layers.{i}.pre_feedforward_layernorm", layer.pre_feedforward_layernorm, attn, resid,
                        f"h2.{i}", f"resid2.{i}")
        out = _mlp(w, plan, i, mlp, h2)
        out = _norm(w, plan, f"layers.{i}.post_feedforward_layernorm", layer.post_feedforward_layernorm, out,
                    f"mlp_post.{i}")
        return out, f"resid2.{i}"
    h2 = _skip_norm(w, plan, f"layers.{i}.post_attention_layernorm", layer.post_attention_layernorm, attn, resid,
                    f"h2.{i}", f"resid2.{i}")
    return _mlp(w, plan, i, mlp, h2), f"resid2.{i}"


def write_fused_backbone(model, arch, path: str | Path, dtype: str = "float32") -> dict:
    """Write ``model``'s fast graph to ``path`` (weights beside it in ``<name>.data``) -> its I/O (:func:`fused_io`).
    Raises ExportError naming what the graph cannot express (a family it does not cover, a head size or rotary part
    GroupQueryAttention does not take, another activation)."""
    import onnx
    from onnx import helper

    plan = Plan(model, arch)  # what the fast graph cannot express is refused here, by name
    np_dtype = np.dtype(dtype)
    path = Path(path)
    w = _Writer(np_dtype, path.with_name(path.name + ".data"))
    try:
        graph = _graph(w, model, arch, plan, np_dtype)
    finally:
        w.close()
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    onnx.save(m, str(path))
    return fused_io(arch, dtype)


def _graph(w: _Writer, model, arch, plan: Plan, np_dtype):
    from onnx import TensorProto, helper

    for name, (cos, sin) in plan.tables.items():
        w.weight(f"cos_{name}", cos)
        w.weight(f"sin_{name}", sin)
    if plan.long_rope is not None:  # Phi-3 long-rope: the long factors once the longest position passes the switch
        w.node("Greater", ["total_sequence_length", w.weight("long_rope_from", np.array(plan.long_rope, np.int32))],
               ["use_long"])
        for k in ("cos", "sin"):
            w.node("Where", ["use_long", f"{k}_cache_long", f"{k}_cache"], [f"{k}_cache_chosen"])
    embed = w.weight("embed_tokens", model.model.embed_tokens.weight)
    w.node("Gather", [embed, "input_ids"], ["tokens"])
    tokens = "tokens"
    if plan.token_scale != 1.0:  # Gemma's sqrt(hidden), on the token embeddings only
        (tokens,) = w.node("Mul", [tokens, w.weight("token_scale", np.array(plan.token_scale, np_dtype))],
                           ["tokens_scaled"])
    w.node("Concat", ["prompt_embeds", tokens], ["x"], axis=1)
    x = "x"
    if plan.embed_scale != 1.0:  # Granite's multiplier: on the prompt too, as the model applies it
        w.node("Mul", [x, w.weight("embed_scale", np.array(plan.embed_scale, np_dtype))], ["x_scaled"])
        x = "x_scaled"
    resid = None
    for i, layer in enumerate(model.model.layers):
        x, resid = _layer(w, plan, i, layer, x, resid, arch)
    final = model.model.final_layernorm if plan.type == "phi" else model.model.norm
    if plan.layer_norm or plan.layout == "post":
        w.node("Add", [x, resid], ["stream_final"])
        _norm(w, plan, "norm", final, "stream_final", "hidden")
    else:
        _skip_norm(w, plan, "norm", final, x, resid, "hidden", "resid_final")
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
    bias = [w.weight("lm_head_bias", model.lm_head.bias)] if getattr(model.lm_head, "bias", None) is not None else []
    logits = "logits_head"
    w.node("Gemm", ["last_hidden", head_name, *bias], [logits], transB=1)
    if plan.logits_divisor != 1.0:  # Granite
        (logits,) = w.node("Div", [logits, w.weight("logits_scaling", np.array(plan.logits_divisor, np_dtype))],
                           ["logits_scaled"])
    if plan.final_softcap:  # Gemma 2: cap * tanh(logits / cap)
        cap = w.weight("final_softcap", np.array(plan.final_softcap, np_dtype))
        w.node("Div", [logits, cap], ["logits_capped_in"])
        w.node("Tanh", ["logits_capped_in"], ["logits_tanh"])
        (logits,) = w.node("Mul", ["logits_tanh", cap], ["logits_capped"])
    if np_dtype == np.float32:
        w.node("Identity", [logits], ["logits"])
    else:
        w.node("Cast", [logits], ["logits"], to=TensorProto.FLOAT)
    io = fused_io(arch, str(np_dtype))
    elem = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int64": TensorProto.INT64,
            "int32": TensorProto.INT32}
    vi = [[helper.make_tensor_value_info(s["name"], elem[s["dtype"]], s["shape"]) for s in io[k]]
          for k in ("inputs", "outputs")]
    return helper.make_graph(w.nodes, "backbone_fast", vi[0], vi[1], w.inits)

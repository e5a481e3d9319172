"""torch -> ONNX for encoder-decoder (T5) backbones: ``encoder.onnx`` and ``decoder.onnx``, weights stored once.

    encoder:  cat(prompt_embeds, embed(input_ids))  -> encoder_hidden_states            (B, E, H)
              and, for every decoder layer, the cross-attention keys/values       cross.{i}.key|value (B, h, E, d)
    decoder:  cat(decoder_prompt_embeds, embed(decoder_input_ids)), self-attention past, cross.{i}.*
              -> logits (last position only), present.{i}.key|value (self-attention)

The cross-attention KV depends only on the encoder output, so it is computed once per request — by the encoder
graph, right after the encoder stack — and every decoder step reuses it as an input. (DESIGN.md lists
"encoder hidden states and mask" as decoder inputs; the decoder takes the cross KV instead, which is what those hidden
states are used for, so no step recomputes the projections and no If-node is needed for TensorRT.)

T5 has no position ids: relative position buckets come from slot indices. Batches therefore keep each row's real
tokens contiguous — ``[pad | prompt_k | text | pad]`` in the encoder, ``[pad | decoder_prompt_k | tokens]`` in the
decoder — so relative distances, and results, are those of the row alone.

Both graphs are exported with their own ``.data`` file and then rewritten to share one ``weights.onnx.data``: every
initializer is stored once by content (the shared embedding and anything else both graphs use).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

from ..errors import ExportError
from .backbone import _set_dim_names
from .precision import fp32_softmax, graph_dtype

WEIGHTS_FILE = "weights.onnx.data"


def seq2seq_io(arch, dtype: str = "float32") -> dict:
    L, h, d, H = arch.num_layers, arch.num_kv_heads, arch.head_dim, arch.hidden_size
    enc = {
        "inputs": [
            {"name": "input_ids", "dtype": "int64", "shape": ["batch", "enc_seq"]},
            {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "enc_len"]},
            {"name": "prompt_embeds", "dtype": dtype, "shape": ["batch", "prompt_len", H]},
        ],
        "outputs": [{"name": "encoder_hidden_states", "dtype": dtype, "shape": ["batch", "enc_len", H]}],
    }
    dec = {
        "inputs": [
            {"name": "decoder_input_ids", "dtype": "int64", "shape": ["batch", "dec_seq"]},
            {"name": "decoder_prompt_embeds", "dtype": dtype, "shape": ["batch", "dec_prompt_len", H]},
            {"name": "decoder_attention_mask", "dtype": "int64", "shape": ["batch", "dec_total_len"]},
            {"name": "encoder_attention_mask", "dtype": "int64", "shape": ["batch", "enc_len"]},
        ],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", arch.vocab_size]}],
    }
    for i in range(L):
        for kind in ("key", "value"):
            enc["outputs"].append({"name": f"cross.{i}.{kind}", "dtype": dtype, "shape": ["batch", h, "enc_len", d]})
            dec["inputs"].append({"name": f"past_key_values.{i}.{kind}", "dtype": dtype,
                                  "shape": ["batch", h, "past_len", d]})
            dec["outputs"].append({"name": f"present.{i}.{kind}", "dtype": dtype,
                                   "shape": ["batch", h, "dec_total_len", d]})
    for i in range(L):
        for kind in ("key", "value"):
            dec["inputs"].append({"name": f"cross.{i}.{kind}", "dtype": dtype, "shape": ["batch", h, "enc_len", d]})
    return {"encoder": enc, "decoder": dec}


def _wrappers(model, arch, embed=None, decoder_embed=None):
    import torch
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    L, d = arch.num_layers, arch.head_dim
    scale = bool(getattr(model.config, "scale_decoder_outputs", getattr(model.config, "tie_word_embeddings", True)))
    embed = embed or model.get_input_embeddings()
    decoder_embed = decoder_embed or embed

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, prompt_embeds):
            embeds = torch.cat([prompt_embeds.to(embed.weight.dtype), embed(input_ids)], dim=1)  # (B, E, H)
            h = model.encoder(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state  # (B, E, H)
            B, E, _ = h.shape
            cross = []
            for block in model.decoder.block:
                att = block.layer[1].EncDecAttention
                cross += [att.k(h).view(B, E, -1, d).transpose(1, 2), att.v(h).view(B, E, -1, d).transpose(1, 2)]
            return (h, *cross)

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, decoder_input_ids, decoder_prompt_embeds, decoder_attention_mask, encoder_attention_mask,
                    past, cross):
            embeds = torch.cat([decoder_prompt_embeds.to(embed.weight.dtype), decoder_embed(decoder_input_ids)], dim=1)
            cache = EncoderDecoderCache(
                DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(L)]),
                DynamicCache(ddp_cache_data=[(cross[2 * i], cross[2 * i + 1]) for i in range(L)]),
            )
            for i in range(L):  # cross KV is given: never recompute it from encoder states
                cache.is_updated[i] = True
            # T5 only reads the encoder states' shape once the cross KV is cached
            shape_only = embeds.new_zeros(embeds.shape[0], cross[0].shape[2], 1)
            out = model.decoder(inputs_embeds=embeds, attention_mask=decoder_attention_mask,
                                encoder_hidden_states=shape_only, encoder_attention_mask=encoder_attention_mask,
                                cache=cache, use_cache=True)
            h = out.last_hidden_state[:, -1, :]  # (B, H)
            if scale:
                h = h * (model.config.d_model ** -0.5)
            logits = model.lm_head(h).float()  # (B, V)
            sc = out.cache.self_attention_cache
            present = []
            for i in range(L):
                present += [sc.layers[i].keys, sc.layers[i].values]
            return (logits, *present)

    return Encoder().eval(), Decoder().eval()


def export_seq2seq(model, arch, out_dir: str | Path, opset: int, embed=None, decoder_embed=None,
                   dtype: str = "float32") -> dict:
    """Write ``encoder.onnx``, ``decoder.onnx`` and one shared ``weights.onnx.data`` into ``out_dir``.

    ``embed`` embeds the encoder's input ids and ``decoder_embed`` the decoder's (default: the model's input
    embeddings for both): they must be the tables PEFT uses — see ``torchside.token_embeddings``."""
    import onnx
    import torch

    out_dir = Path(out_dir)
    io = seq2seq_io(arch, dtype)
    dtype = graph_dtype(model.get_input_embeddings(), dtype, "encoder-decoder export")
    enc, dec = _wrappers(model, arch, embed, decoder_embed)
    L, h, d, H, V = arch.num_layers, arch.num_kv_heads, arch.head_dim, arch.hidden_size, arch.vocab_size
    B, S, P, DS, DP, PL = 2, 3, 4, 3, 2, 5  # every dynamic size >= 2 so none is specialised
    ids = torch.randint(2, V, (B, S))
    mask = torch.ones(B, P + S, dtype=torch.long)
    prompt = torch.randn(B, P, H, dtype=dtype)
    with torch.no_grad():
        cross = list(enc(ids, mask, prompt)[1:])
    past = [torch.zeros(B, h, PL, d, dtype=dtype) for _ in range(2 * L)]
    dec_args = (torch.randint(2, V, (B, DS)), torch.randn(B, DP, H, dtype=dtype),
                torch.ones(B, PL + DP + DS, dtype=torch.long), mask, past, cross)
    jobs = [
        ("encoder", enc, (ids, mask, prompt),
         {"input_ids": {0: "batch", 1: "enc_seq"}, "attention_mask": {0: "batch", 1: "enc_len"},
          "prompt_embeds": {0: "batch", 1: "prompt_len"}}),
        ("decoder", dec, dec_args,
         {"decoder_input_ids": {0: "batch", 1: "dec_seq"}, "decoder_prompt_embeds": {0: "batch", 1: "dec_prompt_len"},
          "decoder_attention_mask": {0: "batch", 1: "dec_total_len"}, "encoder_attention_mask": {0: "batch", 1: "enc_len"},
          "past": [{0: "batch", 2: "past_len"}] * (2 * L), "cross": [{0: "batch", 2: "enc_len"}] * (2 * L)}),
    ]
    for name, module, args, dyn in jobs:
        path = out_dir / f"{name}.onnx"
        try:
            with warnings.catch_warnings(), torch.no_grad(), fp32_softmax():
                warnings.simplefilter("ignore")
                torch.onnx.export(module, args, str(path), dynamo=True,
                                  input_names=[s["name"] for s in io[name]["inputs"]],
                                  output_names=[s["name"] for s in io[name]["outputs"]], dynamic_shapes=dyn,
                                  opset_version=opset, external_data=True, verbose=False)
        except Exception as e:
            raise ExportError(
                f"torch.onnx.export failed for the {arch.name} {name} ({type(e).__name__}: {str(e).splitlines()[0][:300]})"
            ) from e
        _set_dim_names(path, io[name])
    share_weights(out_dir, ["encoder.onnx", "decoder.onnx"], WEIGHTS_FILE)
    written = onnx.load(str(out_dir / "encoder.onnx"), load_external_data=False)
    io["opset"] = int(next(o.version for o in written.opset_import if o.domain in ("", "ai.onnx")))
    return io


def share_weights(root: Path, graphs: list[str], data_name: str, threshold: int = 1024, align: int = 4096) -> None:
    """Rewrite ``graphs`` so that their initializers over ``threshold`` bytes live once, by content, in one
    ``data_name`` file (offsets aligned for memory mapping). Each graph's own ``.data`` file is removed.

    Streams: the graphs are loaded without their weights, and each tensor is copied from its graph's data file in
    chunks while it is hashed (a tensor already stored is cut off again) — a large model is never held in memory
    a second time beside the torch model, not even its largest tensor."""
    import onnx

    models = {g: onnx.load(str(root / g), load_external_data=False) for g in graphs}
    offsets: dict[str, tuple[int, int]] = {}
    sources: dict[str, object] = {}
    tmp = root / (data_name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            for g, m in models.items():
                for t in m.graph.initializer:
                    if _tensor_size(t) < threshold:
                        if t.data_location == onnx.TensorProto.EXTERNAL:  # small but external: keep it inline
                            raw = b"".join(_tensor_chunks(root, t, sources))
                            del t.external_data[:]
                            t.data_location = onnx.TensorProto.DEFAULT
                            t.raw_data = raw
                        continue
                    start = f.tell()
                    if start % align:
                        f.write(b"\0" * (align - start % align))
                    pos = f.tell()
                    h = hashlib.sha256(str(t.data_type).encode() + str(list(t.dims)).encode())
                    for chunk in _tensor_chunks(root, t, sources):
                        h.update(chunk)
                        f.write(chunk)
                    length = f.tell() - pos
                    key = h.hexdigest()
                    if key in offsets:  # stored already: take back this copy
                        f.seek(start)
                        f.truncate(start)
                    else:
                        offsets[key] = (pos, length)
                    off, length = offsets[key]
                    for field in ("float_data", "int64_data", "int32_data", "double_data", "raw_data"):
                        t.ClearField(field)
                    del t.external_data[:]
                    for k, v in (("location", data_name), ("offset", str(off)), ("length", str(length))):
                        entry = t.external_data.add()
                        entry.key, entry.value = k, v
                    t.data_location = onnx.TensorProto.EXTERNAL
    finally:
        for src in sources.values():
            src.close()
    for g, m in models.items():
        onnx.save(m, str(root / g), save_as_external_data=False)
    for g in graphs:
        old = root / (g + ".data")
        if old.exists():
            old.unlink()
    os.replace(tmp, root / data_name)


_CHUNK = 16 * 2**20


def _external(t) -> dict:
    ext = {e.key: e.value for e in t.external_data}
    loc = ext["location"]
    if "/" in loc or "\\" in loc or loc.startswith("."):  # the exporter writes a plain name beside the graph
        raise ExportError(f"unexpected external data location {loc!r} in an exported graph")
    return ext


def _tensor_size(t) -> int:
    import onnx

    if t.data_location == onnx.TensorProto.EXTERNAL:
        ext = _external(t)
        if "length" in ext:
            return int(ext["length"])
    elif t.HasField("raw_data"):
        return len(t.raw_data)
    n = 1
    for d in t.dims:
        n *= int(d)
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def _tensor_chunks(root: Path, t, sources: dict):
    """An initializer's raw bytes in chunks: inline, or read from the external data file the exporter wrote."""
    import onnx

    if t.data_location != onnx.TensorProto.EXTERNAL:
        yield t.raw_data if t.HasField("raw_data") else onnx.numpy_helper.to_array(t).tobytes()
        return
    ext = _external(t)
    loc = ext["location"]
    if loc not in sources:
        sources[loc] = open(root / loc, "rb")
    src = sources[loc]
    src.seek(int(ext.get("offset", 0)))
    left = int(ext["length"]) if "length" in ext else None
    while left is None or left > 0:
        chunk = src.read(_CHUNK if left is None else min(_CHUNK, left))
        if not chunk:
            if left:
                raise ExportError(f"{loc} ends before tensor {t.name} does (the export was cut short)")
            return
        if left is not None:
            left -= len(chunk)
        yield chunk

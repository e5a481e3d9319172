"""The scoring graph: the traced causal backbone with its LM head over every position (``logits_all``), for scoring
a prompt (OpenAI's ``echo`` with ``logprobs``) in one call. Decoding never runs it: the backbone keeps its
last-position head (an all-positions output would cost a full LM head on every decode step, since ONNX Runtime runs
every node of a graph whatever is fetched).

Written by rewiring the backbone graph, not by a second export: the head chain after the graph's last-position
``Gather`` (a ``Gemm``, a ``MatMul`` or a weight-only ``MatMulNBits``, the family's logit multipliers and soft-cap, and
a ``Cast`` in half graphs) is cloned over
the hidden states of every position (flattened to rows, then shaped back). Its initializers keep their external-data
entries, so the scoring graph reads the backbone's own weights file: no tensor is stored twice."""

from __future__ import annotations

from pathlib import Path

from ..errors import ExportError

SCORE_FILE = "backbone_score.onnx"
OUTPUT = "logits_all"


def _head_chain(graph):
    """-> (the last-position Gather node, the nodes from it to ``logits``, in order)."""
    import onnx

    producer = {o: n for n in graph.node for o in n.output}
    chain, name = [], "logits"
    while name in producer:
        n = producer[name]
        if n.op_type == "Gather" and any(a.name == "axis" and onnx.helper.get_attribute_value(a) == 1
                                         for a in n.attribute):
            return n, chain[::-1]
        chain.append(n)
        name = n.input[0]
        if len(chain) > 8:  # head, bias, multipliers, soft-cap, cast
            break
    raise ExportError("the backbone graph has no last-position Gather before its LM head; this bundle cannot get a "
                      "scoring graph (export it again with this version)")


def write_scoring_graph(backbone: Path, out: Path, hidden_size: int, vocab_size: int) -> dict:
    """Write the scoring variant of ``backbone`` (a graph file whose weights are external, beside it) to ``out``
    -> its manifest I/O (the backbone's inputs; ``logits_all`` float32 ``[batch, positions, vocab]``)."""
    import onnx
    from onnx import TensorProto, helper

    m = onnx.load(str(backbone), load_external_data=False)
    g = m.graph
    gather, chain = _head_chain(g)
    hidden = gather.input[0]
    nodes = [helper.make_node("Reshape", [hidden, "score_rows_shape"], ["score_rows"], name="score_rows")]
    g.initializer.append(helper.make_tensor("score_rows_shape", TensorProto.INT64, [2], [-1, hidden_size]))
    prev, last = gather.output[0], "score_rows"
    for i, n in enumerate(chain):
        c = onnx.NodeProto()
        c.CopyFrom(n)
        c.name = f"{n.name or n.op_type}_all_{i}"
        c.input[0] = last if n.input[0] == prev else n.input[0]
        prev, last = n.output[0], f"score_{n.output[0]}"
        del c.output[:]
        c.output.append(last)
        nodes.append(c)
    g.initializer.append(helper.make_tensor("score_bt_ends", TensorProto.INT64, [1], [2]))
    g.initializer.append(helper.make_tensor("score_zero", TensorProto.INT64, [1], [0]))
    g.initializer.append(helper.make_tensor("score_vocab", TensorProto.INT64, [1], [-1]))
    nodes += [helper.make_node("Shape", [hidden], ["score_hidden_shape"], name="score_shape"),
              helper.make_node("Slice", ["score_hidden_shape", "score_zero", "score_bt_ends"], ["score_bt"],
                               name="score_bt"),
              helper.make_node("Concat", ["score_bt", "score_vocab"], ["score_out_shape"], axis=0, name="score_cat"),
              helper.make_node("Reshape", [last, "score_out_shape"], [OUTPUT], name="score_out")]
    g.node.extend(nodes)
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", "positions", vocab_size]))
    onnx.save(m, str(out))
    return {"outputs": [{"name": OUTPUT, "dtype": "float32", "shape": ["batch", "positions", vocab_size]}]}


def scoring_graphs(root: Path, graphs: dict, arch) -> dict:
    """``{"scoring_graphs": {"backbone": spec}}`` for a causal bundle's manifest (its backbone's weights final in
    ``root``), or ``{}`` for encoder-decoders (their decoder scores a target, not a prompt)."""
    spec = graphs.get("backbone")
    if spec is None:
        return {}
    io = write_scoring_graph(root / spec["file"], root / SCORE_FILE, arch.hidden_size, arch.vocab_size)
    return {"scoring_graphs": {"backbone": {"file": SCORE_FILE, "external_data": spec["external_data"],
                                            "inputs": spec["inputs"], **io}}}

"""The prompt composer graph: ``prompt_embeds = shared_prompt ⊙ (task_cols @ task_rows)``.

Two nodes, written with ``onnx.helper`` directly (no torch needed). The runtime calls it once per task and caches
the result, so its speed does not matter; having it as a graph lets every backend (ORT, TensorRT, Triton) compose a
task from its few-kilobyte vectors the same way.
"""

from __future__ import annotations

from pathlib import Path

COMPOSER_INPUTS = ("shared_prompt", "task_cols", "task_rows")
COMPOSER_OUTPUT = "prompt_embeds"


def composer_io(hidden: int) -> dict:
    f = "float32"
    return {
        "inputs": [
            {"name": "shared_prompt", "dtype": f, "shape": ["batch", "prompt_len", hidden]},
            {"name": "task_cols", "dtype": f, "shape": ["batch", "prompt_len", "rank"]},
            {"name": "task_rows", "dtype": f, "shape": ["batch", "rank", hidden]},
        ],
        "outputs": [{"name": "prompt_embeds", "dtype": f, "shape": ["batch", "prompt_len", hidden]}],
    }


def write_composer(path: str | Path, hidden: int, opset: int) -> dict:
    """Write ``composer.onnx``; returns its I/O spec."""
    import onnx
    from onnx import TensorProto, helper

    io = composer_io(hidden)

    def vi(spec):
        return helper.make_tensor_value_info(spec["name"], TensorProto.FLOAT, spec["shape"])

    nodes = [
        helper.make_node("MatMul", ["task_cols", "task_rows"], ["task_prompt"], name="low_rank"),  # (B, T, D)
        helper.make_node("Mul", ["shared_prompt", "task_prompt"], ["prompt_embeds"], name="hadamard"),  # (B, T, D)
    ]
    graph = helper.make_graph(nodes, "mpt_composer", [vi(s) for s in io["inputs"]], [vi(s) for s in io["outputs"]])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="mpt-export")
    model.ir_version = min(model.ir_version, 10)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return io

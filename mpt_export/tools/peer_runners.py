"""The runners ``bench --peer`` measures (``run(ids, new)``: generate ``new`` tokens for a batch of ids): ours on a
bundle from the task's cached prompt KV, ONNX Runtime GenAI's on its model folder with the task's virtual tokens as
ordinary prompt tokens. Also run alone in a fresh process by the memory probe (bench_memory)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from ..bundle.reader import load_bundle


class Ours:
    def __init__(self, bundle: Path, task: str, threads: int, graph: str = "auto"):
        self.session = load_bundle(bundle, verify=False).session(intra_op_threads=threads, graph=graph)
        self.task = task

    def run(self, ids: np.ndarray, new: int) -> None:
        self.session.generate_ids(ids, [self.task] * ids.shape[0], max_new_tokens=new, eos_token_id=None)


class Peer:
    def __init__(self, model_dir: Path, virtual: np.ndarray, threads: int):
        import onnxruntime_genai as og

        cfg_file = Path(model_dir) / "genai_config.json"
        cfg = json.loads(cfg_file.read_text())
        opts = cfg["model"]["decoder"].setdefault("session_options", {})
        if opts.get("intra_op_num_threads") != threads:  # the same thread count as ours
            opts["intra_op_num_threads"] = threads
            cfg_file.write_text(json.dumps(cfg, indent=2))
        self.og, self.model, self.virtual = og, og.Model(str(model_dir)), virtual
        # its GroupQueryAttention wants a KV buffer at least as long as a sliding window (Gemma 2): max_length sizes
        # that buffer; the run still generates exactly ``new`` tokens
        self.window = int((cfg["model"]["decoder"].get("sliding_window") or {}).get("window_size") or 0)

    def run(self, ids: np.ndarray, new: int) -> None:
        prompt = np.concatenate([np.repeat(self.virtual[None], ids.shape[0], 0), ids], 1).astype(np.int32)
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=max(prompt.shape[1] + new, self.window), min_length=prompt.shape[1] + new,
                                  batch_size=ids.shape[0], do_sample=False)
        gen = self.og.Generator(self.model, params)
        gen.append_tokens(prompt)  # the prompt only: each generate_next_token runs one step and adds one token
        for _ in range(new):
            gen.generate_next_token()


RUNNER_KINDS = ("ours", "onnxruntime-genai")


def runner_from_spec(spec: dict):
    """A runner from its JSON spec (what a child process gets): ``{"kind": "ours", "bundle", "task", "threads"[, "graph"]}`` or
    ``{"kind": "onnxruntime-genai", "model", "virtual", "threads"}``."""
    if spec["kind"] == "ours":
        return Ours(Path(spec["bundle"]), spec["task"], spec["threads"], spec.get("graph", "auto"))
    return Peer(Path(spec["model"]), np.asarray(spec["virtual"], np.int64), spec["threads"])

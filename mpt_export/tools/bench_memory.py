"""The bench's memory probe: one row's peak resident memory, measured in a fresh process
(``python -m mpt_export.tools.bench_memory SPEC``), so memory an earlier row freed does not hide it."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from .bench_ref import peft_loop, peft_seq2seq_loop
from .peer_runners import runner_from_spec, RUNNER_KINDS
from ..bundle.reader import load_bundle
from ..export.reference import peft_model_for
from ..export.torchside import adapters_from_bank, load_base_model
from ..runtime.memory import status_bytes


def measure_memory(spec: dict) -> int | None:
    """Peak resident memory of one row, measured in a fresh process (in this one, memory freed by an earlier row is
    reused without showing up): the peak after loading the row's model and running one batch, minus the resident
    memory after imports."""
    try:
        res = subprocess.run([sys.executable, "-m", "mpt_export.tools.bench_memory", json.dumps(spec)], capture_output=True,
                             text=True, timeout=900)
        return int(res.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None


def memory_child(spec: dict) -> int:
    """``spec["kind"]``: ``peft`` (PyTorch), ``ort`` (a bundle's session, the bench's rows) or a bench --peer runner
    (``peer_runners.runner_from_spec``)."""
    if spec["kind"] == "peft":
        import torch

        torch.set_num_threads(spec["threads"])

    ids = np.asarray(spec["ids"], np.int64)
    base_rss = status_bytes("VmRSS") or 0
    if spec["kind"] in RUNNER_KINDS:  # bench --peer's runners, from the same specs its timing children get

        runner_from_spec(spec).run(ids, spec["new"])
    elif spec["kind"] == "peft":
        model, _, _ = load_base_model(spec["base"], attn_implementation="sdpa")
        b = load_bundle(spec["bundle"], verify=False)
        ck, names = adapters_from_bank(b.task_bank())[0]  # the bench's tasks come from the first adapter
        pm = peft_model_for(model, ck)
        task_ids = torch.tensor([names.index(t) for t in spec["tasks"]])
        if spec["seq2seq"]:
            peft_seq2seq_loop(pm, torch.from_numpy(ids), task_ids, spec["new"], spec["start"])
        else:
            peft_loop(pm, torch.from_numpy(ids), task_ids, spec["new"])
    else:
        s = load_bundle(spec["bundle"], verify=False).session(provider=spec["provider"], intra_op_threads=spec["threads"])
        s.generate_ids(ids, spec["tasks"], max_new_tokens=spec["new"], eos_token_id=None, prompt_kv_cache=spec["cache"])
    return (status_bytes("VmHWM") or 0) - base_rss


if __name__ == "__main__":  # the memory probe's child process (see measure_memory)
    print(memory_child(json.loads(sys.argv[1])))

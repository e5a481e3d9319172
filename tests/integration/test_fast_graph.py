"""The fast backbone (GroupQueryAttention over one in-place KV buffer per layer, fused norms), written
from a base model's weights, against PEFT itself: a task prompt's keys/values, each row's logits after a right-padded
mixed-task chunk, and greedy decoding of a mixed batch — every row what PEFT gives it alone. (GroupQueryAttention
needs head sizes that are multiples of 16, so these bases have hidden 64 and 4 heads, not the tests' usual 32.)"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from mpt_export.errors import ExportError, InputError
from mpt_export.export.fastgraph import write_fast_backbone
from mpt_export.runtime.fastkv import FastBackbone
from mpt_export.source.archs import arch_for

SMALL = dict(hidden=64, layers=2, heads=4, max_positions=64)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Per architecture: (PEFT model over a hidden-64 base with a 3-task MPT adapter, arch, fast graph path)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mpt_export.tools.demo import make_base_model, make_source_adapter

    root = tmp_path_factory.mktemp("fast")
    out = {}
    for name in ("llama", "llama-gqa", "mistral", "qwen2"):
        base = root / name / "base"
        model = make_base_model(base, arch=name, seed=0, **SMALL)
        make_source_adapter(model, root / name / "src", num_tasks=3, num_virtual_tokens=5, num_ranks=2, seed=1)
        fresh = AutoModelForCausalLM.from_pretrained(str(base))
        arch = arch_for(json.loads((base / "config.json").read_text()))
        path = root / name / "backbone_fast.onnx"
        write_fast_backbone(fresh, arch, path)
        pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(root / name / "src")).eval()
        out[name] = (pm, arch, path)
    return out


def _prompt(pm, task: int) -> np.ndarray:
    import torch

    with torch.no_grad():
        return pm.get_prompt(1, task_ids=torch.tensor([task]))[0].numpy()  # (P, H), what PEFT prepends


def _peft(pm, task: int, ids: list[int], new: int):
    """PEFT's forward on the growing sequence (no cache): (logits of the last input id, greedy tokens)."""
    import torch

    seq, toks, first = torch.tensor([ids]), [], None
    with torch.no_grad():
        for _ in range(new):
            logits = pm(input_ids=seq, attention_mask=torch.ones_like(seq), task_ids=torch.tensor([task])).logits[0, -1]
            first = logits.numpy() if first is None else first
            toks.append(int(logits.argmax()))
            seq = torch.cat([seq, torch.tensor([[toks[-1]]])], 1)
    return first, toks


@pytest.mark.parametrize("name", ["llama", "llama-gqa", "mistral", "qwen2"])
def test_fast_graph_gives_every_row_what_peft_gives_it_alone(bases, name):
    import torch

    pm, arch, path = bases[name]
    nodes = onnx.load(str(path), load_external_data=False).graph.node
    assert sum(n.op_type == "GroupQueryAttention" for n in nodes) == arch.num_layers
    assert len(nodes) <= 16 * arch.num_layers + 12  # fused: 13 nodes per layer (16 with Qwen2's biases)
    tasks, lens, new = [0, 2, 1], [5, 2, 7], 6
    rng = np.random.default_rng(3)
    rows = [rng.integers(3, arch.vocab_size, n).tolist() for n in lens]
    fb = FastBackbone(path, batch=3, capacity=40)
    for b, t in enumerate(tasks):
        prompt = _prompt(pm, t)
        kv = fb.prompt_kv(prompt)
        with torch.no_grad():  # the prompt's keys/values as PEFT's model caches them (after rotary)
            cache = pm.base_model(inputs_embeds=torch.from_numpy(prompt)[None], use_cache=True).past_key_values
        for i in range(arch.num_layers):
            keys, values = cache.layers[i].keys[0].numpy(), cache.layers[i].values[0].numpy()
            np.testing.assert_allclose(kv[f"past_key.{i}"], keys, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(kv[f"past_value.{i}"], values, rtol=1e-4, atol=1e-5)
        fb.set_row(b, kv)
    ids = np.zeros((3, max(lens)), np.int64)  # right-padded, mixed tasks
    for b, r in enumerate(rows):
        ids[b, : len(r)] = r
    logits = fb.run(ids, np.array(lens))
    toks = [[int(logits[b].argmax())] for b in range(3)]
    for b, (t, r) in enumerate(zip(tasks, rows)):
        want, _ = _peft(pm, t, r, 1)
        assert np.abs(logits[b] - want).max() <= 1e-5 + 1e-4 * np.abs(want).max(), (name, b)
    for _ in range(new - 1):
        logits = fb.run(np.array([[t[-1]] for t in toks]), np.ones(3, np.int64))
        for b in range(3):
            toks[b].append(int(logits[b].argmax()))
    assert toks == [_peft(pm, t, r, new)[1] for t, r in zip(tasks, rows)]
    assert fb.lengths.tolist() == [5 + n + new - 1 for n in lens]


def test_what_the_fast_graph_cannot_hold_is_refused(bases, make_case, llama, tmp_path):
    from mpt_export.export.torchside import load_base_model

    for case, needle in ((make_case("gpt2"), "no fast graph for model type 'gpt2'"),
                         (llama, "head size 8 .ONNX Runtime's GroupQueryAttention needs a multiple of 16")):
        model, _, _ = load_base_model(case.base)
        with pytest.raises(ExportError, match=needle):
            write_fast_backbone(model, arch_for(json.loads((case.base / "config.json").read_text())), tmp_path / "f.onnx")
        assert not (tmp_path / "f.onnx").exists()
    pm, _, path = bases["llama"]
    fb = FastBackbone(path, batch=1, capacity=8)
    fb.set_row(0, fb.prompt_kv(_prompt(pm, 0)))  # 5 positions
    with pytest.raises(InputError, match="9 positions do not fit a cache of 8"):
        fb.run(np.array([[3, 4, 5, 6]]), np.array([4]))
    with pytest.raises(InputError, match="a chunk of 1 rows of 1..2 ids"):
        fb.run(np.array([[3, 4]]), np.array([3]))

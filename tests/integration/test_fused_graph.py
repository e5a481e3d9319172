"""The fused graph (``backbone_fast``: GroupQueryAttention over one in-place KV buffer per layer, fused norms) as
sessions run it — ``Bundle.session(graph="fast")`` —, against PEFT itself: a task prompt's cached keys/values; each
row of a left-padded mixed-task batch (its logits and every cached position); greedy decoding through ``prefill``
and ``decode_step`` (what the serving engine drives) and ``generate_detailed`` — every row what PEFT gives it alone,
the cache written in place and grown once when full, holding what PEFT caches.

Four layouts: Llama (llama-h64), Llama with grouped-query heads (llama3-rope), Mistral and Qwen2 with grouped-query
heads and a sliding window shorter than the generation, Qwen2 with its projection biases (mistral-window,
qwen2-window) — bundles built once per run, shared with test_families.py, test_generate.py and others.
GroupQueryAttention needs head sizes that are multiples of 16: these bases have hidden 64 and 4 heads."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from support import left_padded, peft_greedy, peft_refs
from mpt_export.errors import ExportError
from mpt_export.export.fusedgraph import write_fused_backbone
from mpt_export.export.reference import peft_causal_forward
from mpt_export.source.archs import arch_for

CASES = ["llama-h64", "llama3-rope", "mistral-window", "qwen2-window"]
TASKS, LENS, NEW = ["c", "t", "a"], [5, 2, 7], 12  # 12 tokens: the cache prefill sizes fills up and grows once


@pytest.fixture(scope="module")
def refs(make_case):
    """name -> (the case's bundle, {task: (PEFT model, task index)}), built on first use."""
    memo = {}

    def get(name):
        if name not in memo:
            memo[name] = peft_refs(make_case(name))
        return memo[name]

    return get


def _close(got, want, what):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=what)


def _assert_cache(layers: int, got: dict, want: dict, what: str) -> None:
    """``got`` {name: (KV, T, Dh)} (the fused graph's cache names or the traced ones) against PEFT's present KV."""
    for i in range(layers):
        for kind in ("key", "value"):
            g = got.get(f"past_{kind}.{i}", got.get(f"present.{i}.{kind}"))
            _close(g, want[f"present.{i}.{kind}"][0][:, : g.shape[1]], f"{what} layer {i} {kind}")


@pytest.mark.parametrize("name", CASES)
def test_each_row_and_its_cache_are_what_peft_gives_it_alone(refs, name):
    b, ref = refs(name)
    s = b.session(graph="fast")
    assert s.graph == "fast"
    nodes = onnx.load(str(b.file(b.manifest["fast_graphs"]["backbone"]["file"])), load_external_data=False).graph.node
    assert sum(n.op_type == "GroupQueryAttention" for n in nodes) == s.num_layers
    assert len(nodes) <= 16 * s.num_layers + 12  # fused: 13 nodes per layer (16 with Qwen2's biases)
    ids, mask = left_padded(s.vocab_size, LENS, seed=3)
    rows = s.row_outputs(ids, TASKS, mask)  # the prompt run again in each row (no prompt-KV cache)
    logits = s.logits(ids, TASKS, mask)
    for r, (task, n) in enumerate(zip(TASKS, LENS)):
        pm, idx = ref[task]
        want = peft_causal_forward(pm, ids[r:r + 1, -n:], idx)
        assert np.abs(rows[r]["logits"][0] - want["logits"][0]).max() <= 1e-5 + 1e-4 * np.abs(want["logits"]).max()
        np.testing.assert_array_equal(logits[r], rows[r]["logits"][0])
        P = s.prompt_len(task)
        assert rows[r]["present.0.key"].shape[2] == P + n
        _assert_cache(s.num_layers, {k: v[0] for k, v in rows[r].items() if k != "logits"}, want, f"{name} row {r}")
        # the task's prompt KV as prefills copy it in (computed once per task): PEFT's first P positions
        kv = s.task_kv(task)
        assert next(iter(kv.values())).shape[1] == P
        _assert_cache(s.num_layers, kv, want, f"{name} task {task}")


@pytest.mark.parametrize("name", CASES)
def test_decoding_is_peft_greedy_with_the_cache_in_place_and_grown(refs, name):
    b, ref = refs(name)
    s = b.session(graph="fast")
    ids, mask = left_padded(s.vocab_size, LENS, seed=3)
    plens = [s.prompt_len(t) for t in TASKS]
    cold = b.session(graph="fast")  # no task's prompt KV cached yet: each prompt runs with its row's text
    assert cold.prefill(ids, TASKS, mask)[2] == sum(LENS) + sum(cold.prompt_len(t) for t in set(TASKS))
    for t in TASKS:
        s.task_kv(t)
    logits, state, processed = s.prefill(ids, TASKS, mask)  # the cached prompt KV copied in: only the text runs
    assert processed == sum(LENS)
    assert state["kv_mask"].sum(1).tolist() == [p + n for p, n in zip(plens, LENS)]
    capacity, grown = state["kv_mask"].shape[1], 0
    toks = [[int(t)] for t in logits.argmax(1)]
    for step in range(1, NEW):
        before, keys = state, state["past_key.0"]
        logits, state = s.decode_step(state, np.array([t[-1] for t in toks]))
        used = [p + n + step for p, n in zip(plens, LENS)]
        assert state["kv_mask"].sum(1).tolist() == used
        if max(used) <= capacity:  # written in place: the same buffers, the state given
            assert state is before and state["past_key.0"] is keys
        else:  # full: every buffer grown once, with room for the next steps
            grown += 1
            assert state["past_key.0"].shape[2] == state["kv_mask"].shape[1] == max(used) + s.state_room(max(used))
            capacity = state["kv_mask"].shape[1]
        for r, t in enumerate(logits.argmax(1)):
            toks[r].append(int(t))
    assert grown == 1, name
    for r, (task, n) in enumerate(zip(TASKS, LENS)):
        pm, idx = ref[task]
        real = ids[r:r + 1, -n:]
        assert toks[r] == peft_greedy(pm, idx, real, NEW), (name, r)
        # every slot the steps wrote (before and after the growth) holds what PEFT caches for the whole sequence
        want = peft_causal_forward(pm, np.concatenate([real, [toks[r][:-1]]], 1), idx)
        keep = state["kv_mask"][r] == 1
        _assert_cache(s.num_layers, {k: v[r][:, keep] for k, v in state.items() if k.startswith("past_")}, want,
                      f"{name} row {r} after decoding")
    kw = dict(max_new_tokens=NEW, eos_token_id=None)
    np.testing.assert_array_equal(s.generate_detailed(ids, TASKS, mask, **kw).ids, toks)
    np.testing.assert_array_equal(s.generate_detailed(ids, TASKS, mask, prompt_kv_cache=False, **kw).ids, toks)


def test_what_the_fast_graph_cannot_hold_is_refused(make_case, llama, tmp_path):
    from mpt_export.export.torchside import load_base_model

    for case, needle in ((make_case("gpt2"), "no fast graph for model type 'gpt2'"),
                         (llama, "head size 8 .ONNX Runtime's GroupQueryAttention needs a multiple of 16")):
        model, _, _ = load_base_model(case.base)
        with pytest.raises(ExportError, match=needle):
            write_fused_backbone(model, arch_for(json.loads((case.base / "config.json").read_text())), tmp_path / "f.onnx")
        assert not (tmp_path / "f.onnx").exists()


def test_a_prefill_is_one_call_per_prompt_length_and_each_row_what_it_gets_alone(refs):
    """A mixed batch — cached task prompts, a missing one, two rows of one missing task, texts of 1 to 7 tokens —
    runs in one call per missing prompt length (the prompt computed once) and one for every row whose prompt KV is
    known (right-padded chunks), not one per row; each row's logits and cache are those of the row run alone, and a
    bundle whose graph predates ``query_seqlens`` (row by row) gives the same numbers."""
    b, ref = refs("llama3-rope")
    tasks, lens = ["c", "t", "a", "a", "c", "t"], [5, 1, 7, 3, 2, 6]
    ids, mask = left_padded(b.session(graph="fast").vocab_size, lens, seed=11)

    def run(s, warm=()):
        calls = []
        inner = s._run_bound
        s._run_bound = lambda graph, binding, feed: calls.append(feed["input_ids"].shape) or inner(graph, binding, feed)
        for t in warm:
            s.task_kv(t)
        calls.clear()
        logits, state, processed = s.prefill(ids, tasks, mask)
        return logits, state, processed, calls

    s = b.session(graph="fast")
    assert s._ragged
    logits, state, processed, calls = run(s, warm=["c", "t"])
    # "a" missing: its prompt runs once, in its first row's call; then the other five rows (its second one copying
    # the prompt KV that call computed) in one call, padded to the longest text (6)
    assert calls == [(1, 7), (5, 6)]
    assert processed == sum(lens) + s.prompt_len("a")
    assert s.cached_task_kv("a") is not None
    alone = b.session(graph="fast")
    for r, (task, n) in enumerate(zip(tasks, lens)):
        one, st1, _ = alone.prefill(ids[r:r + 1, -n:], [task], np.ones((1, n), np.int64))
        _close(logits[r], one[0], f"row {r} logits")
        keep, keep1 = state["kv_mask"][r] == 1, st1["kv_mask"][0] == 1
        assert keep.sum() == keep1.sum() == s.prompt_len(task) + n
        for k in (k for k in state if k.startswith("past_")):
            _close(state[k][r][:, keep], st1[k][0][:, keep1], f"row {r} {k}")
    old = b.session(graph="fast")
    old._ragged = False  # row by row, as a bundle written before the graph took query_seqlens runs
    logits_old, state_old, processed_old, calls_old = run(old, warm=["c", "t"])
    assert len(calls_old) == len(tasks) and processed_old == processed
    _close(logits_old, logits, "row by row")
    np.testing.assert_array_equal(state_old["kv_mask"], state["kv_mask"])

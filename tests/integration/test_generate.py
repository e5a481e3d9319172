"""Generation against PEFT's forward, prompt-KV cache, batching, sampling, EOS, task swap, threads."""

import hashlib
import json
import shutil
import threading

import numpy as np
import pytest

import mpt_export
from support import assert_clean_failure, left_padded, cli, peft_greedy
from mpt_export.errors import BaseModelError, InputError, TaskNameError
from mpt_export.export.torchside import adapters_from_bank, load_base_model
from mpt_export.export.reference import peft_model_for


@pytest.mark.parametrize("arch,graph", [("llama", "plain"), ("llama-gqa", "plain"), ("gpt2", "plain"),
                                        ("llama-h64", "fast"), ("llama-h64", "plain")])
def test_greedy_equals_peft_forward_every_task(make_case, arch, graph):
    """Both backbones where a bundle has two: the fused graph (llama-h64: head size 16) and the traced one."""
    case = make_case(arch)
    b = mpt_export.load_bundle(case.bundle)
    model, _, _ = load_base_model(case.base)
    s = b.session(graph=graph)
    assert s.graph == graph
    rng = np.random.default_rng(11)
    for ck, names in adapters_from_bank(b.task_bank()):
        pm = peft_model_for(model, ck)
        for i, name in enumerate(names):
            ids = rng.integers(0, s.vocab_size, (1, 6))
            ref = peft_greedy(pm, i, ids, 16)
            got = s.generate_ids(ids, [name], max_new_tokens=16, eos_token_id=None)
            assert got.tolist() == [ref], (arch, name)


def test_cache_on_off_and_batch_equals_solo(make_case):
    s = mpt_export.load_bundle(make_case("llama-gqa").bundle).session()
    tasks = ["t", "a", "c", "b"]
    ids, mask = left_padded(s.vocab_size, [7, 2, 5, 7])
    on = s.generate_ids(ids, tasks, mask, max_new_tokens=12, eos_token_id=None, prompt_kv_cache=True)
    off = s.generate_ids(ids, tasks, mask, max_new_tokens=12, eos_token_id=None, prompt_kv_cache=False)
    np.testing.assert_array_equal(on, off)
    for i, n in enumerate([7, 2, 5, 7]):
        solo = s.generate_ids(ids[i:i + 1, -n:], [tasks[i]], max_new_tokens=12, eos_token_id=None)
        np.testing.assert_array_equal(on[i], solo[0])
    # the cache really skips the prompt: fewer tokens run through the backbone
    r_on = s.generate_detailed(ids, tasks, mask, max_new_tokens=2, prompt_kv_cache=True)
    r_off = s.generate_detailed(ids, tasks, mask, max_new_tokens=2, prompt_kv_cache=False)
    assert r_off.tokens_processed - r_on.tokens_processed == 4 * 5


def test_prompt_kv_cache_is_bounded_and_keyed_by_content(llama):
    b = mpt_export.load_bundle(llama.bundle)
    s = b.session(kv_cache_size=2)
    for t in b.tasks:
        s.task_kv(t)
    assert len(s._task_kv) == 2
    kv_a = s.task_kv("a")
    task = s.bank.task("a")
    task.rows = task.rows + np.random.default_rng(0).normal(size=task.rows.shape).astype(np.float32)  # changed task
    assert not np.allclose(s.task_kv("a")[0], kv_a[0], atol=1e-3)  # must not reuse the stale KV


def test_sampling_is_reproducible(llama):
    s = mpt_export.load_bundle(llama.bundle).session()
    ids, mask = left_padded(s.vocab_size, [4, 6])
    kw = dict(max_new_tokens=10, temperature=1.0, top_k=20, top_p=0.9, eos_token_id=None)
    a = s.generate_ids(ids, ["a", "t"], mask, seed=1, **kw)
    b = s.generate_ids(ids, ["a", "t"], mask, seed=1, **kw)
    c = s.generate_ids(ids, ["a", "t"], mask, seed=2, **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # top_k=1 is greedy whatever the temperature
    g = s.generate_ids(ids, ["a", "t"], mask, max_new_tokens=10, eos_token_id=None)
    np.testing.assert_array_equal(s.generate_ids(ids, ["a", "t"], mask, max_new_tokens=10, temperature=2.0, top_k=1,
                                                 seed=9, eos_token_id=None), g)
    # one SamplingParams, or its fields as keywords (applied over one), or the old positional max_new_tokens: one path
    from mpt_export.runtime.sampling import SamplingParams

    p = SamplingParams(seed=1, **kw)
    np.testing.assert_array_equal(s.generate_detailed(ids, ["a", "t"], mask, p).ids, a)
    np.testing.assert_array_equal(s.generate_ids(ids, ["a", "t"], mask, sampling=SamplingParams(seed=1), **kw), a)
    np.testing.assert_array_equal(s.generate_detailed(ids, ["a", "t"], mask, 10, eos_token_id=None).ids, g)
    for bad, field in ((dict(top_p=0), "top_p"), (dict(seed=-1), "seed"), (dict(max_new_tokens=0), "max_new_tokens"),
                       (dict(max_new_tokens=200), "max_new_tokens"), (dict(temprature=1.0), "temprature")):
        with pytest.raises(InputError) as e:
            s.generate_detailed(ids, ["a", "t"], mask, p, **bad)
        assert e.value.param == field, (bad, e.value)


def test_eos_stops_one_row_while_others_continue(llama):
    s = mpt_export.load_bundle(llama.bundle).session()
    ids, mask = left_padded(s.vocab_size, [5, 5], seed=21)
    free = s.generate_ids(ids, ["a", "b"], mask, max_new_tokens=12, eos_token_id=None)
    # an EOS token that row 0 emits at some step k and row 1 never emits
    k, eos = next((k, int(t)) for k, t in enumerate(free[0]) if k >= 1 and int(t) not in free[1] and int(t) not in free[0][:k])
    r = s.generate_detailed(ids, ["a", "b"], mask, max_new_tokens=12, eos_token_id=eos)
    assert r.lengths.tolist() == [k + 1, 12] and r.finish == ["eos", "length"]
    np.testing.assert_array_equal(r.ids[1], free[1])
    assert (r.ids[0, k:] == eos).all()


def test_session_add_task_in_memory(llama):
    b = mpt_export.load_bundle(llama.bundle)
    s = b.session()
    bank = b.task_bank()
    t = bank.task("b")
    s.add_task("b2", shared_prompt=bank.shared[t.shared], cols=t.cols, rows=t.rows)
    ids = np.array([[3, 4, 5]])
    np.testing.assert_array_equal(s.generate_ids(ids, ["b2"], max_new_tokens=6),
                                  s.generate_ids(ids, ["b"], max_new_tokens=6))
    with pytest.raises(InputError, match=r"expected \[T, 32\]"):
        s.add_task("bad", shared_prompt=np.zeros((5, 16)), cols=np.zeros((5, 1)), rows=np.zeros((1, 16)))
    with pytest.raises(TaskNameError, match="already exists"):
        s.add_task("b2", shared_prompt=bank.shared[0], cols=t.cols, rows=t.rows)


@pytest.mark.parametrize("arch", ["llama", "llama-h64"])
def test_concurrent_generate_matches_sequential(make_case, arch):
    """One session, several threads (llama-h64: the fused graph, whose cache each call updates in place)."""
    s = mpt_export.load_bundle(make_case(arch).bundle).session()
    jobs = [(left_padded(s.vocab_size, [3 + i, 6], seed=i), ["a", "b", "c", "t"][i % 4]) for i in range(8)]
    seq = [s.generate_ids(ids, [task, "t"], mask, max_new_tokens=8) for (ids, mask), task in jobs]
    res = [None] * len(jobs)

    def work(j):
        (ids, mask), task = jobs[j]
        res[j] = s.generate_ids(ids, [task, "t"], mask, max_new_tokens=8)

    for rnd in range(2):
        threads = [threading.Thread(target=work, args=(j,)) for j in range(rnd * 4, rnd * 4 + 4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
    for a, b in zip(seq, res):
        np.testing.assert_array_equal(a, b)


def _digests(d):
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in d.rglob("*") if p.is_file()}


def test_tasks_add_generate_remove(llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from mpt_export.tools.demo import make_source_adapter

    bdir = tmp_path / "b"
    shutil.copytree(llama.bundle, bdir)
    backbone_sha = json.loads((bdir / "manifest.json").read_text())["files"]["backbone.onnx.data"]
    new = make_source_adapter(AutoModelForCausalLM.from_pretrained(str(llama.base)), tmp_path / "new", num_tasks=2,
                              num_virtual_tokens=7, num_ranks=3, seed=99)
    res = cli("tasks", "add", bdir, "--adapter", f"qa,nli={new}")
    assert res.returncode == 0, res.stderr
    b = mpt_export.load_bundle(bdir)
    assert b.tasks == ["a", "b", "c", "t", "qa", "nli"]
    assert b.manifest["files"]["backbone.onnx.data"] == backbone_sha
    # the new task generates exactly what PEFT's forward gives
    model, _, _ = load_base_model(llama.base)
    from mpt_export.source.adapters import read_adapter

    pm = peft_model_for(model, read_adapter(new))
    ids = np.array([[7, 8, 9, 10]])
    assert b.session().generate_ids(ids, ["nli"], max_new_tokens=8, eos_token_id=None).tolist() == [
        peft_greedy(pm, 1, ids, 8)]
    # a mixed batch across old and new tasks (prompt lengths 5 and 7) still gives each row its solo result
    s = b.session()
    bi, bm = left_padded(s.vocab_size, [4, 6, 2])
    mixed = s.generate_ids(bi, ["qa", "a", "nli"], bm, max_new_tokens=6, eos_token_id=None)
    for i, n in enumerate([4, 6, 2]):
        np.testing.assert_array_equal(mixed[i], s.generate_ids(bi[i:i + 1, -n:], [["qa", "a", "nli"][i]],
                                                               max_new_tokens=6, eos_token_id=None)[0])
    res = cli("tasks", "list", bdir)
    assert res.returncode == 0 and "nli" in res.stdout
    res = cli("tasks", "remove", bdir, "qa")
    assert res.returncode == 0, res.stderr
    assert mpt_export.load_bundle(bdir).tasks == ["a", "b", "c", "t", "nli"]
    # the original bundle (hard-linked mirror) was never written through
    assert mpt_export.load_bundle(llama.bundle).tasks == ["a", "b", "c", "t"]


def test_generate_cli(llama, tmp_path):
    res = cli("generate", llama.bundle, "--task", "a", "the movie was", "a great", "--max-new-tokens", "5", "--json")
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["task"] for r in rows] == ["a", "a"] and all(1 <= len(r["ids"]) <= 5 for r in rows)
    s = mpt_export.load_bundle(llama.bundle).session()
    assert rows[0]["text"] == s.generate(["the movie was"], ["a"], max_new_tokens=5)[0]
    f = tmp_path / "in.jsonl"
    f.write_text("\n".join(json.dumps({"task": t, "text": x}) for t, x in
                           [("a", "one frozen backbone"), ("t", "the plot"), ("b", "question : where")]))
    res = cli("generate", llama.bundle, "--input-file", f, "--batch-size", "2", "--max-new-tokens", "4", "--json")
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["task"] for r in rows] == ["a", "t", "b"]
    assert rows[1]["text"] == s.generate(["the plot"], ["t"], max_new_tokens=4)[0]  # batch of 2 == alone
    res = cli("generate", llama.bundle, "--task", "t", "the plot", "--max-new-tokens", "4", "--stream")
    assert res.returncode == 0 and res.stdout.rstrip("\n") == rows[1]["text"]
    # no setting given: the command's one defaults object (greedy, 32 new tokens) reaches the loop
    from mpt_export.cli.generate import CLI_DEFAULTS

    res = cli("generate", llama.bundle, "--task", "t", "the plot", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["text"] == s.generate(["the plot"], "t", sampling=CLI_DEFAULTS)[0]
    # a temperature whose logits / t overflowed (a traceback once): below 1e-5 sampling is greedy
    res = cli("generate", llama.bundle, "--task", "t", "the plot", "--max-new-tokens", "4", "--temperature",
                  "1e-320", "--seed", "1", "--stream")
    assert res.returncode == 0 and res.stdout.rstrip("\n") == rows[1]["text"], res.stderr


def test_generate_bad_inputs(llama, tmp_path):
    from support import assert_clean_failure

    before = _digests(llama.bundle)
    assert_clean_failure(cli("generate", llama.bundle, "--task", "nope", "hi"), "unknown task 'nope'", "a, b, c, t")
    long = " ".join(["the movie was great"] * 40)
    assert_clean_failure(cli("generate", llama.bundle, "--task", "a", long), "at most 59 input tokens fit")
    assert_clean_failure(cli("generate", llama.bundle, "--task", "a", "the movie", "--max-new-tokens", "60"),
                         "input + max_new_tokens <= 59")
    assert_clean_failure(cli("generate", llama.bundle, "--task", "a", ""), "prompt 1 is empty")
    assert_clean_failure(cli("generate", llama.bundle, "--task", "a", "hi", "--max-new-tokens", "0"),
                         "max_new_tokens must be a positive integer")
    from support import wide_adapter

    other = wide_adapter(tmp_path)
    assert_clean_failure(cli("tasks", "add", llama.bundle, "--adapter", f"w1,w2={other}"),
                         "trained for another base model", "token_dim 48", "hidden size is 32")
    assert_clean_failure(cli("tasks", "add", llama.bundle, "--adapter", f"a={llama.target}"), "'a' is already taken", "tasks remove")
    assert_clean_failure(cli("tasks", "add", llama.bundle, "--adapter", f"{'n' * 129}={llama.target}"),
                         "is 129 characters long", "at most 128")
    assert_clean_failure(cli("tasks", "remove", llama.bundle, "zz"), "unknown task 'zz'")
    assert _digests(llama.bundle) == before
    assert not list(llama.bundle.parent.glob(".bundle.mpt-export-tmp-*"))
    s = mpt_export.load_bundle(llama.bundle).session()
    with pytest.raises(BaseModelError):
        from mpt_export.source.adapters import read_adapter
        from mpt_export.export.task_edits import check_adapter_matches

        check_adapter_matches(mpt_export.load_bundle(llama.bundle), read_adapter(other))
    del s



def test_session_options(llama):
    b = mpt_export.load_bundle(llama.bundle)
    ids = np.array([[3, 4, 5, 6]])
    ref = b.session(io_binding=False).generate_ids(ids, ["c"], max_new_tokens=8, eos_token_id=None)
    for opts in ({"io_binding": True}, {"optimization": "basic", "intra_op_threads": 1}):
        np.testing.assert_array_equal(b.session(**opts).generate_ids(ids, ["c"], max_new_tokens=8, eos_token_id=None), ref)
    with pytest.raises(InputError, match="unknown graph optimization level 'max'"):
        b.session(optimization="max")


def test_prepack_policy(llama):
    """Packed weight copies only where two copies of the weights fit in available memory; results are the same."""
    from mpt_export.runtime.ortgraphs import available_memory, graph_weight_bytes, prepack_fits

    b = mpt_export.load_bundle(llama.bundle)
    w = graph_weight_bytes(b)
    assert w == (llama.bundle / "backbone.onnx.data").stat().st_size > 0
    assert prepack_fits(w, 2 * w) and not prepack_fits(w, 2 * w - 1) and prepack_fits(w, None)
    assert available_memory() > 0
    ids = np.array([[3, 4, 5, 6], [7, 8, 9, 10]])
    runs = {}
    for choice in ("auto", True, False):
        s = b.session(prepack=choice)
        runs[choice] = (s.prepacked, s.generate_ids(ids, ["a", "t"], max_new_tokens=6, eos_token_id=None))
    assert runs["auto"][0] is True and runs[True][0] is True and runs[False][0] is False  # a tiny model fits
    np.testing.assert_array_equal(runs[False][1], runs[True][1])
    with pytest.raises(InputError, match="prepack must be True, False or 'auto'"):
        b.session(prepack="yes")
    res = cli("generate", llama.bundle, "--task", "a", "the movie was", "--max-new-tokens", "4", "--no-prepack",
                  "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["text"] == b.session().generate(["the movie was"], ["a"], max_new_tokens=4)[0]


def test_a_big_bank_stays_editable_and_its_manifest_small(llama, tmp_path):
    """6,000 tasks: the manifest stays small (the task list lives in the task files), adds and removes write one
    small segment each; and the ownership check reads our files whole — a manifest past 1 MiB (an older bundle's
    task list) was cut there, not recognised as ours, and every later `tasks add`/`tasks remove` refused."""
    from transformers import AutoModelForCausalLM

    from mpt_export.storage.ownership import dir_kind
    from mpt_export.tools.demo import make_source_adapter

    bdir = tmp_path / "big"
    shutil.copytree(llama.bundle, bdir)
    n = 6000
    many = make_source_adapter(AutoModelForCausalLM.from_pretrained(str(llama.base)), tmp_path / "many",
                               num_tasks=n, num_virtual_tokens=2, num_ranks=1, seed=7)
    names = tmp_path / "names.txt"
    names.write_text("".join(f"task{i:05d}\n" for i in range(n)))
    res = cli("tasks", "add", bdir, "--adapter", many, "--names-file", names)
    assert res.returncode == 0 and "added 6000 tasks: task00000" in res.stdout, res.stderr
    assert (bdir / "manifest.json").stat().st_size < 64 << 10
    before = {p.name: p.stat().st_ino for p in bdir.rglob("*.safetensors")}
    res = cli("tasks", "add", bdir, "--adapter", f"one_more={llama.target}")
    assert res.returncode == 0, res.stderr
    res = cli("tasks", "remove", bdir, "task00042")
    assert res.returncode == 0, res.stderr
    after = {p.name: p.stat().st_ino for p in bdir.rglob("*.safetensors")}
    assert {k: after[k] for k in before} == before and len(after) == len(before) + 2  # two new small files
    b = mpt_export.load_bundle(bdir)
    assert len(b.tasks) == len(mpt_export.load_bundle(llama.bundle).tasks) + n
    assert "one_more" in b.tasks and "task00042" not in b.tasks
    b.verify()
    big = tmp_path / "older"
    big.mkdir()
    (big / "manifest.json").write_text(json.dumps({"format": "mpt-export/bundle/2", "tasks": ["x" * 100] * 20000}))
    assert (big / "manifest.json").stat().st_size > 1 << 20 and dir_kind(big) == "bundle"

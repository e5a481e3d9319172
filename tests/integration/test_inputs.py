"""Bad inputs get one clear message on every path that brings them in; streamed text equals the final text."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import mpt_export
from support import cli
from mpt_export.errors import BaseModelError, InputError, NumericsError
from support import assert_clean_failure, edit_manifest, no_output_left, poison_token


# -- 6. every path that brings a task in checks the same things -----------------------------------------------------

def test_session_add_task_refuses_poison(llama):
    s = mpt_export.load_bundle(llama.bundle).session()
    H, T = s.hidden_size, 5
    P, C, R = np.ones((T, H)), np.ones((T, 2)), np.ones((2, H))
    bad = {"NaN": (np.where(np.eye(T, H) > 0, np.nan, P), C, R, "NaN or Inf"),
           "Inf": (P, C, np.full((2, H), np.inf), "NaN or Inf"),
           "overflow": (P, np.full((T, 2), 1e20), np.full((2, H), 1e20), "overflows float32"),
           "T=0": (np.ones((0, H)), np.ones((0, 2)), R, "at least 1"),
           "rank 0": (P, np.ones((T, 0)), np.ones((0, H)), "at least 1"),
           "too long": (np.ones((63, H)), np.ones((63, 2)), R, "only 64 positions"),
           "width": (np.ones((T, H + 1)), C, np.ones((2, H + 1)), f"hidden size is {H}"),
           "not numbers": ([["x"]], C, R, "numeric arrays")}
    for label, (p, c, r, needle) in bad.items():
        with pytest.raises(InputError, match=needle):
            s.add_task(f"bad-{label.replace(' ', '').replace('=', '')}", shared_prompt=p, cols=c, rows=r)
    assert "bad-NaN" not in s.tasks
    s.add_task("fine", shared_prompt=P * 0.1, cols=C, rows=R)
    assert s.generate_ids(np.array([[4, 5]]), ["fine"], max_new_tokens=2).shape == (1, 2)


def test_task_vectors_whose_product_overflows_are_refused_everywhere(llama, tmp_path):
    """cols = rows = 1e20 pass every per-array finiteness check, but the composed prompt is Inf and every request to
    the task would fail: refused at export, at `tasks add`, and in a bank rewritten (and re-hashed) behind our back."""
    from safetensors.numpy import load_file, save_file
    from transformers import AutoModelForCausalLM

    from mpt_export.bundle.bankfile import load_files, write_file
    from mpt_export.bundle.manifest import sha256_file

    from mpt_export.tools.demo import make_source_adapter

    huge = make_source_adapter(AutoModelForCausalLM.from_pretrained(str(llama.base)), tmp_path / "huge", num_tasks=2,
                               num_virtual_tokens=4, num_ranks=2, seed=4)
    w = load_file(str(huge / "adapter_model.safetensors"))
    for k in w:
        if "prefix_task_cols" in k or "prefix_task_rows" in k:
            w[k] = np.full_like(w[k], 1e20)
    save_file(w, str(huge / "adapter_model.safetensors"))
    b = tmp_path / "b"
    shutil.copytree(llama.bundle, b)
    before = (b / "manifest.json").read_bytes()
    assert_clean_failure(cli("tasks", "add", b, "--adapter", f"x,y={huge}"), "task 'x'", "overflows float32")
    assert (b / "manifest.json").read_bytes() == before
    out = tmp_path / "out"
    assert_clean_failure(cli("export", "--base-model", llama.base, "--adapter", f"x,y={huge}", "--out", out,
                             "--no-validate"), "overflows float32")
    assert no_output_left(out)
    # a bank rewritten with such a task and every checksum made to match again: verify and load name it
    bank = load_files([b / "tasks.safetensors"])
    bank.tasks[0].cols = np.full_like(bank.tasks[0].cols, 1e20)
    bank.tasks[0].rows = np.full_like(bank.tasks[0].rows, 1e20)
    (b / "tasks.safetensors").unlink()
    write_file(b / "tasks.safetensors", bank)
    edit_manifest(b, lambda m: m["files"].update({"tasks.safetensors": sha256_file(b / "tasks.safetensors")}),
                  redigest=True)
    assert_clean_failure(cli("verify", b), f"task {bank.tasks[0].name!r}", "overflows float32")
    with pytest.raises(mpt_export.errors.MptExportError, match="overflows float32"):
        mpt_export.load_bundle(b)


def test_a_task_longer_than_the_positions_is_refused_everywhere(llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from mpt_export.tools.demo import make_source_adapter
    from mpt_export.export.task_edits import add_tasks

    long = make_source_adapter(AutoModelForCausalLM.from_pretrained(str(llama.base)), tmp_path / "long", num_tasks=1,
                               num_virtual_tokens=63, num_ranks=1, seed=4)
    b = tmp_path / "b"
    shutil.copytree(llama.bundle, b)
    assert_clean_failure(cli("tasks", "add", b, "--adapter", f"x={long}"), "63 virtual tokens",
                         "only 64 positions")
    with pytest.raises(BaseModelError, match="only 64 positions"):
        add_tasks(b, [f"x={long}"])
    out = tmp_path / "out"
    assert_clean_failure(cli("export", "--base-model", llama.base, "--adapter", f"x={long}", "--out", out,
                                 "--no-validate"), "63 virtual tokens", "only 64 positions")
    assert no_output_left(out)


def test_nan_logits_are_an_error_not_eos(llama, tmp_path):
    """A bundle whose weights produce NaN (damaged, then re-hashed so that the checksums pass) must not end its
    rows as if they had met EOS."""
    import onnx

    from mpt_export.bundle.manifest import write_manifest

    b = tmp_path / "b"
    shutil.copytree(llama.bundle, b)
    g = onnx.load(str(b / "backbone.onnx"), load_external_data=False)
    norm = [t for t in g.graph.initializer if "norm" in t.name and t.data_type == onnx.TensorProto.FLOAT][-1]
    info = {e.key: e.value for e in norm.external_data}
    if info:  # stored in the weights file
        data = bytearray((b / "backbone.onnx.data").read_bytes())
        off, n = int(info["offset"]), int(info["length"])
        data[off:off + n] = np.full(n // 4, np.nan, np.float32).tobytes()
        (b / "backbone.onnx.data").write_bytes(bytes(data))
    else:  # small tensors live in the graph file itself
        norm.raw_data = np.full(int(np.prod(norm.dims)), np.nan, np.float32).tobytes()
        onnx.save(g, str(b / "backbone.onnx"))
    write_manifest(b, json.loads((b / "manifest.json").read_text()))
    s = mpt_export.load_bundle(b).session()
    with pytest.raises(NumericsError, match="NaN or Inf logits at generation step 0 .*task a"):
        s.generate_ids(np.array([[4, 5, 6]]), ["a"], max_new_tokens=3)
    assert_clean_failure(cli("generate", b, "--task", "a", "the movie"), "NaN or Inf logits", "mpt-export verify")


# -- 7. --input-file is read and checked whole, errors name file:line ------------------------------------------------

def test_input_file_is_checked_before_anything_runs(llama, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"task": "a", "text": "the movie"}\n{"task": "b", "text": "the plot"}\n{"text": 7, "task": "a"}\n'
                 'not json\n[1, 2]\n{"task": "a", "text": "  "}\n')
    res = cli("generate", llama.bundle, "--input-file", f)
    assert_clean_failure(res, f"{f}:3: \"text\" must be a string, got 7", f"{f}:4: not JSON", f"{f}:5: a JSON list",
                         f"{f}:6: \"text\" is empty")
    assert res.stdout == ""  # nothing generated for the good lines before the bad ones
    f.write_text('{"task": "a", "text": "the movie"}\n{"task": "nope", "text": "the plot"}\n'
                 + json.dumps({"task": "a", "text": " ".join(["the movie was great"] * 40)}) + "\n")
    res = cli("generate", llama.bundle, "--input-file", f)
    assert_clean_failure(res, f"{f}:2: unknown task 'nope'", f"{f}:3: input of", "too long")
    assert res.stdout == ""
    f.write_text("")
    assert_clean_failure(cli("generate", llama.bundle, "--input-file", f), "holds no prompts")
    f.write_bytes(b'{"task": "a", "text": "ok"}\n{"task": "a", "text": "caf\xe9"}\n')
    assert_clean_failure(cli("generate", llama.bundle, "--input-file", f), f"{f}:2: not UTF-8")
    f.write_text('{"text": "the movie"}\n')
    assert_clean_failure(cli("generate", llama.bundle, "--input-file", f), f"{f}:1: no \"task\" and no --task")
    res = cli("generate", llama.bundle, "--input-file", f, "--task", "b", "--json", "--max-new-tokens", "2")
    assert res.returncode == 0 and json.loads(res.stdout)["line"] == 1


# -- 8. streaming --------------------------------------------------------------------------------------------------

def test_input_file_rows_fail_alone(llama, tmp_path):
    """A bundle that gives NaN for one token (its embedding row damaged, checksums re-made): the row whose text
    holds it ends with its error, every other row prints what the clean bundle gives it, and the command exits 1
    naming the failed line — as text and as JSON lines."""
    texts = [("a", "the movie"), ("b", "the station was"), ("c", "a plot")]
    tok = mpt_export.load_bundle(llama.bundle).session().tokenizer
    ids = [tok.encode(t) for _, t in texts]
    bad_token = next(t for t in ids[1] if t not in ids[0] + ids[2])
    b = tmp_path / "b"
    shutil.copytree(llama.bundle, b)
    poison_token(b, bad_token)
    f = tmp_path / "in.jsonl"
    f.write_text("".join(json.dumps({"task": k, "text": t}) + "\n" for k, t in texts))
    clean = [json.loads(x) for x in cli("generate", llama.bundle, "--input-file", f, "--json", "--max-new-tokens",
                                        "4", "-q").stdout.splitlines()]
    assert not any(bad_token in r["ids"] for r in clean)
    res = cli("generate", b, "--input-file", f, "--json", "--max-new-tokens", "4", "-q")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    got = [json.loads(x) for x in res.stdout.splitlines()]
    assert [r["line"] for r in got] == [1, 2, 3]
    assert got[1]["finish"] == "error" and got[1]["text"] is None and got[1]["error"]["type"] == "NumericsError"
    for i in (0, 2):
        assert "error" not in got[i] and (got[i]["text"], got[i]["ids"]) == (clean[i]["text"], clean[i]["ids"])
    assert_clean_failure(res, "1 of 3 row(s) failed", f"{f}:2: the model produced NaN or Inf logits", "task b")
    res = cli("generate", b, "--input-file", f, "--max-new-tokens", "4", "-q")
    out = " ".join(res.stdout.split())
    assert res.returncode == 1 and f"-> {clean[0]['text']!r}" in out and "'the station was' -> error:" in out


def test_text_stream_never_shows_partial_characters_or_stop_strings(llama):
    from mpt_export.runtime.streaming import TextStream

    tok = mpt_export.load_bundle(llama.bundle).session().tokenizer
    text = "café ☕ ok — naïve"
    ids = tok.tok.encode(text).ids
    assert len(ids) > len(text.split())  # byte-level pieces: characters split across tokens
    st = TextStream(tok)
    pieces = [st.push(i) for i in ids]
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) + st.finish(tok.decode(ids)) == tok.decode(ids) == text
    st = TextStream(tok, stop=["☕ o"])
    shown = "".join(st.push(i) for i in ids)
    assert shown == "café " and st.stopped
    partial = TextStream(tok, stop=["ok!"])
    shown = "".join(partial.push(i) for i in ids[: len(tok.tok.encode("café ☕ ok").ids)])
    assert shown == "café ☕ "  # "ok" could be the start of the stop string: held back until it is not


def test_text_stream_window_agrees_with_whole_decodes(llama):
    """Each push decodes a short window; what it shows is always a prefix of decoding the whole row."""
    from mpt_export.runtime.streaming import TextStream, cut_at_stop

    tok = mpt_export.load_bundle(llama.bundle).session().tokenizer
    rng = np.random.default_rng(0)
    vocab = tok.tok.get_vocab_size()
    for n in range(60):
        ids = rng.integers(0, vocab, int(rng.integers(1, 40))).tolist()
        stop = ["e t"] if n % 3 == 0 else None
        st = TextStream(tok, stop=stop)
        pieces = []
        for k, i in enumerate(ids):
            pieces.append(st.push(i))
            assert tok.decode(ids[: k + 1]).startswith("".join(pieces))
            if st.stopped:
                break
        final = cut_at_stop(tok.decode(ids[: k + 1]), stop)
        assert "".join(pieces) + st.finish(final) == final


def test_stream_equals_final_text(llama):
    non_ascii = False
    for seed in range(8):
        args = ("generate", llama.bundle, "--task", "t", "the movie", "--max-new-tokens", "12", "--temperature", "3",
                "--seed", str(seed))
        final = json.loads(cli(*args, "--json").stdout)["text"]
        streamed = cli(*args, "--stream")
        assert streamed.returncode == 0 and streamed.stdout == final + "\n", (seed, streamed.stdout, final)
        jl = cli(*args, "--stream", "--json")
        lines = [json.loads(x) for x in jl.stdout.splitlines()]  # JSON lines only
        assert "".join(x.get("delta", "") for x in lines[:-1]) == final == lines[-1]["text"]
        non_ascii |= any(ord(ch) > 127 for ch in final)
        if non_ascii and seed >= 2:
            break
    assert non_ascii  # random byte-level tokens: some texts hold multi-byte characters


def test_stream_json_several_prompts_and_stop(llama):
    res = cli("generate", llama.bundle, "--task", "a", "the movie", "the plot", "--stream", "--json",
                  "--max-new-tokens", "6", "--stop", "e")
    assert res.returncode == 0, res.stderr
    lines = [json.loads(x) for x in res.stdout.splitlines()]
    finals = {x["index"]: x["text"] for x in lines if "text" in x}
    for i, text in finals.items():
        assert "".join(x["delta"] for x in lines if x.get("index") == i and "delta" in x) == text
        assert "e" not in text


# -- 9. no tracebacks ----------------------------------------------------------------------------------------------

def test_more_bad_values_are_one_line(llama):
    assert_clean_failure(cli("generate", llama.bundle, "--task", "a", "hi", "--temperature", "nan"),
                         "temperature must be a finite number")
    assert_clean_failure(cli("generate", llama.bundle, "--task", "a", "hi", "--top-p", "inf"),
                         "top_p must be a finite number")
    assert_clean_failure(cli("generate", llama.bundle, "--task", "a", "hi", "--stop", ""),
                         "stop strings must not be empty")
    s = mpt_export.load_bundle(llama.bundle).session()
    with pytest.raises(InputError, match="tasks must be a task name or a list"):
        s.generate_ids(np.array([[4, 5]]), None)
    with pytest.raises(InputError, match="tasks must be a task name or a list"):
        s.generate_ids(np.array([[4, 5]]), [3])
    with pytest.raises(InputError, match="stop must be a string or a list of strings"):
        s.generate(["hi"], "a", stop=[None])
    with pytest.raises(InputError, match="seed must be an integer"):
        s.generate(["hi"], "a", seed=-1, temperature=1.0)


def test_user_text_is_printed_as_text(llama):
    """Prompts, model output and paths are never read as terminal markup or emoji codes."""
    res = cli("generate", llama.bundle, "--task", "a", "the [/] movie [red]x :thumbs_up:", "--max-new-tokens", "2")
    assert res.returncode == 0, res.stderr
    assert "'the [/] movie [red]x :thumbs_up:'" in res.stdout
    res = cli("verify", str(llama.bundle) + "[/]x")
    assert_clean_failure(res, "[/]x")


def test_undecodable_text_and_odd_values_are_one_line(llama, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).with_name("mpt-export")
    res = subprocess.run([str(exe), "generate", str(llama.bundle), "--task", "a", b"\xff\xfe abc"], capture_output=True)
    assert res.returncode == 1 and b"not valid UTF-8 text" in res.stderr and b"Traceback" not in res.stderr
    f = tmp_path / "s.jsonl"
    f.write_text('{"task": "a", "text": "\\ud800 x"}\n{"task": null, "text": "fine"}\n')
    assert_clean_failure(cli("generate", llama.bundle, "--input-file", f, "--task", "b"),
                         f"{f}:1: \"text\" is not valid Unicode")
    assert_clean_failure(cli("generate", llama.bundle, "--task", "a", "hi", "--threads", "100000"),
                         "threads must be an integer from 1 to")
    assert_clean_failure(cli("generate", llama.bundle, "--task", "a", "hi", "--threads", "-2"),
                         "threads must be an integer")
    for opset in ("9999", "-1"):
        assert_clean_failure(cli("export", "--base-model", llama.base, "--adapter", str(llama.source), "--out",
                                     tmp_path / "o", "--opset", opset), "--opset")
    res = cli("export", "--base-model", llama.base, "--adapter", str(llama.source), "--out", tmp_path / "q",
                  "--quantize", "int8", "--min-agreement", "2")
    assert_clean_failure(res, "--min-agreement must be in [0, 1]")
    assert "validate" not in res.stderr  # refused before any export work
    assert_clean_failure(cli("inspect", "/etc/hostname"), "is a file, not an adapter directory")
    assert_clean_failure(cli("export", "--base-model", tmp_path / "nope", "--adapter", str(llama.source), "--out",
                                 tmp_path / "o"), "does not exist")
    from mpt_export.bundle.taskbank import check_task_name
    from mpt_export.errors import TaskNameError

    for bad in ("-x", ".", "..", ".hidden"):
        with pytest.raises(TaskNameError, match="start with a letter or digit"):
            check_task_name(bad)


def test_crafted_manifest_fields_are_one_line(llama, tmp_path):
    from support import edit_manifest

    def shape(m):
        m["graphs"]["backbone"]["outputs"][0]["shape"] = []

    cases = {"logits shape": (shape, "vocab_size"),
             "eos": (lambda m: m["base_model"].update(eos_token_id="x"), "eos_token_id"),
             "eos range": (lambda m: m["base_model"].update(eos_token_id=10**30), "eos_token_id"),
             "task files": (lambda m: m.update(task_files=["tasks.safetensors", "../x"]), "task_files"),
             "task files first": (lambda m: m.update(task_files=["composer.onnx"]), "task_files"),
             "atol": (lambda m: m.update(validation={"atol": "x"}), "validation.atol"),
             "positions": (lambda m: m["base_model"].update(max_positions=3), "max_positions"),
             "renamed past": (lambda m: m["graphs"]["backbone"]["inputs"][5].update(name="past_key_values.9.key"),
                              "past_key_values.9.key"),
             # the typed manifest knows every field: one it does not know (a newer writer's, or an edit) is named
             "unknown field": (lambda m: m.update(engine_hints={"x": 1}), "'engine_hints', which this mpt-export"),
             "missing field": (lambda m: m.pop("format"), "format")}
    for label, (fn, needle) in cases.items():
        b = tmp_path / label.replace(" ", "_")
        shutil.copytree(llama.bundle, b)
        edit_manifest(b, fn, redigest=True)
        assert_clean_failure(cli("verify", b), needle)
        assert_clean_failure(cli("tasks", "list", b), needle)
    b = tmp_path / "deep"
    shutil.copytree(llama.bundle, b)
    (b / "manifest.json").write_text("[" * 200000)
    assert_clean_failure(cli("verify", b), "nested too deeply")


def test_closed_pipe_ends_quietly(llama):
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).with_name("mpt-export")
    res = subprocess.run(f"'{exe}' tasks list '{llama.bundle}' | head -c 10 > /dev/null; echo rc=${{PIPESTATUS[0]}}",
                         shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=120)
    assert "error" not in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_a_directory_that_is_not_a_bundle_says_what_it_is(llama, tmp_path):
    """A PEFT adapter or a base model passed where a bundle is expected is named as such, with the export that makes
    the bundle; an input too long says the task's virtual tokens take part of the positions (not "the prompt")."""
    for cmd in (["generate", llama.source, "--task", "a", "x"], ["tasks", "list", llama.source]):
        assert_clean_failure(cli(*cmd), "is a PEFT adapter, not a bundle", "mpt-export export --base-model")
    assert_clean_failure(cli("generate", llama.base, "--task", "a", "x"), "is a model directory, not a bundle")
    empty = tmp_path / "empty"
    (empty / "x").mkdir(parents=True)
    assert_clean_failure(cli("generate", empty, "--task", "a", "x"), "has no manifest.json")
    s = mpt_export.load_bundle(llama.bundle).session()
    with pytest.raises(InputError, match="the task's virtual tokens take"):
        s.generate_ids(np.ones((1, s.max_positions), np.int64), ["a"], max_new_tokens=1)


def test_export_takes_the_bundle_positionally_or_by_out(llama, tmp_path):
    """`export BUNDLE` as every other command names its bundle, `--out` as before; neither, or two different ones,
    is one clear line before anything loads."""
    out = tmp_path / "b"
    res = cli("export", out, "--base-model", llama.base, "--adapter", f"a,b,c={llama.source}", "--no-validate")
    assert res.returncode == 0, res.stderr
    assert mpt_export.load_bundle(out).tasks == ["a", "b", "c"]
    assert_clean_failure(cli("export", "--base-model", llama.base, "--adapter", str(llama.source)),
                         "name the bundle to create")
    assert_clean_failure(cli("export", tmp_path / "x", "--out", tmp_path / "y", "--base-model", llama.base,
                             "--adapter", str(llama.source)), "name two outputs")
    assert no_output_left(tmp_path / "x") and no_output_left(tmp_path / "y")

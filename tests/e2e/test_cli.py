"""The command line as a user runs it: exit codes, one clear message, no traceback, nothing half-written."""

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import mpt_export

from support import assert_clean_failure, cli, no_output_left, run_cli


def test_help_is_complete():
    res = run_cli("--help")
    assert res.returncode == 0
    for cmd in ("inspect", "export", "verify", "demo"):
        assert cmd in res.stdout
    res = run_cli("export", "--help")
    for opt in ("--base-model", "--adapter", "--out", "--opset", "--atol", "--no-validate", "--force"):
        assert opt in res.stdout


def test_import_and_help_stay_light():
    code = ("import sys, mpt_export, mpt_export.bundle.reader, mpt_export.source.adapters; "
            "heavy = [m for m in ('torch', 'onnxruntime', 'tensorrt', 'transformers', 'onnx') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom mpt_export.cli import app\n"
            "r = CliRunner().invoke(app, ['--help'])\nassert r.exit_code == 0\n"
            "heavy = [m for m in ('torch', 'onnxruntime', 'tensorrt') if m in sys.modules]\nsys.exit(1 if heavy else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_inspect(llama):
    res = run_cli("inspect", llama.source, llama.target, "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert [i["num_tasks"] for i in info] == [3, 1] and info[0]["num_ranks"] == 2 and info[1]["kind"] == "target"


def test_export_verify_roundtrip(llama, tmp_path):
    out = tmp_path / "b"
    res = run_cli("export", "--base-model", llama.base, "--adapter", f"x,y,z={llama.source}", "--adapter",
                  str(llama.target), "--out", out, "--seed", "5")
    assert res.returncode == 0, res.stderr
    assert "parity vs PEFT" in res.stdout and "backbone" in res.stdout
    assert_only_progress_lines(res.stderr, "export")
    man = json.loads((out / "manifest.json").read_text())
    assert mpt_export.load_bundle(out).tasks == ["x", "y", "z", "target"] and "tasks" not in man  # format 3
    assert man["validation"]["passed"] and man["validation"]["seed"] == 5
    assert set(man["files"]) >= {"backbone.onnx", "backbone.onnx.data", "composer.onnx", "tasks.safetensors",
                                 "tokenizer/tokenizer.json"}
    res = run_cli("verify", out)
    assert res.returncode == 0 and "match their sha256" in res.stdout
    res = run_cli("verify", out, "--base-model", llama.base)
    assert res.returncode == 0, res.stderr
    assert "parity vs PEFT" in res.stdout
    # existing output without --force: refused, untouched
    before = (out / "manifest.json").read_bytes()
    res = run_cli("export", "--base-model", llama.base, "--adapter", str(llama.source), "--out", out)
    assert_clean_failure(res, "already exists", "--force")
    assert (out / "manifest.json").read_bytes() == before


PROGRESS_LINE = re.compile(r"^(?P<cmd>[a-z-]+): .+( \.\.\.|: done in \d+\.\d s)$")


def assert_only_progress_lines(stderr: str, command: str):
    """Redirected output: each phase a start and an end line (those under a second none), nothing from torch,
    transformers or the exporter (progress bars, warnings, "torchvision is not installed")."""
    lines = stderr.splitlines()
    for line in lines:
        m = PROGRESS_LINE.match(line)
        assert m and m["cmd"] == command, (line, stderr)
    assert sum(x.endswith(" ...") for x in lines) == sum("done in" in x for x in lines) >= 1, stderr


def test_python_api_prints_nothing_of_its_own(llama, tmp_path):
    """export_bundle and verify_bundle (the calls that run torch, transformers and PEFT) from a user's script: no
    progress bar, no warning, no log line on either stream, and the caller's warnings filters, loggers and
    transformers' progress bars are as they were after each call."""
    code = f"""
import logging, warnings, mpt_export, torch
from transformers.utils import logging as tlog
names = ("transformers", "peft", "torch.onnx._internal.exporter._registration")
def settings():
    everything = [f for f in warnings.filters if f[0] == "ignore" and f[1] is None and f[2] is Warning]
    return everything, tlog.is_progress_bar_enabled(), [logging.getLogger(n).level for n in names]
before = settings()
b = mpt_export.export_bundle({str(llama.base)!r}, [{str(llama.source)!r}], {str(tmp_path / 'b')!r}, validate=False)
assert settings() == before, (settings(), before)
mpt_export.verify_bundle(b.path, base_model={str(llama.base)!r})
assert settings() == before, (settings(), before)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "" and res.stderr == "", (res.stdout, res.stderr)


def test_bad_arguments_answer_before_heavy_imports(llama, tmp_path):
    """A mistyped path, dtype, preset or shape is answered before torch, transformers or a web framework loads (a
    second, not the 20 s of importing them on a loaded machine): each command run in-process, then the modules
    loaded are checked."""
    nothing = str(tmp_path / "nothing")
    cases = [["export", "--base-model", nothing, "--adapter", str(llama.source), "--out", nothing],
             ["export", "--base-model", str(llama.base), "--adapter", nothing, "--out", nothing],
             ["export", "--base-model", str(llama.base), "--adapter", str(llama.source), "--out", nothing,
              "--dtype", "fp8"],
             ["quantize", nothing, "--out", nothing + "2"], ["verify", nothing], ["generate", nothing, "hi"],
             ["eval", str(llama.bundle), "--data", nothing], ["eval", nothing, "--data", nothing],
             ["bench", "--preset", "nope"], ["bench-export", "--shape", "nope"], ["bench-serve", "--preset", "nope"],
             ["demo", "--arch", "nope"], ["serve", nothing], ["triton", nothing, "--out", nothing + "3"],
             ["build", nothing], ["check-trt", nothing], ["tasks", "list", nothing], ["inspect", nothing]]
    code = f"""
import json, sys
from typer.testing import CliRunner
from mpt_export.cli import app
codes = [CliRunner().invoke(app, args).exit_code for args in {cases!r}]
heavy = [m for m in ("torch", "transformers", "peft", "starlette", "uvicorn", "ray") if m in sys.modules]
print(json.dumps([codes, heavy]))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    codes, heavy = json.loads(res.stdout)
    assert codes == [1] * len(cases) and heavy == [], (list(zip(codes, cases)), heavy)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_bad_inputs_fail_cleanly_from_the_console_script(llama, tmp_path):
    """The console script's own exit path (the whole matrix runs in-process: tests/integration/test_checkpoint.py)."""
    corrupt = _copy(llama.source, tmp_path / "corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00\x01garbage" * 10)
    for adapter, base, needles in ((str(corrupt), llama.base, ["corrupt or truncated", "adapter_model.safetensors"]),
                                   (str(llama.source), tmp_path / "nothing", ["base model directory", "does not exist"])):
        out = tmp_path / "out"
        assert_clean_failure(run_cli("export", "--base-model", base, "--out", out, "--adapter", adapter), *needles)
        assert no_output_left(out)


def test_validation_miss_is_typed_and_writes_nothing(llama, tmp_path):
    out = tmp_path / "strict"
    res = cli("export", "--base-model", llama.base, "--adapter", str(llama.source), "--out", out,
              "--atol", "1e-12", "--rtol", "0")  # in-process: the console script's own exit path is tested above
    assert_clean_failure(res, "differ from PEFT beyond atol 1e-12 + rtol 0", "logits (single", "max abs")
    assert no_output_left(out)


@pytest.mark.parametrize("target", ["tasks.safetensors", "backbone.onnx.data", "composer.onnx",
                                    "tokenizer/tokenizer.json"])
def test_tampered_bundle_is_refused(llama, tmp_path, target):
    import mpt_export
    from mpt_export.errors import BundleError

    b = _copy(llama.bundle, tmp_path / "b")
    f = b / target
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01  # one byte changed
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"bundle file {target} does not match its sha256"):
        mpt_export.load_bundle(b)
    assert_clean_failure(run_cli("verify", b), target, "sha256")


def test_incomplete_bundle_is_refused(llama, tmp_path):
    import mpt_export
    from mpt_export.errors import BundleError

    b = _copy(llama.bundle, tmp_path / "b")
    (b / "backbone.onnx.data").unlink()
    with pytest.raises(BundleError, match="backbone.onnx.data is missing"):
        mpt_export.load_bundle(b)
    (b / "manifest.json").unlink()
    assert_clean_failure(run_cli("verify", b), "no manifest.json")


def test_verify_against_another_base_model(llama, make_case):
    other = make_case("gpt2")
    assert_clean_failure(run_cli("verify", llama.bundle, "--base-model", other.base), "does not match the bundle")


def test_runtime_input_errors(llama):
    import mpt_export
    from mpt_export.errors import InputError, TaskNameError

    s = mpt_export.load_bundle(llama.bundle).session()
    ids = np.ones((2, 4), np.int64)
    with pytest.raises(TaskNameError, match="unknown task 'nope'.*a, b, c, t"):
        s.logits(ids, ["a", "nope"])
    with pytest.raises(InputError, match="one task per row"):
        s.logits(ids, ["a"])
    with pytest.raises(InputError, match="left-padded"):
        s.logits(ids, ["a", "b"], attention_mask=np.array([[1, 1, 0, 0], [1, 1, 1, 1]]))
    with pytest.raises(InputError, match="at most 59 input tokens fit"):
        s.logits(np.ones((1, 60), np.int64), ["a"])
    with pytest.raises(InputError, match="provider 'nosuch'.*available providers are: .*CPUExecutionProvider"):
        mpt_export.load_bundle(llama.bundle).session(provider="nosuch")


def test_an_api_key_that_would_not_protect_the_server_is_refused(tmp_path, monkeypatch):
    """An empty or blank key used to switch auth off without a word; a key no client can send is refused too. All
    before the bundle is opened (so no bundle is needed here), one line, exit code 1."""
    nowhere = tmp_path / "no-bundle"
    monkeypatch.delenv("MPT_EXPORT_API_KEY", raising=False)
    off = "omit --api-key and unset MPT_EXPORT_API_KEY"
    for key, said in (("", "--api-key is empty"), ("   ", "--api-key is only whitespace"),
                      (" key", "--api-key begins or ends with whitespace"), ("k\tey", "cannot carry")):
        res = run_cli("serve", nowhere, "--api-key", key)
        assert_clean_failure(res, said, off)
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    for key, said in (("", "MPT_EXPORT_API_KEY is empty"), (" \t", "MPT_EXPORT_API_KEY is only whitespace")):
        monkeypatch.setenv("MPT_EXPORT_API_KEY", key)
        assert_clean_failure(run_cli("serve", nowhere), said, off)
        assert_clean_failure(run_cli("serve", nowhere, "--ray"), said, off)
    monkeypatch.setenv("MPT_EXPORT_API_KEY", "")  # the option decides when given: a good key there is used
    assert_clean_failure(run_cli("serve", nowhere, "--api-key", "s3cret key"), "does not exist")
    monkeypatch.delenv("MPT_EXPORT_API_KEY")
    assert_clean_failure(run_cli("serve", nowhere), "does not exist")  # no key at all: allowed, as documented

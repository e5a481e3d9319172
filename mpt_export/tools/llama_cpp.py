"""llama.cpp as a ``bench --peer``: its own tools on the same base model — the model converted by its
``convert_hf_to_gguf.py`` (f32), quantized by ``llama-quantize`` (q8_0, q4_0), measured by ``llama-bench`` at the
context depth ours decodes at (the task's virtual tokens + the input). Nothing here builds llama.cpp: a bench finds
a build (``--llama-cpp DIR`` or ``llama-bench`` on PATH) or says how to make one.

``python -m mpt_export.tools.llama_cpp SRC BASE OUT`` runs llama.cpp's converter in this interpreter (its ``gguf``
package from ``SRC/gguf-py``): a tokenizer trained in code has a pre-tokenizer hash the converter does not know, and
it is then told "gpt-2" (pre-tokenization does not change decode speed)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, MissingDependencyError
from ..storage.ownership import seal_workdir

TYPES = {"fp32": "f32", "int8": "q8_0", "int4": "q4_0"}  # our precision -> llama.cpp's type of the same kind
HOW = ("build llama.cpp's llama-bench and llama-quantize (cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF; "
       "cmake --build build --target llama-bench llama-quantize) and pass its source folder as --llama-cpp DIR")


@dataclass
class LlamaCpp:
    bench: Path  # llama-bench
    quantize: Path  # llama-quantize
    source: Path  # the source tree: convert_hf_to_gguf.py and gguf-py


def find_llama_cpp(where: str | Path | None = None) -> LlamaCpp:
    """llama.cpp's tools in ``where`` (its source folder, its build folder or the folder of the binaries), else on
    PATH with the source found above them. Raises MissingDependencyError saying how to get them."""
    if where is not None:
        root = Path(where).expanduser()
        if not root.is_dir():
            raise InputError(f"--llama-cpp {where}: no such folder; {HOW}")
        bins = [root, root / "bin", root / "build" / "bin"]
    else:
        found = shutil.which("llama-bench")
        if found is None:
            raise MissingDependencyError(f"the llama-cpp peer needs llama.cpp: no llama-bench on PATH; {HOW}")
        root = Path(found).resolve().parent
        bins = [root]
    bench = next((d / "llama-bench" for d in bins if (d / "llama-bench").is_file()), None)
    quant = next((d / "llama-quantize" for d in bins if (d / "llama-quantize").is_file()), None)
    if bench is None or quant is None:
        missing = "llama-bench" if bench is None else "llama-quantize"
        raise MissingDependencyError(f"no {missing} in {root} (looked in {', '.join(str(d) for d in bins)}); {HOW}")
    source = next((d for d in (bench.parent, *bench.parents) if (d / "convert_hf_to_gguf.py").is_file()), None)
    if source is None or not (source / "gguf-py").is_dir():
        raise MissingDependencyError(f"found {bench} but not llama.cpp's source above it (convert_hf_to_gguf.py and "
                                     "gguf-py convert the model): pass the source folder as --llama-cpp DIR")
    return LlamaCpp(bench, quant, source)


def _run(cmd: list, what: str, env: dict | None = None) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=1800)
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        raise InputError(f"llama.cpp's {what} failed: {' | '.join(tail)}")
    return res


def build_gguf(tools: LlamaCpp, base: Path, out_dir: Path, precision: str, step) -> Path:
    """The base model as llama.cpp's ``precision`` GGUF (f32 converted once; q8_0/q4_0 quantized from it once)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    f32 = out_dir / "model-f32.gguf"
    if not f32.is_file():
        step("convert the base model with llama.cpp's convert_hf_to_gguf.py (once)")
        part = f32.with_name(f32.name + ".part")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tools.source / "gguf-py"),
                                                                           os.environ.get("PYTHONPATH")]))}
        _run([sys.executable, "-m", "mpt_export.tools.llama_cpp", tools.source, base, "--outtype", "f32",
              "--outfile", part], "converter", env)
        part.replace(f32)
    kind = TYPES[precision]
    out = out_dir / f"model-{kind}.gguf"
    if not out.is_file():
        step(f"quantize it to {kind} with llama-quantize (once)")
        part = out.with_name(out.name + ".part")
        _run([tools.quantize, f32, part, kind], "llama-quantize")
        part.replace(out)
    seal_workdir(out_dir.parent)  # recorded as the bench's own: the next run reuses them instead of refusing them
    return out


def llama_bench(tools: LlamaCpp, model: Path, threads: int, depth: int, input_len: int, new: int,
                reps: int = 1) -> dict:
    """One fresh ``llama-bench`` process: decode tok/s of ``new`` tokens at ``depth`` cached tokens and prefill tok/s
    of ``input_len`` tokens after ``depth - input_len`` (as ours prefills the input after the task's prompt KV), and
    its peak resident MiB. -> {"decode", "prefill", "peak_rss_mib"}"""
    cmd = [str(tools.bench), "-m", str(model), "-t", str(threads), "-r", str(reps), "-o", "jsonl"]
    figs, rss = {}, 0
    for metric, args in (("decode", ["-p", "0", "-n", str(new), "-d", str(depth)]),
                         ("prefill", ["-p", str(input_len), "-n", "0", "-d", str(depth - input_len)])):
        # started by a small interpreter of its own: a child forked from this process would count this process's
        # resident memory as its own peak (the kernel keeps the larger of the two at exec)
        res = subprocess.run([sys.executable, "-S", "-c", _SPAWN, *cmd, *args], capture_output=True, text=True,
                             timeout=1800)
        text, log = res.stdout, res.stderr.strip().splitlines()[-3:]
        rss_line = text.strip().splitlines()[-1] if text.strip() else ""
        rows = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        if res.returncode != 0 or not rows or not rss_line.isdigit():
            raise InputError(f"llama-bench failed (exit {res.returncode}): {' | '.join(log)}")
        figs[metric] = float(rows[-1]["avg_ts"])
        rss = max(rss, int(rss_line))
    return {**figs, "peak_rss_mib": round(rss / 1024, 1)}


# run argv, pass its output through, then print its peak resident KiB (its exit status is this interpreter's)
_SPAWN = """import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(usage.ru_maxrss, flush=True)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def converter_main(argv: list[str]) -> None:
    """llama.cpp's converter (``argv``: SRC BASE, then its own options) with the pre-tokenizer fallback above."""
    source, rest = argv[0], argv[1:]
    sys.path.insert(0, source)
    import convert_hf_to_gguf as conv

    for mod in list(sys.modules.values()):
        for cls in list(vars(mod).values()) if mod is not None else ():
            if isinstance(cls, type) and "get_vocab_base_pre" in vars(cls):
                cls.get_vocab_base_pre = _known_or_gpt2(vars(cls)["get_vocab_base_pre"])
    sys.argv = ["convert_hf_to_gguf.py", *rest]
    conv.main()


def _known_or_gpt2(original):
    def get_vocab_base_pre(self, tokenizer):
        try:
            return original(self, tokenizer)
        except NotImplementedError:  # a tokenizer trained in code: its pre-tokenizer hash is not in the table
            return "gpt-2"
    return get_vocab_base_pre


if __name__ == "__main__":
    converter_main(sys.argv[1:])

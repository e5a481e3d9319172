"""Tiny models, PEFT adapters and bundles built in code (never downloaded), cached per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = dict(hidden=32, layers=2, heads=4, max_positions=64)


class Case:
    """A base model dir, a 3-task source adapter (rank 2), a target adapter (rank 1, own P*), and their bundle."""

    def __init__(self, root: Path, arch: str, nts: int | None = None):
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

        from mpt_export.tools.demo import SEQ2SEQ_ARCHS, make_base_model, make_source_adapter, make_target_adapter

        self.root, self.arch = root, arch
        self.seq2seq = arch in SEQ2SEQ_ARCHS
        task_type = "SEQ_2_SEQ_LM" if self.seq2seq else "CAUSAL_LM"
        auto = AutoModelForSeq2SeqLM if self.seq2seq else AutoModelForCausalLM
        self.base = root / "base"
        model = make_base_model(self.base, arch=arch, seed=0, **TINY)
        self.source = make_source_adapter(model, root / "source", num_tasks=3, num_virtual_tokens=5, num_ranks=2, seed=1,
                                          task_type=task_type, num_transformer_submodules=nts)
        model = auto.from_pretrained(str(self.base))
        self.target = make_target_adapter(model, root / "target", self.source, source_task=2, num_ranks=1, seed=2,
                                          init="ONLY_SOURCE_SHARED", task_type=task_type)
        # The init file named in the target's config is gone, as on a user's machine: reading must not need it.
        self.init_copy = root / "gone" / "adapter_model.safetensors"
        self._bundle = None

    @property
    def adapters(self) -> list[str]:
        return [f"a,b,c={self.source}", f"t={self.target}"]

    @property
    def bundle(self) -> Path:
        if self._bundle is None:
            import json

            from mpt_export import export_bundle

            cfg_file = self.target / "adapter_config.json"
            cfg = json.loads(cfg_file.read_text())
            cfg["prompt_tuning_init_state_dict_path"] = str(self.init_copy)  # does not exist
            cfg_file.write_text(json.dumps(cfg))
            out = self.root / "bundle"
            export_bundle(self.base, self.adapters, out, seed=123)
            self._bundle = out
        return self._bundle


_cases: dict[str, Case] = {}


@pytest.fixture(scope="session", autouse=True)
def _own_cache(tmp_path_factory):
    """Verification stamps go to this run's own cache (the CLIs and servers the tests start inherit it), never the
    user's ~/.cache."""
    os.environ["MPT_EXPORT_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def make_case(tmp_path_factory):
    def get(arch: str, nts: int | None = None) -> Case:
        key = f"{arch}-{nts}" if nts else arch
        if key not in _cases:
            _cases[key] = Case(tmp_path_factory.mktemp(key), arch, nts)
        return _cases[key]

    return get


@pytest.fixture(scope="session")
def llama(make_case) -> Case:
    return make_case("llama")


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it."""
    exe = Path(sys.executable).with_name("mpt-export")
    env = {**os.environ, "COLUMNS": "200"}  # rich wraps at 80 columns when not on a terminal
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600, env=env)


def peft_refs(case):
    """The case's bundle and, per task, (PEFT model over the base, task index in its adapter)."""
    import mpt_export
    from mpt_export.export.torchside import adapters_from_bank, load_base_model
    from mpt_export.export.reference import peft_model_for

    model, _, _ = load_base_model(case.base)
    b = mpt_export.load_bundle(case.bundle)
    refs = {}
    for ck, names in adapters_from_bank(b.task_bank()):
        pm = peft_model_for(model, ck)
        for i, n in enumerate(names):
            refs[n] = (pm, i)
    return b, refs


def left_padded(vocab: int, lens: list[int], seed: int = 5):
    """Random token rows of the given lengths, left-padded: (ids, mask), int64 (B, max(lens))."""
    import numpy as np

    rng = np.random.default_rng(seed)
    S = max(lens)
    ids = np.zeros((len(lens), S), np.int64)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lens):
        ids[i, S - n:] = rng.integers(0, vocab, n)
        mask[i, S - n:] = 1
    return ids, mask

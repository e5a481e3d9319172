"""Fixtures: tiny models, PEFT adapters and bundles built in code (never downloaded), cached per test session (the
helpers themselves are in support.py)."""

from __future__ import annotations

import os

import pytest

from support import Case, run_root

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers on a small machine: torch's intra-op threads in each (and in the CLIs they start) would only
    # contend; the tiny models gain nothing from a second thread
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# The longest test files start first, so the workers do not wait on one at the end (the order of everything else
# is kept; make runs xdist with --no-loadscope-reorder, which would otherwise put files with many tests first): the
# export memory measurements, the Ray server's module, the benchmarks, the files that export T5 several times, the
# fp16/bf16/quantized exports, the console-script tests (each a subprocess with torch), the kill tests, the docs
# (the real demo, then every page). A long file started last would keep one worker busy while the other idles.
FIRST = ("e2e/test_memory.py", "e2e/test_ray.py", "integration/test_families.py", "e2e/test_bench.py",
         "integration/test_validation.py",
         "integration/test_seq2seq.py", "integration/test_precision.py", "e2e/test_cli.py",
         "e2e/test_data_safety_swaps.py", "e2e/test_docs.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not any(str(item.path).endswith(f) for f in FIRST))


_started: dict[str, float] = {}  # test file -> when its first test reported (the run's progress, file by file)


def pytest_runtest_logreport(report):
    """Under -q the dots say nothing of what runs: a line when each test file starts (on the xdist controller, or
    the one process), with the minutes since the run began."""
    if os.environ.get("PYTEST_XDIST_WORKER") or report.when != "setup":
        return
    path = report.nodeid.split("::")[0]
    if path in _started:
        return
    import time

    _started.setdefault("", time.monotonic())
    _started[path] = now = time.monotonic()
    term = _config[0].pluginmanager.get_plugin("terminalreporter") if _config else None
    if term is not None and term.verbosity < 1:
        if term._tw.width_of_current_line:  # after a row of dots
            term._tw.line()
        term.write_line(f"[{(now - _started['']) / 60:4.1f} min] {path}")


_config = []


def pytest_configure(config):
    _config.append(config)

_cases: dict[str, Case] = {}


@pytest.fixture(scope="session", autouse=True)
def _own_cache(tmp_path_factory):
    """Verification stamps go to this run's own cache (the CLIs and servers the tests start inherit it), never the
    user's ~/.cache."""
    os.environ["MPT_EXPORT_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def make_case(tmp_path_factory):
    def get(arch: str, nts: int | None = None) -> Case:
        from mpt_export.tools.demo import SEQ2SEQ_ARCHS

        if nts is None and arch in SEQ2SEQ_ARCHS:
            nts = 2  # PEFT's default for SEQ_2_SEQ_LM: "t5" and "t5-2" are one case, exported once
        key = f"{arch}-{nts}" if nts else arch
        if key not in _cases:
            _cases[key] = Case.shared(run_root(tmp_path_factory) / "cases", key, arch, nts)
        return _cases[key]

    return get


@pytest.fixture(scope="session")
def llama(make_case) -> Case:
    return make_case("llama")

"""Export memory at a size where a second copy of the weights would show: a ~340 MB fp32 model (decoder-only, and
encoder-decoder, whose two graphs are rewritten to share one weights file) exported (with validation) by the CLI in
a child process; its peak resident memory, from ``wait4`` (the export and its own torch
child), against the weight bytes. No timing is asserted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from mpt_export.tools.bench_export import Shape, _run_measured, build_model

EXE = Path(sys.executable).with_name("mpt-export")


# ~340 MB of weights in few layers (a wide vocabulary, wide feed-forwards): the memory is the weights' whatever the
# depth, while the export's time grows with it (8 layers each took 25-30 s longer to export, with the same margins)
SHAPES = {"llama": Shape("llama", 640, 3, 10, 5, 1728, 56000, 512),
          "t5": Shape("t5", 512, 4, 8, 8, 4608, 32128, 512)}


@pytest.mark.parametrize("family", list(SHAPES))
def test_export_peak_memory_stays_near_the_weights(family, tmp_path):
    root = tmp_path / "model"
    weights = build_model(SHAPES[family], root, "fp32")
    assert 250e6 < weights < 400e6
    out = tmp_path / "bundle"
    code, _, peak, tail = _run_measured([str(EXE), "export", "--base-model", str(root / "base"), "--adapter",
                                         f"a,b={root / 'adapter'}", "--out", str(out), "--seed", "0"])
    assert code == 0, tail
    t = json.loads((out / "manifest.json").read_text())["timings"]
    assert t["isolated"] and json.loads((out / "manifest.json").read_text())["validation"]["passed"]
    mib = weights / 2**20
    # The libraries themselves (torch, transformers, onnx: ~350 MiB) are not the model's: each phase is measured
    # from the memory it started with, after its imports. Besides the weights, the torch phase holds a fixed
    # ~110 MiB of exporter state and ~75 MiB of reference machinery (measured the same at 295 and 541 MiB of
    # weights), so the bound is 1.3x the weights plus FIXED; a second copy of the weights (+1.0x) fails it.
    fixed = 192
    torch_phase = t["torch_phase_peak_rss_mib"] - t["torch_phase_start_rss_mib"]
    validation = t["validate_peak_rss_mib"] - t["validate_start_rss_mib"]
    assert torch_phase <= 1.3 * mib + fixed, (torch_phase, mib)
    assert validation <= 1.3 * mib + fixed, (validation, mib)
    # the whole export, every process of it: never two copies of the weights at once
    assert peak / 2**20 <= t["torch_phase_start_rss_mib"] + 1.3 * mib + fixed, (peak / 2**20, t)

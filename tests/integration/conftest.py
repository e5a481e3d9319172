"""Fixtures the integration modules share, each built once per run: the llama bundle's Triton model repository
(test_triton_repository.py, test_triton_generation.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def repo(llama, tmp_path_factory):
    """`mpt-export triton`'s repository for the llama case (max batch 4, queue 32) and what the writer reported. The
    tests read it or copy it, never change it."""
    from mpt_export.serving.triton.writer import write_repository

    out = tmp_path_factory.mktemp("triton") / "repo"
    r = write_repository(llama.bundle, out, max_batch=4, max_queue=32)
    return out, r

"""The unit tier runs without torch and without starting processes: checked when it runs alone."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.fixture(scope="session", autouse=True)
def _no_torch_no_subprocess(request):
    if any("/unit/" not in str(item.path) for item in request.session.items):
        yield  # other tiers in the same run import torch and start processes
        return
    started = []
    real = subprocess.Popen.__init__

    def spy(self, *a, **k):
        started.append(a[0] if a else k.get("args"))
        return real(self, *a, **k)

    subprocess.Popen.__init__ = spy
    try:
        yield
    finally:
        subprocess.Popen.__init__ = real
    assert "torch" not in sys.modules, "a unit test imported torch: it belongs in tests/integration"
    assert not started, f"a unit test started a process ({started[0]}): it belongs in tests/integration or e2e"

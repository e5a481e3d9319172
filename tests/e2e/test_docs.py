"""The documentation is true: every bash/python example in README.md and docs/**/*.md runs (docs_examples.py has the
rule and the runner), the site builds with --strict (links and anchors checked), the README stands alone.

One test per page. The real `mpt-export demo --workdir build/demo` runs once for the module (it stands for the
pages' `make demo`); its tree is copied into each page's own directory, since pages change it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from docs_examples import PageRun, blocks, pages, rule_violations, run_page
from support import EXE, run_cli

ROOT = Path(__file__).resolve().parents[2]
PAGES = pages(ROOT)


@pytest.fixture(scope="module")
def demo_tree(tmp_path_factory):
    """build/demo as `make demo` leaves it: the real console script, run once. One torch thread (as the suite's
    xdist workers have): on two busy cores a second one only spins (the demo's training took 4x as long)."""
    root = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    res = subprocess.run([str(EXE), "demo", "--workdir", "build/demo"], cwd=root, capture_output=True, text=True,
                         timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return root / "build" / "demo"


def test_examples_follow_the_rule():
    """bash/python blocks run unless marked `<!-- not run: REASON -->`; everything else is tagged as output."""
    bad = [v for page in PAGES for v in rule_violations(ROOT, page)]
    assert not bad, "\n".join(bad)
    assert any(b.runs for b in blocks(ROOT, "README.md")), "the README's examples must run"


def test_the_rule_refuses_what_would_slip_through(tmp_path):
    (tmp_path / "p.md").write_text(
        "```\nmpt-export export --out b\n```\n\n```sh\nmpt-export verify b\n```\n\n"
        "<!-- not run: slow -->\n```bash\nmpt-export bench\n```\n\n```bash\nmake bench\n```\n\n"
        "<!-- not run: a sample, not a command -->\n```text\nx\n```\n\n<!-- not run: dangling here -->\n\n"
        "    ```python\n    print(1)\n    ```\n\n"
        "```bash\nmpt-export serve b --port 8000 &\ncurl -s http://localhost:8000/v1/models\n```\n")
    bad = "\n".join(rule_violations(tmp_path, "p.md"))
    for needle in ("p.md:1: info string '(none)'", "p.md:5: info string 'sh'", "p.md:10: not-run reason 'slow'",
                   "p.md:14: `make bench`", "p.md:19: a not-run comment on a text block",
                   "p.md:23: a not-run comment must be", "p.md:29: a server started with & must be waited for"):
        assert needle in bad, (needle, bad)
    assert [b.info for b in blocks(tmp_path, "p.md") if b.runs] == ["bash", "python", "bash"]


@pytest.mark.parametrize("page", [p for p in PAGES if any(b.runs for b in blocks(ROOT, p))])
def test_page_examples_run(page, demo_tree, tmp_path):
    shutil.copytree(demo_tree, tmp_path / "build" / "demo", symlinks=True)
    ran = run_page(ROOT, page, tmp_path)
    assert ran


def test_a_failing_page_stops_its_server(demo_tree, tmp_path):
    """The runner's server line: started on a free port, the page's later 8000s rewritten, stopped on failure."""
    (tmp_path / "p.md").write_text("```bash\nmake demo\nmpt-export serve build/demo/bundle --port 8000 &\n"
                                   "timeout 60 bash -c 'until curl -sf http://localhost:8000/health; do sleep 0.2; done'\n"
                                   "curl -s --fail-with-body http://localhost:8000/v1/models\nfalse\n```\n")
    shutil.copytree(demo_tree, tmp_path / "build" / "demo", symlinks=True)
    run = PageRun(tmp_path)
    try:
        with pytest.raises(AssertionError, match="p.md:1: exit code 1"):  # curl reached the server; `false` failed
            run.run_block(blocks(tmp_path, "p.md")[0])
    finally:
        run.stop()
    (server,) = run.servers
    assert server.port != 8000 and server.proc.poll() is not None
    assert run.ran[0].startswith("[skipped: make demo")


def test_mkdocs_build_strict(tmp_path):
    """What `make docs` runs: a broken link or anchor, a page missing from the nav or any warning fails it."""
    mkdocs = Path(sys.executable).with_name("mkdocs")
    res = subprocess.run([str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert res.returncode == 0, res.stderr[-5000:]
    assert "WARNING" not in res.stderr, res.stderr[-5000:]
    cli = (tmp_path / "site" / "reference" / "cli.html").read_text()
    assert 'id="mpt-export-tasks-add"' in cli and "mpt-export cli reference" not in cli  # the generated reference
    assert (tmp_path / "site" / "reference" / "python.html").read_text().count("doc-heading") > 10
    index = (tmp_path / "site" / "index.html").read_text()  # links to files: the site opens from disk (file://)
    assert 'href="quickstart.html"' in index and 'href="quickstart/"' not in index


def test_readme_and_help_stand_alone():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= 10240, f"README.md is {len(text.encode())} bytes; keep it <= 10 KB"
    assert text.startswith("# mpt-export\n\n```bash\nmake demo ") and "\nmake test " in text[:400]
    for page in PAGES:
        body = (ROOT / page).read_text()
        assert "DESIGN.md" not in body and "shared/" not in body, page
    for link in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not link.startswith("http"):
            assert (ROOT / link).is_file(), link
    res = run_cli("export", "--help")
    assert "T5" in res.stdout and "causal-LM directory" not in res.stdout

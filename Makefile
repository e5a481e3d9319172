# Fresh machine: `make demo` or `make test` create .venv, install torch 2.13.0 (CPU build) first, then the project.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test check bench docs docs-serve install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[cpu,export,serve,test,peers,docs]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mpt-export demo --workdir build/demo

# the documentation site, built into build/site; --strict fails on any warning (broken links and anchors included)
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir build/site

# the site over HTTP on 127.0.0.1:8001 (search works there; build/site/index.html also opens from disk, without it)
docs-serve: docs
	$(PY) -m http.server 8001 --bind 127.0.0.1 --directory build/site

bench: $(STAMP)
	$(VENV)/bin/mpt-export bench --preset gpt2-small-shape --workdir build/bench

# every tier (what CI runs): unit (no torch, no processes), integration (tiny exports, the CLI in-process),
# e2e (console scripts, kill tests, servers, Ray, docs). Two workers (pytest-xdist): the tiny models and their
# bundles are built once for both; each test file runs on one worker, in order (module fixtures: one server each).
TESTFLAGS ?= -n 2 --dist loadfile --no-loadscope-reorder
test: $(STAMP)
	$(PY) -m pytest -q $(TESTFLAGS) --durations=15

# the fast loop while working: unit + integration
check: $(STAMP)
	$(PY) -m pytest -q $(TESTFLAGS) tests/unit tests/integration

clean:
	rm -rf build .pytest_cache

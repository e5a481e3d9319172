# Fresh machine: `make demo` creates .venv and installs torch 2.13.0 (CPU build) first, then the project with what
# the demo needs; `make test` (and check, docs, bench) adds every extra the suite imports. Each step says what it
# installs and about how long it takes (2-core machine).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEMO_STAMP := $(VENV)/.installed-demo
STAMP  := $(VENV)/.installed
# PYTHONWARNINGS: setuptools' box about editable installs and same-named folders, which does not apply here
PIP    := PYTHONWARNINGS=ignore $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: demo test check bench docs docs-serve install install-demo clean

$(DEMO_STAMP): pyproject.toml
	@echo "make: creating the virtual environment .venv"
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	@echo "make: installing torch 2.13.0, CPU build (about 40 s)"
	$(PIP) torch==2.13.0
	@echo "make: installing mpt-export for the demo: ONNX Runtime, transformers, PEFT, onnx (about 1 min)"
	$(PIP) -e '.[cpu,export]'
	touch $(DEMO_STAMP)

$(STAMP): $(DEMO_STAMP)
	@echo "make: installing the extras the tests use: server, Ray, lm-eval, Triton client, docs, peers (about 2 min)"
	$(PIP) -e '.[cpu,export,serve,test,peers,docs]'
	touch $(STAMP)

install-demo: $(DEMO_STAMP)

install: $(STAMP)

demo: $(DEMO_STAMP)
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

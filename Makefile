# Every target installs what it needs first, so each works on a fresh machine and is idempotent.
# Choose the interpreter (and so the environment) with PY, e.g. `make test PY=.venv/bin/python`.
PY ?= python3
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

# torch comes from PyTorch's CPU wheel index first: from the default index, a bare requirement
# takes the CUDA build (several GB of nvidia packages). When that index cannot be reached, the
# try fails within seconds and the plain requirement is installed from the configured indexes.
# GPU users: install their CUDA build of torch first (it satisfies the requirement, so nothing
# is replaced), or point TORCH_INDEX at the CUDA index, e.g.
# `make test TORCH_INDEX=https://download.pytorch.org/whl/cu128`.
TORCH ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
INSTALL_TORCH = $(PIP) --index-url $(TORCH_INDEX) --timeout 10 --retries 0 "$(TORCH)" \
	|| $(PIP) "$(TORCH)"

# The oldest versions pyproject.toml allows; `make test-floor` runs the suite against them.
TORCH_FLOOR := 2.13.0
LIGHTNING_FLOOR := 2.5.0
TORCHMETRICS_FLOOR := 1.3.1
FLOOR_VENV ?= .venv-floor
FLOOR_PY := $(FLOOR_VENV)/bin/python

.PHONY: install test test-floor floor-install demo lint bench

install:
	$(INSTALL_TORCH)
	$(PIP) -e ".[test,examples]"

test: install
	$(PY) -m pytest -q

# Its own virtual environment (gitignored): torch first (so nothing pulls the CUDA build), then
# the floor versions of lightning and torchmetrics with the package and its test and examples
# extras (the report, heatmap and benchmark smoke tests need matplotlib, scikit-learn, mnist1d).
test-floor:
	test -x $(FLOOR_PY) || $(PY) -m venv $(FLOOR_VENV)
	$(MAKE) --no-print-directory floor-install PY=$(FLOOR_PY) TORCH="torch==$(TORCH_FLOOR)"
	$(FLOOR_PY) -m pytest -q

floor-install:
	$(INSTALL_TORCH)
	$(PIP) "lightning==$(LIGHTNING_FLOOR)" "torchmetrics==$(TORCHMETRICS_FLOOR)" -e ".[test,examples]"

demo: install
	$(PY) examples/mnist1d_gwa.py

lint: install
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

bench: install
	$(PY) benchmarks/overhead.py

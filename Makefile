# Every target installs what it needs first, so each works on a fresh machine and is idempotent.
PY ?= python3
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: install test demo lint bench

# The CPU wheel of torch first: a bare `torch` requirement would otherwise pull CUDA packages.
install:
	$(PIP) "torch==2.13.0" || $(PIP) "torch>=2.4"
	$(PIP) -e ".[test,examples]"

test: install
	$(PY) -m pytest -q

demo: install
	$(PY) examples/mnist1d_gwa.py

lint: install
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

bench: install
	$(PY) benchmarks/overhead.py

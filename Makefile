# Beaver: `make demo` runs the main job on the embedded default; `make test` runs the whole suite.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU wheel of torch: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install install-dev demo test bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check $(TORCH)
	$(PIP) install -q --disable-pip-version-check -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/beaver demo

test: install
	$(PY) -m pytest -q

bench: install
	$(PIP) install -q --disable-pip-version-check $(TORCH) -e '.[bench]'
	$(PY) bench/score_training.py
	$(PY) bench/serving.py
	$(PY) bench/memory.py
	$(PY) bench/load.py

clean:
	rm -rf .beaver .pytest_cache

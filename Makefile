# Beaver: `make demo` runs the main job on the embedded default; `make test` runs the whole suite.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU wheel of torch: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
# The browser tests (tests/browser) drive Debian's Chromium headless with Playwright (the dev extra);
# Playwright never downloads a browser. `make test` installs the chromium package when it is missing.
CHROMIUM ?= /usr/bin/chromium

.PHONY: install install-dev browser demo test bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check $(TORCH)
	$(PIP) install -q --disable-pip-version-check -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/beaver demo

browser:
	@test -x $(CHROMIUM) || { \
	  if [ "$$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then \
	    echo "error: $(CHROMIUM) is missing: the browser tests need Debian's Chromium. As root, run:" >&2; \
	    echo "  apt-get update && apt-get install -y --no-install-recommends chromium" >&2; \
	    echo "(or point CHROMIUM= at a Chromium binary)" >&2; exit 1; \
	  fi; \
	  echo "Installing Debian's chromium for the browser tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; \
	  test -x $(CHROMIUM) || { echo "error: $(CHROMIUM) is still missing after installing chromium" >&2; exit 1; }; \
	}

test: install browser
	BEAVER_CHROMIUM=$(CHROMIUM) $(PY) -m pytest -q --durations=30

bench: install
	$(PIP) install -q --disable-pip-version-check $(TORCH) -e '.[bench]'
	$(PY) bench/score_training.py
	$(PY) bench/grpo_trl.py
	$(PY) bench/serving.py
	$(PY) bench/memory.py
	$(PY) bench/load.py
	$(PY) bench/leaderboard.py
	$(PY) bench/rollouts.py

clean:
	rm -rf .beaver .pytest_cache

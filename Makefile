# Two entry points, as the README says: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: run test setup setup-dev model FORCE

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# llama.cpp is compiled for this CPU without AMX (it crashes there: inference/llama_build.py).
# pip's wheel cache keys llama-cpp-python by version, not by CMAKE_ARGS: build it without the
# cache, and again whenever the flags or the version change (the stamp holds both).
LLAMA_TARGET ?= host
LLAMA_ARGS := $(shell $(PYTHON) -m inference.llama_build cmake-args $(LLAMA_TARGET))
LLAMA_PIN := $(shell grep -E '^llama-cpp-python==' requirements.txt)
LLAMA_STAMP := $(VENV)/.llama-build

$(VENV)/.llama-build-want: FORCE | $(BIN)/python
	@echo "$(LLAMA_PIN) $(LLAMA_ARGS)" | cmp -s - $(LLAMA_STAMP) || \
	  (echo "building $(LLAMA_PIN) with CMAKE_ARGS=\"$(LLAMA_ARGS)\"" && \
	   CMAKE_ARGS="$(LLAMA_ARGS)" $(BIN)/python -m pip install --no-cache-dir --force-reinstall \
	     --no-deps --no-binary llama-cpp-python "$(LLAMA_PIN)" && \
	   echo "$(LLAMA_PIN) $(LLAMA_ARGS)" > $(LLAMA_STAMP))

# Reinstall the rest only when a requirements file changes (stamp files in the venv).
$(VENV)/.installed: requirements.txt | $(BIN)/python $(VENV)/.llama-build-want
	$(BIN)/python -m pip install -r requirements.txt
	touch $@

$(VENV)/.installed-dev: requirements-dev.txt $(VENV)/.installed
	$(BIN)/python -m pip install -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed
setup-dev: $(VENV)/.installed-dev

model: setup  ## fetch the offline default model (SmolLM2) into models/ when it is empty
	$(BIN)/python -m inference.default_model

run: model
	$(BIN)/python app.py

test: setup-dev
	$(BIN)/python -m pytest

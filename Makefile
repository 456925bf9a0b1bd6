# The two commands a newcomer needs:
#   make demo   set everything up, then serve a tiny random-weight demo model on :50051 (gRPC) and :8080 (HTTP)
#   make test   set everything up, then run the test suite (what CI runs)
# Both create .venv and install the project into it on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0: a CPU build where this machine has one on disk, a CUDA build from PyPI elsewhere.
TORCH ?= torch==2.13.0
# On a machine without a GPU and without that file, PyPI's torch is a CUDA build of
# several GB; the CPU build is much smaller:
#   make install TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL ?=
# Extra pytest arguments, e.g. make test PYTEST_ARGS="-x tests/test_server.py"
PYTEST_ARGS ?=
MODEL ?=
PORT ?= 50051
DEMO_MODEL := models/demo

.PHONY: install serving test test-all lint demo serve proto bench soak gpu-check clean

# What serving needs (make demo, make serve): torch, the client package (clients/python:
# the stubs and reranker_client; the server depends on it by name, and it is not fetched
# from an index), the server, bitsandbytes for int8/nf4, the demo model's tokenizer files.
serving: $(VENV)/.serving

$(VENV)/.serving: pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(BIN)/python -m pip install -q -e ./clients/python
	$(BIN)/python -m pip install -q -e ".[quant,demo]"
	touch $@

# Everything: serving, and what the tests and checks need.
install: $(VENV)/.installed

$(VENV)/.installed: $(VENV)/.serving
	$(BIN)/python -m pip install -q -e "./clients/python[test]" -e ".[test,quant,demo]"
	touch $@

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The long runs too (soak, benchmarks marked slow).
test-all: install
	$(BIN)/python -m pytest -q -m "" $(PYTEST_ARGS)

# Formatting, lint and types (what CI checks before the tests).
lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

$(DEMO_MODEL)/config.json: | serving
	$(BIN)/reranker demo-model $(DEMO_MODEL)

# Serves the tiny random model; prints a first call to paste once it answers.
demo: serving $(DEMO_MODEL)/config.json
	$(BIN)/python scripts/demo.py --model $(DEMO_MODEL) --port $(PORT)

# make serve MODEL=Qwen/Qwen3-Reranker-4B   (a directory, or a hub id in the local cache)
serve: serving
	@test -n "$(MODEL)" || { echo "usage: make serve MODEL=<directory or hub id>"; exit 2; }
	$(BIN)/reranker serve --model $(MODEL) --port $(PORT)

# Rewrites clients/python/reranker/v1/*_pb2*.py from proto/.
proto: install
	$(BIN)/python scripts/generate_stubs.py

# make bench WORKLOAD=b   (the card recipe, sentence-transformers, the engine and the
# service side by side on a random CPU-sized Qwen3; workload a, b or c; see bench/compare.py)
WORKLOAD ?= a
bench: install
	$(BIN)/python -c "import sentence_transformers" 2>/dev/null || $(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python -m bench.compare --shape cpu --workload $(WORKLOAD)

# make soak SECONDS=600   (steady load on the demo model; reports errors, p50/p99, memory)
SECONDS ?= 300
soak: install $(DEMO_MODEL)/config.json
	$(BIN)/python -m bench.load --model $(DEMO_MODEL) --duration $(SECONDS) --concurrency 32

gpu-check:
	bash bench/gpu_check.sh

# make docs   (rewrite the settings table of docs/operating.md from service/settings.py;
# tests/test_docs.py fails while the committed table differs)
.PHONY: docs
docs: install
	$(BIN)/python scripts/settings_table.py

clean:
	rm -rf $(VENV) models *.egg-info clients/python/*.egg-info

# The two commands a newcomer needs:
#   make demo   set everything up, then serve a tiny random-weight demo model on :50051 (gRPC) and :8080 (HTTP)
#   make test   set everything up, then run the test suite (what CI runs)
# Both create .venv and install the project into it on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0: a CPU build where this machine has one on disk, a CUDA build from PyPI elsewhere.
TORCH ?= torch==2.13.0
MODEL ?=
PORT ?= 50051
DEMO_MODEL := models/demo

.PHONY: install test test-all demo serve proto bench soak gpu-check clean

install: $(VENV)/.installed

# The client package (clients/python: the stubs and reranker_client) first: the server
# depends on it by name, and it is not fetched from an index.
$(VENV)/.installed: pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ./clients/python
	$(BIN)/python -m pip install -q -e ".[test,quant,demo]"
	touch $@

test: install
	$(BIN)/python -m pytest -q

# The long runs too (soak, benchmarks marked slow).
test-all: install
	$(BIN)/python -m pytest -q -m ""

$(DEMO_MODEL)/config.json: | install
	$(BIN)/reranker demo-model $(DEMO_MODEL)

demo: install $(DEMO_MODEL)/config.json
	$(BIN)/reranker serve --model $(DEMO_MODEL) --port $(PORT)

# make serve MODEL=Qwen/Qwen3-Reranker-4B   (a directory, or a hub id in the local cache)
serve: install
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

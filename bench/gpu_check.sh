#!/usr/bin/env bash
# The GPU check: one call on a GPU machine (the `device` tool), everything that
# needs CUDA, in about five minutes. Results land in $OUT (or ./gpu-check-out).
#
#   Here, once:  echo /.whl/ >> .git/info/exclude  and download the wheels listed
#                in BENCHMARKS.md into .whl/; copy the Qwen3 tokenizer files into
#                .gpu/tokenizer/ (both travel with `carry`).
#   There:       bash bench/gpu_check.sh
#
# Dry run on the CPU: GPU_CHECK_DEVICE=cpu GPU_CHECK_SHAPES=tiny GPU_CHECK_SERVE_SHAPE=tiny
#   GPU_CHECK_PAIRS=32 GPU_CHECK_LOAD_SECONDS=3 GPU_CHECK_WHEELS=none bash bench/gpu_check.sh
#
# Steps: environment; CUDA correctness (tests/test_gpu.py); engine throughput
# in the real 0.6B / 4B / 8B shapes with random weights (bench/engine.py: the
# card's code vs ours); the service end to end on the 0.6B shape (bench/load.py:
# one worker vs two on the GPU).
set -uo pipefail
OUT=${OUT:-$PWD/gpu-check-out}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
SHAPES=${GPU_CHECK_SHAPES:-"0.6b 4b 8b"}
LOAD_SECONDS=${GPU_CHECK_LOAD_SECONDS:-20}
SERVE_SHAPE=${GPU_CHECK_SERVE_SHAPE:-0.6b}
PAIRS=${GPU_CHECK_PAIRS:-512}
WHEELS=${GPU_CHECK_WHEELS:-.whl}  # a dry run on the CPU names a folder that does not exist
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d "$WHEELS" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
if [ -d .gpu/tokenizer ]; then
  export RERANKER_TEST_TOKENIZER_DIR=$PWD/.gpu/tokenizer
  TOKENIZER=(--tokenizer "$PWD/.gpu/tokenizer")
else
  TOKENIZER=()
fi
step() { echo; echo "=== $* ($(date +%T))"; }

step environment
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import torch, transformers, tokenizers, grpc, google.protobuf as p; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| tokenizers', tokenizers.__version__, '| grpcio', grpc.__version__, '| protobuf', p.__version__)"
  python3 -c "import bitsandbytes as b; print('bitsandbytes', b.__version__)" 2>&1 | tail -1
} | tee "$OUT/environment.txt"

step correctness on CUDA
python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu.py 2>&1 | grep -v "MatMul8bitLt\|warnings.warn" | tee "$OUT/test_gpu.txt"

for shape in $SHAPES; do
  step "engine $shape bf16"
  skip=(); [ "$shape" = "8b" ] && skip=(--skip-card)
  python3 -m bench.engine --shape "$shape" --device "$DEVICE" --dtype bf16 --pairs "$PAIRS" "${TOKENIZER[@]}" "${skip[@]}" --json "$OUT/engine_$shape.json" 2>&1 | tail -40
done

step "service end to end, $SERVE_SHAPE shape, bf16"
python3 -c "import os, sys; from bench.common import save_random_checkpoint; save_random_checkpoint(sys.argv[1], sys.argv[2], os.environ.get('RERANKER_TEST_TOKENIZER_DIR'))" "$SERVE_SHAPE" /tmp/qwen3-random-serve || exit 1
python3 -m bench.load --model /tmp/qwen3-random-serve --duration "$LOAD_SECONDS" --concurrency 64 --documents 20 \
  --config "1-worker:--device $DEVICE" --config "2-workers:--device $DEVICE --workers-per-device 2" \
  --json "$OUT/load_$SERVE_SHAPE.json" 2>&1 | tail -60
step done

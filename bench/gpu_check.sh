#!/usr/bin/env bash
# The GPU check: one call on a GPU machine (the `device` tool), everything that
# needs CUDA, in at most eight minutes. Results land in $OUT (or ./gpu-check-out).
#
#   Here, once:  echo /.whl/ >> .git/info/exclude  and download the wheels listed
#                in BENCHMARKS.md into .whl/, and sentence-transformers without its
#                dependencies (pip download --no-deps sentence-transformers==6.2.0 -d .whl);
#                copy the Qwen3 tokenizer files into .gpu/tokenizer/ (both travel with `carry`).
#   There:       bash bench/gpu_check.sh
#
# Dry run on the CPU: GPU_CHECK_DEVICE=cpu GPU_CHECK_SHAPES=tiny GPU_CHECK_DTYPES=fp32
#   GPU_CHECK_REQUESTS=2 GPU_CHECK_WHEELS=none bash bench/gpu_check.sh
#
# Steps: environment; CUDA correctness (tests/test_gpu.py); bench/compare.py on
# workload a (RAG, 50 documents per request) in the real 0.6B and 4B shapes with
# random weights, in bf16, fp16 and int8: the card's recipe, the same with
# logits_to_keep=1, sentence-transformers (when it imports there), the engine in
# process and the service, side by side. Each step has a time limit; a compare cut
# short keeps the precisions it finished in its JSON. (The 8B shape, bench/engine.py
# and the 1-vs-2-worker load run of earlier checks no longer fit in the time.)
set -uo pipefail
OUT=${OUT:-$PWD/gpu-check-out}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
SHAPES=${GPU_CHECK_SHAPES:-"0.6b 4b"}
DTYPES=${GPU_CHECK_DTYPES:-"bf16 fp16 int8"}
REQUESTS=${GPU_CHECK_REQUESTS:-8}
WHEELS=${GPU_CHECK_WHEELS:-.whl}  # a dry run on the CPU names a folder that does not exist
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d "$WHEELS" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD:$PWD/clients/python  # clients/python: the generated stubs (reranker.v1)
else
  export PYTHONPATH=$PWD:$PWD/clients/python
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
  python3 -c "import sentence_transformers as s; print('sentence-transformers', s.__version__)" 2>&1 | tail -1
} | tee "$OUT/environment.txt"
CONTENDERS=(--contenders card card-keep1 sentence-transformers engine service)
python3 -c "import sentence_transformers" 2>/dev/null || CONTENDERS=(--contenders card card-keep1 engine service)

step "correctness on CUDA (at most 75 s)"
timeout -k 5 75 python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu.py 2>&1 | grep -v "MatMul8bitLt\|warnings.warn" | tee "$OUT/test_gpu.txt"

for shape in $SHAPES; do
  if [ "$shape" = 4b ]; then limit=210; else limit=150; fi
  step "compare, workload a, $shape shape, $DTYPES (at most $limit s)"
  # shellcheck disable=SC2086  # DTYPES is a list
  timeout -k 10 "$limit" python3 -m bench.compare --shape "$shape" --device "$DEVICE" --dtype $DTYPES --workload a \
    --requests "$REQUESTS" "${TOKENIZER[@]}" "${CONTENDERS[@]}" --json "$OUT/compare_${shape}_a.json" 2>&1
  [ "$?" = 124 ] && echo "(stopped at $limit s: $OUT/compare_${shape}_a.json holds the precisions that finished)"
done
step done

#!/usr/bin/env bash
# The GPU check: one call on a GPU machine (the `device` tool), everything that
# needs CUDA, in under eight minutes on an H200. Results land in $OUT (or ./gpu-check-out).
#
#   Here, once:  echo /.whl/ >> .git/info/exclude  and download the wheels listed
#                in BENCHMARKS.md into .whl/ (torchao for fp8 among them), and
#                sentence-transformers without its dependencies
#                (pip download --no-deps sentence-transformers==6.2.0 -d .whl);
#                copy the Qwen3 tokenizer files into .gpu/tokenizer/ (both travel with `carry`).
#   There:       bash bench/gpu_check.sh
#
# Dry run on the CPU (tests/test_gpu_check.py runs it):
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_SHAPES=tiny GPU_CHECK_DTYPE=fp32 GPU_CHECK_WHEELS=none \
#   GPU_CHECK_REQUESTS=1 GPU_CHECK_VARIANTS="padded packed" GPU_CHECK_PROFILE_LAYOUTS="padded packed" \
#   GPU_CHECK_BUDGET=512 bash bench/gpu_check.sh
#
# Steps, each with a time limit (a step cut short keeps what it finished in its JSON); the limits
# add up to 435 s (75 + 2 x 25 + 40 + 50 + 100 + 120), about 7.5 minutes with the wheels' install,
# so the whole check fits in 8 even at worst:
#   1. environment;
#   2. correctness on CUDA (tests/test_gpu.py: every precision, fp8 included, and
#      every layout, FlexAttention included, against CPU fp32);
#   3. random-weight checkpoints in the real 0.6B and 4B shapes, in bf16, shared by the steps below;
#   4. the profile (bench/profile.py): torch.profiler over steady-state batches of each
#      shape in bf16, per layout: time in attention and which SDPA backend ran, GEMMs,
#      the head's KV copy, other copies, host gaps, and the front end's share per pair;
#   5. layouts and options (bench/layouts.py): each in bf16 (fp8 and int8 beside),
#      pairs/s and the largest logit difference from fp32 on the same weights;
#   6. with GPU_CHECK_COMPARE=1 and time left: bench/compare.py on the 0.6B in bf16.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-check-out}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
SHAPES=${GPU_CHECK_SHAPES:-"0.6b 4b"}
DTYPE=${GPU_CHECK_DTYPE:-bf16}
REQUESTS=${GPU_CHECK_REQUESTS:-}  # default per shape, below
BUDGET=${GPU_CHECK_BUDGET:-0}  # 0: the device's default batch budget
VARIANTS=${GPU_CHECK_VARIANTS:-}  # default per shape, below
PROFILE_LAYOUTS=${GPU_CHECK_PROFILE_LAYOUTS:-}  # default per shape, below
WHEELS=${GPU_CHECK_WHEELS:-.whl}  # a dry run on the CPU names a folder that does not exist
COMPARE=${GPU_CHECK_COMPARE:-0}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d "$WHEELS" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD:$PWD/clients/python  # clients/python: the generated stubs (reranker.v1)
else
  export PYTHONPATH=$PWD:$PWD/clients/python
fi
PYTHON=${GPU_CHECK_PYTHON:-python3}
if [ -d .gpu/tokenizer ]; then
  export RERANKER_TEST_TOKENIZER_DIR=$PWD/.gpu/tokenizer
  TOKENIZER=(--tokenizer "$PWD/.gpu/tokenizer")
else
  TOKENIZER=()
fi
CHECKPOINTS=${GPU_CHECK_CHECKPOINTS:-/tmp/gpu-check-models}
step() { echo; echo "=== $* ($(date +%T))"; }
limited() {  # limited SECONDS COMMAND...: run it, and say so when the limit cut it short
  local limit=$1; shift
  timeout -k 10 "$limit" "$@"
  local code=$?
  [ "$code" = 124 ] && echo "(stopped at $limit s; its JSON holds what finished)"
  return 0
}

step environment
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  $PYTHON -c "import torch, transformers, tokenizers, grpc, google.protobuf as p; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| tokenizers', tokenizers.__version__, '| grpcio', grpc.__version__, '| protobuf', p.__version__)"
  $PYTHON -c "import torch; print('capability', torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None)"
  $PYTHON -c "import bitsandbytes as b; print('bitsandbytes', b.__version__)" 2>&1 | tail -1
  $PYTHON -c "import torchao as t; print('torchao', t.__version__)" 2>&1 | tail -1
} | tee "$OUT/environment.txt"

step "correctness on CUDA (at most 75 s)"
limited 75 $PYTHON -m pytest -q -s -p no:cacheprovider tests/test_gpu.py 2>&1 | grep -v "MatMul8bitLt\|warnings.warn" | tee "$OUT/test_gpu.txt"

step "random checkpoints: $SHAPES (at most 25 s each)"
for shape in $SHAPES; do
  [ -f "$CHECKPOINTS/$shape/config.json" ] && continue
  weights=$([ "$DEVICE" = cpu ] && echo float32 || echo bfloat16)
  limited 25 $PYTHON -c "import sys; from bench.common import save_random_checkpoint as s; s(sys.argv[1], sys.argv[2], sys.argv[3] or None, dtype=sys.argv[4], device=sys.argv[5])" \
    "$shape" "$CHECKPOINTS/$shape" "${TOKENIZER[1]:-}" "$weights" "$DEVICE"
done

for shape in $SHAPES; do
  case $shape in
    4b) limit=50; requests=${REQUESTS:-8}; layouts=${PROFILE_LAYOUTS:-"padded packed cascade"} ;;
    *) limit=40; requests=${REQUESTS:-16}; layouts=${PROFILE_LAYOUTS:-"padded packed packed/flex cascade"} ;;
  esac
  step "profile, $shape shape, $DTYPE, layouts $layouts (at most $limit s)"
  # shellcheck disable=SC2086  # layouts is a list
  limited "$limit" $PYTHON -m bench.profile --model "$CHECKPOINTS/$shape" --device "$DEVICE" --dtype "$DTYPE" \
    --layouts $layouts --requests "$requests" --budget "$BUDGET" --json "$OUT/profile_${shape}.json" 2>&1 | grep -v "^USDT"
done

for shape in $SHAPES; do
  case $shape in
    # every variant on both shapes; the 4B's slow compiles last, so that a step cut short loses them first
    4b) limit=120; requests=${REQUESTS:-4}
        variants=${VARIANTS:-"padded padded/heads packed packed/flex cascade fp8/padded int8/padded padded/graphs padded/compile"} ;;
    *) limit=100; requests=${REQUESTS:-8}
       variants=${VARIANTS:-"padded padded/heads packed packed/flex cascade padded/compile padded/graphs fp8/padded int8/padded"} ;;
  esac
  budgets=$([ "$BUDGET" = 0 ] && echo 32768 || echo "$BUDGET")
  step "layouts and options, $shape shape, $DTYPE against fp32: $variants (at most $limit s)"
  # shellcheck disable=SC2086  # variants is a list
  limited "$limit" $PYTHON -m bench.layouts --model "$CHECKPOINTS/$shape" --device "$DEVICE" --dtype "$DTYPE" \
    --variants $variants --budgets $budgets --requests "$requests" --time-limit $((limit - 25)) \
    --json "$OUT/layouts_${shape}.json" 2>&1
done

if [ "$COMPARE" = 1 ]; then
  step "compare, workload a, 0.6b shape, $DTYPE: card-sorted, engine, service (at most 90 s)"
  limited 90 $PYTHON -m bench.compare --model "$CHECKPOINTS/0.6b" --device "$DEVICE" --dtype "$DTYPE" --workload a \
    --requests 8 --contenders card-sorted engine service --json "$OUT/compare_0.6b_a.json" 2>&1
fi
step done

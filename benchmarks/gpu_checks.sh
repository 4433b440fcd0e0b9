#!/usr/bin/env bash
# Every GPU check in one run, for a session lent a GPU for a few minutes.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_checks.sh [STAGE ...]
#
# Stages (default: all, in this order, most important first; each one under
# its own time limit so that a slow one cannot eat the next):
#   env      GPU, driver, torch / triton / transformers versions
#   tests    the CUDA tests: tests/test_cuda.py (engines on CUDA, bf16 autocast,
#            checkpointing, torch.compile with Inductor, no host synchronisation)
#            and the fused kernels and codecs on CUDA (test_kernels, test_codec_*)
#   kernels  benchmarks/bench_kernels.py: kernel GB/s against a plain copy
#   gpt2     actpack bench on a GPT-2-small-sized decoder (built-in gpt:gpt2,
#            124M parameters, 1024 tokens): step time, peak memory, largest batch
#   resnet50 the same for ResNet-50 at 224x224 (built-in resnet:resnet50)
#   bf16     both models again with every row under bf16 autocast (--autocast bf16)
#
# Needs only PyTorch with CUDA (and Triton, pytest for the tests); the
# repository is used through PYTHONPATH, nothing is installed.  Writes
# $OUT/summary.md (every stage's results), $OUT/tests.log (pytest's whole
# report), $OUT/stderr.log (the benches' stderr) and one JSON per bench.  DEVICE=cpu runs the bench stages on the CPU (a dry run of
# the script: use a small --max-batch-limit-free model there).  TF32 matmuls are allowed for the benches
# (TORCH_ALLOW_TF32_CUBLAS_OVERRIDE), as most fp32 users train.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/actpack-gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:$PWD/tests PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
STAGES=${*:-env tests kernels gpt2 resnet50 bf16}
log() { echo "=== $* ($(date +%T))" | tee -a "$OUT/summary.md"; }

bench() {  # name limit args...
  local name=$1 limit=$2
  shift 2
  log "bench $name: $*"
  # Progress lines (stdout) reach the summary as they come, so a stage cut
  # off by its limit still reports the rows it finished; stderr (tqdm's bars,
  # tracebacks) goes to $OUT/stderr.log.
  { echo "=== $name"; } >>"$OUT/stderr.log"
  TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 timeout "$limit" $PY -m actpack.tools.cli bench \
    --device "${DEVICE:-cuda}" --json "$OUT/$name.json" "$@" 2>>"$OUT/stderr.log" \
    | tee -a "$OUT/summary.md"
  echo "rc=${PIPESTATUS[0]}" | tee -a "$OUT/summary.md"
}

for stage in $STAGES; do
  case $stage in
  env)
    log env
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv \
      | tee -a "$OUT/summary.md"
    $PY -c "import torch, triton, transformers, sys; print(sys.version.split()[0], \
torch.__version__, torch.version.cuda, triton.__version__, transformers.__version__)" \
      | tee -a "$OUT/summary.md"
    ;;
  tests)
    log tests
    # The whole report to tests.log (failures with short tracebacks, no
    # captured logs: Inductor's debug traces would bury them); its last
    # lines, the failed tests and the count, to the summary.
    timeout 150 $PY -m pytest -q -rfs --tb=short --show-capture=no -p no:cacheprovider \
      -n 12 tests/test_cuda.py tests/test_kernels.py tests/test_codec_pack.py \
      tests/test_codec_division.py tests/test_codec_groupquant.py >"$OUT/tests.log" 2>&1
    grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -60 | tee -a "$OUT/summary.md"
    ;;
  kernels)
    log kernels
    timeout 60 $PY benchmarks/bench_kernels.py 2>&1 | tee -a "$OUT/summary.md"
    ;;
  gpt2)
    bench gpt2 130 --model gpt:gpt2 --batch-size 8 --strategies actnn division \
      --alternatives autocast-bf16 checkpoint --max-batch-limit 1024
    ;;
  resnet50)
    bench resnet50 180 --model resnet:resnet50 --batch-size 64 --strategies actnn division \
      --alternatives autocast-bf16 checkpoint --max-batch-limit 4096
    ;;
  bf16)
    bench resnet50-bf16 130 --model resnet:resnet50 --batch-size 64 --strategies actnn \
      division --alternatives checkpoint --autocast bf16 --max-batch-limit 4096
    bench gpt2-bf16 110 --model gpt:gpt2 --batch-size 8 --strategies actnn division \
      --alternatives checkpoint --autocast bf16 --max-batch-limit 1024
    ;;
  *)
    echo "unknown stage $stage" >&2
    exit 2
    ;;
  esac
done

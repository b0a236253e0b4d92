#!/usr/bin/env bash
# GPU checks, run on the GPU machine from the repo root with $OUT set:
#
#     OUT=/some/folder bash benchmarks/gpu_checks.sh
#
# The machine has no network: the wheels it lacks travel in .whl/ (git-ignored,
# so pass it along: carry [".whl"]): pytorch-metric-learning, faiss-cpu,
# hypothesis (imported at the top of tests/functional/test_semantic_scale.py,
# which holds a CUDA test) and sortedcontainers (hypothesis's one dependency).
# The repo itself comes through PYTHONPATH (no pip install of it).
#
# Time budget (H200), about 6 minutes in all, hard cap BUDGET_S = 400 s:
#   install wheels + versions             ~15 s
#   (1) pytest -m gpu (the CUDA tests)    ~30 s   (timeout 150 s; only the files holding them)
#   (2) bench_dsb_step --steps-only cuda  ~120 s  (timeout 240 s; stage-3 and stage-2 rows)
#   (3) bench_train_step fp32 default     ~90 s   (timeout 200 s; ResNet-50, 224 px,
#       cub B=64 and imagenetlt B=256, 30 timed + 7 solo iterations per variant)
#   (4) bench_train_step --amp bf16       ~60 s   (timeout 120 s, 20 iterations; only
#       if the budget still allows: each step's timeout is cut to what is left)
# Each step has its own timeout and the script goes on after a failure; every
# line is appended to $OUT/gpu_checks.log, and the exit status is 1 if any step
# failed (a machine without CUDA fails the cuda-available step). Files written under $OUT (<= 8):
# gpu_checks.log, bench_dsb_step_cuda.json, bench_train_step.json,
# bench_train_step_bf16.json.
set -u
export PYTHONUNBUFFERED=1
: "${OUT:?set OUT to the output folder}"
mkdir -p "$OUT"
LOG="$OUT/gpu_checks.log"
BUDGET_S=${BUDGET_S:-400}
SECONDS=0
SUMMARY=()

log() { echo "$@" | tee -a "$LOG"; }

# step NAME TIMEOUT_S CMD...: run CMD under timeout (cut to the budget left), tee its output
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET_S - SECONDS))
    if ((left < 20)); then
        log "=== [$name] SKIPPED: ${left}s of the ${BUDGET_S}s budget left"
        SUMMARY+=("$name: skipped (budget)")
        return
    fi
    ((limit > left)) && limit=$left
    log "=== [$name] (timeout ${limit}s, t=${SECONDS}s): $*"
    local start=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    local note=""
    ((rc == 124 || rc == 137)) && note=" (TIMED OUT)"
    log "=== [$name] rc=$rc$note in $((SECONDS - start))s"
    SUMMARY+=("$name: rc=$rc$note $((SECONDS - start))s")
    ((rc == 0)) || FAILED+=("$name")
}
FAILED=()

log "=== gpu_checks $(date -u +%FT%TZ) in $PWD, git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
step install 60 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
{
    nvidia-smi -L
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
    python3 -c "import sys, torch, torchvision, numpy, pytorch_metric_learning as pml, faiss, hypothesis, pml_dsb; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-', '| torchvision', torchvision.__version__, '| numpy', numpy.__version__, '| pml', pml.__version__, '| faiss', faiss.__version__, '| hypothesis', hypothesis.__version__, '| pml_dsb', pml_dsb.__file__)"
} 2>&1 | tee -a "$LOG"

# without CUDA every CUDA test would be skipped and the run would look green
step cuda-available 60 python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'torch.cuda.is_available() is False')"
# (1) the CUDA tests: those marked @pytest.mark.gpu (conftest skips them without CUDA)
# only the files that hold them: other test modules import packages (record-keeper)
# that the GPU machine lacks, and a collection error would stop the run
GPU_TEST_FILES=$(grep -rl "mark.gpu" tests | sort | tr '\n' ' ')
step pytest-gpu 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rs $GPU_TEST_FILES
# (2) DSB loss step against its parent on CUDA
step bench-dsb-step 240 python3 benchmarks/bench_dsb_step.py --device cuda --steps-only --iters 20 --out "$OUT/bench_dsb_step_cuda.json"
# (3) Table 10: training iterations per second and peak memory, SoftTriple vs DSB-ST
step bench-train-step 200 python3 benchmarks/bench_train_step.py --device cuda --out "$OUT/bench_train_step.json"
# (4) the same with the model under bf16 autocast, if time is left
step bench-train-step-bf16 120 python3 benchmarks/bench_train_step.py --device cuda --amp bf16 --iters 20 --out "$OUT/bench_train_step_bf16.json"

log "=== summary (total ${SECONDS}s of ${BUDGET_S}s budget)"
for line in "${SUMMARY[@]}"; do log "  $line"; done
if ((${#FAILED[@]})); then
    log "=== FAILED: ${FAILED[*]}"
    exit 1
fi

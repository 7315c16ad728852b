#!/usr/bin/env bash
# The GPU baseline in one command: build with the CUDA runtime, run the GPU tests, then every benchmark, most
# important first, each under its own time cap and all inside one overall budget (a stage that would start past
# the budget is skipped and logged as such).
#
#   bash bench/baseline.sh [RESULTS_DIR] [BUDGET_SECONDS]
#
# RESULTS_DIR (default bench/results/<gpu>) receives each benchmark's .json and .md, `pytest-gpu.log`, one log
# per stage and `baseline.log` (stage, exit status, seconds). Exit status: 0 when every stage that ran passed.
# STAGES="step-lumiere-base pipeline" runs only the stages named (a later call finishing an earlier one's work;
# names as in baseline.log). STUNET_CUDA_ARCH (default 90 here) chooses what nvcc builds for.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! [[ ${2:-3600} =~ ^[1-9][0-9]*$ ]]; then
    echo "bench/baseline.sh: BUDGET_SECONDS must be a positive whole number of seconds, got '$2'" >&2
    exit 2
fi
if ! python -c "import torch; assert torch.cuda.is_available()" 2> /dev/null; then
    echo "bench/baseline.sh: no CUDA device here (it is the GPU baseline; each bench/*.py runs on the CPU with" \
         "--device cpu --quick)" >&2
    exit 2
fi
gpu=$(python -c "import torch, re; print(re.sub('[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
out=${1:-bench/results/$gpu}
budget=${2:-3600}
mkdir -p "$out"
out=$(cd "$out" && pwd)
start=$(date +%s)
status=0
echo "# $(date -u '+%F %T') UTC, budget ${budget}s${STAGES:+, stages: $STAGES}" >> "$out/baseline.log"

stage() {  # stage NAME CAP_SECONDS COMMAND...
    local name=$1 cap=$2 t0 rc left
    shift 2
    if [[ -n ${STAGES:-} && " $STAGES " != *" $name "* ]]; then
        return
    fi
    left=$((budget - ($(date +%s) - start)))
    if ((left < 30)); then
        echo "$name skipped (budget of ${budget}s spent)" | tee -a "$out/baseline.log"
        status=1
        return
    fi
    ((cap > left)) && cap=$left
    t0=$(date +%s)
    echo "== $name (at most ${cap}s): $*"
    PYTHONUNBUFFERED=1 timeout -k 10 "$cap" "$@" > "$out/$name.log" 2>&1
    rc=$?
    tail -n 25 "$out/$name.log"
    echo "$name rc=$rc $(($(date +%s) - t0))s" | tee -a "$out/baseline.log"
    ((rc == 0)) || status=1
}

stage install 300 env STUNET_CUDA=1 STUNET_CUDA_ARCH="${STUNET_CUDA_ARCH:-90}" \
    python -m pip install -q --no-build-isolation --no-deps -e .
# What runs where (the GPU, its compute capability, the runtime's CUDA passes, the kernels), beside the results.
stage env 60 python -m stunet.cli env
# Every file with a gpu test, the quick ones first (the AOTInductor package build takes minutes), one line per
# test as it ends: a stage stopped at its cap still says what passed.
gpu_files=(tests/test_model.py tests/test_kernels.py tests/test_runtime.py tests/test_backends.py)
for f in $(grep -l "mark.gpu" tests/test_*.py); do
    [[ " ${gpu_files[*]} " == *" $f "* ]] || gpu_files+=("$f")
done
stage pytest-gpu 400 python -m pytest -m gpu -v -rfEs --durations=20 -p no:cacheprovider "${gpu_files[@]}"
stage kernels 240 python bench/kernels.py --out "$out"
stage runtime 120 python bench/runtime.py --out "$out"
stage fidelity 300 python bench/fidelity.py --backend compile --backend fast --backend aoti --out "$out"
stage profile_step 240 python bench/profile_step.py --out "$out"
stage step-small-edge 600 python bench/step.py --preset small --preset edge --out "$out/small-edge"
stage step-lumiere-base 900 python bench/step.py --preset lumiere-base --max-batch 1 --out "$out/lumiere-base"
stage step-lumiere-ssr 900 python bench/step.py --preset lumiere-ssr --out "$out/lumiere-ssr"
stage step-aoti 600 python bench/step.py --preset small --backend reference --backend fast --backend aoti \
    --out "$out/aoti"
stage pipeline 900 python bench/pipeline.py --steps 8 --ssr-steps 4 --out "$out"
if python -c "import diffusers" 2> /dev/null; then
    stage peers 900 python bench/peers.py --out "$out"
elif [[ -z ${STAGES:-} || " $STAGES " == *" peers "* ]]; then
    echo "peers skipped (diffusers is not installed)" | tee -a "$out/baseline.log"
fi
echo "total $(($(date +%s) - start))s, status $status" | tee -a "$out/baseline.log"
exit $status

#!/usr/bin/env bash
# One device session for bench/bench_gpu.py (issue 13 item 4), under a total time budget.
#
# Launch (the device tool runs a command in the repo root; at most 600 s a command, 15 min of device time a
# session, machine start included):
#
#     run(command="bash bench/gpu_session.sh", timeout_s=600)
#
# Python there: the device image's own python3 (torch with CUDA, transformers, accelerate, safetensors, tqdm,
# numpy, pillow, pytest are in it) with PYTHONPATH=src, i.e. our package from this checkout. No venv is built:
# the device machine reaches no registry, so `make venv` / `pip install -r requirements-lock.txt` cannot run
# there (and would cost minutes of the 15 even with a mirror); .venv built here is CPU torch and over the
# 64 MiB carry limit. Set PYTHON=... to use another interpreter. The reference column (bench_gpu.py
# --reference) needs the reference's wheels carried there; it is passed only when REF_PYTHON is set and exists.
#
# Steps, each under `timeout` of what is left of BUDGET_S (default 570 s, inside the 600 s command limit):
#   1. bench_gpu.py --quick --device cuda              (sanity: seconds)
#   1b. bench_qlinear_cuda.py                          (the CUDA inference kernels: cuda_int4, triton, torch vs bf16)
#   2. bench_gpu.py --model 1b                         (all 16 blocks, low_gpu_mem_usage off and on)
#   3. bench_gpu.py --model 8b --blocks 8              (8 of 32 blocks, times reported scaled x4), leaving
#                                                      TEST_RESERVE_S (default 60 s) for step 4
#   4. python -m pytest -q -m gpu tests/               (the GPU-marked tests; pyproject deselects them by default)
# Output under $OUT (default ./gpu_out), at most 8 files as the device tool returns them: session.log,
# nvidia-smi.txt, gpu_quick.json, qlinear_cuda.json, gpu_1b.json, gpu_8b.json, pytest.log, logs.tar.gz (the child processes'
# specs, records and logs). A step that runs out of time is killed and the next one still runs.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
BUDGET_S="${BUDGET_S:-570}"
TEST_RESERVE_S="${TEST_RESERVE_S:-60}"
WORK="${WORK:-/tmp/gpu_bench_work}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
START=$(date +%s)
LOG="$OUT/session.log"
REF_ARGS=()
if [ -n "${REF_PYTHON:-}" ] && [ -x "${REF_PYTHON}" ]; then REF_ARGS=(--reference "$REF_PYTHON"); fi

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
step() {  # step NAME RESERVE_S CMD...: run CMD under timeout (time left - RESERVE_S), log its status
  local name=$1 reserve=$2; shift 2
  local t=$(( $(left) - reserve ))
  if [ "$t" -lt 10 ]; then echo "== $name: SKIPPED (${t}s left for it)" | tee -a "$LOG"; return; fi
  echo "== $name (timeout ${t}s): $*" | tee -a "$LOG"
  timeout --signal=TERM --kill-after=10 "$t" "$@" 2>&1 | tee -a "$LOG"
  echo "== $name: rc=${PIPESTATUS[0]} after $(( $(date +%s) - START ))s" | tee -a "$LOG"
}

{ date -u; git rev-parse --short HEAD 2>/dev/null; nvidia-smi 2>&1; "$PYTHON" -c \
  "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.is_available())"; } \
  >"$OUT/nvidia-smi.txt" 2>&1

B="bench/bench_gpu.py"
step quick 0 "$PYTHON" "$B" --quick --device cuda --work "$WORK" --json "$OUT/gpu_quick.json" "${REF_ARGS[@]}"
step kernels "$(( TEST_RESERVE_S + 360 ))" "$PYTHON" bench/bench_qlinear_cuda.py --rounds 20 --json "$OUT/qlinear_cuda.json"
step 1b "$(( TEST_RESERVE_S + 150 ))" "$PYTHON" "$B" --model 1b --work "$WORK" --json "$OUT/gpu_1b.json" "${REF_ARGS[@]}"
step 8b "$TEST_RESERVE_S" "$PYTHON" "$B" --model 8b --blocks 8 --work "$WORK" --json "$OUT/gpu_8b.json" "${REF_ARGS[@]}"
step gpu-tests 0 bash -c "set -o pipefail; '$PYTHON' -m pytest -q -m gpu tests/ 2>&1 | tee '$OUT/pytest.log'"
tar czf "$OUT/logs.tar.gz" -C "$(dirname "$WORK")" "$(basename "$WORK")" 2>/dev/null
echo "== done after $(( $(date +%s) - START ))s" | tee -a "$LOG"

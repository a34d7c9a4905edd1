#!/usr/bin/env bash
# The spotdiff GPU check: every GPU path once, one markdown report (see benchmarks/gpu_check.py).
#
#   benchmarks/gpu_check.sh                          # GPU: writes benchmarks/gpu_check_<UTC time>.md
#   benchmarks/gpu_check.sh --out gpu.md --device cuda:1
#   benchmarks/gpu_check.sh --device cpu --tiny      # CPU smoke run of every code path (seconds)
#
# PYTHON selects the interpreter (default: python3). The whole check is stopped after
# GPU_CHECK_TIMEOUT seconds (default 480); the checks finished by then are already in the report.
# Exit status: 0 all checks passed, 1 a check failed, 2 bad arguments, 124 timed out.
#
# Last, optional step (GPU_CHECK_SPD=1): the pre-registered SPD experiment at its GPU design
# (benchmarks/spd_effect.py --design cuda: 10 seeds, 600 steps x 256 at 72 px, bf16; meant for
# <= 8 min on one H200), results in ${SPD_WORK:-/tmp/spd_effect_cuda}/ (resumed when run again), stopped
# after SPD_TIMEOUT seconds (default 480; finished cells are kept). Its status does not change ours.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
status=0
timeout "${GPU_CHECK_TIMEOUT:-480}" "${PYTHON:-python3}" benchmarks/gpu_check.py "$@" || status=$?
if [[ "${GPU_CHECK_SPD:-0}" == "1" ]]; then
  timeout "${SPD_TIMEOUT:-480}" "${PYTHON:-python3}" benchmarks/spd_effect.py --design cuda \
    --work "${SPD_WORK:-/tmp/spd_effect_cuda}" || echo "spd_effect (optional step) exited with status $?" >&2
fi
exit "$status"

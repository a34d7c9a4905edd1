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
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec timeout "${GPU_CHECK_TIMEOUT:-480}" "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"

#!/bin/bash
# Intra-op threads: `spotdiff predict` (50 images) and `spotdiff fit` (PaDiM, resnet18, 256 px)
# with torch's default thread count (= the cores, forced with --threads) against spotdiff's choice
# (the cores idle at start), alternating, two rounds. Usage: benchmarks/threads_bench.sh WORK_DIR
# (spotdiff importable, e.g. PYTHONPATH=src). Prints one line per run with the load average.
set -euo pipefail
mkdir -p "$1" && cd "$1"
PY=${PYTHON:-python}
unset OMP_NUM_THREADS SPOTDIFF_THREADS
[ -d data ] || $PY -m spotdiff --quiet synth --out data --scale 0.32 --objects pcb_synth >/dev/null
IMGS=$(ls data/pcb_synth/Data/Images/*/* | head -50)
[ -d model ] || $PY -m spotdiff --quiet --threads 1 fit --model padim --data data --object pcb_synth \
    --arch resnet18 --out model >/dev/null
for round in 1 2; do
  for mode in default chosen; do
    flag=""; [ $mode = default ] && flag="--threads $(nproc)"
    l=$(cut -d' ' -f1 /proc/loadavg)
    /usr/bin/time -f "predict $mode round $round: %e s wall, %U+%S s cpu, load $l" \
        $PY -m spotdiff --quiet $flag predict model $IMGS --out p_$mode >/dev/null
    l=$(cut -d' ' -f1 /proc/loadavg)
    /usr/bin/time -f "fit $mode round $round: %e s wall, %U+%S s cpu, load $l" \
        $PY -m spotdiff --quiet $flag fit --model padim --data data --object pcb_synth --arch resnet18 \
        --out m_$mode >/dev/null
  done
done

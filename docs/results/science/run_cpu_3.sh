#!/usr/bin/env bash
# Run after run_cpu.sh (session of 2026-12-02): the scaled-down All-CNN-C experiment 1 and the
# regularisation sweep, two runs at a time (one thread each), niced. Same OUT folder.
set -u
DATA=${DATA:-data/cifar10-jpg}
OUT=${OUT:-/tmp/science}
export OMP_NUM_THREADS=1
for recipe in repro-cpu-allconv q-regularise-mlp; do
    /usr/bin/time -f "$recipe: %e s wall" nice -n 10 \
        surgeon train --recipe "$recipe" --data "$DATA" --out "$OUT" --workers 2 --quiet \
        > "$OUT.$recipe.log" 2>&1
    tail -1 "$OUT.$recipe.log"
done

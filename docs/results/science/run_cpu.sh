#!/usr/bin/env bash
# The CPU runs behind docs/reproduction.md, in the order they ran: one thread, niced.
# DATA is the JPEG copy of CIFAR-10 (tar xzf cifar10-jpg.tar.gz); OUT holds the run folders.
set -u
DATA=${DATA:-data/cifar10-jpg}
OUT=${OUT:-/tmp/science}
export OMP_NUM_THREADS=1
for recipe in repro-cpu-mlp q-collapse-mlp q-ablation-mlp q-sawtooth-mlp repro-cpu-mlp-dropout; do
    /usr/bin/time -f "$recipe: %e s wall" nice -n 10 \
        surgeon train --recipe "$recipe" --data "$DATA" --out "$OUT" --workers 1 --quiet \
        > "$OUT.$recipe.log" 2>&1
    tail -1 "$OUT.$recipe.log"
done

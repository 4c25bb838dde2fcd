#!/bin/sh
# Reproduce the figures of benchmarks/README.md ("Latest figures").
#
#   benchmarks/run_all.sh [BENCH_DIR] [SCALE_DIR]
#
# Environment (defaults = the published run): SCENES=400 QUERIES=150 SEED=0
# MODES=single,mvr,himir-full,himir ENCODER=offline DEVICE=cpu
# SCALE_IMAGES=100000 SCALE_QUERIES=200 SCALE_DIM=384.
# Needs Debian's tuxpaint-stamps-default (benchmarks/install_stamps.sh) for the composite benchmark.
set -eu

BENCH_DIR=${1:-/tmp/bench}
SCALE_DIR=${2:-/tmp/bench-scale}
SCENES=${SCENES:-400}
QUERIES=${QUERIES:-150}
SEED=${SEED:-0}
MODES=${MODES:-single,mvr,himir-full,himir}
ENCODER=${ENCODER:-offline}
DEVICE=${DEVICE:-cpu}
SCALE_IMAGES=${SCALE_IMAGES:-100000}
SCALE_QUERIES=${SCALE_QUERIES:-200}
SCALE_DIM=${SCALE_DIM:-384}

# 1. the composite photo collection (seconds)
himir bench build "$BENCH_DIR" --scenes "$SCENES" --queries "$QUERIES" --seed "$SEED"

# 2. every mode on the same queries; indexes BENCH_DIR/images once (the slow part: the
#    encoder runs on 1+4+16 crops per image), then reuses BENCH_DIR/index
himir bench run "$BENCH_DIR" --modes "$MODES" --encoder "$ENCODER" --device "$DEVICE" \
    --decomposer rule
himir bench run "$BENCH_DIR" --modes "$MODES" --encoder "$ENCODER" --device "$DEVICE" \
    --decomposer oracle --report-dir "$BENCH_DIR/report-oracle"

# 3. the matching engine at scale on planted synthetic vectors (no encoder)
himir bench scale --images "$SCALE_IMAGES" --queries "$SCALE_QUERIES" --dim "$SCALE_DIM" \
    --modes "$MODES" --seed "$SEED" --out "$SCALE_DIR"

echo "reports: $BENCH_DIR/report.md $BENCH_DIR/report-oracle/report.md $SCALE_DIR/report.md"

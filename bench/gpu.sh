#!/usr/bin/env bash
# The GPU run (bench/gpu.py): every section in under 10 minutes on one GPU, its tables appended
# to bench/RESULTS.md (or to --results FILE). Extra arguments go to bench/gpu.py, e.g.
#   bash bench/gpu.sh --results "$OUT/gpu-results.md"     # on a lent machine
#   bash bench/gpu.sh --toy --results /tmp/toy.md         # CPU, tiny sizes (tests/test_bench_gpu.py)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python}" bench/gpu.py "$@"

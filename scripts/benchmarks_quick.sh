#!/usr/bin/env bash
# Runs every benchmark's --quick mode (CI: called by .ci/run when executable). Quick results go to a temporary
# folder (or $BENCH_QUICK_OUT), never into the repository; the full-mode numbers the docs quote come from the commands
# in benchmarks/README.md. A benchmark exits non-zero only when it crashes (a missed target is recorded in its JSON).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg WANDB_MODE=offline WANDB_SILENT=true
py=.venv/bin/python
[ -x "$py" ] || py=python
out=${BENCH_QUICK_OUT:-$(mktemp -d -t benchmarks_quick.XXXXXX)}
mkdir -p "$out"
echo "quick results -> $out"
start=$(date +%s)
run() {
    local name=$1; shift
    local t0; t0=$(date +%s)
    echo "== benchmarks/$name.py --quick"
    "$py" "benchmarks/$name.py" --quick --out "$out/${name}_quick.json" "$@"
    echo "   ($(( $(date +%s) - t0 )) s)"
}
[ -f benchmarks/overhead.py ] && run overhead
run rescue
run lr_sensitivity
run codec_quality
run quality_cost
run peers
run fault_zoo
echo "== quick benchmarks finished in $(( $(date +%s) - start )) s"

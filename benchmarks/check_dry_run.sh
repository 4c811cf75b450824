#!/usr/bin/env bash
# CI check of benchmarks/gpu_check.sh on a machine without a GPU (its dry run):
#
#     bash benchmarks/check_dry_run.sh [OUTPUT_DIR]
#
# Runs the dry run into a fresh folder and fails unless the folder then holds exactly
# gpu_check.tar.gz and summary.txt, the archive opens and holds the stage table and the smoke
# results, and summary.txt names every stage. Extra arguments go to gpu_check.sh through the
# environment (e.g. GPU_CHECK_SKIP_INSTALL=1 when the package is already installed).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-$(mktemp -d)/gpu-check-dry-run}
rm -rf "$OUT"
start=$SECONDS
bash benchmarks/gpu_check.sh "$OUT" > /dev/null
echo "gpu_check.sh dry run: $((SECONDS - start)) s"
files=$(cd "$OUT" && find . -mindepth 1 -printf '%P\n' | sort | tr '\n' ' ')
[ "$files" = "gpu_check.tar.gz summary.txt " ] || { echo "expected exactly gpu_check.tar.gz and summary.txt in $OUT, got: $files"; exit 1; }
listing=$(tar -tzf "$OUT/gpu_check.tar.gz")
for f in ./stages.tsv ./smoke.txt ./summary.txt ./gpu_check.log; do
    grep -qx -- "$f" <<< "$listing" || { echo "$f missing from the archive"; exit 1; }
done
for s in install precompile smoke gpu_tests memcheck tune kernels cli_inference cli_training blocks cli_max_autotune; do
    grep -q "^   $s " "$OUT/summary.txt" || { echo "summary.txt does not name stage $s"; exit 1; }
done
grep -q "== smoke" "$OUT/summary.txt" || { echo "summary.txt has no smoke results"; exit 1; }
echo "ok: $OUT holds gpu_check.tar.gz ($(du -k "$OUT/gpu_check.tar.gz" | cut -f1) KiB) and summary.txt"

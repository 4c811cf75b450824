#!/usr/bin/env bash
# The one command to run on a GPU machine (no network; PyTorch, Triton, nvcc installed):
#
#     bash benchmarks/gpu_check.sh OUTPUT_DIR
#
# Installs the package without touching a registry, builds the extension (when the tree
# has one), runs the GPU tests, the benchmark CLI and the per-block suite, writes JSON,
# PNG and logs into OUTPUT_DIR and prints a short table last. Each stage has a time cap in
# seconds (CAP_TESTS, CAP_MEMCHECK, CAP_KERNELS, CAP_INFER, CAP_TRAIN, CAP_BLOCKS,
# CAP_MAX_AUTOTUNE; 580 s in all) so the whole check stays within ~10 minutes on an H100; a stage cut by its cap loses only
# its own results (the CLI keeps every finished workload; pytest-benchmark keeps nothing).
# On a machine without a GPU it is a dry run: same stages, tiny sizes.
set -uo pipefail

OUT=${1:?usage: bash benchmarks/gpu_check.sh OUTPUT_DIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
LOG="$OUT/gpu_check.log"
log() { echo "[gpu_check $(date +%T)] $*" | tee -a "$LOG"; }
stage() {  # stage NAME CAP_SECONDS COMMAND...: run with a time cap, log its status and duration
    local name=$1 cap=$2; shift 2
    local start=$SECONDS
    timeout -k 10 "$cap" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    log "$name: rc=$rc ($((SECONDS - start)) s, cap $cap s)$([ $rc -eq 124 ] && echo ' HIT THE TIME CAP')"
    tail -n 3 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$LOG"
}

if ! GPU=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>>"$LOG"); then
    log "cannot import torch with $PY (set PYTHON=/path/to/python); stopping"
    exit 1
fi
log "start; GPU=$GPU; $($PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' 2>&1)"
[ "$GPU" = 1 ] && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$OUT/nvidia-smi.csv" 2>&1

# 1. Install: no build isolation, no dependency resolution (nothing to download).
if ! $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/install.log" 2>&1; then
    log "pip install failed (see install.log); using the source tree on PYTHONPATH"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

# 2. The C++/CUDA extension, built here (never carried from another machine): the install
#    above builds it for the visible GPU; if it did not load, build it in place.
EXT_OK() { $PY -c "from fusedres import ext; import sys; e = ext.load_error(); print(e or 'fusedres._C loaded, CUDA kernels:', ext.has_kernels('cuda')); sys.exit(1 if e else 0)" >> "$LOG" 2>&1; }
if ! EXT_OK; then
    stage build 300 $PY setup.py build_ext --inplace
    EXT_OK || log "fusedres._C is still not loadable: the cuda backend rows will be unavailable"
fi

if [ "$GPU" = 1 ]; then
    export FUSEDRES_CACHE_DIR="$OUT/dispatch-cache"
    # 3. GPU tests (every test marked gpu).
    # One Triton config per kernel here (correctness, not speed): far fewer compilations.
    FUSEDRES_TRITON_AUTOTUNE=0 stage gpu_tests "${CAP_TESTS:-90}" $PY -m pytest -q -m gpu tests \
        -p no:cacheprovider -rs --maxfail=10 --durations=10
    # 3b. The extension's kernels under compute-sanitizer memcheck (a subset: it is slow),
    #     then its kernels against PyTorch's op sequences on ResNet-50 shapes, batch 256 bf16.
    SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
    if [ -n "$SAN" ]; then
        stage memcheck "${CAP_MEMCHECK:-60}" "$SAN" --tool memcheck --error-exitcode 9 $PY -m pytest -q -m gpu \
            tests/test_ext.py -p no:cacheprovider -x -k "cuda and (float32 or opcheck or nan) and not 1x5x9x3"
    else
        log "memcheck: compute-sanitizer not found"
    fi
    stage kernels "${CAP_KERNELS:-40}" $PY -m fusedres.bench.kernels --out "$OUT/kernels.json"
    # 4. The CLI: ResNet-50, batch 256, bf16, channels_last; inference, then training.
    stage cli_inference "${CAP_INFER:-130}" $PY -m fusedres.bench --mode inference \
        --skip compile_max_autotune --out-dir "$OUT" --name cli-inference --no-progress
    stage cli_training "${CAP_TRAIN:-80}" $PY -m fusedres.bench --mode training --skip compile_max_autotune \
        --out-dir "$OUT" --name cli-training --no-progress
    # 5. Per-block suite (pytest-benchmark), L2 flushed before every round.
    stage blocks "${CAP_BLOCKS:-90}" $PY -m pytest benchmarks -q -p no:cacheprovider -k "not compile_max_autotune" \
        --benchmark-json="$OUT/blocks.json" --benchmark-columns=min,median,max,rounds
    # 6. Last, because its compile alone may take minutes: max-autotune + freezing, inference,
    #    against the yardstick and fusedres (a run cut by its cap leaves the others intact).
    stage cli_max_autotune "${CAP_MAX_AUTOTUNE:-90}" $PY -m fusedres.bench --mode inference \
        --candidates compile_max_autotune fusedres_auto --out-dir "$OUT" --name cli-max-autotune --no-progress
else
    log "no GPU: dry run with tiny sizes"
    stage gpu_tests 60 $PY -m pytest -q -m gpu tests -p no:cacheprovider
    stage cli_inference 120 $PY -m fusedres.bench --model resnet18 --batch 2 --image-size 64 --repeats 2 \
        --mode inference --skip compile --out-dir "$OUT" --name cli-inference --no-progress
    stage cli_training 120 $PY -m fusedres.bench --model resnet18 --batch 4 --image-size 64 --repeats 2 \
        --mode training --skip compile --out-dir "$OUT" --name cli-training --no-progress
    stage blocks 120 $PY -m pytest benchmarks -q -p no:cacheprovider --benchmark-json="$OUT/blocks.json"
    stage kernels 120 $PY -m fusedres.bench.kernels --shapes 2 --batch 2 --repeats 2 --out "$OUT/kernels.json"
fi

log "done in $SECONDS s"
echo
echo "================ summary ================"
$PY -m fusedres.bench.summary "$OUT" 2>&1 | tee "$OUT/summary.txt"

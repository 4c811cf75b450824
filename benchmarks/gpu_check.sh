#!/usr/bin/env bash
# The one command to run on a GPU machine (no network; PyTorch, Triton, nvcc installed):
#
#     bash benchmarks/gpu_check.sh OUTPUT_DIR
#
# Leaves exactly two files in OUTPUT_DIR: gpu_check.tar.gz (every log, JSON, PNG, the smoke
# results, the tuner's per-shape JSON, listings of the Triton caches; no compiled kernels) and
# summary.txt (stages with rc/seconds/cap, smoke results, CLI img/s, speedups and first-call
# seconds, the tuner's Triton-vs-cuDNN time per ResNet-50 conv shape). Everything is written in
# a scratch folder outside OUTPUT_DIR and packed after every stage and on exit (trap), so a
# run cut short (stage cap, SIGTERM, the device tool's own limit) still leaves both files.
#
# Budget: the whole command stays within GPU_CHECK_BUDGET seconds (default 540 = 9 min on an
# H100/H200): each stage gets min(its cap, what is left - 15 s for packing); a stage with
# less than 10 s left is skipped. Stages run in order of value; the expected seconds per
# stage (H100/H200 host with 16 cores) and how they were estimated are in the comments below
# and in benchmarks/results/README.md. Caps can be overridden: CAP_<STAGE>=seconds.
# GPU_CHECK_SKIP_INSTALL=1 uses the installed package (CI's dry run). GPU_CHECK_MAX_AUTOTUNE=1
# adds torch.compile max-autotune (minutes of compilation: not in the 9-minute budget).
# On a machine without a GPU it is a dry run: same stages, tiny sizes.
set -uo pipefail

OUT=${1:?usage: bash benchmarks/gpu_check.sh OUTPUT_DIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}  # the GPU machine's image has python3 (holding PyTorch), maybe no python
BUDGET=${GPU_CHECK_BUDGET:-540}
RESERVE=15  # seconds kept for the final pack
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
LOG="$WORK/gpu_check.log"
STAGES="$WORK/stages.tsv"
MAX_FILE_KB=2048  # bigger files stay out of the archive (listed in left-out-of-archive.txt)
: > "$STAGES"
BG_PID= STAGE_PID=

log() { echo "[gpu_check $(date +%T) +${SECONDS}s] $*" | tee -a "$LOG"; }

pack() {  # summary + archive into OUT, atomically (temp file in OUT, then rename)
    local d
    for d in "$WORK"/triton-cache/*/; do
        [ -d "$d" ] && (cd "$d" && find . -type f -printf '%s %P\n' | sort -k2) > "$WORK/triton-cache-$(basename "$d").txt"
    done
    (cd "$WORK" && find . -path ./triton-cache -prune -o -path ./smoke-cache -prune -o -type f \
        -size +"${MAX_FILE_KB}"k -printf '%s %P\n') > "$WORK/left-out-of-archive.txt"
    [ -s "$WORK/left-out-of-archive.txt" ] || rm -f "$WORK/left-out-of-archive.txt"
    # As a script: no torch import (seconds per pack) unless the kernel benchmark's table needs it.
    $PY fusedres/bench/summary.py "$WORK" > "$WORK/summary.txt" 2>&1
    [ -f "$WORK/left-out-of-archive.txt" ] && sed 's/^/left out of the archive (bytes path): /' \
        "$WORK/left-out-of-archive.txt" >> "$WORK/summary.txt"
    (cd "$WORK" && find . -path ./triton-cache -prune -o -path ./smoke-cache -prune -o -type f \
        -size -"$((MAX_FILE_KB + 1))"k -not -name .files -print | sort) > "$WORK/.files"
    tar -czf "$OUT/.gpu_check.tar.gz.part" -C "$WORK" -T "$WORK/.files" 2>>"$LOG" \
        && mv -f "$OUT/.gpu_check.tar.gz.part" "$OUT/gpu_check.tar.gz"
    cp "$WORK/summary.txt" "$OUT/.summary.txt.part" && mv -f "$OUT/.summary.txt.part" "$OUT/summary.txt"
}

finish() {
    trap - EXIT INT TERM
    local p
    for p in $BG_PID $STAGE_PID; do kill -- -"$p" 2>/dev/null; done  # timeout leads its group
    log "done in $SECONDS s"
    pack
    rm -rf "$WORK"
    echo
    echo "================ summary ($OUT/summary.txt) ================"
    cat "$OUT/summary.txt"
}
trap finish EXIT
trap 'log "interrupted"; exit 143' INT TERM

record() {  # record NAME RC SECONDS CAP NOTE: replace NAME's "started" line in stages.tsv
    sed -i "/^$1\t-\t/d" "$STAGES"
    printf '%s\t%s\t%s\t%s\t%s\n' "$@" >> "$STAGES"
}

cap_for() {  # cap_for NAME DEFAULT: CAP_NAME if set, limited by the time left
    local var="CAP_${1^^}" left=$((BUDGET - RESERVE - SECONDS))
    local cap=${!var:-$2}
    echo $((cap < left ? cap : left))
}

stage() {  # stage NAME DEFAULT_CAP COMMAND...: run with a time cap, record rc and duration, pack
    local name=$1 cap; cap=$(cap_for "$1" "$2"); shift 2
    if [ "$cap" -lt 10 ]; then
        record "$name" skip 0 "$cap" "no time left in the ${BUDGET} s budget"
        log "$name: skipped, no time left"
        return
    fi
    printf '%s\t-\t\t%s\tstarted\n' "$name" "$cap" >> "$STAGES"
    local start=$SECONDS
    # In the background + wait: a trapped SIGTERM interrupts wait at once (not after the stage).
    timeout -k 10 "$cap" "$@" > "$WORK/$name.log" 2>&1 &
    STAGE_PID=$!
    wait "$STAGE_PID"
    local rc=$?
    STAGE_PID=
    local note=""
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && note="hit the time cap"
    record "$name" "$rc" "$((SECONDS - start))" "$cap" "$note"
    log "$name: rc=$rc ($((SECONDS - start)) s, cap $cap s)${note:+ $note}"
    tail -n 3 "$WORK/$name.log" | sed 's/^/    /' | tee -a "$LOG"
    pack
}

skip() { record "$1" skip 0 0 "$2"; log "$1: skipped: $2"; }

# The GPU tests in 4 shards at once: they are bound by Triton/inductor compilation (one CPU
# core each), so shards cut the wall time; each shard logs to gpu_tests-N.log.
gpu_test_shards() {
    local i=0 pids=() rc=0 p
    local other="--ignore=tests/test_ext.py --ignore=tests/test_triton_conv.py --ignore=tests/test_triton_conv_backward.py"
    for files in "tests/test_ext.py" "tests/test_triton_conv.py tests/test_triton_conv_backward.py" \
            "tests/test_triton_backend.py" "tests $other --ignore=tests/test_triton_backend.py"; do
        # shellcheck disable=SC2086
        $PY -m pytest -q -m gpu $files -p no:cacheprovider -rs --maxfail=10 --durations=5 \
            > "$WORK/gpu_tests-$i.log" 2>&1 &
        pids+=($!)
        i=$((i + 1))
    done
    for p in "${pids[@]}"; do wait "$p" || rc=$?; done
    tail -q -n 2 "$WORK"/gpu_tests-*.log
    return $rc
}
export -f gpu_test_shards
export PY WORK

if ! GPU=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>>"$LOG"); then
    log "cannot import torch with $PY (set PYTHON=/path/to/python); stopping"
    exit 1
fi
log "start; GPU=$GPU; budget $BUDGET s; scratch $WORK; $($PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' 2>&1)"
[ "$GPU" = 1 ] && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$WORK/nvidia-smi.csv" 2>&1
mkdir -p "$WORK/triton-cache"
export FUSEDRES_CACHE_DIR="$WORK/fusedres-cache"  # the never-slower tuner's results: the summary's table
TUNED_CACHE="$WORK/triton-cache/tuned"            # full autotuning: precompile, tune, CLI, blocks
TEST_CACHE="$WORK/triton-cache/tests"             # FUSEDRES_TRITON_AUTOTUNE=0: tests, memcheck

# 1. Install: no build isolation, no dependency resolution (nothing to download); builds the
#    C++/CUDA extension for the visible GPU. ~60 s: the 2-core build takes 154 s for two
#    archs (~150 core-s per arch); 16 cores run its files in parallel, the slowest ~30-40 s.
if [ "${GPU_CHECK_SKIP_INSTALL:-0}" = 1 ]; then
    skip install "GPU_CHECK_SKIP_INSTALL=1"
else
    stage install 240 $PY -m pip install --no-build-isolation --no-deps -e .
    if ! $PY -c "import fusedres" >/dev/null 2>&1 || [ "$(tail -n 1 "$STAGES" | cut -f2)" != 0 ]; then
        log "pip install failed (see install.log); using the source tree on PYTHONPATH"
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
EXT_OK() { $PY -c "from fusedres import ext; import sys; e = ext.load_error(); print(e or 'fusedres._C loaded, CUDA kernels:', ext.has_kernels('cuda')); sys.exit(1 if e else 0)" >> "$LOG" 2>&1; }
if ! EXT_OK && [ "${GPU_CHECK_SKIP_INSTALL:-0}" != 1 ]; then
    stage build 300 $PY setup.py build_ext --inplace
    EXT_OK || log "fusedres._C is still not loadable: the cuda backend rows will be unavailable"
fi

if [ "$GPU" = 1 ]; then
    # 2. Precompile, in the background while the correctness stages run (they need little
    #    CPU): 6 processes compile every autotuning config of every Triton kernel ResNet-50's
    #    blocks use at batch 256 bf16 (eval + train), untimed. ~60 s: ~200 compiles (6 eval +
    #    5 train conv variants x ~10 configs, dgrad/wgrad 4 variants x 7, elementwise ~15) x
    #    ~1.5 s (measured 0.7-4.3 s per conv config for sm_90 on the 2-core machine) / 6 + 15 s
    #    start. Fills TUNED_CACHE; its timings are not kept.
    PRE_CAP=$(cap_for precompile 240)
    printf 'precompile\t-\t\t%s\tstarted (background)\n' "$PRE_CAP" >> "$STAGES"
    PRE_START=$SECONDS
    # timeout leads its own process group: finish() kills it and the workers with kill -- -PID.
    TRITON_CACHE_DIR="$TUNED_CACHE" FUSEDRES_CACHE_DIR="$WORK/precompile-cache" timeout -k 10 "$PRE_CAP" \
        $PY -m fusedres.bench.tune --precompile "${PRECOMPILE_WORKERS:-6}" --out "$WORK/precompile.json" \
        > "$WORK/precompile.log" 2>&1 &
    BG_PID=$!
    # 3. Smoke: every backend x eval/train on resnet18 (64 px, batch 8) and ResNet-50's layer2.0
    #    Bottleneck, bf16, vs float64; one Triton config. ~60 s: ~40 compiles x ~1 s + 15 s start.
    TRITON_CACHE_DIR="$WORK/triton-cache/smoke" FUSEDRES_CACHE_DIR="$WORK/smoke-cache" FUSEDRES_TRITON_AUTOTUNE=0 \
        stage smoke 90 $PY -m fusedres.bench.smoke --out "$WORK/smoke.txt"
    # 4. GPU tests (every test marked gpu), one Triton config, 4 shards. ~75 s: bound by the
    #    shard holding the two torch.compile ResNet-18 tests (inductor, ~30 s each).
    TRITON_CACHE_DIR="$TEST_CACHE" FUSEDRES_TRITON_AUTOTUNE=0 stage gpu_tests 100 bash -c gpu_test_shards
    # 5. The extension's kernels under compute-sanitizer memcheck (112 tests: float32, opcheck,
    #    NaN). ~40 s: sanitizer start ~15 s, kernels ~10-100x slower, tiny shapes.
    SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
    if [ -n "$SAN" ]; then
        TRITON_CACHE_DIR="$TEST_CACHE" FUSEDRES_TRITON_AUTOTUNE=0 stage memcheck 60 "$SAN" --tool memcheck \
            --error-exitcode 9 $PY -m pytest -q -m gpu tests/test_ext.py -p no:cacheprovider -x \
            -k "cuda and (float32 or opcheck or nan) and not 1x5x9x3"
    else
        skip memcheck "compute-sanitizer not found"
    fi
    wait "$BG_PID"; rc=$?; BG_PID=
    record precompile "$rc" "$((SECONDS - PRE_START))" "$PRE_CAP" "background, waited for at +${SECONDS}s"
    log "precompile: rc=$rc (ended by +${SECONDS}s)"
    # From here on: timings. Triton keeps its autotuning choices on disk (TRITON_CACHE_AUTOTUNING),
    # so the tune stage's choices serve the CLI and the per-block suite (warm caches, recorded
    # in each CLI row's first_call_caches).
    export TRITON_CACHE_DIR="$TUNED_CACHE" TRITON_CACHE_AUTOTUNING=1
    # 6. Tune: every distinct ResNet-50 block at batch 256 bf16 with backend auto, eval forward
    #    and train forward+backward: the never-slower tuner times Triton vs cuDNN for every eval
    #    conv and Triton vs ATen dgrad/wgrad for every train conv (the summary's table). Triton
    #    configs timed 5+20 ms each. ~60 s: ~830 config timings x ~35 ms + ~100 tuner timings x
    #    ~50 ms + loading ~200 cubins; a cache miss left by the precompile compiles here.
    stage tune 150 $PY -m fusedres.bench.tune --bench-ms 5,20 --out "$WORK/tune.json"
    # 7. The extension's kernels vs PyTorch's op sequences, ResNet-50 shapes, batch 256 bf16.
    #    ~20 s: 8 shapes x 7 ops x 7 repeats of ~1 ms + start.
    stage kernels 40 $PY -m fusedres.bench.kernels --out "$WORK/kernels.json"
    # 8. The CLI, ResNet-50 batch 256 bf16 channels_last, inference: eager, torch.compile,
    #    cuDNN fusion, every fusedres backend. ~85 s: inductor compile ~40 s, 8 rows x (3 + 5 x 10)
    #    iterations x ~25 ms, parity and memory passes, start.
    stage cli_inference 110 $PY -m fusedres.bench --mode inference --repeats 5 \
        --skip compile_max_autotune --out-dir "$WORK" --name cli-inference --no-progress
    # 9. Training (AMP bf16, SGD). torch.compile is skipped: its fwd+bwd compile (~90 s) does
    #    not fit. ~60 s: 6 rows x (3 + 5 x 10) steps x ~100 ms + start.
    stage cli_training 100 $PY -m fusedres.bench --mode training --repeats 5 \
        --skip compile compile_max_autotune --out-dir "$WORK" --name cli-training --no-progress
    # 10. Per-block suite (pytest-benchmark, L2 flushed per round), ResNet-50's 8 distinct blocks
    #     x 2 modes x 5 candidates. ~60 s: 80 cases x (check + 23 rounds of ~3 ms) + block setup.
    stage blocks 100 $PY -m pytest benchmarks -q -p no:cacheprovider -k "resnet50 and not compile_max_autotune" \
        --benchmark-json="$WORK/blocks.json" --benchmark-columns=min,median,max,rounds
    # 11. Opt-in: max-autotune + freezing, inference (its compile alone takes minutes).
    if [ "${GPU_CHECK_MAX_AUTOTUNE:-0}" = 1 ]; then
        stage cli_max_autotune 300 $PY -m fusedres.bench --mode inference --candidates compile_max_autotune \
            fusedres_auto --out-dir "$WORK" --name cli-max-autotune --no-progress
    else
        skip cli_max_autotune "opt-in (GPU_CHECK_MAX_AUTOTUNE=1): compiles for minutes"
    fi
else
    log "no GPU: dry run with tiny sizes"
    # The same stages at tiny sizes, on the CPU. Triton: no compiler here; the smoke reports the
    # triton backend UNAVAILABLE (its interpreter needs TRITON_INTERPRET=1 before Python starts
    # and takes minutes at these sizes; the test suite covers the interpreter).
    TRITON_CACHE_DIR="$TUNED_CACHE" FUSEDRES_CACHE_DIR="$WORK/precompile-cache" \
        stage precompile 60 $PY -m fusedres.bench.tune --precompile 2 --max-blocks 1 --out "$WORK/precompile.json"
    TRITON_CACHE_DIR="$WORK/triton-cache/smoke" FUSEDRES_CACHE_DIR="$WORK/smoke-cache" FUSEDRES_TRITON_AUTOTUNE=0 \
        stage smoke 90 env -u TRITON_INTERPRET $PY -m fusedres.bench.smoke --out "$WORK/smoke.txt"
    TRITON_CACHE_DIR="$TEST_CACHE" FUSEDRES_TRITON_AUTOTUNE=0 stage gpu_tests 100 bash -c gpu_test_shards
    skip memcheck "no GPU"
    export TRITON_CACHE_DIR="$TUNED_CACHE" TRITON_CACHE_AUTOTUNING=1
    stage tune 60 $PY -m fusedres.bench.tune --max-blocks 1 --out "$WORK/tune.json"
    stage kernels 60 $PY -m fusedres.bench.kernels --shapes 2 --batch 2 --repeats 2 --out "$WORK/kernels.json"
    stage cli_inference 90 $PY -m fusedres.bench --model resnet18 --batch 2 --image-size 64 --repeats 2 \
        --warmup 0 --mode inference --skip compile compile_freezing eager_nchw_fp32 --out-dir "$WORK" \
        --name cli-inference --no-progress
    stage cli_training 90 $PY -m fusedres.bench --model resnet18 --batch 4 --image-size 64 --repeats 2 \
        --warmup 0 --mode training --skip compile eager_nchw_fp32 --out-dir "$WORK" --name cli-training --no-progress
    stage blocks 90 $PY -m pytest benchmarks -q -p no:cacheprovider -k "resnet18.layer1.0 or resnet50.layer1.0" \
        --benchmark-json="$WORK/blocks.json"
    skip cli_max_autotune "GPU only"
fi

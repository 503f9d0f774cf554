#!/usr/bin/env bash
# GPU checks of the CUDA backend, in two halves because the GPU machine has no cargo:
#
#   scripts/gpu-check.sh stage   here: build the trellis-cuda test binaries, strip them and copy
#                                them with the fixtures they need into .device-carry/
#   scripts/gpu-check.sh         on the GPU machine, from the repo root (with .device-carry
#                                carried along): run every GPU test and the timings, logs in $OUT
#
# Environment: FIXTURES (stage) lists the EXL3 fixture directories to carry (the carried
# tree is limited, so not all of them); OUT (run) is where logs go (default /tmp/gpu-check).
set -uo pipefail

CARRY=.device-carry
FIXTURES=${FIXTURES:-"glm4-moe-lite-tiny-2.5bpw glm4-moe-lite-tiny-3.0bpw-mcg"}

stage() {
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-cuda}
    local src=${TRELLIS_FIXTURES:-../shared/fixtures}
    rm -rf "$CARRY"
    mkdir -p "$CARRY/bin" "$CARRY/fixtures/exl3" "$CARRY/fixtures/ref/exl3"
    cargo test -p trellis-cuda --no-run --message-format=json 2>/dev/null |
        python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "trellis-cuda" in m["package_id"]:
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do
        strip -o "$CARRY/bin/$name" "$exe"
    done
    cp "$src/README.md" "$CARRY/fixtures/"
    for f in $FIXTURES; do
        cp -r "$src/exl3/$f" "$CARRY/fixtures/exl3/"
        rm -f "$CARRY/fixtures/exl3/$f/tokenizer.json"
        cp -r "$src/ref/exl3/$f" "$CARRY/fixtures/ref/exl3/"
    done
    echo "$FIXTURES" >"$CARRY/fixtures.txt"
    ls -la "$CARRY/bin"
    du -sh "$CARRY"
}

source "$(dirname "$0")/cuda-env.sh"

run() {
    OUT=${OUT:-/tmp/gpu-check}
    mkdir -p "$OUT"
    export LD_LIBRARY_PATH="$(library_path)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export TRELLIS_FIXTURES="$PWD/$CARRY/fixtures"
    export TRELLIS_KERNEL_CACHE=/tmp/trellis-kernels
    export RUST_BACKTRACE=1
    # The CPU backend is the GPU tests' reference: keep it on bit-exact kernels (a VNNI host
    # would otherwise approximate mul1 products).
    export TRELLIS_CPU_ISA=exact
    {
        date -u
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
        echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
        ldconfig -p | grep -E "libcuda\.so|libnvrtc" || true
        ls /usr/local/cuda*/lib64/libnvrtc* 2>/dev/null || true
        nvcc --version 2>/dev/null | tail -2 || true
    } >"$OUT/env.txt" 2>&1
    : >"$OUT/summary.txt"
    local fixtures
    fixtures=$(cat "$CARRY/fixtures.txt" 2>/dev/null || echo "")
    run_bin() {
        local log=$1 name=$2 limit=$3
        shift 3
        echo "== $name $*" >>"$OUT/$log.log"
        timeout "$limit" "$CARRY/bin/$name" "$@" >>"$OUT/$log.log" 2>&1
        local rc=$?
        echo "$name $*: exit $rc" | tee -a "$OUT/summary.txt"
        grep -E "^test result|FAILED|panicked" "$OUT/$log.log" | tail -5 >>"$OUT/summary.txt"
    }
    run_bin host trellis_cuda 60 --include-ignored
    run_bin host kernels 120 --include-ignored --nocapture
    TRELLIS_CUDA_SYNC=1 run_bin ops ops 300 --ignored --test-threads 1 --nocapture
    # Graph recording is off while synchronising after each launch: the replay test again, with it.
    run_bin ops ops 120 --ignored --test-threads 1 --nocapture run_step
    TRELLIS_CUDA_MMA=0 run_bin ops ops 300 --ignored --test-threads 1 --nocapture trellis moe mla fused
    # The SIMT kernels for tiles of up to 16 rows (decode uses the 16-row tensor-core kernel).
    TRELLIS_CUDA_MMA16=0 run_bin ops ops 300 --ignored --test-threads 1 --nocapture trellis moe fused
    TRELLIS_CUDA_UNFUSED_LINEAR=1 TRELLIS_CUDA_SYNC=1 run_bin ops ops 300 --ignored --test-threads 1 --nocapture trellis moe_experts fused
    # The quantizer's GPU Viterbi search against the CPU's exact search (and its throughput).
    run_bin tile_search tile_search 300 --ignored --test-threads 1 --nocapture
    local filters=()
    for f in $fixtures; do
        case $f in
        llama-tiny-4.0bpw) filters+=(llama_4bpw_on_gpu) ;;
        qwen3-tiny-3.0bpw) filters+=(qwen3_3bpw_on_gpu) ;;
        *4.0bpw) filters+=(exl3_4bpw_on_gpu) ;;
        *2.5bpw) filters+=(exl3_2_5bpw_on_gpu) ;;
        *3.0bpw-mcg) filters+=(exl3_3bpw_mcg_on_gpu) ;;
        esac
    done
    [ ${#filters[@]} -gt 0 ] && run_bin fixtures fixtures 300 --ignored --test-threads 1 --nocapture "${filters[@]}"
    # The project's tiny transformers models (tracked files, so always there).
    run_bin fixtures fixtures 300 --ignored --test-threads 1 --nocapture matches_transformers
    run_bin bench bench 400 --ignored --test-threads 1 --nocapture
    TRELLIS_CUDA_MMA16=0 run_bin bench bench 300 --ignored --test-threads 1 --nocapture op_timings
    [ -n "${SWEEP_WAVES:-}" ] && for w in $SWEEP_WAVES; do
        TRELLIS_CUDA_SPLIT_WAVES=$w run_bin bench bench 300 --ignored --test-threads 1 --nocapture op_timings
    done
    TRELLIS_CUDA_PROFILE=1 run_bin bench bench 300 --ignored --test-threads 1 --nocapture glm_layer_profile
    # The timing tables and the fixture results last (the reply shows the tail).
    sed -n '/^op timings/,/^end of op timings/p' "$OUT/bench.log"
    grep -h -A20 "^GLM MoE layer decode ctx" "$OUT/bench.log"
    grep -h "GLM tiny\|prefill of\|teacher-forced\|decode steps" "$OUT/bench.log" "$OUT/fixtures.log" 2>/dev/null
    cat "$OUT/summary.txt"
}

case ${1:-run} in
stage) stage ;;
run) run ;;
*)
    echo "usage: $0 [stage|run]" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# Speed and memory of the CUDA backend on full-size synthetic GLM-4.7-Flash models, in one go
# on the GPU machine (which has no cargo): a release `trellis` built here with
# `--features cuda` is carried in .device-carry/trellis.
#
#   scripts/gpu-bench.sh stage      here: build and copy the binary into .device-carry/
#   scripts/gpu-bench.sh [bits...]  there: synthesize each model in /tmp, bench it, JSON in $OUT
#                                   (DEQUANTIZE_BITS=3 adds a `--dequantize all` run at 3 bpw)
set -uo pipefail
CARRY=.device-carry

stage() {
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
    cargo build --release -p trellis-cli --features cuda || exit 1
    mkdir -p "$CARRY"
    strip -o "$CARRY/trellis" "$CARGO_TARGET_DIR/release/trellis"
    ls -la "$CARRY/trellis"
}

bench() {
    source "$(dirname "$0")/cuda-env.sh"
    export LD_LIBRARY_PATH="$(library_path)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export TRELLIS_KERNEL_CACHE=/tmp/trellis-kernels
    OUT=${OUT:-/tmp/gpu-bench}
    mkdir -p "$OUT"
    local t=$CARRY/trellis
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$OUT/env.txt" 2>&1
    local widths=("$@")
    [ ${#widths[@]} -eq 0 ] && widths=(3 4)
    for bits in "${widths[@]}"; do
        local m=/tmp/glm-synth-${bits}bpw
        rm -rf /tmp/glm-synth-*
        /usr/bin/time -f "synth %e s" $t synth glm4_moe_lite --preset full --bits "$bits" --out "$m" 2>>"$OUT/log.txt" || continue
        du -sb "$m" >>"$OUT/log.txt"
        # Decode after a 512-token prompt with an 8k-token cache (as the ExLlamaV3 anchors),
        # then prefill of 2048 tokens.
        $t bench "$m" --device cuda --prompt-tokens 512 --gen-tokens 128 --repeat 3 --ctx-size 8192 \
            >"$OUT/bench-${bits}bpw-512.json" 2>>"$OUT/log.txt"
        echo "bench ${bits} 512: exit $?" >>"$OUT/log.txt"
        $t bench "$m" --device cuda --prompt-tokens 2048 --gen-tokens 16 --repeat 2 --prefill-chunk 2048 \
            >"$OUT/bench-${bits}bpw-2048.json" 2>>"$OUT/log.txt"
        echo "bench ${bits} 2048: exit $?" >>"$OUT/log.txt"
        if [ "$bits" = "${PROFILE_BITS:-3}" ]; then
            # Per-kernel device time (each launch timed alone): a decode step is the difference
            # of the 66- and 2-token runs over 64; the prefill profile is one 2048-token chunk.
            for g in 2 66; do
                TRELLIS_CUDA_PROFILE=1 $t bench "$m" --device cuda --prompt-tokens 512 --gen-tokens $g \
                    --repeat 1 --ctx-size 8192 >/dev/null 2>"$OUT/profile-decode-$g.txt"
            done
            TRELLIS_CUDA_PROFILE=1 $t bench "$m" --device cuda --prompt-tokens 2048 --gen-tokens 2 \
                --repeat 1 --prefill-chunk 2048 >/dev/null 2>"$OUT/profile-prefill.txt"
        fi
        if [ "$bits" = "${GRAPH_OFF_BITS:-3}" ]; then
            # The same decode with every op launched directly (no step graphs), for comparison.
            TRELLIS_CUDA_GRAPH=0 $t bench "$m" --device cuda --prompt-tokens 512 --gen-tokens 64 --repeat 2 \
                --ctx-size 8192 >"$OUT/bench-${bits}bpw-512-nograph.json" 2>>"$OUT/log.txt"
            echo "bench ${bits} 512 without graphs: exit $?" >>"$OUT/log.txt"
        fi
        if [ "$bits" = "${DEQUANTIZE_BITS:-none}" ]; then
            # The same decode with every EXL3 linear dequantized to f16 at load (about 60 GB of
            # device memory at full size; off unless DEQUANTIZE_BITS names this width).
            $t bench "$m" --device cuda --dequantize all --prompt-tokens 512 --gen-tokens 64 --repeat 2 \
                --ctx-size 8192 >"$OUT/bench-${bits}bpw-512-dequantized.json" 2>>"$OUT/log.txt"
            echo "bench ${bits} 512 dequantized: exit $?" >>"$OUT/log.txt"
        fi
        $t generate "$m" --device cuda --prompt "Hello" --max-tokens 8 --temperature 0 --ctx-size 8192 \
            >>"$OUT/log.txt" 2>&1
    done
    rm -rf /tmp/glm-synth-*
    cat "$OUT/log.txt"
    for f in "$OUT"/bench-*.json; do
        echo "== $f"
        grep -E '"(prefill_tok_s|decode_tok_s|ttft_ms|load_seconds|peak_device_bytes|peak_rss_bytes|bytes_per_token|bandwidth_bytes_per_s|roofline_fraction)"' "$f"
    done
}

case ${1:-} in
stage) stage ;;
*) bench "$@" ;;
esac

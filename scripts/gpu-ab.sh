#!/usr/bin/env bash
# A/B decode and prefill speed of CUDA builds or settings on the GPU machine, alternated in one
# call so that both sides see the same machine state. Each variant is `label=binary[,VAR=value…]`.
#
#   scripts/gpu-ab.sh <bits> <rounds> <variant>...      (on the GPU machine; JSON lines in $OUT)
#   e.g. scripts/gpu-ab.sh 3 2 old=.device-carry/trellis-old new=.device-carry/trellis \
#        simt=.device-carry/trellis,TRELLIS_CUDA_MMA16=0
set -uo pipefail
source "$(dirname "$0")/cuda-env.sh"
export LD_LIBRARY_PATH="$(library_path)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export TRELLIS_KERNEL_CACHE=/tmp/trellis-kernels
OUT=${OUT:-/tmp/gpu-ab}
mkdir -p "$OUT"
bits=$1 rounds=$2
shift 2
m=/tmp/glm-synth-${bits}bpw
first=${1#*=}
first=${first%%,*}
[ -d "$m" ] || "$first" synth glm4_moe_lite --preset full --bits "$bits" --out "$m" >>"$OUT/ab.log" 2>&1
field() { grep -o "\"$1\": *[0-9.e+-]*" "$2" | head -1 | sed 's/.*: *//'; }
for round in $(seq 1 "$rounds"); do
    for variant in "$@"; do
        label=${variant%%=*}
        spec=${variant#*=}
        bin=${spec%%,*}
        envs=()
        [ "$spec" != "$bin" ] && IFS=, read -r -a envs <<<"${spec#*,}"
        json=$OUT/$label-$round-512.json
        env "${envs[@]}" "$bin" bench "$m" --device cuda --prompt-tokens 512 --gen-tokens 64 \
            --repeat 2 --ctx-size 8192 >"$json" 2>>"$OUT/ab.log"
        json2=$OUT/$label-$round-2048.json
        env "${envs[@]}" "$bin" bench "$m" --device cuda --prompt-tokens 2048 --gen-tokens 8 \
            --repeat 1 --prefill-chunk 2048 >"$json2" 2>>"$OUT/ab.log"
        printf '%s round %s: decode(512) %s tok/s, prefill 512 %s, prefill 2048 %s tok/s\n' \
            "$label" "$round" "$(field decode_tok_s "$json")" "$(field prefill_tok_s "$json")" \
            "$(field prefill_tok_s "$json2")" | tee -a "$OUT/ab.txt"
    done
done

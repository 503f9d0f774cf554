#!/usr/bin/env bash
# `trellis serve` under load on the GPU machine: a full-size synthetic GLM-4.7-Flash on the CUDA
# backend, the bounded load test (streaming chat, every response checked whole) at several
# concurrencies. Needs .device-carry/{trellis,load_test}, built here with
#   cargo build --release -p trellis-cli --features cuda
#   cargo build --release -p trellis-server --example load_test
# and copied (stripped) into .device-carry/. Results in $OUT (default /tmp/gpu-serve).
set -uo pipefail
source "$(dirname "$0")/cuda-env.sh"
export LD_LIBRARY_PATH="$(library_path)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export TRELLIS_KERNEL_CACHE=/tmp/trellis-kernels
OUT=${OUT:-/tmp/gpu-serve}
mkdir -p "$OUT"
bits=${BITS:-3}
t=.device-carry/trellis
m=/tmp/glm-synth-${bits}bpw
[ -d "$m" ] || $t synth glm4_moe_lite --preset "${PRESET:-full}" --bits "$bits" --out "$m" >/dev/null 2>&1
port=18090
$t serve "$m" --device "${DEVICE:-cuda}" --port $port --ctx-size 4096 --max-batch 64 --max-queue 512 \
    >"$OUT/serve.log" 2>&1 &
server=$!
for _ in $(seq 1 120); do
    python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/health')" \
        2>/dev/null && break
    sleep 1
done
# concurrency:requests per client (totals 8, 64, 128, 256 as in the CPU table)
for run in ${RUNS:-1:8 8:8 32:4 64:4}; do
    c=${run%%:*} r=${run##*:}
    echo "== concurrency $c requests $r" >>"$OUT/load.txt"
    .device-carry/load_test --url http://127.0.0.1:$port --concurrency "$c" --requests "$r" \
        --max-tokens 64 --cancel-fraction 0 >>"$OUT/load.txt" 2>&1
    echo "exit $?" >>"$OUT/load.txt"
done
echo "== with hang-ups" >>"$OUT/load.txt"
.device-carry/load_test --url http://127.0.0.1:$port --concurrency 64 --requests 4 --max-tokens 32 \
    --cancel-fraction 0.25 --seed 7 >>"$OUT/load.txt" 2>&1
echo "exit $?" >>"$OUT/load.txt"
python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:$port/metrics').read().decode())" \
    >"$OUT/metrics.txt" 2>&1
kill -TERM $server
wait $server
echo "server exit $?" >>"$OUT/load.txt"
cat "$OUT/load.txt"

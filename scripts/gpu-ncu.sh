#!/usr/bin/env bash
# Hardware counters of the decode kernels on the GPU machine (ncu), to see what bounds them:
# issue slots, stall reasons, occupancy, DRAM throughput. Runs the carried release `trellis`
# (built here with `scripts/gpu-bench.sh stage`) on a synthetic full-size GLM-4.7-Flash.
#
#   scripts/gpu-ncu.sh [bits] [kernel regex]     on the GPU machine, .device-carry carried
set -uo pipefail
source "$(dirname "$0")/cuda-env.sh"
export LD_LIBRARY_PATH="$(library_path)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export TRELLIS_KERNEL_CACHE=/tmp/trellis-kernels
OUT=${OUT:-/tmp/gpu-ncu}
mkdir -p "$OUT"
bits=${1:-3}
regex=${2:-"trellis_linear_tm1|trellis_mma_tm16|moe_route|mla_decode_mma|mla_absorb_q_wide_f16|mla_unabsorb_wide_f16|moe_combine|mla_append_f16|mla_combine"}
t=.device-carry/trellis
m=/tmp/glm-synth-${bits}bpw
[ -d "$m" ] || /usr/bin/time -f "synth %e s" $t synth glm4_moe_lite --preset full --bits "$bits" --out "$m" >>"$OUT/log.txt" 2>&1
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
echo "ncu: $NCU" >>"$OUT/log.txt"
# Graphs off so that each launch is a kernel ncu sees; a 16-token prompt keeps prefill short.
# Decode launches start after the prefill's; skip well into decode (47 layers × ~12 launches).
TRELLIS_CUDA_GRAPH=0 timeout 400 "$NCU" --clock-control none --target-processes all \
    --kernel-name "regex:$regex" --launch-skip ${SKIP:-1200} --launch-count ${COUNT:-40} \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section SchedulerStats --section InstructionStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
    $t bench "$m" --device cuda --prompt-tokens 16 --gen-tokens 12 --repeat 1 --ctx-size 1024 \
    >"$OUT/ncu.txt" 2>>"$OUT/log.txt"
echo "ncu exit $?" >>"$OUT/log.txt"
cat "$OUT/log.txt"

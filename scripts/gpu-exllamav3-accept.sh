#!/usr/bin/env bash
# Does ExLlamaV3 1.6.5 load trellis's EXL3 output and compute what trellis computes? In two
# halves, because the GPU machine has no network and no cargo:
#
#   scripts/gpu-exllamav3-accept.sh stage   here: quantize the tiny GLM fixture (4.0 bpw, mul1),
#                                           trellis logits for it and for the ExLlamaV3 fixture,
#                                           ExLlamaV3's wheel and the dependencies the GPU image
#                                           lacks into .whl/ (~11 MB), the rest into .exl3-accept/
#   scripts/gpu-exllamav3-accept.sh run     there (carry .whl and .exl3-accept): install, build
#                                           ExLlamaV3's extension (~250 s on 16 cores), compare
#
# Both folders are ignored by git (add them to .git/info/exclude). TRELLIS names the binary.
set -euo pipefail
cd "$(dirname "$0")/.."
A=.exl3-accept
FIXTURES=${TRELLIS_FIXTURES:-../shared/fixtures}
REF=$FIXTURES/ref/exl3/glm4-moe-lite-tiny-4.0bpw/reference_exl3.safetensors

stage() {
    local trellis=${TRELLIS:-target/release/trellis}
    mkdir -p "$A" .whl
    [ -d "$A/ours-4.0bpw" ] || "$trellis" quantize "$FIXTURES/hf/glm4-moe-lite-tiny" \
        --out "$A/ours-4.0bpw" --bits 4.0 --codebook mul1 --head-bits 6
    rm -rf "$A/fixture-4.0bpw" && cp -r "$FIXTURES/exl3/glm4-moe-lite-tiny-4.0bpw" "$A/fixture-4.0bpw"
    # The fixture's token ids and ExLlamaV3's own logits for them (python with numpy + safetensors).
    ${PYTHON:-python3} - "$REF" "$A" <<'PY'
import sys
from safetensors.numpy import load_file, save_file
ref, out = sys.argv[1], sys.argv[2]
r = load_file(ref)
save_file({"input_ids": r["input_ids"]}, f"{out}/ids.safetensors")
save_file({"logits": r["logits"].astype("float32")}, f"{out}/fixture_ref_logits.safetensors")
open(f"{out}/ids.txt", "w").write(",".join(str(int(t)) for t in r["input_ids"]))
PY
    local ids
    ids=$(cat "$A/ids.txt")
    "$trellis" logits "$A/ours-4.0bpw" --tokens "$ids" --out "$A/ours_trellis_logits.safetensors"
    "$trellis" logits "$A/fixture-4.0bpw" --tokens "$ids" --out "$A/fixture_trellis_logits.safetensors"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_31_x86_64 -d .whl exllamav3==1.6.5 pydantic==2.14.4 \
        pydantic_core==2.50.5 annotated_types typing_inspection typing_extensions \
        "llguidance>=1.7.0" marisa_trie
    du -sh "$A" .whl
}

run() {
    OUT=${OUT:-/tmp/exl3-accept}
    mkdir -p "$OUT"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=9.0 \
        TORCH_EXTENSIONS_DIR=/tmp/torch_ext PYTHONUNBUFFERED=1
    local start=$SECONDS
    python3 -c "import exllamav3.ext"
    echo "ExLlamaV3 extension built in $((SECONDS - start)) s"
    python3 scripts/exllamav3_accept.py --tokens-from "$A/ids.safetensors" \
        --case fixture_vs_stored "$A/fixture-4.0bpw" "$A/fixture_ref_logits.safetensors" \
        --case fixture_vs_trellis "$A/fixture-4.0bpw" "$A/fixture_trellis_logits.safetensors" \
        --case ours_vs_trellis "$A/ours-4.0bpw" "$A/ours_trellis_logits.safetensors" \
        --json "$OUT/accept.json"
}

case ${1:-} in
stage) stage ;;
run) run ;;
*)
    echo "usage: $0 stage|run" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# Cross-builds the crates that hold aarch64 kernels (trellis-backend: NEON trellis and vector
# kernels) and runs their tests under qemu-user, on two emulated CPUs so that every level
# is exercised and detected as it should be:
#   -cpu max         ARMv8.x with FEAT_FP16: levels scalar, neon, neonfp16.
#   -cpu cortex-a53  ARMv8.0 without FP16: levels scalar, neon (plain NEON must not need FP16).
# Needs: rustup target aarch64-unknown-linux-gnu, gcc-aarch64-linux-gnu (linker and libc for
# the target) and qemu-user (.ci/run installs them). Release build: qemu runs optimised code
# an order of magnitude faster than a debug build, which more than pays for the compile.
# Other crates are left out: trellis-codec has no aarch64 code and its encoder tests take
# minutes under qemu; the rest build on these two.
set -euo pipefail
cd "$(dirname "$0")/.."

target=aarch64-unknown-linux-gnu
sysroot=${AARCH64_SYSROOT:-/usr/aarch64-linux-gnu}
for tool in aarch64-linux-gnu-gcc qemu-aarch64; do
  if ! command -v "$tool" >/dev/null; then
    echo "error: $tool not found (apt-get install gcc-aarch64-linux-gnu qemu-user)" >&2
    exit 1
  fi
done

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc

echo "== aarch64 clippy (trellis-backend)"
cargo clippy --locked --target "$target" -p trellis-backend --all-targets -- -D warnings

echo "== aarch64 tests under qemu -cpu max (trellis-backend)"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -cpu max -L $sysroot"
cargo test --locked --release --target "$target" -p trellis-backend

echo "== aarch64 kernel tests under qemu -cpu cortex-a53 (no FP16)"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -cpu cortex-a53 -L $sysroot"
# The unit tests hold the vector kernels' (simd) tests; the integration test the trellis ones.
cargo test --locked --release --target "$target" -p trellis-backend --lib --test trellis_kernels

#!/usr/bin/env python3
"""Random GGUF quant blocks and the `gguf` package's own dequantization of them: the ground
truth for trellis's GGUF dequantizers (crates/trellis-format/tests/gguf_quants.rs).

    python3 -m venv .venv && .venv/bin/pip install -r scripts/requirements-gguf.txt
    .venv/bin/python scripts/make_gguf_quant_fixture.py

Writes tests/fixtures/gguf/quants.gguf with the `gguf` package's own writer, so the file also
checks trellis's reader against an independent writer:

* for each type T in TYPES, a tensor `q.T` of shape [ROWS, COLS] (PyTorch order; GGUF dims
  [COLS, ROWS]) holding random blocks whose f16 scale fields are finite, and a tensor `ref.T`
  (F32, same shape) holding `gguf.quants.dequantize` of those blocks;
* metadata of every GGUF value type (`test.*` keys; the Rust test asserts the values below);
* a custom `general.alignment` of 64, so tensor offsets are not the default 32-aligned ones.

Everything is seeded; rerunning reproduces the file byte for byte.
"""

import pathlib

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "gguf" / "quants.gguf"
ROWS, COLS = 8, 256
ALIGNMENT = 64

# Byte offsets of the f16 scale fields (`d`, and `m`/`dmin` where the type has one) inside one
# block. Random bytes there could be inf/NaN, whose products are meaningless to compare.
SCALE_OFFSETS = {
    Q.Q4_0: [0],
    Q.Q4_1: [0, 2],
    Q.Q5_0: [0],
    Q.Q5_1: [0, 2],
    Q.Q8_0: [0],
    Q.Q2_K: [80, 82],
    Q.Q3_K: [108],
    Q.Q4_K: [0, 2],
    Q.Q5_K: [0, 2],
    Q.Q6_K: [208],
}
TYPES = [Q.F32, Q.F16, Q.BF16, *SCALE_OFFSETS]


def finite_f16(rng: np.random.Generator, n: int) -> np.ndarray:
    """Scales spread over many binades (subnormals included), both signs."""
    magnitude = np.exp2(rng.uniform(-20.0, 2.0, n))
    sign = np.where(rng.random(n) < 0.2, -1.0, 1.0)
    return (sign * magnitude).astype(np.float16)


def random_blocks(rng: np.random.Generator, qtype: Q) -> np.ndarray:
    """[ROWS, bytes per row] uint8 of random blocks with finite scales."""
    block_len, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = ROWS * COLS // block_len
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for offset in SCALE_OFFSETS[qtype]:
        blocks[:, offset:offset + 2] = finite_f16(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(ROWS, -1)


def main() -> None:
    rng = np.random.default_rng(20260131)
    writer = gguf.GGUFWriter(OUT, "trellis-test")
    writer.add_custom_alignment(ALIGNMENT)
    writer.add_uint8("test.u8", 200)
    writer.add_int8("test.i8", -100)
    writer.add_uint16("test.u16", 60000)
    writer.add_int16("test.i16", -30000)
    writer.add_uint32("test.u32", 4000000000)
    writer.add_int32("test.i32", -2000000000)
    writer.add_float32("test.f32", 0.15625)
    writer.add_uint64("test.u64", 2**63 + 5)
    writer.add_int64("test.i64", -(2**62))
    writer.add_float64("test.f64", -2.5e-300)
    writer.add_bool("test.bool", True)
    writer.add_string("test.string", "héllo ▁wörld")
    writer.add_array("test.strings", ["a", "", "▁b", "<0x0A>"])
    writer.add_array("test.i32s", [1, -2, 3])
    writer.add_array("test.f32s", [0.5, -1.25])
    writer.add_array("test.bools", [True, False, True])
    writer.add_array("test.nested", [[1, 2], [3]])

    for qtype in TYPES:
        name = qtype.name
        if qtype == Q.F32:
            values = rng.standard_normal((ROWS, COLS)).astype(np.float32)
            writer.add_tensor(f"q.{name}", values)
            writer.add_tensor(f"ref.{name}", values.copy())
            continue
        if qtype == Q.F16:
            values = finite_f16(rng, ROWS * COLS).reshape(ROWS, COLS)
            writer.add_tensor(f"q.{name}", values)
            writer.add_tensor(f"ref.{name}", gguf.quants.dequantize(values, qtype).astype(np.float32))
            continue
        if qtype == Q.BF16:
            # The upper halves of random finite f32s: every bf16 bit pattern that is finite.
            wide = (rng.standard_normal(ROWS * COLS) * np.exp2(rng.uniform(-30, 30, ROWS * COLS)))
            raw = (wide.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
            raw_bytes = raw.view(np.uint8).reshape(ROWS, COLS * 2)
            writer.add_tensor(f"q.{name}", raw_bytes, raw_dtype=qtype)
            writer.add_tensor(f"ref.{name}", gguf.quants.dequantize(raw_bytes, qtype).astype(np.float32))
            continue
        blocks = random_blocks(rng, qtype)
        writer.add_tensor(f"q.{name}", blocks, raw_dtype=qtype)
        reference = gguf.quants.dequantize(blocks, qtype).astype(np.float32)
        assert reference.shape == (ROWS, COLS), (name, reference.shape)
        assert np.isfinite(reference).all(), name
        writer.add_tensor(f"ref.{name}", reference)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()

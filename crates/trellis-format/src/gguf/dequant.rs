//! ggml block formats decoded to f32.
//!
//! Each decoder follows the block layout of ggml's `block_*` structs and evaluates the same
//! products in the same order as ggml's reference `dequantize_row_*` (an f16 scale widened to
//! f32, times a sub-block scale, times the quant, minus the min), so results are bit-exact
//! with ggml and with the `gguf` Python package — `tests/gguf_quants.rs` checks that on
//! random blocks. Rust never contracts `a * b - c` into a fused multiply-add, which is what
//! keeps that exactness.

use super::GgmlType;
use half::{bf16, f16};

/// Why a byte buffer could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DequantError {
    #[error("ggml type {0} cannot be dequantized by trellis (supported: {SUPPORTED})")]
    Unsupported(GgmlType),
    #[error(
        "{ty}: {elements} values need {expected} bytes ({} per block of {}), got {got}",
        ty.block_bytes(),
        ty.block_len()
    )]
    Length {
        ty: GgmlType,
        elements: usize,
        expected: String,
        got: usize,
    },
}

const SUPPORTED: &str =
    "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K";

/// Decode `bytes` of type `ty` into `out` (one f32 per element). `bytes` must hold exactly
/// `out.len()` elements.
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), DequantError> {
    if !ty.can_dequantize() {
        return Err(DequantError::Unsupported(ty));
    }
    let expected = ty.byte_len(out.len() as u64);
    if expected != Some(bytes.len() as u64) {
        return Err(DequantError::Length {
            ty,
            elements: out.len(),
            expected: expected.map_or_else(
                || format!("a multiple of {} values", ty.block_len()),
                |n| n.to_string(),
            ),
            got: bytes.len(),
        });
    }
    let block_bytes = ty.block_bytes();
    let blocks = bytes
        .chunks_exact(block_bytes)
        .zip(out.chunks_exact_mut(ty.block_len()));
    match ty {
        GgmlType::F32 => blocks.for_each(|(b, y)| y[0] = f32::from_le_bytes(word(b, 0))),
        GgmlType::F16 => blocks.for_each(|(b, y)| y[0] = half_at(b, 0)),
        GgmlType::BF16 => {
            blocks.for_each(|(b, y)| y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32());
        }
        GgmlType::Q4_0 => blocks.for_each(|(b, y)| q4_0(b, y)),
        GgmlType::Q4_1 => blocks.for_each(|(b, y)| q4_1(b, y)),
        GgmlType::Q5_0 => blocks.for_each(|(b, y)| q5_0(b, y)),
        GgmlType::Q5_1 => blocks.for_each(|(b, y)| q5_1(b, y)),
        GgmlType::Q8_0 => blocks.for_each(|(b, y)| q8_0(b, y)),
        GgmlType::Q2_K => blocks.for_each(|(b, y)| q2_k(b, y)),
        GgmlType::Q3_K => blocks.for_each(|(b, y)| q3_k(b, y)),
        GgmlType::Q4_K => blocks.for_each(|(b, y)| q4_k(b, y)),
        GgmlType::Q5_K => blocks.for_each(|(b, y)| q5_k(b, y)),
        GgmlType::Q6_K => blocks.for_each(|(b, y)| q6_k(b, y)),
        _ => unreachable!("can_dequantize covers exactly the types above"),
    }
    Ok(())
}

/// Four bytes at `at`.
fn word(b: &[u8], at: usize) -> [u8; 4] {
    [b[at], b[at + 1], b[at + 2], b[at + 3]]
}

/// The little-endian f16 at `at`, widened (exactly) to f32.
fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

// 32-element blocks: an f16 scale `d` (and min `m`), then the quants. Low nibbles hold
// elements 0..16, high nibbles 16..32; Q5 types keep each element's fifth bit in `qh`.

/// `{ d: f16, qs: [u8; 16] }`: y = d · (q − 8).
fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = (i32::from(qs[j] & 0x0F) - 8) as f32 * d;
        y[j + 16] = (i32::from(qs[j] >> 4) - 8) as f32 * d;
    }
}

/// `{ d: f16, m: f16, qs: [u8; 16] }`: y = d · q + m.
fn q4_1(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let m = half_at(b, 2);
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = f32::from(qs[j] & 0x0F) * d + m;
        y[j + 16] = f32::from(qs[j] >> 4) * d + m;
    }
}

/// The fifth bits of a Q5 block's 32 elements: bit j of the little-endian `qh` word.
fn fifth_bits(qh: u32, j: usize) -> (u8, u8) {
    let low = ((qh >> j) & 1) as u8;
    let high = ((qh >> (j + 16)) & 1) as u8;
    (low << 4, high << 4)
}

/// `{ d: f16, qh: u32, qs: [u8; 16] }`: y = d · (q − 16), q five bits.
fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let qh = u32::from_le_bytes(word(b, 2));
    let qs = &b[6..22];
    for j in 0..16 {
        let (h0, h1) = fifth_bits(qh, j);
        y[j] = (i32::from((qs[j] & 0x0F) | h0) - 16) as f32 * d;
        y[j + 16] = (i32::from((qs[j] >> 4) | h1) - 16) as f32 * d;
    }
}

/// `{ d: f16, m: f16, qh: u32, qs: [u8; 16] }`: y = d · q + m, q five bits.
fn q5_1(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let m = half_at(b, 2);
    let qh = u32::from_le_bytes(word(b, 4));
    let qs = &b[8..24];
    for j in 0..16 {
        let (h0, h1) = fifth_bits(qh, j);
        y[j] = f32::from((qs[j] & 0x0F) | h0) * d + m;
        y[j + 16] = f32::from((qs[j] >> 4) | h1) * d + m;
    }
}

/// `{ d: f16, qs: [i8; 32] }`: y = d · q.
fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    for (j, &q) in b[2..34].iter().enumerate() {
        y[j] = f32::from(q as i8) * d;
    }
}

// 256-element "K" super-blocks: an f16 super-scale `d` (and super-min `dmin`) multiplies
// small per-sub-block integer scales (and mins).

/// `{ scales: [u8; 16], qs: [u8; 64], d: f16, dmin: f16 }`: 16 sub-blocks of 16; each
/// `scales` byte is a 4-bit scale (low) and 4-bit min (high); quants are 2 bits, four per
/// byte, the byte's bit pairs walking through four 32-element groups of each 128 half.
fn q2_k(b: &[u8], y: &mut [f32]) {
    let scales = &b[0..16];
    let d = half_at(b, 80);
    let dmin = half_at(b, 82);
    let mut sub = 0;
    let mut out = 0;
    for half in 0..2 {
        let q = &b[16 + 32 * half..16 + 32 * half + 32];
        for shift in [0, 2, 4, 6] {
            for part in 0..2 {
                let sc = scales[sub];
                sub += 1;
                let dl = d * f32::from(sc & 0x0F);
                let ml = dmin * f32::from(sc >> 4);
                for &byte in &q[16 * part..16 * part + 16] {
                    y[out] = dl * f32::from((byte >> shift) & 3) - ml;
                    out += 1;
                }
            }
        }
    }
}

/// The sixteen signed 6-bit sub-block scales of a Q3_K block, packed in 12 bytes: scale i
/// has its low four bits in byte i (i < 8) or the high nibble of byte i − 8 (i ≥ 8), and its
/// top two bits in byte 8 + i mod 4 at bit 2·(i / 4); stored with a bias of 32.
fn q3_k_scales(packed: &[u8]) -> [i8; 16] {
    let mut scales = [0i8; 16];
    for (i, scale) in scales.iter_mut().enumerate() {
        let low = if i < 8 {
            packed[i] & 0x0F
        } else {
            packed[i - 8] >> 4
        };
        let high = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
        *scale = ((low | (high << 4)) as i8) - 32;
    }
    scales
}

/// `{ hmask: [u8; 32], qs: [u8; 64], scales: [u8; 12], d: f16 }`: quants are 2 low bits (as
/// in Q2_K) plus a high bit in `hmask`; a clear high bit subtracts 4. No mins.
fn q3_k(b: &[u8], y: &mut [f32]) {
    let hmask = &b[0..32];
    let scales = q3_k_scales(&b[96..108]);
    let d = half_at(b, 108);
    let mut sub = 0;
    let mut out = 0;
    let mut mask_bit = 1u8;
    for half in 0..2 {
        let q = &b[32 + 32 * half..32 + 32 * half + 32];
        for shift in [0, 2, 4, 6] {
            for part in 0..2 {
                let dl = d * f32::from(scales[sub]);
                sub += 1;
                for l in 16 * part..16 * part + 16 {
                    let low = i32::from((q[l] >> shift) & 3);
                    let minus = if hmask[l] & mask_bit != 0 { 0 } else { 4 };
                    y[out] = dl * (low - minus) as f32;
                    out += 1;
                }
            }
            mask_bit <<= 1;
        }
    }
}

/// Scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K block, 6 bits each, packed in 12
/// bytes: sub-blocks 0..4 in the low six bits of bytes j and j + 4; sub-blocks 4..8 in the
/// nibbles of byte j + 4 with their top two bits in the high bits of bytes j − 4 and j.
fn k4_scale_min(packed: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (packed[j] & 63, packed[j + 4] & 63)
    } else {
        (
            (packed[j + 4] & 0x0F) | ((packed[j - 4] >> 6) << 4),
            (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4),
        )
    }
}

/// `{ d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128] }`: 8 sub-blocks of 32; each 32
/// bytes of `qs` give one sub-block in their low nibbles and the next in their high ones.
fn q4_k(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let dmin = half_at(b, 2);
    let packed = &b[4..16];
    for pair in 0..4 {
        let q = &b[16 + 32 * pair..16 + 32 * pair + 32];
        let (sc1, m1) = k4_scale_min(packed, 2 * pair);
        let (sc2, m2) = k4_scale_min(packed, 2 * pair + 1);
        let (d1, min1) = (d * f32::from(sc1), dmin * f32::from(m1));
        let (d2, min2) = (d * f32::from(sc2), dmin * f32::from(m2));
        let y = &mut y[64 * pair..64 * pair + 64];
        for l in 0..32 {
            y[l] = d1 * f32::from(q[l] & 0x0F) - min1;
            y[l + 32] = d2 * f32::from(q[l] >> 4) - min2;
        }
    }
}

/// `{ d: f16, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128] }`: Q4_K plus a fifth
/// bit per element, sub-block s taking bit s of each `qh` byte.
fn q5_k(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let dmin = half_at(b, 2);
    let packed = &b[4..16];
    let qh = &b[16..48];
    for pair in 0..4 {
        let q = &b[48 + 32 * pair..48 + 32 * pair + 32];
        let (sc1, m1) = k4_scale_min(packed, 2 * pair);
        let (sc2, m2) = k4_scale_min(packed, 2 * pair + 1);
        let (d1, min1) = (d * f32::from(sc1), dmin * f32::from(m1));
        let (d2, min2) = (d * f32::from(sc2), dmin * f32::from(m2));
        let (bit1, bit2) = (1u8 << (2 * pair), 1u8 << (2 * pair + 1));
        let y = &mut y[64 * pair..64 * pair + 64];
        for l in 0..32 {
            let h1 = if qh[l] & bit1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & bit2 != 0 { 16 } else { 0 };
            y[l] = d1 * f32::from((q[l] & 0x0F) + h1) - min1;
            y[l + 32] = d2 * f32::from((q[l] >> 4) + h2) - min2;
        }
    }
}

/// `{ ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16 }`: 16 sub-blocks of 16 with
/// signed 8-bit scales; quants are 6 bits (4 in `ql`, 2 in `qh`) with a bias of 32. Each 128
/// half takes 64 bytes of `ql` (low nibbles: elements 0..64, high nibbles: 64..128) and 32
/// of `qh` (bit pairs 0..4 for the four 32-element groups).
fn q6_k(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 208);
    for half in 0..2 {
        let ql = &b[64 * half..64 * half + 64];
        let qh = &b[128 + 32 * half..128 + 32 * half + 32];
        let sc = &b[192 + 8 * half..192 + 8 * half + 8];
        let y = &mut y[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = i32::from((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) - 32;
            let q2 = i32::from((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
            let q3 = i32::from((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            let q4 = i32::from((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            let scale = |k: usize| d * f32::from(sc[is + k] as i8);
            y[l] = scale(0) * q1 as f32;
            y[l + 32] = scale(2) * q2 as f32;
            y[l + 64] = scale(4) * q3 as f32;
            y[l + 96] = scale(6) * q4 as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_by_hand() {
        let mut block = vec![0u8; 34];
        block[..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        block[2] = 4;
        block[3] = (-6i8) as u8;
        let mut out = [0f32; 32];
        dequantize(GgmlType::Q8_0, &block, &mut out).unwrap();
        assert_eq!(&out[..3], &[2.0, -3.0, 0.0]);
    }

    #[test]
    fn q4_0_by_hand() {
        let mut block = vec![0u8; 18];
        block[..2].copy_from_slice(&f16::from_f32(2.0).to_le_bytes());
        block[2] = 0x9F; // element 0: 15 − 8 = 7; element 16: 9 − 8 = 1
        let mut out = [0f32; 32];
        dequantize(GgmlType::Q4_0, &block, &mut out).unwrap();
        assert_eq!(out[0], 14.0);
        assert_eq!(out[16], 2.0);
        assert_eq!(out[1], -16.0);
    }

    #[test]
    fn length_and_type_errors() {
        let mut out = [0f32; 32];
        assert!(matches!(
            dequantize(GgmlType::Q8_0, &[0; 33], &mut out),
            Err(DequantError::Length { .. })
        ));
        assert!(matches!(
            dequantize(GgmlType::Q4_K, &[0; 18], &mut out),
            Err(DequantError::Length { .. })
        ));
        let err = dequantize(GgmlType::IQ2_XXS, &[0; 66], &mut [0f32; 256]).unwrap_err();
        assert!(err.to_string().contains("IQ2_XXS"), "{err}");
    }
}

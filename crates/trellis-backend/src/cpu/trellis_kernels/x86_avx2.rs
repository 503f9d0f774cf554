//! AVX2 + FMA + F16C kernels: one vector per chunk of 8 consecutive trellis positions (rows
//! 2c, 2c+1, 2c+8, 2c+9 of the group's two columns).
//!
//! The windows of 8 consecutive positions lie inside 16 bytes: those bytes are broadcast to
//! both 128-bit halves, `vpshufb` forms each lane's big-endian 32-bit word at its window's
//! first byte, and a variable right shift plus a mask leaves the state. Codebooks run on
//! 32-bit lanes; the single fp16 rounding of the reference is a round trip through F16C.

use super::layout::{
    GROUPS, GroupTables, PackedTrellis, PerWidth, STRIP, group_stride, per_width, per_width_cache,
};
use std::arch::x86_64::*;
use trellis_codec::codebook::{MCG_MULTIPLIER, MUL1_MULTIPLIER};
use trellis_codec::{BitWidth, TILE_WEIGHTS};

/// Chunks of 8 positions per group.
const CHUNKS: usize = 4;

/// Where the windows of each chunk lie, relative to the group's start 16 bits before its
/// first code bit (as in `layout`), for one bit width.
pub(super) struct ChunkTables {
    /// First byte of the chunk's 16-byte window.
    base: [usize; CHUNKS],
    /// `vpshufb` indices (both halves index the same 16 bytes).
    shuffle: [[u8; 32]; CHUNKS],
    /// Right shift that aligns each lane's state at bit 0.
    pub(super) shift: [[u32; 8]; CHUNKS],
    /// Left shift that aligns each lane's state at bit 16 (`16 − shift`).
    pub(super) left_shift: [[u32; 8]; CHUNKS],
}

impl ChunkTables {
    fn compute(bits: BitWidth) -> ChunkTables {
        let mut t = ChunkTables {
            base: [0; CHUNKS],
            shuffle: [[0; 32]; CHUNKS],
            shift: [[0; 8]; CHUNKS],
            left_shift: [[0; 8]; CHUNKS],
        };
        let g = GroupTables::of(bits);
        for c in 0..CHUNKS {
            let base = usize::from(g.start_byte[8 * c]);
            t.base[c] = base;
            for lane in 0..8 {
                let (byte, bit) = (g.start_byte[8 * c + lane], g.start_bit[8 * c + lane]);
                let rel = usize::from(byte) - base;
                assert!(rel + 3 < 16, "8 windows fit in 16 bytes");
                // Little-endian lane: its lowest byte is the big-endian word's last.
                for i in 0..4 {
                    t.shuffle[c][4 * lane + i] = (rel + 3 - i) as u8;
                }
                t.shift[c][lane] = 16 - u32::from(bit);
                t.left_shift[c][lane] = u32::from(bit);
            }
        }
        t
    }

    pub(super) fn of(bits: BitWidth) -> &'static ChunkTables {
        static TABLES: PerWidth<ChunkTables> = per_width_cache();
        per_width(&TABLES, bits, ChunkTables::compute)
    }
}

/// The 8 states of chunk `c` of group `G` of the tile at `tile`.
///
/// # Safety
/// AVX2 must be available; `tile − 2 … tile + tile_bytes + 16` must be readable.
#[inline(always)]
pub(super) unsafe fn chunk_states<const G: usize>(
    tile: *const u8,
    stride: usize,
    tile_bytes: usize,
    t: &ChunkTables,
    c: usize,
) -> __m256i {
    // SAFETY: forwarded from the caller.
    unsafe {
        let words = chunk_words::<G>(tile, stride, tile_bytes, t, c);
        let shifted = _mm256_srlv_epi32(words, _mm256_loadu_si256(t.shift[c].as_ptr().cast()));
        _mm256_and_si256(shifted, _mm256_set1_epi32(0xFFFF))
    }
}

/// The 32-bit big-endian window of each of chunk `c`'s 8 states (the state lies in its bits
/// `shift … shift + 16`).
///
/// # Safety
/// As [`chunk_states`].
#[inline(always)]
pub(super) unsafe fn chunk_words<const G: usize>(
    tile: *const u8,
    stride: usize,
    tile_bytes: usize,
    t: &ChunkTables,
    c: usize,
) -> __m256i {
    // SAFETY: the caller guarantees the range is readable and AVX2 present.
    unsafe {
        let base = t.base[c];
        let src = tile.add(G * stride + base).sub(2);
        let bytes = if G == 0 && base < 2 {
            // The ring closes: the two bytes before the tile's first are its last two.
            let v = _mm_loadu_si128(src.cast());
            let last = tile.add(tile_bytes - 2).cast::<u16>().read_unaligned();
            if base == 0 {
                _mm_insert_epi16::<0>(v, i32::from(last))
            } else {
                _mm_insert_epi8::<0>(v, i32::from(last >> 8))
            }
        } else {
            _mm_loadu_si128(src.cast())
        };
        _mm256_shuffle_epi8(
            _mm256_broadcastsi128_si256(bytes),
            _mm256_loadu_si256(t.shuffle[c].as_ptr().cast()),
        )
    }
}

/// Maps 8 states (32-bit lanes) to their f32 weights.
trait Codebook256 {
    /// # Safety
    /// AVX2, FMA and F16C must be available.
    unsafe fn weights(states: __m256i) -> __m256;
}

/// Round f32 values to the nearest fp16 (ties to even) and widen them back, exactly.
///
/// # Safety
/// F16C must be available.
#[inline(always)]
unsafe fn round_to_f16(v: __m256) -> __m256 {
    // SAFETY: plain F16C conversions.
    unsafe { _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v)) }
}

struct Mul1;
impl Codebook256 for Mul1 {
    #[inline(always)]
    unsafe fn weights(states: __m256i) -> __m256 {
        // SAFETY: the caller runs with AVX2, FMA and F16C available.
        unsafe {
            let x = _mm256_mullo_epi32(states, _mm256_set1_epi32(MUL1_MULTIPLIER as i32));
            let pairs = _mm256_maddubs_epi16(x, _mm256_set1_epi8(1));
            let sum = _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
            // fma(b, scale, value at 0) is exact in f32; see the AVX-512 kernel.
            let affine = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(sum),
                _mm256_set1_ps(1774.0 / 262_144.0),
                _mm256_set1_ps(-3.453125),
            );
            round_to_f16(affine)
        }
    }
}

/// 3INST (`MCG == false`) and mcg.
struct Inst<const MCG: bool>;
impl<const MCG: bool> Codebook256 for Inst<MCG> {
    #[inline(always)]
    unsafe fn weights(states: __m256i) -> __m256 {
        // SAFETY: the caller runs with AVX2, FMA and F16C available.
        unsafe {
            let x = if MCG {
                _mm256_mullo_epi32(states, _mm256_set1_epi32(MCG_MULTIPLIER as i32))
            } else {
                _mm256_add_epi32(
                    _mm256_mullo_epi32(states, _mm256_set1_epi32(89_226_354)),
                    _mm256_set1_epi32(64_248_484),
                )
            };
            let x = _mm256_xor_si256(
                _mm256_and_si256(x, _mm256_set1_epi32(0x8FFF_8FFF_u32 as i32)),
                _mm256_set1_epi32(0x3B60_3B60),
            );
            // Low halves to bytes 0..8 of each 128-bit lane, high halves to bytes 8..16, then
            // the low quadwords of both lanes together.
            let split = _mm256_shuffle_epi8(
                x,
                _mm256_setr_epi8(
                    0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15, 0, 1, 4, 5, 8, 9, 12, 13,
                    2, 3, 6, 7, 10, 11, 14, 15,
                ),
            );
            let split = _mm256_permute4x64_epi64::<0b11_01_10_00>(split);
            let lo = _mm256_cvtph_ps(_mm256_castsi256_si128(split));
            let hi = _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(split));
            // Two fp16 values within a factor 16 of each other sum exactly in f32.
            round_to_f16(_mm256_add_ps(lo, hi))
        }
    }
}

/// # Safety
/// As [`chunk_states`]; `x` must hold 32 floats (the tile's prepared input).
#[inline(always)]
unsafe fn gemv_group<C: Codebook256, const G: usize>(
    tile: *const u8,
    stride: usize,
    tile_bytes: usize,
    t: &ChunkTables,
    x: *const f32,
    acc: &mut __m256,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        for c in 0..CHUNKS {
            let w = C::weights(chunk_states::<G>(tile, stride, tile_bytes, t, c));
            *acc = _mm256_fmadd_ps(w, _mm256_loadu_ps(x.add(8 * c)), *acc);
        }
    }
}

/// Groups G0..G3 of every tile of one strip (starting at `tile`): four accumulators, so that
/// they and the codebook's constants fit AVX2's 16 registers. Vector i sums columns Gi
/// (lanes 0..4) and Gi+8 (lanes 4..8).
///
/// # Safety
/// As [`chunk_states`] for every tile of the strip; `input` holds 32 floats per tile.
#[inline(always)]
unsafe fn gemv_pass<
    C: Codebook256,
    const G0: usize,
    const G1: usize,
    const G2: usize,
    const G3: usize,
>(
    mut tile: *const u8,
    tiles_k: usize,
    stride: usize,
    tile_bytes: usize,
    t: &ChunkTables,
    input: *const f32,
) -> [__m256; 4] {
    // SAFETY: forwarded from the caller.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); 4];
        for kt in 0..tiles_k {
            let x = input.add(kt * 2 * STRIP);
            gemv_group::<C, G0>(tile, stride, tile_bytes, t, x, &mut acc[0]);
            gemv_group::<C, G1>(tile, stride, tile_bytes, t, x, &mut acc[1]);
            gemv_group::<C, G2>(tile, stride, tile_bytes, t, x, &mut acc[2]);
            gemv_group::<C, G3>(tile, stride, tile_bytes, t, x, &mut acc[3]);
            tile = tile.add(tile_bytes);
        }
        acc
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemv_avx2<C: Codebook256>(
    p: &PackedTrellis,
    input: &[f32],
    strips: std::ops::Range<usize>,
    z: &mut [f32],
) {
    let t = ChunkTables::of(p.bits);
    let (tb, stride) = (p.tile_bytes, group_stride(p.tile_bytes));
    let tiles_k = p.tiles_k();
    assert!(input.len() >= tiles_k * 2 * STRIP && z.len() >= strips.len() * STRIP);
    assert!(strips.end <= p.strips());
    for (strip, zs) in strips.zip(z.chunks_exact_mut(STRIP)) {
        // SAFETY: tiles of strips below `p.strips()` lie inside the stream, whose pads cover
        // the loads around them; `input` has 32 floats per tile (asserted above).
        unsafe {
            let tile = p.stream().as_ptr().add(p.tile_offset(strip, 0));
            let x = input.as_ptr();
            // Two passes over the strip (the second finds it in L1/L2).
            let first = gemv_pass::<C, 0, 1, 2, 3>(tile, tiles_k, stride, tb, t, x);
            let second = gemv_pass::<C, 4, 5, 6, 7>(tile, tiles_k, stride, tb, t, x);
            for (g, a) in first.iter().chain(&second).enumerate() {
                let mut lanes = [0.0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), *a);
                zs[g] = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
                zs[g + 8] = (lanes[4] + lanes[5]) + (lanes[6] + lanes[7]);
            }
        }
    }
}

/// GEMV over `strips`; `input` holds 32 floats per tile (rows in chunk order, duplicated for
/// the two columns of a chunk).
pub fn gemv(p: &PackedTrellis, input: &[f32], strips: std::ops::Range<usize>, z: &mut [f32]) {
    use trellis_codec::Codebook::*;
    assert!(super::Isa::Avx2.is_supported());
    // SAFETY: AVX2, FMA and F16C were checked just above.
    unsafe {
        match p.codebook {
            Mul1 => gemv_avx2::<self::Mul1>(p, input, strips, z),
            Mcg => gemv_avx2::<Inst<true>>(p, input, strips, z),
            Inst3 => gemv_avx2::<Inst<false>>(p, input, strips, z),
        }
    }
}

/// # Safety
/// As [`chunk_states`]; `wt` is one tile.
#[inline(always)]
unsafe fn decode_group<C: Codebook256, const G: usize>(
    tile: *const u8,
    stride: usize,
    tile_bytes: usize,
    t: &ChunkTables,
    wt: &mut [f32; TILE_WEIGHTS],
) {
    // SAFETY: forwarded from the caller; the stores are inside `wt`.
    unsafe {
        for c in 0..CHUNKS {
            let w = C::weights(chunk_states::<G>(tile, stride, tile_bytes, t, c));
            _mm256_storeu_ps(wt.as_mut_ptr().add(G * 4 * 8 + 8 * c), w);
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode_tiles_avx2<C: Codebook256>(
    p: &PackedTrellis,
    strip: usize,
    kt0: usize,
    wt: &mut [f32],
) {
    let tiles = wt.len() / TILE_WEIGHTS;
    assert!(strip < p.strips() && kt0 + tiles <= p.tiles_k());
    let t = ChunkTables::of(p.bits);
    let (tb, stride) = (p.tile_bytes, group_stride(p.tile_bytes));
    for (i, wt) in wt.chunks_exact_mut(TILE_WEIGHTS).enumerate() {
        let wt: &mut [f32; TILE_WEIGHTS] = wt.try_into().expect("one tile");
        // SAFETY: the tile lies inside the stream (asserted above), whose pads cover the
        // loads around it.
        unsafe {
            let tile = p.stream().as_ptr().add(p.tile_offset(strip, kt0 + i));
            decode_group::<C, 0>(tile, stride, tb, t, wt);
            decode_group::<C, 1>(tile, stride, tb, t, wt);
            decode_group::<C, 2>(tile, stride, tb, t, wt);
            decode_group::<C, 3>(tile, stride, tb, t, wt);
            decode_group::<C, 4>(tile, stride, tb, t, wt);
            decode_group::<C, 5>(tile, stride, tb, t, wt);
            decode_group::<C, 6>(tile, stride, tb, t, wt);
            decode_group::<C, 7>(tile, stride, tb, t, wt);
        }
    }
}

/// Decode tiles `kt0…` of `strip` (as many as `wt` holds) into `wt[t·256 + p]` for trellis
/// position p (vectors of 8 consecutive positions).
pub fn decode_tiles(p: &PackedTrellis, strip: usize, kt0: usize, wt: &mut [f32]) {
    use trellis_codec::Codebook::*;
    assert!(super::Isa::Avx2.is_supported());
    // SAFETY: AVX2, FMA and F16C were checked just above.
    unsafe {
        match p.codebook {
            Mul1 => decode_tiles_avx2::<self::Mul1>(p, strip, kt0, wt),
            Mcg => decode_tiles_avx2::<Inst<true>>(p, strip, kt0, wt),
            Inst3 => decode_tiles_avx2::<Inst<false>>(p, strip, kt0, wt),
        }
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn accumulate_rows_avx2(
    wt: &[f32],
    tiles: usize,
    inputs: &[f32],
    input_stride: usize,
    acc: &mut [f32],
) {
    let rows = acc.len() / TILE_WEIGHTS;
    assert!(wt.len() >= tiles * TILE_WEIGHTS);
    assert!(rows == 0 || (rows - 1) * input_stride + tiles * 2 * STRIP <= inputs.len());
    for row in 0..rows {
        // SAFETY: every access is inside the slices (asserted above).
        unsafe {
            // Eight accumulators, as in the GEMV: vector g sums columns g (lanes 0..4) and
            // g+8 (lanes 4..8).
            let a_ptr = acc.as_mut_ptr().add(row * TILE_WEIGHTS);
            let x_ptr = inputs.as_ptr().add(row * input_stride);
            let mut a: [__m256; GROUPS] =
                std::array::from_fn(|g| _mm256_loadu_ps(a_ptr.add(8 * g)));
            for t in 0..tiles {
                let x: [__m256; CHUNKS] =
                    std::array::from_fn(|c| _mm256_loadu_ps(x_ptr.add(t * 2 * STRIP + 8 * c)));
                let w = wt.as_ptr().add(t * TILE_WEIGHTS);
                for (g, a) in a.iter_mut().enumerate() {
                    for (c, x) in x.iter().enumerate() {
                        *a = _mm256_fmadd_ps(_mm256_loadu_ps(w.add(32 * g + 8 * c)), *x, *a);
                    }
                }
            }
            for (g, a) in a.iter().enumerate() {
                _mm256_storeu_ps(a_ptr.add(8 * g), *a);
            }
        }
    }
}

/// GEMM row sweep over decoded tiles (see `super::accumulate_rows`).
pub fn accumulate_rows(
    wt: &[f32],
    tiles: usize,
    inputs: &[f32],
    input_stride: usize,
    acc: &mut [f32],
) {
    assert!(super::Isa::Avx2.is_supported());
    // SAFETY: AVX2 and FMA were checked just above.
    unsafe { accumulate_rows_avx2(wt, tiles, inputs, input_stride, acc) }
}

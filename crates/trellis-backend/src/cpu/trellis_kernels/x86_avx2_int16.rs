//! mul1 products with 16-bit integer dot products on AVX2 (`vpmaddwd`): the approximation of
//! [`super::x86_vnni`] (activations quantized to int16 per 128-row block, mul1's fp16 rounding
//! left out; the error analysis there holds unchanged) for CPUs without AVX-512.
//!
//! Two chunks of 8 positions (the exact AVX2 kernel's windows, [`super::x86_avx2`]) are cut
//! into one vector of 16 states in 16-bit lanes: one chunk's states shifted down to bits 0..16
//! of each 32-bit lane, the other's shifted up to bits 16..32, blended. `s · 0x83DCD12D` is
//! formed in 16-bit halves (two `vpmullw`, one `vpmulhuw`), each half's two bytes are added by
//! `vpmaddubsw` against ones, and one `vpmaddwd` against the int16 activations sums each
//! 32-bit lane's two products. Per 16 weights: 6 multiplies and 7 other instructions.
//!
//! On the AMD EPYC (Zen, AVX2 only) dev box all of those multiplies share one pipe, and they
//! bound the kernel: a 2048 → 1536 one-row product from cache on one thread took 1.19 ms,
//! against 1.40 with the byte sums by masks, shifts and adds (the shifts cost more still) and
//! 2.52 for the exact kernel. The form with the states in 32-bit lanes (`vpmulld`,
//! `vpmaddubsw`, then `vpmaddwd` against activations held twice) ran at the same speed for one
//! row but took twice as long as the exact f32 GEMM for many, where this layout's `vpmaddwd`
//! does two weights a lane and beats it (`trellis_gemv`, 2 threads: 64 rows 7.7 against 8.4 ms,
//! 256 rows 31.5 against 37.1).
//!
//! Per 128-row block a lane sums 32 products (8 tiles × 2 chunk pairs × 2), `|D| ≤ 32·32767·
//! 1020 < 2^31`, exact; each block's lane sums are then converted to f32 and folded with the
//! block's scale in block order, and a column's four lanes are added last, in the same order
//! in [`gemv`] and [`gemm`]. So a row's results are bit-equal whatever rows share its product.

use super::layout::{GROUPS, PackedTrellis, STRIP, group_stride};
use super::x86_avx2::{ChunkTables, chunk_words};
use super::x86_avx512::MUL1_SCALE;
use super::x86_vnni::{RANGE, block_quantization, row_constant, row_lift};
use std::arch::x86_64::*;
use trellis_codec::codebook::MUL1_MULTIPLIER;
use trellis_codec::hadamard::HADAMARD_SIZE;

/// Tiles (16 rows each) per quantization block: one Hadamard block.
const TILES_PER_BLOCK: usize = HADAMARD_SIZE / STRIP;

/// Pairs of chunks (8 positions each, as in the exact AVX2 kernel) per group.
const PAIRS: usize = 2;

/// 32-bit lanes of prepared activations per tile: two int16 per lane, one per position of a
/// group (all groups share the pattern of rows).
const LANES_PER_TILE: usize = STRIP;

/// The tile row of each int16 activation of a tile: pair p's lane j holds chunk 2p's
/// position j (low half) and chunk 2p+1's (high half); chunk c's lane j is row
/// `2c + (j & 1) + 8·((j >> 1) & 1)` (lanes 4..8 repeat 0..4 for the group's second column).
const PAIR_ROWS: [usize; 2 * STRIP] = {
    let mut rows = [0; 2 * STRIP];
    let mut i = 0;
    while i < 2 * STRIP {
        let (p, j, h) = (i / 16, (i / 2) % 8, i % 2);
        let c = 2 * p + h;
        rows[i] = 2 * c + (j & 1) + 8 * ((j >> 1) & 1);
        i += 1;
    }
    rows
};

/// Floats (32-bit lanes) of prepared input for `tiles_k` tiles: per tile 32 int16 activations
/// in [`PAIR_ROWS`] order; per block its scale `S·s_k` lifted by the row's power of two
/// (`x86_vnni::row_lift`); `E` and that power's inverse.
pub fn input_len(tiles_k: usize) -> usize {
    tiles_k * LANES_PER_TILE + tiles_k / TILES_PER_BLOCK + 2
}

/// Quantize one row of transformed activations (`xh`, `k_padded` values) into `input`.
pub fn prepare_input(xh: &[f32], input: &mut [f32]) {
    assert!(super::Isa::Avx2.is_supported());
    let tiles_k = xh.len() / STRIP;
    assert!(xh.len().is_multiple_of(HADAMARD_SIZE) && input.len() >= input_len(tiles_k));
    // SAFETY: AVX2 was checked above and the lengths asserted.
    unsafe { prepare_input_avx2(xh, input) }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn prepare_input_avx2(xh: &[f32], input: &mut [f32]) {
    let tiles_k = xh.len() / STRIP;
    let blocks = tiles_k / TILES_PER_BLOCK;
    let (acts, rest) = input.split_at_mut(tiles_k * LANES_PER_TILE);
    let mut sum_a = 0.0f64;
    let mut sum_st = 0.0f64;
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
    // Each block's largest magnitude (kept in its scale's slot until the scale is known) and
    // the row's sum; the largest of them sets the row's lift.
    for (b, block_max) in rest[..blocks].iter_mut().enumerate() {
        let mut max = _mm256_setzero_ps();
        let mut sum = _mm256_setzero_ps();
        for v in xh[b * HADAMARD_SIZE..(b + 1) * HADAMARD_SIZE].chunks_exact(8) {
            // SAFETY: an 8-float load of an 8-float chunk.
            let v = unsafe { _mm256_loadu_ps(v.as_ptr()) };
            max = _mm256_max_ps(max, _mm256_and_ps(v, abs_mask));
            sum = _mm256_add_ps(sum, v);
        }
        *block_max = lanes(max).into_iter().fold(0.0f32, f32::max);
        sum_a += f64::from(lanes(sum).iter().sum::<f32>());
    }
    let (lift, unlift) = row_lift(rest[..blocks].iter().fold(0.0f32, |m, &v| m.max(v)));
    rest[blocks + 1] = unlift;
    for (b, block_scale_out) in rest[..blocks].iter_mut().enumerate() {
        let x = &xh[b * HADAMARD_SIZE..(b + 1) * HADAMARD_SIZE];
        let (recip, scale) = block_quantization(*block_scale_out);
        let recip = _mm256_set1_ps(recip);
        let range = _mm256_set1_ps(RANGE);
        let mut tsum = _mm256_setzero_si256();
        for (t, rows) in x.chunks_exact(STRIP).enumerate() {
            // Rows 0..8 and 8..16 of the tile, rounded to nearest (the default mode) and held
            // inside int16 (a last-bit excess over RANGE saturates).
            let quantize = |v: &[f32]| {
                // SAFETY: an 8-float load of an 8-float slice.
                let v = unsafe { _mm256_loadu_ps(v.as_ptr()) };
                _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_mul_ps(v, recip), range))
            };
            let (low, high) = (quantize(&rows[..8]), quantize(&rows[8..]));
            tsum = _mm256_add_epi32(tsum, _mm256_add_epi32(low, high));
            let clamp = |q: __m256i| {
                _mm256_max_epi32(
                    _mm256_min_epi32(q, _mm256_set1_epi32(32767)),
                    _mm256_set1_epi32(-32768),
                )
            };
            let mut q = [0i32; STRIP];
            // SAFETY: two 8-lane stores into 16 i32.
            unsafe {
                _mm256_storeu_si256(q.as_mut_ptr().cast(), clamp(low));
                _mm256_storeu_si256(q.as_mut_ptr().add(8).cast(), clamp(high));
            }
            let tile16: [i16; 2 * STRIP] = std::array::from_fn(|i| q[PAIR_ROWS[i]] as i16);
            let tile = &mut acts[(b * TILES_PER_BLOCK + t) * LANES_PER_TILE..][..LANES_PER_TILE];
            // SAFETY: 64 bytes of int16 into the tile's 16 floats.
            unsafe {
                let out = tile.as_mut_ptr().cast::<__m256i>();
                _mm256_storeu_si256(out, _mm256_loadu_si256(tile16.as_ptr().cast()));
                _mm256_storeu_si256(
                    out.add(1),
                    _mm256_loadu_si256(tile16.as_ptr().add(16).cast()),
                );
            }
        }
        let block_scale = f64::from(scale) * f64::from(MUL1_SCALE);
        *block_scale_out = (block_scale * lift) as f32;
        // SAFETY: `__m256i` is 8 i32 of plain bits.
        let tsum: [i32; 8] = unsafe { std::mem::transmute(tsum) };
        let tsum: i64 = tsum.iter().map(|&v| i64::from(v)).sum();
        sum_st += block_scale * tsum as f64;
    }
    rest[blocks] = row_constant(sum_a, sum_st);
}

/// The 8 lanes of a vector.
#[inline(always)]
fn lanes(v: __m256) -> [f32; 8] {
    // SAFETY: `__m256` is 8 f32 of plain bits.
    unsafe { std::mem::transmute(v) }
}

/// The 16 states of chunk pair `pair` of group `G`: 16-bit lane 2j is chunk 2·pair's
/// position j, lane 2j+1 chunk 2·pair+1's.
///
/// # Safety
/// As `chunk_words`.
#[inline(always)]
unsafe fn pair_states<const G: usize>(
    tile: *const u8,
    stride: usize,
    tile_bytes: usize,
    t: &ChunkTables,
    pair: usize,
) -> __m256i {
    // SAFETY: forwarded from the caller.
    unsafe {
        let (even, odd) = (2 * pair, 2 * pair + 1);
        let low = _mm256_srlv_epi32(
            chunk_words::<G>(tile, stride, tile_bytes, t, even),
            _mm256_loadu_si256(t.shift[even].as_ptr().cast()),
        );
        let high = _mm256_sllv_epi32(
            chunk_words::<G>(tile, stride, tile_bytes, t, odd),
            _mm256_loadu_si256(t.left_shift[odd].as_ptr().cast()),
        );
        _mm256_blend_epi16::<0b1010_1010>(low, high)
    }
}

/// mul1's byte sums (0..1020) of 16 states in 16-bit lanes.
///
/// # Safety
/// AVX2 must be available.
#[inline(always)]
unsafe fn byte_sums(states: __m256i) -> __m256i {
    // SAFETY: plain AVX2 arithmetic.
    unsafe {
        let m_lo = _mm256_set1_epi16(MUL1_MULTIPLIER as u16 as i16);
        let m_hi = _mm256_set1_epi16((MUL1_MULTIPLIER >> 16) as u16 as i16);
        let lo = _mm256_mullo_epi16(states, m_lo);
        let hi = _mm256_add_epi16(
            _mm256_mulhi_epu16(states, m_lo),
            _mm256_mullo_epi16(states, m_hi),
        );
        let ones = _mm256_set1_epi8(1);
        _mm256_add_epi16(
            _mm256_maddubs_epi16(lo, ones),
            _mm256_maddubs_epi16(hi, ones),
        )
    }
}

/// Groups G0..G3 of every tile of one strip: per group an int32 accumulator per block, folded
/// into f32 with the block's scale. Vector i sums columns Gi (lanes 0..4) and Gi+8 (4..8).
///
/// # Safety
/// As `chunk_words` for every tile of the strip; `input` is a prepared input of `tiles_k`
/// tiles.
#[inline(always)]
unsafe fn gemv_pass<const G0: usize, const G1: usize, const G2: usize, const G3: usize>(
    mut tile: *const u8,
    tiles_k: usize,
    stride: usize,
    tile_bytes: usize,
    t: &ChunkTables,
    input: *const f32,
) -> [__m256; 4] {
    #[inline(always)]
    unsafe fn group<const G: usize>(
        tile: *const u8,
        stride: usize,
        tile_bytes: usize,
        t: &ChunkTables,
        x: *const f32,
        acc: &mut __m256i,
    ) {
        // SAFETY: forwarded from the caller.
        unsafe {
            for pair in 0..PAIRS {
                let sums = byte_sums(pair_states::<G>(tile, stride, tile_bytes, t, pair));
                let x = _mm256_loadu_si256(x.add(8 * pair).cast());
                *acc = _mm256_add_epi32(*acc, _mm256_madd_epi16(sums, x));
            }
        }
    }
    // SAFETY: forwarded from the caller.
    unsafe {
        let blocks = tiles_k / TILES_PER_BLOCK;
        let scales = input.add(tiles_k * LANES_PER_TILE);
        let mut sums = [_mm256_setzero_ps(); 4];
        for b in 0..blocks {
            let mut acc = [_mm256_setzero_si256(); 4];
            for kt in b * TILES_PER_BLOCK..(b + 1) * TILES_PER_BLOCK {
                let x = input.add(kt * LANES_PER_TILE);
                group::<G0>(tile, stride, tile_bytes, t, x, &mut acc[0]);
                group::<G1>(tile, stride, tile_bytes, t, x, &mut acc[1]);
                group::<G2>(tile, stride, tile_bytes, t, x, &mut acc[2]);
                group::<G3>(tile, stride, tile_bytes, t, x, &mut acc[3]);
                tile = tile.add(tile_bytes);
            }
            let scale = _mm256_set1_ps(*scales.add(b));
            for (s, a) in sums.iter_mut().zip(&acc) {
                *s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(*a), scale, *s);
            }
        }
        sums
    }
}

/// Column g's and g+8's outputs from group g's running sums (lifted by the row's power of two).
#[inline(always)]
fn finish(sums: __m256, e: f32, unlift: f32, z: &mut [f32], g: usize) {
    let l = lanes(sums);
    z[g] = ((l[0] + l[1]) + (l[2] + l[3])) * unlift + e;
    z[g + 8] = ((l[4] + l[5]) + (l[6] + l[7])) * unlift + e;
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemv_avx2(
    p: &PackedTrellis,
    input: &[f32],
    strips: std::ops::Range<usize>,
    z: &mut [f32],
) {
    let t = ChunkTables::of(p.bits);
    let (tb, stride) = (p.tile_bytes, group_stride(p.tile_bytes));
    let tiles_k = p.tiles_k();
    assert!(input.len() >= input_len(tiles_k) && z.len() >= strips.len() * STRIP);
    assert!(strips.end <= p.strips());
    let (e, unlift) = (input[input_len(tiles_k) - 2], input[input_len(tiles_k) - 1]);
    for (strip, zs) in strips.zip(z.chunks_exact_mut(STRIP)) {
        // SAFETY: tiles of strips below `p.strips()` lie inside the stream, whose pads cover
        // the loads around them; `input` is a prepared input of `tiles_k` tiles (asserted).
        unsafe {
            let tile = p.stream().as_ptr().add(p.tile_offset(strip, 0));
            let x = input.as_ptr();
            // Two passes over the strip (the second finds it in L1/L2): 4 accumulators and 4
            // sums leave registers for the constants.
            let first = gemv_pass::<0, 1, 2, 3>(tile, tiles_k, stride, tb, t, x);
            let second = gemv_pass::<4, 5, 6, 7>(tile, tiles_k, stride, tb, t, x);
            for (g, s) in first.iter().chain(&second).enumerate() {
                finish(*s, e, unlift, zs, g);
            }
        }
    }
}

/// The one-row mul1 product over `strips` from an input made by [`prepare_input`] (see
/// `scalar::gemv` for `z`).
pub fn gemv(p: &PackedTrellis, input: &[f32], strips: std::ops::Range<usize>, z: &mut [f32]) {
    assert!(p.codebook == trellis_codec::Codebook::Mul1);
    assert!(super::Isa::Avx2.is_supported());
    // SAFETY: AVX2, FMA and F16C were checked just above.
    unsafe { gemv_avx2(p, input, strips, z) }
}

/// Rows whose running sums (8 vectors each) a GEMM pass keeps in task scratch while one block's
/// byte sums stay in L1.
const GEMM_ROW_BLOCK: usize = 64;

/// Vectors of one block's byte sums: per tile, group and chunk pair.
const BLOCK_VECTORS: usize = TILES_PER_BLOCK * GROUPS * PAIRS;

/// Vectors (32 bytes) of task scratch [`gemm`] needs for `rows` rows.
pub fn gemm_scratch_vectors(rows: usize) -> usize {
    BLOCK_VECTORS + GROUPS * rows.min(GEMM_ROW_BLOCK)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemm_avx2(
    p: &PackedTrellis,
    inputs: &[f32],
    input_stride: usize,
    rows: usize,
    strips: std::ops::Range<usize>,
    z: &mut [f32],
    scratch: &mut [__m256i],
) {
    let t = ChunkTables::of(p.bits);
    let (tb, stride) = (p.tile_bytes, group_stride(p.tile_bytes));
    let tiles_k = p.tiles_k();
    let blocks = tiles_k / TILES_PER_BLOCK;
    let block_rows = rows.min(GEMM_ROW_BLOCK);
    assert!(input_stride >= input_len(tiles_k) && rows > 0);
    assert!(inputs.len() >= (rows - 1) * input_stride + input_len(tiles_k));
    assert!(z.len() >= strips.len() * rows * STRIP && strips.end <= p.strips());
    assert!(scratch.len() >= BLOCK_VECTORS + GROUPS * block_rows);
    let (block_sums, sums) = scratch.split_at_mut(BLOCK_VECTORS);
    // Row blocks outside strips: a block's inputs stay in L2 while the strips pass over them.
    for row0 in (0..rows).step_by(GEMM_ROW_BLOCK) {
        for (strip, zs) in strips.clone().zip(z.chunks_exact_mut(rows * STRIP)) {
            let block_rows = GEMM_ROW_BLOCK.min(rows - row0);
            let sums = &mut sums[..GROUPS * block_rows];
            sums.fill(_mm256_setzero_si256());
            // SAFETY: tiles of strips below `p.strips()` lie inside the stream, whose pads
            // cover the loads around them; every row's input is a prepared input of
            // `tiles_k` tiles (asserted above); `block_sums` holds a block's vectors.
            unsafe {
                let mut tile = p.stream().as_ptr().add(p.tile_offset(strip, 0));
                for b in 0..blocks {
                    for kt in 0..TILES_PER_BLOCK {
                        let out = block_sums.as_mut_ptr().add(kt * GROUPS * PAIRS);
                        tile_byte_sums::<0>(tile, stride, tb, t, out);
                        tile_byte_sums::<1>(tile, stride, tb, t, out);
                        tile_byte_sums::<2>(tile, stride, tb, t, out);
                        tile_byte_sums::<3>(tile, stride, tb, t, out);
                        tile_byte_sums::<4>(tile, stride, tb, t, out);
                        tile_byte_sums::<5>(tile, stride, tb, t, out);
                        tile_byte_sums::<6>(tile, stride, tb, t, out);
                        tile_byte_sums::<7>(tile, stride, tb, t, out);
                        tile = tile.add(tb);
                    }
                    for (r, row_sums) in sums.chunks_exact_mut(GROUPS).enumerate() {
                        let input = inputs.as_ptr().add((row0 + r) * input_stride);
                        let x = input.add(b * TILES_PER_BLOCK * LANES_PER_TILE);
                        let scale = _mm256_set1_ps(*input.add(tiles_k * LANES_PER_TILE + b));
                        for (g, s) in row_sums.iter_mut().enumerate() {
                            let mut acc = _mm256_setzero_si256();
                            for kt in 0..TILES_PER_BLOCK {
                                for pair in 0..PAIRS {
                                    let xv = _mm256_loadu_si256(
                                        x.add(kt * LANES_PER_TILE + 8 * pair).cast(),
                                    );
                                    let bv = block_sums[(kt * GROUPS + g) * PAIRS + pair];
                                    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(bv, xv));
                                }
                            }
                            let sum = _mm256_castsi256_ps(*s);
                            let sum = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), scale, sum);
                            *s = _mm256_castps_si256(sum);
                        }
                    }
                }
            }
            for (r, row_sums) in sums.chunks_exact(GROUPS).enumerate() {
                let tail = (row0 + r) * input_stride + input_len(tiles_k);
                let (e, unlift) = (inputs[tail - 2], inputs[tail - 1]);
                let zr = &mut zs[(row0 + r) * STRIP..(row0 + r + 1) * STRIP];
                for (g, s) in row_sums.iter().enumerate() {
                    finish(_mm256_castsi256_ps(*s), e, unlift, zr, g);
                }
            }
        }
    }
}

/// Group G's byte sums of one tile, its chunk pairs at `out[G·2 + pair]`.
///
/// # Safety
/// As `chunk_words`; `out` has `GROUPS · PAIRS` writable vectors.
#[inline(always)]
unsafe fn tile_byte_sums<const G: usize>(
    tile: *const u8,
    stride: usize,
    tile_bytes: usize,
    t: &ChunkTables,
    out: *mut __m256i,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        for pair in 0..PAIRS {
            let states = pair_states::<G>(tile, stride, tile_bytes, t, pair);
            out.add(G * PAIRS + pair).write(byte_sums(states));
        }
    }
}

/// The mul1 product of several rows (`inputs` holds each one's [`prepare_input`],
/// `input_stride` apart; `z` gets `[strip][row][16]`); every row's results equal [`gemv`]'s
/// bit for bit. `scratch` holds at least [`gemm_scratch_vectors`] 32-byte-aligned vectors.
pub fn gemm(
    p: &PackedTrellis,
    inputs: &[f32],
    input_stride: usize,
    rows: usize,
    strips: std::ops::Range<usize>,
    z: &mut [f32],
    scratch: &mut [f32],
) {
    assert!(p.codebook == trellis_codec::Codebook::Mul1);
    assert!(super::Isa::Avx2.is_supported());
    // SAFETY: `__m256i` is plain bits.
    let scratch = unsafe { super::float_vectors::<__m256i>(scratch) };
    // SAFETY: AVX2, FMA and F16C were checked above.
    unsafe { gemm_avx2(p, inputs, input_stride, rows, strips, z, scratch) }
}

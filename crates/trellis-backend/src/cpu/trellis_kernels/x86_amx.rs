//! mul1 products of many rows on Intel AMX tiles: the [`super::x86_vnni`] approximation (int16
//! activations per 128-row block), with the integer dot products on the tile unit.
//!
//! A tile multiply `C[m][n] += Σ_k Σ_j A[m][4k+j]·B[k][4n+j]` sums four byte products per
//! dword, and mul1's byte sum is the sum of the four bytes of the 32-bit product `s·M`: so with
//! `A` the weights' products (row = output column, dword k = input row k) and `B` an
//! activation copied into all four bytes of its dword (row k = input row, dword n = token),
//! `C[column][token]` is the dot product of the byte sums with the activations. Activations
//! are int16 and the tile unit multiplies bytes: each is split into a signed high byte and an
//! unsigned low byte, multiplied apart (`tdpbusd`, `tdpbuud`) into two accumulators, and
//! `D = 256·C_high + C_low` is formed exactly in f64. Per block of 128 input rows each column's
//! `D` is rounded once to f32 and folded like the VNNI kernels fold theirs
//! ([`super::x86_vnni::block_columns`]), so every row's results equal the one-row GEMV's bit
//! for bit.
//!
//! A pass keeps a few tiles of 16 tokens' activations (in that form, 8 bytes per value) in L2;
//! each strip decodes a block's 8 weight tiles once into L1 and multiplies them into every
//! token tile of the pass.
//!
//! Linux hands out the tile state only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), made
//! once by [`is_available`]; each call loads its tile configuration and releases the tiles at
//! the end, so that a thread holds no tile state between products.

use super::Isa;
use super::layout::{PackedTrellis, STRIP, group_stride};
use super::x86_avx512::{Windows, group_states, mul_halves};
use super::x86_vnni::{TILES_PER_BLOCK, block_columns_f64_pair, input_len};
use std::arch::asm;
use std::arch::x86_64::*;
use trellis_codec::codebook::MUL1_MULTIPLIER;

/// Vectors (64 bytes) per tile: 16 rows of 64 bytes.
const TILE_VECTORS: usize = 16;

/// Bytes of one pass's activations (both bytes of every value, four copies each) that stay
/// in L2 while the strips go over them.
const PASS_BYTES: usize = 1 << 20;

/// Most token tiles (16 rows each) in one pass.
const MAX_PASS_TILES: usize = 4;

/// Fewest rows for which the tile unit beats the VNNI GEMM: a token tile costs the same for
/// one token as for 16. On the H200 host's Xeon (2 threads, `trellis_gemv`) 8 rows of a
/// 2048 → 1536 product took 0.55 ms on tiles against 0.34 with VNNI, 16 rows 0.54 against
/// 0.56, 256 rows 6.9 against 10.5; a 5120 → 2048 product of 16 rows 1.43 against 1.90.
pub const MIN_ROWS: usize = 16;

/// Whether AMX-INT8 is present and the OS lets this process use it (asked once); never on
/// a CPU without AVX-512 VNNI, whose input layout the kernel reads, or with
/// `TRELLIS_CPU_AMX=0`.
pub fn is_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        if std::env::var("TRELLIS_CPU_AMX").is_ok_and(|v| v == "0") {
            return false;
        }
        if !Isa::Avx512Vnni.is_supported() {
            return false;
        }
        // Leaf 7: EDX bit 24 AMX-TILE, bit 25 AMX-INT8.
        let leaf = __cpuid_count(7, 0);
        if (leaf.edx >> 24) & 3 != 3 {
            return false;
        }
        request_tile_state()
    })
}

#[cfg(target_os = "linux")]
fn request_tile_state() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only changes which register state the kernel
    // saves for this process; it touches no memory of ours.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn request_tile_state() -> bool {
    false
}

/// Token tiles per pass for `tiles_k` weight tiles along the input.
fn pass_tiles(tiles_k: usize) -> usize {
    (PASS_BYTES / (tiles_k * 2 * TILE_VECTORS * 64)).clamp(1, MAX_PASS_TILES)
}

/// Vectors of task scratch [`gemm`] needs for `tiles_k` weight tiles along the input.
pub fn gemm_scratch_vectors(tiles_k: usize) -> usize {
    let pass = pass_tiles(tiles_k);
    let blocks = tiles_k / TILES_PER_BLOCK;
    // The block's weight tiles, the two accumulators, the pass's activations (high and low
    // tiles per weight tile), its block scales and running sums.
    TILES_PER_BLOCK * TILE_VECTORS
        + 2 * TILE_VECTORS
        + pass * tiles_k * 2 * TILE_VECTORS
        + pass * blocks
        + pass * STRIP
}

/// The tile shapes: tiles 0, 1 accumulate (16 columns × 16 tokens of int32), 2 holds weights
/// (16 columns × 16 rows of 4 bytes), 3 and 4 activations (16 rows × 16 tokens of 4 bytes).
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn new() -> TileConfig {
        let mut c = [0u8; 64];
        c[0] = 1; // palette 1
        for tile in 0..5 {
            // Bytes per row (u16 at 16 + 2·tile), rows (u8 at 48 + tile).
            c[16 + 2 * tile] = 64;
            c[48 + tile] = 16;
        }
        TileConfig(c)
    }
}

/// The weight tile of one 16×16 trellis tile: row c holds column c's 16 products `s·M`, in the
/// input rows' `CHUNK_ROW_ORDER` (the order of the prepared activations).
///
/// # Safety
/// As `group_states`; `out` has 16 writable vectors.
#[inline(always)]
unsafe fn weight_tile(
    tile: *const u8,
    stride: usize,
    tile_bytes: usize,
    w: &Windows,
    out: *mut __m512i,
) {
    #[inline(always)]
    unsafe fn group<const G: usize>(
        tile: *const u8,
        stride: usize,
        tile_bytes: usize,
        w: &Windows,
        out: *mut __m512i,
    ) {
        // SAFETY: forwarded from the caller.
        unsafe {
            let (lo, hi) = mul_halves(
                group_states::<G>(tile, stride, tile_bytes, w),
                MUL1_MULTIPLIER,
            );
            // Per 128-bit lane (column G's rows 0..8, 8..16, then column G+8's), the 32-bit
            // products of its 16-bit lanes 0..4 (`first`) and 4..8 (`second`).
            let first = _mm512_unpacklo_epi16(lo, hi);
            let second = _mm512_unpackhi_epi16(lo, hi);
            let column_g = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11);
            let column_g8 = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
            out.add(G)
                .write(_mm512_permutex2var_epi64(first, column_g, second));
            out.add(G + 8)
                .write(_mm512_permutex2var_epi64(first, column_g8, second));
        }
    }
    // SAFETY: forwarded from the caller.
    unsafe {
        group::<0>(tile, stride, tile_bytes, w, out);
        group::<1>(tile, stride, tile_bytes, w, out);
        group::<2>(tile, stride, tile_bytes, w, out);
        group::<3>(tile, stride, tile_bytes, w, out);
        group::<4>(tile, stride, tile_bytes, w, out);
        group::<5>(tile, stride, tile_bytes, w, out);
        group::<6>(tile, stride, tile_bytes, w, out);
        group::<7>(tile, stride, tile_bytes, w, out);
    }
}

/// One token tile's activations as tile rows: for weight tile kt, 16 vectors of high bytes
/// then 16 of low bytes, row k = input row k's value for each of the 16 tokens, in all four
/// bytes of its dword; tokens past `count` are zero. Also each block's scales (lane = token).
///
/// # Safety
/// `inputs` holds `count` rows of `input_len(tiles_k)` floats, `stride` apart; `acts` has
/// `tiles_k · 32` and `scales` `tiles_k / 8` writable vectors.
#[inline(always)]
unsafe fn token_tile(
    inputs: *const f32,
    stride: usize,
    count: usize,
    tiles_k: usize,
    acts: *mut __m512i,
    scales: *mut __m512,
) {
    // SAFETY: the gathers read dword m of a tile's first 16 int16 for rows below `count`
    // (masked), inside each row's prepared input; the stores stay inside `acts`/`scales`.
    unsafe {
        let mask: __mmask16 = ((1u32 << count) - 1) as u16;
        let offsets = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(stride as i32),
        );
        // Byte b of each dword copied into all four of its bytes.
        let copies = |b: i8| {
            let d = |n: i8| [4 * n + b; 4];
            let lane: [i8; 16] = [d(0), d(1), d(2), d(3)].concat().try_into().unwrap();
            _mm512_broadcast_i32x4(_mm_loadu_si128(lane.as_ptr().cast()))
        };
        let (low0, high0, low1, high1) = (copies(0), copies(1), copies(2), copies(3));
        for kt in 0..tiles_k {
            let out = acts.add(kt * 2 * TILE_VECTORS);
            for m in 0..8 {
                // Token n's dword: rows 2m (low half) and 2m+1 (high half) of tile kt.
                let v = _mm512_mask_i32gather_epi32::<4>(
                    _mm512_setzero_si512(),
                    mask,
                    offsets,
                    inputs.add(kt * STRIP + m).cast(),
                );
                out.add(2 * m).write(_mm512_shuffle_epi8(v, high0));
                out.add(2 * m + 1).write(_mm512_shuffle_epi8(v, high1));
                out.add(TILE_VECTORS + 2 * m)
                    .write(_mm512_shuffle_epi8(v, low0));
                out.add(TILE_VECTORS + 2 * m + 1)
                    .write(_mm512_shuffle_epi8(v, low1));
            }
        }
        let blocks = tiles_k / TILES_PER_BLOCK;
        for b in 0..blocks {
            let mut lanes = [0.0f32; 16];
            for (n, lane) in lanes.iter_mut().enumerate().take(count) {
                *lane = *inputs.add(n * stride + tiles_k * STRIP + b);
            }
            scales.add(b).write(_mm512_loadu_ps(lanes.as_ptr()));
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni")]
unsafe fn gemm_amx(
    p: &PackedTrellis,
    inputs: &[f32],
    input_stride: usize,
    rows: usize,
    strips: std::ops::Range<usize>,
    z: &mut [f32],
    scratch: &mut [__m512i],
) {
    let w = Windows::of(p);
    let (tile_bytes, stride) = (p.tile_bytes, group_stride(p.tile_bytes));
    let tiles_k = p.tiles_k();
    let blocks = tiles_k / TILES_PER_BLOCK;
    let pass = pass_tiles(tiles_k);
    assert!(input_stride >= input_len(tiles_k) && rows > 0);
    assert!(inputs.len() >= (rows - 1) * input_stride + input_len(tiles_k));
    assert!(z.len() >= strips.len() * rows * STRIP && strips.end <= p.strips());
    assert!(scratch.len() >= gemm_scratch_vectors(tiles_k));
    assert!(i32::try_from(15 * input_stride).is_ok());
    let (weights, rest) = scratch.split_at_mut(TILES_PER_BLOCK * TILE_VECTORS);
    let (products, rest) = rest.split_at_mut(2 * TILE_VECTORS);
    let (acts, rest) = rest.split_at_mut(pass * tiles_k * 2 * TILE_VECTORS);
    let (scales, rest) = rest.split_at_mut(pass * blocks);
    let sums = &mut rest[..pass * STRIP];
    let as_floats = |v: &mut [__m512i]| {
        // SAFETY: `__m512` and `__m512i` are both 64 aligned bytes of plain bits; the slice
        // is borrowed mutably for as long as the result lives.
        unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<__m512>(), v.len()) }
    };
    let (scales, sums) = (as_floats(scales), as_floats(sums));
    let config = TileConfig::new();
    // SAFETY: a valid palette-1 configuration (the caller checked AMX and the OS permission).
    unsafe { asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack)) };
    let row_bytes = 64usize;
    for row0 in (0..rows).step_by(pass * 16) {
        let token_tiles = (rows - row0).div_ceil(16).min(pass);
        for tt in 0..token_tiles {
            let first = row0 + 16 * tt;
            // SAFETY: rows `first..first + count` exist in `inputs` (asserted above); the
            // pass's buffers hold `pass` token tiles.
            unsafe {
                token_tile(
                    inputs.as_ptr().add(first * input_stride),
                    input_stride,
                    (rows - first).min(16),
                    tiles_k,
                    acts.as_mut_ptr().add(tt * tiles_k * 2 * TILE_VECTORS),
                    scales.as_mut_ptr().add(tt * blocks),
                );
            }
        }
        for (strip, zs) in strips.clone().zip(z.chunks_exact_mut(rows * STRIP)) {
            sums.fill(_mm512_setzero_ps());
            // SAFETY: tiles of strips below `p.strips()` lie inside the stream, whose pads
            // cover the vector loads around them; tile loads and stores move 16 rows of 64
            // bytes inside `weights`, `acts` and `products`.
            unsafe {
                let mut tile = p.stream().as_ptr().add(p.tile_offset(strip, 0));
                for b in 0..blocks {
                    for t in 0..TILES_PER_BLOCK {
                        let out = weights.as_mut_ptr().add(t * TILE_VECTORS);
                        weight_tile(tile, stride, tile_bytes, &w, out);
                        tile = tile.add(tile_bytes);
                    }
                    for tt in 0..token_tiles {
                        asm!("tilezero tmm0", "tilezero tmm1", options(nostack));
                        for t in 0..TILES_PER_BLOCK {
                            let kt = b * TILES_PER_BLOCK + t;
                            let high = acts.as_ptr().add((tt * tiles_k + kt) * 2 * TILE_VECTORS);
                            asm!(
                                "tileloadd tmm2, [{w} + {s} * 1]",
                                "tileloadd tmm3, [{h} + {s} * 1]",
                                "tileloadd tmm4, [{l} + {s} * 1]",
                                "tdpbusd tmm0, tmm2, tmm3",
                                "tdpbuud tmm1, tmm2, tmm4",
                                w = in(reg) weights.as_ptr().add(t * TILE_VECTORS),
                                h = in(reg) high,
                                l = in(reg) high.add(TILE_VECTORS),
                                s = in(reg) row_bytes,
                                options(nostack),
                            );
                        }
                        asm!(
                            "tilestored [{h} + {s} * 1], tmm0",
                            "tilestored [{l} + {s} * 1], tmm1",
                            h = in(reg) products.as_mut_ptr(),
                            l = in(reg) products.as_mut_ptr().add(TILE_VECTORS),
                            s = in(reg) row_bytes,
                            options(nostack),
                        );
                        let scale = scales[tt * blocks + b];
                        for c in 0..STRIP {
                            let d = block_columns_f64_pair(products[c], products[TILE_VECTORS + c]);
                            let s = &mut sums[tt * STRIP + c];
                            *s = _mm512_fmadd_ps(d, scale, *s);
                        }
                    }
                }
            }
            // Column c's lane n is token n: z is [row][column].
            for tt in 0..token_tiles {
                let first = row0 + 16 * tt;
                for n in 0..(rows - first).min(16) {
                    let row = first + n;
                    let tail = row * input_stride + tiles_k * STRIP + blocks;
                    let (e, unlift) = (inputs[tail], inputs[tail + 1]);
                    let zr = &mut zs[row * STRIP..(row + 1) * STRIP];
                    for (c, zc) in zr.iter_mut().enumerate() {
                        // SAFETY: `__m512` is 16 f32.
                        let lanes: [f32; 16] = unsafe { std::mem::transmute(sums[tt * STRIP + c]) };
                        *zc = lanes[n] * unlift + e;
                    }
                }
            }
        }
    }
    // SAFETY: releases the tile state this call configured.
    unsafe { asm!("tilerelease", options(nostack)) };
}

/// The mul1 product of several rows on AMX, with [`super::x86_vnni::gemm`]'s arguments and
/// results (bit for bit); `scratch` holds at least [`gemm_scratch_vectors`] 64-byte-aligned
/// vectors. [`is_available`] must be true.
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
    assert!(is_available());
    // SAFETY: `__m512i` is plain bits.
    let scratch = unsafe { super::float_vectors::<__m512i>(scratch) };
    // SAFETY: `is_available` checked the VNNI level's features (which include every one
    // enabled on the kernel), AMX-INT8 and the OS's permission.
    unsafe { gemm_amx(p, inputs, input_stride, rows, strips, z, scratch) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::trellis_kernels::x86_vnni::{self, Products, prepare_input};
    use rand::{Rng, SeedableRng, rngs::StdRng};
    use trellis_codec::{BitWidth, Codebook};

    /// Every row of an AMX product equals the one-row VNNI product bit for bit, at every
    /// width, for row counts that fill token tiles partly, wholly and over several passes.
    #[test]
    fn amx_rows_equal_the_one_row_product() {
        if !is_available() {
            eprintln!("no AMX-INT8 on this CPU (or not allowed)");
            return;
        }
        let mut rng = StdRng::seed_from_u64(9);
        for bits in BitWidth::ALL {
            // Wide inputs (3000 rows, padded to 192 tiles) make passes of 2 token tiles, fewer
            // than a 70-row batch needs.
            let in_f = if bits.is_integer() { 3000 } else { 300 };
            let t =
                trellis_testutil::random_trellis(&mut rng, in_f, 70, bits, Codebook::Mul1, false);
            let p = PackedTrellis::new(&t);
            let (k, strips) = (p.k_padded, p.strips());
            let len = input_len(p.tiles_k());
            for rows in [8, 16, 17, 70] {
                let mut inputs = vec![0.0f32; rows * len];
                for input in inputs.chunks_exact_mut(len) {
                    let xh: Vec<f32> = (0..k)
                        .map(|i| {
                            let v: f32 = rng.random_range(-1.0..1.0);
                            if i % 61 == 3 { 30.0 * v } else { v }
                        })
                        .collect();
                    prepare_input(&xh, input);
                }
                let mut scratch = vec![0.0f32; 16 * gemm_scratch_vectors(p.tiles_k()) + 16];
                let skip = scratch.as_ptr().align_offset(64);
                let mut many = vec![f32::NAN; strips * rows * STRIP];
                gemm(
                    &p,
                    &inputs,
                    len,
                    rows,
                    0..strips,
                    &mut many,
                    &mut scratch[skip..],
                );
                for r in 0..rows {
                    let mut one = vec![f32::NAN; strips * STRIP];
                    let input = &inputs[r * len..(r + 1) * len];
                    x86_vnni::gemv(&p, input, 0..strips, &mut one, Products::selected());
                    for s in 0..strips {
                        let got = &many[(s * rows + r) * STRIP..][..STRIP];
                        let want = &one[s * STRIP..][..STRIP];
                        assert!(
                            got.iter()
                                .zip(want)
                                .all(|(g, w)| g.to_bits() == w.to_bits()),
                            "K {bits} rows {rows} row {r} strip {s}: {got:?} vs {want:?}"
                        );
                    }
                }
            }
        }
    }
}

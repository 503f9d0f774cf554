//! mul1 products of many rows on Intel AMX tiles: the [`super::x86_vnni`] approximation (int16
//! activations per 128-row block), with the integer dot products on the tile unit.
//!
//! A tile multiply `C[m][n] += Σ_k Σ_j A[m][4k+j]·B[k][4n+j]` sums four byte products per
//! dword, and mul1's byte sum is the sum of the four bytes of the 32-bit product `s·M`: so with
//! `A` the weights' products (row = output column) and `B` the activations (dword n = token),
//! each activation in the bytes of `B` that meet its product's bytes in `A`, `C[column][token]`
//! is the dot product of the byte sums with the activations. A dword of `A` holds the low (or
//! the high) 16-bit halves of two input rows' products, as the multiplies leave them, and its
//! dword of `B` the two rows' activations, each twice ([`weight_tile`], [`token_tile`]).
//! Activations are int16 and the tile unit multiplies bytes: each is split into a signed high
//! byte and an unsigned low byte, multiplied apart (`tdpbusd`, `tdpbuud`) into two
//! accumulators, and `D = 256·C_high + C_low` is formed exactly in f64. Per block of 128 input
//! rows each column's `D` is rounded once to f32 and folded like the VNNI kernels fold theirs
//! ([`super::x86_vnni::block_columns`]), so every row's results equal the one-row GEMV's bit
//! for bit.
//!
//! A pass keeps a few tiles of 16 tokens' activations (in that form, 8 bytes per value) in L2;
//! strips go in pairs, each decoding a block's 8 weight tiles once into L1, and every
//! activation tile loaded is multiplied into both strips' tiles.
//!
//! Measured on the Intel Xeon dev box (`trellis_gemv --threads 2`, weights in cache, best of
//! ~1 s, 4 bits): the pairs, a pass of two token tiles for 5120 inputs (1.5 MB, not 1 MB) and
//! the halves layout (which dropped an interleave and a permute per 32 weights) took a
//! 2048 → 1536 product from 0.281 to 0.239 ms at 16 rows and 3.72–3.88 to 3.14–3.19 at 256,
//! and a 5120 → 2048 product from 0.85–0.87 to 0.70 at 16 rows and 14.5–15.0 to 11.3–12.1 at
//! 256.
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
/// in L2 while the strips go over them. Each pass decodes all weights again, so it should hold
/// as many token tiles as fit: 1.5 MB gives products with 5120 inputs two token tiles a pass,
/// ~10 % faster than one (1 MB) at 32–256 rows here; 2 MB (three) was slower again.
const PASS_BYTES: usize = 3 << 19;

/// Most token tiles (16 rows each) in one pass.
const MAX_PASS_TILES: usize = 4;

/// Fewest rows for which the tile unit beats the VNNI GEMM: a token tile costs the same for
/// one token as for 16. On the Intel Xeon dev box (2 threads, `trellis_gemv`, 3 and 4 bits) 8
/// rows of a 2048 → 1536 product took 0.216 ms on tiles against 0.211 with VNNI, 10 rows 0.222
/// against 0.241, 14 rows 0.23 against 0.30–0.32; a 5120 → 2048 product of 8 rows 0.64
/// against 0.67. (Before the pairs and the halves layout the bound was 16; the H200 host's
/// 16-core Xeon was too noisy on the day to time the new kernel, 2× between runs.)
pub const MIN_ROWS: usize = 8;

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
    // For each of a pair of strips its block's weight tiles, its two accumulators and its
    // running sums; the pass's activations (high and low tiles per weight tile) and block
    // scales.
    PAIR * (TILES_PER_BLOCK * TILE_VECTORS + 2 * TILE_VECTORS + pass * STRIP)
        + pass * tiles_k * 2 * TILE_VECTORS
        + pass * blocks
}

/// Strips multiplied side by side: each activation tile, once loaded, goes into both strips'
/// products (a tile load per product saved) and the two strips' accumulations are independent
/// chains for the tile unit.
const PAIR: usize = 2;

/// The tile shapes, all 16 rows of 64 bytes: tiles 0, 1 accumulate the first strip's products
/// (16 columns × 16 tokens of int32, high and low activation bytes) and 5, 6 the second's; 2
/// and 7 hold their weights (16 columns × 16 rows of 4 bytes); 3 and 4 the activations (16
/// rows × 16 tokens of 4 bytes).
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn new() -> TileConfig {
        let mut c = [0u8; 64];
        c[0] = 1; // palette 1
        for tile in 0..8 {
            // Bytes per row (u16 at 16 + 2·tile), rows (u8 at 48 + tile).
            c[16 + 2 * tile] = 64;
            c[48 + tile] = 16;
        }
        TileConfig(c)
    }
}

/// The weight tile of one 16×16 trellis tile: row c holds column c's 16 products `s·M` as
/// their low 16-bit halves (in the input rows' `CHUNK_ROW_ORDER`, two to a dword) and then
/// their high halves in the same order. A dword's four bytes are then two rows' halves, not
/// one row's product, which the activation tiles match ([`token_tile`]); the byte sums are the
/// same, and the halves go into the tile as they come out of the multiplies, with one
/// 128-bit-lane shuffle per column instead of an interleave and a permute.
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
            // The lower 256 bits of each are column G's rows, the upper column G+8's.
            out.add(G).write(_mm512_shuffle_i64x2::<0x44>(lo, hi));
            out.add(G + 8).write(_mm512_shuffle_i64x2::<0xEE>(lo, hi));
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
/// then 16 of low bytes. Row k < 8 holds, for each of the 16 tokens, the values of the input
/// rows at chunk positions 2k and 2k+1, each in two bytes of the dword (the layout of the
/// weight tile's halves, [`weight_tile`]), and row k + 8 repeats row k; tokens past `count`
/// are zero. Also each block's scales (lane = token).
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
        // Of each dword's two 16-bit values, byte b of the first twice, then byte b of the
        // second twice.
        let halves = |b: i8| {
            let d = |n: i8| [4 * n + b, 4 * n + b, 4 * n + 2 + b, 4 * n + 2 + b];
            let lane: [i8; 16] = [d(0), d(1), d(2), d(3)].concat().try_into().unwrap();
            _mm512_broadcast_i32x4(_mm_loadu_si128(lane.as_ptr().cast()))
        };
        let (low, high) = (halves(0), halves(1));
        for kt in 0..tiles_k {
            let out = acts.add(kt * 2 * TILE_VECTORS);
            for m in 0..8 {
                // Token n's dword: the values at chunk positions 2m and 2m+1 of tile kt.
                let v = _mm512_mask_i32gather_epi32::<4>(
                    _mm512_setzero_si512(),
                    mask,
                    offsets,
                    inputs.add(kt * STRIP + m).cast(),
                );
                let (h, l) = (_mm512_shuffle_epi8(v, high), _mm512_shuffle_epi8(v, low));
                out.add(m).write(h);
                out.add(m + 8).write(h);
                out.add(TILE_VECTORS + m).write(l);
                out.add(TILE_VECTORS + m + 8).write(l);
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
    let (weights, rest) = scratch.split_at_mut(PAIR * TILES_PER_BLOCK * TILE_VECTORS);
    let (products, rest) = rest.split_at_mut(PAIR * 2 * TILE_VECTORS);
    let (acts, rest) = rest.split_at_mut(pass * tiles_k * 2 * TILE_VECTORS);
    let (scales, rest) = rest.split_at_mut(pass * blocks);
    let sums = &mut rest[..PAIR * pass * STRIP];
    let as_floats = |v: &mut [__m512i]| {
        // SAFETY: `__m512` and `__m512i` are both 64 aligned bytes of plain bits; the slice
        // is borrowed mutably for as long as the result lives.
        unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<__m512>(), v.len()) }
    };
    let (scales, sums) = (as_floats(scales), as_floats(sums));
    let config = TileConfig::new();
    // SAFETY: a valid palette-1 configuration (the caller checked AMX and the OS permission).
    unsafe { asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack)) };
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
        let strip_at = |s: usize| (s - strips.start) * rows * STRIP;
        for first_strip in strips.clone().step_by(PAIR) {
            let count = (strips.end - first_strip).min(PAIR);
            sums.fill(_mm512_setzero_ps());
            // SAFETY: tiles of strips below `p.strips()` lie inside the stream, whose pads
            // cover the vector loads around them; tile loads and stores move 16 rows of 64
            // bytes inside `weights`, `acts` and `products`.
            unsafe {
                let mut tiles: [*const u8; PAIR] = std::array::from_fn(|i| {
                    p.stream()
                        .as_ptr()
                        .add(p.tile_offset(first_strip + i.min(count - 1), 0))
                });
                for b in 0..blocks {
                    for (i, tile) in tiles.iter_mut().enumerate().take(count) {
                        for t in 0..TILES_PER_BLOCK {
                            let out = weights
                                .as_mut_ptr()
                                .add((i * TILES_PER_BLOCK + t) * TILE_VECTORS);
                            weight_tile(*tile, stride, tile_bytes, &w, out);
                            *tile = tile.add(tile_bytes);
                        }
                    }
                    for tt in 0..token_tiles {
                        // A last, unpaired strip leaves the second weight slot as it was (any
                        // bits) and its products unread.
                        pair_block(weights, acts, tiles_k, tt, b, products);
                        let scale = scales[tt * blocks + b];
                        for i in 0..count {
                            let products = &products[i * 2 * TILE_VECTORS..];
                            for c in 0..STRIP {
                                let d =
                                    block_columns_f64_pair(products[c], products[TILE_VECTORS + c]);
                                let s = &mut sums[(i * pass + tt) * STRIP + c];
                                *s = _mm512_fmadd_ps(d, scale, *s);
                            }
                        }
                    }
                }
            }
            // Column c's lane n is token n: z is [strip][row][column].
            for i in 0..count {
                let zs = &mut z[strip_at(first_strip + i)..][..rows * STRIP];
                for tt in 0..token_tiles {
                    let first = row0 + 16 * tt;
                    for n in 0..(rows - first).min(16) {
                        let row = first + n;
                        let tail = row * input_stride + tiles_k * STRIP + blocks;
                        let (e, unlift) = (inputs[tail], inputs[tail + 1]);
                        let zr = &mut zs[row * STRIP..(row + 1) * STRIP];
                        for (c, zc) in zr.iter_mut().enumerate() {
                            // SAFETY: `__m512` is 16 f32.
                            let lanes: [f32; 16] =
                                unsafe { std::mem::transmute(sums[(i * pass + tt) * STRIP + c]) };
                            *zc = lanes[n] * unlift + e;
                        }
                    }
                }
            }
        }
    }
    // SAFETY: releases the tile state this call configured.
    unsafe { asm!("tilerelease", options(nostack)) };
}

/// One block (8 weight tiles along the input) of two strips against token tile `tt`: each
/// strip's integer sums for the high and low activation bytes into `products` (16 vectors
/// each, the first strip's 32 first). `weights` holds both strips' blocks (the second 8 tiles
/// on).
///
/// # Safety
/// The tile configuration of [`gemm_amx`] is loaded.
#[inline(always)]
unsafe fn pair_block(
    weights: &[__m512i],
    acts: &[__m512i],
    tiles_k: usize,
    tt: usize,
    b: usize,
    products: &mut [__m512i],
) {
    let row_bytes = 64usize;
    let last_act = (tt * tiles_k + (b + 1) * TILES_PER_BLOCK) * 2 * TILE_VECTORS;
    assert!(weights.len() >= PAIR * TILES_PER_BLOCK * TILE_VECTORS && acts.len() >= last_act);
    assert!(products.len() >= PAIR * 2 * TILE_VECTORS);
    // SAFETY: every tile load and store moves 16 rows of 64 bytes inside the slices (asserted
    // above); the tiles are configured.
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm5",
            "tilezero tmm6",
            options(nostack)
        );
        for t in 0..TILES_PER_BLOCK {
            let kt = b * TILES_PER_BLOCK + t;
            let high = acts.as_ptr().add((tt * tiles_k + kt) * 2 * TILE_VECTORS);
            asm!(
                "tileloadd tmm3, [{h} + {s} * 1]",
                "tileloadd tmm2, [{w0} + {s} * 1]",
                "tdpbusd tmm0, tmm2, tmm3",
                "tileloadd tmm7, [{w1} + {s} * 1]",
                "tdpbusd tmm5, tmm7, tmm3",
                "tileloadd tmm4, [{l} + {s} * 1]",
                "tdpbuud tmm1, tmm2, tmm4",
                "tdpbuud tmm6, tmm7, tmm4",
                w0 = in(reg) weights.as_ptr().add(t * TILE_VECTORS),
                w1 = in(reg) weights.as_ptr().add((TILES_PER_BLOCK + t) * TILE_VECTORS),
                h = in(reg) high,
                l = in(reg) high.add(TILE_VECTORS),
                s = in(reg) row_bytes,
                options(nostack),
            );
        }
        let second = products.as_mut_ptr().add(2 * TILE_VECTORS);
        asm!(
            "tilestored [{h0} + {s} * 1], tmm0",
            "tilestored [{l0} + {s} * 1], tmm1",
            "tilestored [{h1} + {s} * 1], tmm5",
            "tilestored [{l1} + {s} * 1], tmm6",
            h0 = in(reg) products.as_mut_ptr(),
            l0 = in(reg) products.as_mut_ptr().add(TILE_VECTORS),
            h1 = in(reg) second,
            l1 = in(reg) second.add(TILE_VECTORS),
            s = in(reg) row_bytes,
            options(nostack),
        );
    }
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

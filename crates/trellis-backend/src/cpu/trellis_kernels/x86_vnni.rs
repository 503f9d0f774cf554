//! mul1 products with integer dot products (AVX-512 VNNI): an approximation of the exact
//! kernels (see [`super::Isa`]), for one row (decode) and several (prefill, batched decode).
//!
//! mul1's weight is `w = fp16(A0 + S·b)` with `b` the byte sum of `s · 0x83DCD12D` (0…1020),
//! `S` its scale and `A0` its value at b = 0. Leaving out the fp16 rounding (at most half an
//! fp16 ulp: ≤ 2^-10 absolute, ~3·10^-4 of the weights' spread on average), a column's product
//! is `A0·Σa + S·Σ a_i·b_i`, and `Σ a_i·b_i` is an integer dot product once the activations
//! are integers. Each 128-row block of the (transformed) input row is quantized to int16 with
//! its own scale `s_k` (`a_i ≈ s_k·t_i`), so that
//!
//! ```text
//! y_c ≈ A0·Σa + S·Σ_k s_k·D_kc,   D_kc = Σ_{i∈k} t_i·b_ic   (exact in int32)
//!     = S·Σ_k s_k·D_kc + E,        E = (A0 + 510·S)·Σa − 510·S·Σ_k s_k·T_k,  T_k = Σ_{i∈k} t_i
//! ```
//!
//! The second form is the same number; it is written so because the activations' rounding
//! error then meets only the *centred* byte sums `b − 510` (zero mean, spread ~148), as an
//! f32 product's would, instead of `b` (mean 510), whose mean would multiply the error by ~3.5.
//! `E` is one constant per input row, computed with the exact `Σa`; so a NaN or infinity in the
//! input still reaches every output.
//!
//! Error: with `r = w − (A0 + S·b)` (|r| ≤ half an fp16 ulp ≤ 2^-10 since |w| < 4) and the
//! activations' rounding `|a_i − s_k·t_i| ≤ s_k/2 = max_k|a|/65534`, every column is off by at
//! most `2^-10·Σ|a| + 6.8·10^-3·Σ_k max_k|a|` (the second term: 128 rows × 510·S ×
//! max_k|a|/65534) plus f32 rounding. Typically the `r` are small, independent of the
//! activations and of each other, and the relative L2 error of an output vector is ~2·10^-4
//! (the tests bound it by 10^-3 on random inputs with outliers, on every width).
//!
//! Rows never mix: per block, each column's integer sum `D_kc` is exact and rounded once to f32
//! ([`block_columns`]), then folded with the block's scale in block order, in [`gemv`],
//! [`gemm`] and the AMX kernel alike; so a row's results are bit-equal whatever rows share the
//! product and whichever of them ran it (a sequence decodes the same alone or batched, which
//! the exact kernels also give, to f32 rounding). The GEMM computes each block's byte sums once
//! into L1, turned so that a row's `vpdpwssd` (its row pair broadcast) adds into lanes that are
//! columns, and runs one `vpdpwssd` per row and 32 weights.
//!
//! The kernel keeps the states' 16-bit lanes of the exact AVX-512 kernels: the byte sums come
//! out in 16-bit lanes (rows of two columns), and one `vpdpwssd` multiplies them by the 16-bit
//! activations and adds row pairs into 32-bit lanes (lanes 0…8 column g, 8…16 column g+8).
//! Per 32 weights: 2 instructions for the states, 7 for the byte sums and 1 dot product,
//! against ~19 for the exact decode, widen and FMA. The byte sums come in two forms with
//! identical results ([`Products`]), chosen per CPU: the multiply pipes bound this kernel, and
//! the two vendors' cores put a 32-bit multiply on them differently.
//!
//! Measured and left out: int8 activations, with two `vpdpbusd` on the product's halves in
//! place of the byte sums and `vpdpwssd`, run ~20 % faster still but leave ~0.6 % relative
//! error per product, which the tiny GLM fixtures amplify to ~1 % logit error in decode (3.6 %
//! at the worst step, over the tests' 1 % bound). Moving one `vpmaddubsw` (port 0) to a byte
//! shuffle (port 5) was 25 % slower on the Xeon; on the AMD EPYC box the byte sums by masks,
//! shifts and adds instead of `vpmaddubsw` were 12 % slower.

use super::layout::{CHUNK_ROW_ORDER, PackedTrellis, STRIP, group_stride};
use super::x86_avx512::{
    MUL1_AT_ZERO, MUL1_SCALE, Windows, group_states, mul1_byte_sum, prefetch_ahead,
};
use std::arch::x86_64::*;
use trellis_codec::codebook::MUL1_MULTIPLIER;
use trellis_codec::hadamard::HADAMARD_SIZE;

/// Tiles (16 rows each) per quantization block: one Hadamard block, whose values the rotation
/// has mixed, so they share a magnitude.
pub(super) const TILES_PER_BLOCK: usize = HADAMARD_SIZE / STRIP;

/// Largest |t|.
pub(super) const RANGE: f32 = 32767.0;

/// The mean of mul1's byte sum (4 bytes of mean 127.5), by which the sums are centred.
const BYTE_SUM_MEAN: f64 = 510.0;

/// Floats of prepared input for `tiles_k` tiles: per tile 32 activations in 16-bit lanes (its
/// 16 rows in `CHUNK_ROW_ORDER`, twice: once per column of a group), per block its scale
/// `S·s_k` lifted by the row's power of two ([`row_lift`]), then `E` and that power's inverse.
pub fn input_len(tiles_k: usize) -> usize {
    tiles_k * STRIP + tiles_k / TILES_PER_BLOCK + 2
}

/// How a 128-row block with largest magnitude `max` is quantized: the reciprocal to multiply
/// its values by (before [`RANGE`]) and its scale `s_k`. A zero block (padding) gets scale 0
/// and zero activations, and so does a block of subnormals, whose reciprocal would overflow
/// (its part of `E` stays exact). The reciprocal and the range are applied apart: RANGE / max
/// overflows below 1e-34.
pub(super) fn block_quantization(max: f32) -> (f32, f32) {
    if max >= f32::MIN_POSITIVE {
        (1.0 / max, max / RANGE)
    } else {
        (0.0, 0.0)
    }
}

/// `E` from the row's exact `Σa` and `Σ_k S·s_k·T_k`.
pub(super) fn row_constant(sum_a: f64, sum_st: f64) -> f32 {
    let centre = f64::from(MUL1_AT_ZERO) + BYTE_SUM_MEAN * f64::from(MUL1_SCALE);
    (centre * sum_a - BYTE_SUM_MEAN * sum_st) as f32
}

/// The power of two `2^k` by which a row's block scales are stored, and `2^-k`, by which its
/// sums are brought back: `k` makes the row's largest block scale about 1, so that the scales
/// of tiny activations (a block maximum of 1e-35 gives `S·s_k` ≈ 2·10^-42) are not subnormal
/// f32, which would cost them their precision. A power of two scales every f32 result exactly,
/// so rows of ordinary magnitude get the same results whatever `k` is.
pub(super) fn row_lift(row_max: f32) -> (f64, f32) {
    if !(row_max >= f32::MIN_POSITIVE && row_max.is_finite()) {
        return (1.0, 1.0);
    }
    let top = f64::from(row_max) / f64::from(RANGE) * f64::from(MUL1_SCALE);
    let k = (-top.log2().floor()).clamp(-126.0, 126.0) as i32;
    (2f64.powi(k), 2f32.powi(-k))
}

/// Quantize one row of transformed activations (`xh`, `k_padded` values) into `input`.
pub fn prepare_input(xh: &[f32], input: &mut [f32]) {
    assert!(std::arch::is_x86_feature_detected!("avx512f"));
    assert!(std::arch::is_x86_feature_detected!("avx512bw"));
    let tiles_k = xh.len() / STRIP;
    assert!(xh.len().is_multiple_of(HADAMARD_SIZE) && input.len() >= input_len(tiles_k));
    // SAFETY: the features were checked above and the lengths asserted.
    unsafe { prepare_input_avx512(xh, input) }
}

#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn prepare_input_avx512(xh: &[f32], input: &mut [f32]) {
    let tiles_k = xh.len() / STRIP;
    let blocks = tiles_k / TILES_PER_BLOCK;
    let (acts, rest) = input.split_at_mut(tiles_k * STRIP);
    let mut sum_a = 0.0f64;
    let mut sum_st = 0.0f64;
    // SAFETY: every load is of 16 floats inside `xh` (blocks · 128 = its length), every store
    // of 16 floats' worth inside `acts` (16 floats a tile); AVX-512F/BW are enabled here.
    unsafe {
        // Each block's largest magnitude (kept in its scale's slot until the scale is known)
        // and the row's sum; the largest of them sets the row's lift.
        for (b, block_max) in rest[..blocks].iter_mut().enumerate() {
            let x = xh.as_ptr().add(b * HADAMARD_SIZE);
            let mut max = _mm512_setzero_ps();
            let mut sum = _mm512_setzero_ps();
            for t in 0..TILES_PER_BLOCK {
                let v = _mm512_loadu_ps(x.add(t * STRIP));
                max = _mm512_max_ps(max, _mm512_abs_ps(v));
                sum = _mm512_add_ps(sum, v);
            }
            *block_max = _mm512_reduce_max_ps(max);
            sum_a += f64::from(_mm512_reduce_add_ps(sum));
        }
        let (lift, unlift) = row_lift(rest[..blocks].iter().fold(0.0f32, |m, &v| m.max(v)));
        rest[blocks + 1] = unlift;
        let order = _mm512_loadu_si512(CHUNK_ROW_ORDER.map(|r| r as u32).as_ptr().cast());
        for (b, block_scale_out) in rest[..blocks].iter_mut().enumerate() {
            let x = xh.as_ptr().add(b * HADAMARD_SIZE);
            let (recip, scale) = block_quantization(*block_scale_out);
            let recip = _mm512_set1_ps(recip);
            let range = _mm512_set1_ps(RANGE);
            let mut tsum = _mm512_setzero_si512();
            for t in 0..TILES_PER_BLOCK {
                let v = _mm512_permutexvar_ps(order, _mm512_loadu_ps(x.add(t * STRIP)));
                // Rounded to nearest (the default rounding mode); |q| ≤ RANGE but for a last-bit
                // excess, which the narrowing saturates.
                let q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_mul_ps(v, recip), range));
                tsum = _mm512_add_epi32(tsum, q);
                let half = _mm512_cvtsepi32_epi16(q);
                let both = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(half), half);
                let tile = b * TILES_PER_BLOCK + t;
                _mm512_storeu_si512(acts.as_mut_ptr().add(tile * STRIP).cast(), both);
            }
            let block_scale = f64::from(scale) * f64::from(MUL1_SCALE);
            *block_scale_out = (block_scale * lift) as f32;
            sum_st += block_scale * f64::from(_mm512_reduce_add_epi32(tsum));
        }
    }
    rest[blocks] = row_constant(sum_a, sum_st);
}

/// How mul1's byte sums of 32 states (16-bit lanes in, 16-bit lanes out) are computed; both
/// forms give the same integers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Products {
    /// `s·M` in 16-bit halves (two `vpmullw`, one `vpmulhuw`, an add), each half's two bytes
    /// summed by `vpmaddubsw` against ones, then added: 5 multiply-pipe instructions of 7.
    /// For Intel cores, where `vpmulld` is two µops on port 0, so that the widened form puts
    /// 7 µops a group there against 6: on the Intel Xeon dev box (`trellis_gemv`, 1 thread,
    /// weights in cache, 2048 × 1536 and 5120 × 2048, 3 and 4 bits) 20.3–20.8 G weights/s
    /// against 17.4–17.7 for the widened form.
    Halves,
    /// The even and odd states of each 32-bit lane taken apart by a mask and a shift,
    /// multiplied whole (`vpmulld`), and their four bytes summed by `vpdpbusd` against ones;
    /// the odd sums, shifted up 16 bits, are the even sums' accumulator, which puts both back
    /// in their 16-bit lanes: 4 multiply-pipe instructions of 7, and no shuffle. For AMD Zen 4
    /// and later, where `vpmulld` is one instruction on the two multiply pipes, which also run
    /// `vpmultishiftqb`, `vpdpwssd` and the shuffles: one-row products from memory ran 2–14 %
    /// faster than the halves on the AMD EPYC dev box (`trellis_gemv`, 2 threads, `--cold-mb
    /// 600`) with the states widened by two unpacks and packed back by `vpackusdw`; the mask
    /// and shift, which take those three shuffles off the multiply pipes, another 6 % on one
    /// thread from cache (16.3 → 17.3 G weights/s, 2048 × 1536 and 5120 × 2048, 3 and 4 bits).
    Widened,
}

impl Products {
    /// The form for this CPU: [`Products::Widened`] on AMD's, [`Products::Halves`] elsewhere,
    /// unless the environment variable `TRELLIS_CPU_PRODUCTS` names one (`halves`, `widened`),
    /// for measurements. Chosen once.
    pub fn selected() -> Products {
        static SELECTED: std::sync::OnceLock<Products> = std::sync::OnceLock::new();
        *SELECTED.get_or_init(|| {
            match std::env::var("TRELLIS_CPU_PRODUCTS").as_deref() {
                Ok("halves") => return Products::Halves,
                Ok("widened") => return Products::Widened,
                _ => {}
            }
            // Leaf 0: the vendor string, in EBX, EDX, ECX.
            let leaf = __cpuid(0);
            let vendor = [leaf.ebx, leaf.edx, leaf.ecx]
                .map(u32::to_le_bytes)
                .concat();
            if vendor == b"AuthenticAMD" {
                Products::Widened
            } else {
                Products::Halves
            }
        })
    }
}

/// mul1's byte sums (0..1020) of 32 states in the form `WIDENED` says ([`Products`]).
///
/// # Safety
/// AVX-512F/BW/VNNI must be available.
#[inline(always)]
unsafe fn byte_sums<const WIDENED: bool>(states: __m512i) -> __m512i {
    // SAFETY: plain AVX-512BW/VNNI arithmetic.
    unsafe {
        if !WIDENED {
            return mul1_byte_sum(states);
        }
        let multiplier = _mm512_set1_epi32(MUL1_MULTIPLIER as i32);
        let ones = _mm512_set1_epi8(1);
        let even = _mm512_and_si512(states, _mm512_set1_epi32(0xffff));
        let odd = _mm512_srli_epi32::<16>(states);
        let even = _mm512_mullo_epi32(even, multiplier);
        let odd = _mm512_mullo_epi32(odd, multiplier);
        // Each sum is below 2^10: the odd state's, shifted up, is the even one's accumulator.
        let odd_sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), odd, ones);
        _mm512_dpbusd_epi32(_mm512_slli_epi32::<16>(odd_sums), even, ones)
    }
}

/// One group of one tile into its 32-bit accumulator.
///
/// # Safety
/// As `group_states`, plus AVX512-VNNI.
#[inline(always)]
unsafe fn group<const G: usize, const WIDENED: bool>(
    tile: *const u8,
    stride: usize,
    tile_bytes: usize,
    w: &Windows,
    x: __m512i,
    acc: &mut [__m512i; 8],
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        let states = group_states::<G>(tile, stride, tile_bytes, w);
        acc[G] = _mm512_dpwssd_epi32(acc[G], byte_sums::<WIDENED>(states), x);
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni")]
unsafe fn gemv_vnni<const WIDENED: bool>(
    p: &PackedTrellis,
    input: &[f32],
    strips: std::ops::Range<usize>,
    z: &mut [f32],
) {
    let w = Windows::of(p);
    let (tile_bytes, stride) = (p.tile_bytes, group_stride(p.tile_bytes));
    let tiles_k = p.tiles_k();
    let blocks = tiles_k / TILES_PER_BLOCK;
    assert!(input.len() >= input_len(tiles_k) && z.len() >= strips.len() * STRIP);
    assert!(strips.end <= p.strips());
    let acts = input.as_ptr();
    let (scales, rest) = input[tiles_k * STRIP..].split_at(blocks);
    let (e, unlift) = (rest[0], rest[1]);
    for (strip, zs) in strips.zip(z.chunks_exact_mut(STRIP)) {
        // SAFETY: tiles of strips below `p.strips()` lie inside the stream, whose pads cover
        // the vector loads around them; `input` has 16 floats per tile (asserted above).
        unsafe {
            let mut sums = _mm512_setzero_ps();
            let mut tile = p.stream().as_ptr().add(p.tile_offset(strip, 0));
            for (b, &scale) in scales.iter().enumerate() {
                // |D| per lane per tile ≤ 2·32767·1020 < 2^26: a block of 8 tiles stays
                // far inside int32.
                let mut acc = [_mm512_setzero_si512(); 8];
                for t in 0..TILES_PER_BLOCK {
                    prefetch_ahead(tile, tile_bytes);
                    let x = _mm512_loadu_si512(acts.add((b * TILES_PER_BLOCK + t) * STRIP).cast());
                    group::<0, WIDENED>(tile, stride, tile_bytes, &w, x, &mut acc);
                    group::<1, WIDENED>(tile, stride, tile_bytes, &w, x, &mut acc);
                    group::<2, WIDENED>(tile, stride, tile_bytes, &w, x, &mut acc);
                    group::<3, WIDENED>(tile, stride, tile_bytes, &w, x, &mut acc);
                    group::<4, WIDENED>(tile, stride, tile_bytes, &w, x, &mut acc);
                    group::<5, WIDENED>(tile, stride, tile_bytes, &w, x, &mut acc);
                    group::<6, WIDENED>(tile, stride, tile_bytes, &w, x, &mut acc);
                    group::<7, WIDENED>(tile, stride, tile_bytes, &w, x, &mut acc);
                    tile = tile.add(tile_bytes);
                }
                sums = _mm512_fmadd_ps(block_columns(&acc), _mm512_set1_ps(scale), sums);
            }
            finish(sums, e, unlift, zs);
        }
    }
}

/// Each column's block sum `D` (exact, then rounded once to f32), in column order, from the
/// 8 group accumulators (lanes 0..8: column g's row pairs; 8..16: column g+8's).
///
/// Every product path folds a block through this one rounding of the exact integer, so that
/// they agree bit for bit whatever order their integer sums ran in (the AMX kernel's
/// differs). Four row pairs stay inside int32 (|D| ≤ 64·32767·1020 < 2^31); the last sum of
/// two such halves runs in f64, where it is exact.
///
/// # Safety
/// AVX-512F must be available.
#[inline(always)]
pub(super) unsafe fn block_columns(acc: &[__m512i; 8]) -> __m512 {
    // SAFETY: plain AVX-512F shuffles, adds and conversions.
    unsafe {
        // Per 128-bit lane of a pair (a, b): [a0+a2, b0+b2, a1+a3, b1+b3].
        let pair = |a: __m512i, b: __m512i| {
            _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b))
        };
        let (u01, u23) = (pair(acc[0], acc[1]), pair(acc[2], acc[3]));
        let (u45, u67) = (pair(acc[4], acc[5]), pair(acc[6], acc[7]));
        // Per 128-bit lane: columns (g, g+1, g+2, g+3) summed over the lane's 4 row pairs;
        // lanes 0, 1: g = 0 (pairs 0..4, 4..8); lanes 2, 3: g = 8.
        let quad = |a: __m512i, b: __m512i| {
            _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b))
        };
        let (low, high) = (quad(u01, u23), quad(u45, u67));
        // Columns 0..16 in order, over pairs 0..4 (`first`) and 4..8 (`second`).
        let first_idx = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27);
        let second_idx =
            _mm512_setr_epi32(4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
        let first = _mm512_permutex2var_epi32(low, first_idx, high);
        let second = _mm512_permutex2var_epi32(low, second_idx, high);
        rounded_sums(first, 1.0, second)
    }
}

/// `weight·a + b` per lane of two int32 vectors (exact in f64 for `weight` 1 or 256), rounded
/// once to f32: how every product path turns a block's integer column sums into floats.
///
/// # Safety
/// AVX-512F must be available.
#[inline(always)]
unsafe fn rounded_sums(a: __m512i, weight: f64, b: __m512i) -> __m512 {
    // SAFETY: plain AVX-512F conversions and arithmetic.
    unsafe {
        let half = |a: __m256i, b: __m256i| {
            _mm512_cvtpd_ps(_mm512_fmadd_pd(
                _mm512_cvtepi32_pd(a),
                _mm512_set1_pd(weight),
                _mm512_cvtepi32_pd(b),
            ))
        };
        let low = half(_mm512_castsi512_si256(a), _mm512_castsi512_si256(b));
        let high = half(
            _mm512_extracti64x4_epi64::<1>(a),
            _mm512_extracti64x4_epi64::<1>(b),
        );
        let low = _mm512_castpd256_pd512(_mm256_castps_pd(low));
        _mm512_castpd_ps(_mm512_insertf64x4::<1>(low, _mm256_castps_pd(high)))
    }
}

/// 16 columns' block sums `D = 256·high + low` (exact in f64), each rounded once to f32: the
/// AMX kernel's two accumulators of one column, lane = token.
///
/// # Safety
/// AVX-512F must be available.
#[inline(always)]
pub(super) unsafe fn block_columns_f64_pair(high: __m512i, low: __m512i) -> __m512 {
    // SAFETY: AVX-512F is available (the caller's contract).
    unsafe { rounded_sums(high, 256.0, low) }
}

/// One tile's byte sums turned for many-row products: `groups[g]` holds column g's row pairs
/// in dwords 0..8 and column g+8's in 8..16 (as [`byte_sums`] leaves them); vector p of the
/// result holds row pair p of every column, dword c being column c. A row's `vpdpwssd` with
/// its pair p broadcast then adds into lanes that are columns, so that a block's column sums
/// need no shuffles (see [`pair_columns`]).
///
/// # Safety
/// AVX-512F must be available.
#[inline(always)]
unsafe fn pairs_by_column(groups: [__m512i; 8]) -> [__m512i; 8] {
    // SAFETY: plain AVX-512F shuffles.
    unsafe {
        let [g0, g1, g2, g3, g4, g5, g6, g7] = groups;
        // Per 128-bit lane k and m in 0..4: column j = 4k + m (dword j) of four groups.
        let quarter = |a: __m512i, b: __m512i, c: __m512i, d: __m512i| {
            let (ab_lo, ab_hi) = (_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
            let (cd_lo, cd_hi) = (_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
            [
                _mm512_unpacklo_epi64(ab_lo, cd_lo),
                _mm512_unpackhi_epi64(ab_lo, cd_lo),
                _mm512_unpacklo_epi64(ab_hi, cd_hi),
                _mm512_unpackhi_epi64(ab_hi, cd_hi),
            ]
        };
        let first = quarter(g0, g1, g2, g3);
        let second = quarter(g4, g5, g6, g7);
        // Pair p = 4k + m: lanes k and k + 2 (dwords p and p + 8) of both quarters.
        let lanes_0 = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13);
        let lanes_1 = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
        std::array::from_fn(|p| {
            let idx = if p < 4 { lanes_0 } else { lanes_1 };
            _mm512_permutex2var_epi64(first[p % 4], idx, second[p % 4])
        })
    }
}

/// One block of two rows (one row without `TWO`, `second` then unread) against a block of
/// [`pairs_by_column`] sums: per row, 8 accumulators (one per row pair) whose lanes are the 16
/// columns.
///
/// # Safety
/// AVX-512F/VNNI must be available; the inputs read must hold block `b`'s 8 tiles.
#[inline(always)]
unsafe fn pair_products<const TWO: bool>(
    bs: &[__m512i],
    first: *const f32,
    second: *const f32,
    b: usize,
) -> ([__m512i; 8], [__m512i; 8]) {
    // SAFETY: the caller guarantees the inputs; `bs` holds a block's 64 vectors.
    unsafe {
        let mut acc = ([_mm512_setzero_si512(); 8], [_mm512_setzero_si512(); 8]);
        for t in 0..TILES_PER_BLOCK {
            let at = (b * TILES_PER_BLOCK + t) * STRIP;
            let x0 = first.add(at).cast::<i32>();
            for p in 0..8 {
                let v = bs[t * 8 + p];
                acc.0[p] = _mm512_dpwssd_epi32(acc.0[p], v, _mm512_set1_epi32(*x0.add(p)));
                if TWO {
                    let x1 = second.add(at).cast::<i32>();
                    acc.1[p] = _mm512_dpwssd_epi32(acc.1[p], v, _mm512_set1_epi32(*x1.add(p)));
                }
            }
        }
        acc
    }
}

/// [`block_columns`] of [`pair_products`]' accumulators: the same f32 values, since both
/// round the exact block sum once (four accumulators are 64 rows, inside int32:
/// 64·32768·1020 < 2^31).
///
/// # Safety
/// AVX-512F must be available.
#[inline(always)]
unsafe fn pair_columns(acc: &[__m512i; 8]) -> __m512 {
    // SAFETY: plain AVX-512F adds; `rounded_sums` needs only AVX-512F.
    unsafe {
        let add4 = |a: &[__m512i]| {
            _mm512_add_epi32(_mm512_add_epi32(a[0], a[1]), _mm512_add_epi32(a[2], a[3]))
        };
        rounded_sums(add4(&acc[..4]), 1.0, add4(&acc[4..]))
    }
}

/// Rows whose running sums (a vector each) a GEMM pass keeps in task scratch while one block's
/// byte sums stay in L1.
const GEMM_ROW_BLOCK: usize = 64;

/// Vectors of byte sums of one block of one strip (8 tiles × 8 groups).
const BLOCK_GROUPS: usize = TILES_PER_BLOCK * 8;

/// Several rows: each block's byte sums are computed once into `bs`, turned by
/// [`pairs_by_column`], and multiplied into every row, two rows at a time. Every row gets the
/// same exact integer block sums as in [`gemv_vnni`], rounded once and folded in the same
/// order, so its results equal a one-row product's bit for bit: a sequence decodes the same
/// alone or batched. Turning the sums costs 24 shuffles a tile once for all rows; it saves
/// each row the ~30 shuffles and adds a block of [`block_columns`] takes (`trellis_gemv`,
/// one thread, AMD EPYC: 2048 × 1536 at 32 rows 1.53 → 1.25–1.29 ms, 5120 × 2048 at 256 rows
/// 43.3 → 33.0–34.2 ms).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni")]
unsafe fn gemm_vnni<const WIDENED: bool>(
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
    let block_rows = rows.min(GEMM_ROW_BLOCK);
    assert!(input_stride >= input_len(tiles_k) && rows > 0);
    assert!(inputs.len() >= (rows - 1) * input_stride + input_len(tiles_k));
    assert!(z.len() >= strips.len() * rows * STRIP && strips.end <= p.strips());
    assert!(scratch.len() >= BLOCK_GROUPS + block_rows);
    let (bs, sums) = scratch.split_at_mut(BLOCK_GROUPS);
    for (strip, zs) in strips.zip(z.chunks_exact_mut(rows * STRIP)) {
        for row0 in (0..rows).step_by(GEMM_ROW_BLOCK) {
            let block_rows = GEMM_ROW_BLOCK.min(rows - row0);
            let sums = &mut sums[..block_rows];
            sums.fill(_mm512_setzero_si512());
            // SAFETY: tiles of strips below `p.strips()` lie inside the stream, whose pads
            // cover the vector loads around them; every row's input has `input_len` floats
            // (asserted above); `bs` and `sums` are vectors of scratch.
            unsafe {
                let mut tile = p.stream().as_ptr().add(p.tile_offset(strip, 0));
                for b in 0..blocks {
                    for t in 0..TILES_PER_BLOCK {
                        let groups = [
                            byte_sums::<WIDENED>(group_states::<0>(tile, stride, tile_bytes, &w)),
                            byte_sums::<WIDENED>(group_states::<1>(tile, stride, tile_bytes, &w)),
                            byte_sums::<WIDENED>(group_states::<2>(tile, stride, tile_bytes, &w)),
                            byte_sums::<WIDENED>(group_states::<3>(tile, stride, tile_bytes, &w)),
                            byte_sums::<WIDENED>(group_states::<4>(tile, stride, tile_bytes, &w)),
                            byte_sums::<WIDENED>(group_states::<5>(tile, stride, tile_bytes, &w)),
                            byte_sums::<WIDENED>(group_states::<6>(tile, stride, tile_bytes, &w)),
                            byte_sums::<WIDENED>(group_states::<7>(tile, stride, tile_bytes, &w)),
                        ];
                        bs[t * 8..t * 8 + 8].copy_from_slice(&pairs_by_column(groups));
                        tile = tile.add(tile_bytes);
                    }
                    let bs: &[__m512i] = bs;
                    let input = |r: usize| inputs.as_ptr().add((row0 + r) * input_stride);
                    let fold = |row_sums: &mut __m512i, acc: &[__m512i; 8], r: usize| {
                        let scale = _mm512_set1_ps(*input(r).add(tiles_k * STRIP + b));
                        let sum = _mm512_castsi512_ps(*row_sums);
                        let sum = _mm512_fmadd_ps(pair_columns(acc), scale, sum);
                        *row_sums = _mm512_castps_si512(sum);
                    };
                    // Two rows at a time share each vector of byte sums.
                    let mut r = 0;
                    for pair in sums.chunks_exact_mut(2) {
                        let (a, b_acc) = pair_products::<true>(bs, input(r), input(r + 1), b);
                        fold(&mut pair[0], &a, r);
                        fold(&mut pair[1], &b_acc, r + 1);
                        r += 2;
                    }
                    if r < block_rows {
                        let (a, _) = pair_products::<false>(bs, input(r), input(r), b);
                        fold(&mut sums[r], &a, r);
                    }
                }
                for (r, row_sums) in sums.iter().enumerate() {
                    let tail = inputs
                        .as_ptr()
                        .add((row0 + r) * input_stride + tiles_k * STRIP);
                    let (e, unlift) = (*tail.add(blocks), *tail.add(blocks + 1));
                    let zr = &mut zs[(row0 + r) * STRIP..(row0 + r + 1) * STRIP];
                    finish(_mm512_castsi512_ps(*row_sums), e, unlift, zr);
                }
            }
        }
    }
}

/// A strip's 16 outputs from its running sums (one lane per column, lifted by the row's power
/// of two, see [`row_lift`]).
///
/// # Safety
/// AVX-512F must be available.
#[inline(always)]
unsafe fn finish(sums: __m512, e: f32, unlift: f32, z: &mut [f32]) {
    assert!(z.len() >= STRIP);
    // SAFETY: a 16-float store into `z`, whose length was asserted.
    unsafe {
        let sums = _mm512_mul_ps(sums, _mm512_set1_ps(unlift));
        _mm512_storeu_ps(z.as_mut_ptr(), _mm512_add_ps(sums, _mm512_set1_ps(e)))
    }
}

/// Vectors of task scratch [`gemm`] needs for `rows` rows.
pub fn gemm_scratch_vectors(rows: usize) -> usize {
    BLOCK_GROUPS + rows.min(GEMM_ROW_BLOCK)
}

/// The mul1 product of several rows (`inputs` holds each one's [`prepare_input`], `input_stride`
/// floats apart) over `strips`, `z` getting `[strip][row][16]`; `scratch` holds at least
/// [`gemm_scratch_vectors`] 64-byte-aligned vectors.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    p: &PackedTrellis,
    inputs: &[f32],
    input_stride: usize,
    rows: usize,
    strips: std::ops::Range<usize>,
    z: &mut [f32],
    scratch: &mut [f32],
    products: Products,
) {
    assert!(p.codebook == trellis_codec::Codebook::Mul1);
    assert!(super::Isa::Avx512Vnni.is_supported());
    // SAFETY: `__m512i` is plain bits.
    let scratch = unsafe { super::float_vectors::<__m512i>(scratch) };
    // SAFETY: the level's features (which include every one enabled on the kernel) were
    // checked just above.
    unsafe {
        match products {
            Products::Halves => {
                gemm_vnni::<false>(p, inputs, input_stride, rows, strips, z, scratch)
            }
            Products::Widened => {
                gemm_vnni::<true>(p, inputs, input_stride, rows, strips, z, scratch)
            }
        }
    }
}

/// The one-row mul1 product over `strips` from an input made by [`prepare_input`] (see
/// `scalar::gemv` for `z`).
pub fn gemv(
    p: &PackedTrellis,
    input: &[f32],
    strips: std::ops::Range<usize>,
    z: &mut [f32],
    products: Products,
) {
    assert!(p.codebook == trellis_codec::Codebook::Mul1);
    assert!(super::Isa::Avx512Vnni.is_supported());
    // SAFETY: the level's features (which include every one enabled on the kernel) were
    // checked just above.
    unsafe {
        match products {
            Products::Halves => gemv_vnni::<false>(p, input, strips, z),
            Products::Widened => gemv_vnni::<true>(p, input, strips, z),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};
    use trellis_codec::{BitWidth, Codebook};

    /// Both forms of the byte sums agree with mul1's definition on every 16-bit state.
    #[test]
    fn both_byte_sum_forms_are_exact_for_every_state() {
        if !super::super::Isa::Avx512Vnni.is_supported() {
            eprintln!("no AVX-512 VNNI on this CPU");
            return;
        }
        #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
        unsafe fn sums<const WIDENED: bool>(states: &[u16; 32]) -> [u16; 32] {
            // SAFETY: 64-byte unaligned loads and stores of 32 u16; the features are enabled.
            unsafe {
                let v = byte_sums::<WIDENED>(_mm512_loadu_si512(states.as_ptr().cast()));
                let mut out = [0u16; 32];
                _mm512_storeu_si512(out.as_mut_ptr().cast(), v);
                out
            }
        }
        for first in (0..=u16::MAX).step_by(32) {
            let states: [u16; 32] = std::array::from_fn(|i| first + i as u16);
            let want = states.map(|s| {
                let x = u32::from(s).wrapping_mul(MUL1_MULTIPLIER);
                x.to_le_bytes().iter().map(|&b| u16::from(b)).sum::<u16>()
            });
            // SAFETY: the features were checked at the start of the test.
            let (halves, widened) = unsafe { (sums::<false>(&states), sums::<true>(&states)) };
            assert_eq!(halves, want, "16-bit halves, states {first}…");
            assert_eq!(widened, want, "widened, states {first}…");
        }
    }

    /// One-row and several-row products are bit-equal in both forms, at every width.
    #[test]
    fn both_forms_give_identical_products() {
        if !super::super::Isa::Avx512Vnni.is_supported() {
            eprintln!("no AVX-512 VNNI on this CPU");
            return;
        }
        let mut rng = StdRng::seed_from_u64(5);
        for bits in BitWidth::ALL {
            let t =
                trellis_testutil::random_trellis(&mut rng, 300, 260, bits, Codebook::Mul1, false);
            let p = PackedTrellis::new(&t);
            let (rows, k, strips) = (3, p.k_padded, p.strips());
            let len = input_len(p.tiles_k());
            let mut inputs = vec![0.0f32; rows * len];
            for input in inputs.chunks_exact_mut(len) {
                let xh: Vec<f32> = (0..k).map(|_| rng.random_range(-1.0..1.0)).collect();
                prepare_input(&xh, input);
            }
            let mut scratch = vec![0.0f32; 16 * gemm_scratch_vectors(rows) + 16];
            let skip = scratch.as_ptr().align_offset(64);
            let [halves, widened] = [Products::Halves, Products::Widened].map(|products| {
                let mut one = vec![f32::NAN; strips * STRIP];
                gemv(&p, &inputs[..len], 0..strips, &mut one, products);
                let mut many = vec![f32::NAN; strips * rows * STRIP];
                let scratch = &mut scratch[skip..];
                gemm(
                    &p,
                    &inputs,
                    len,
                    rows,
                    0..strips,
                    &mut many,
                    scratch,
                    products,
                );
                (one, many)
            });
            assert!(halves.0.iter().all(|v| v.is_finite()), "K {bits}: finite");
            assert!(halves.0 == widened.0, "K {bits}: one-row products differ");
            assert!(
                halves.1 == widened.1,
                "K {bits}: several-row products differ"
            );
        }
    }
}

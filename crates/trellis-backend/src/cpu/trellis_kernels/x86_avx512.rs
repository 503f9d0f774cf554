//! AVX-512 kernels: one vector per group of 32 trellis positions (two output columns).
//!
//! States: 64 bytes are loaded from the group's start (the layout makes the picture the
//! same for every group). One `vpermb` gives each 64-bit lane the 8 stream bytes that hold
//! its 4 consecutive positions, byte-reversed so that the stream reads from the lane's top
//! bit down, and one `vpmultishiftqb` cuts each position's 16-bit window out of its lane.
//! Lanes 0..16 are column g and lanes 16..32 column g+8, rows in `CHUNK_ROW_ORDER`.
//! Group 0 takes the ring's last two bytes from a second load of the tile's end through a
//! two-table `vpermi2b`.
//!
//! Codebooks run on the 32 states in 16-bit lanes: the 32-bit multiply `s · M` is split into
//! 16-bit halves (`lo = s·M_lo`, `hi = s·M_hi + high(s·M_lo)`), which are exactly the two
//! fp16 halves of 3INST/mcg and the byte pairs of mul1's byte sum.

use super::Isa;
use super::layout::{
    GROUPS, GroupTables, PackedTrellis, PerWidth, STRIP, chunk_order_position, group_stride,
    per_width, per_width_cache,
};
use std::arch::x86_64::*;
use trellis_codec::codebook::{MCG_MULTIPLIER, MUL1_MULTIPLIER};
use trellis_codec::{BitWidth, TILE_WEIGHTS};

/// Byte permutations and multishift controls of one bit width (see the module docs).
struct StateTables {
    /// Indices into the group's 64-byte load.
    gather: [u8; 64],
    /// The same for group 0, whose first two bytes come from the second table (the load of
    /// the tile's last 64 bytes): indices 126 and 127.
    gather_first: [u8; 64],
    /// Per 16-bit lane, the bit offsets of its state's low and high byte in its 64-bit lane.
    cut: [u8; 64],
}

impl StateTables {
    fn compute(bits: BitWidth) -> StateTables {
        let starts = GroupTables::of(bits);
        let mut t = StateTables {
            gather: [0; 64],
            gather_first: [0; 64],
            cut: [0; 64],
        };
        for lane64 in 0..8 {
            let (half, chunk) = (lane64 / 4, lane64 % 4);
            let first = chunk_order_position(half, 4 * chunk);
            let base = usize::from(starts.start_byte[first]);
            for m in 0..8 {
                // Lane byte m (little-endian) is stream byte base + 7 − m: stream bit
                // 8·base + b is lane bit 63 − b.
                let index = base + 7 - m;
                assert!(index < 64, "4 positions fit in the group load");
                t.gather[8 * lane64 + m] = index as u8;
                t.gather_first[8 * lane64 + m] = if index < 2 { 126 + index } else { index } as u8;
            }
            for j in 0..4 {
                let p = first + j;
                debug_assert_eq!(p, chunk_order_position(half, 4 * chunk + j));
                let offset = 8 * (usize::from(starts.start_byte[p]) - base)
                    + usize::from(starts.start_bit[p]);
                // Window bits b = offset … offset+15 are lane bits 63−offset … 48−offset;
                // the state's low byte starts at lane bit 48 − offset.
                let lane16 = 4 * lane64 + j;
                t.cut[2 * lane16] = (48 - offset) as u8;
                t.cut[2 * lane16 + 1] = (56 - offset) as u8;
            }
        }
        t
    }

    fn of(bits: BitWidth) -> &'static StateTables {
        static TABLES: PerWidth<StateTables> = per_width_cache();
        per_width(&TABLES, bits, StateTables::compute)
    }
}

/// Loop-invariant index vectors of one bit width.
#[derive(Clone, Copy)]
pub(super) struct Windows {
    gather: __m512i,
    gather_first: __m512i,
    cut: __m512i,
}

impl Windows {
    #[inline(always)]
    pub(super) fn of(p: &PackedTrellis) -> Windows {
        let t = StateTables::of(p.bits);
        // SAFETY: unaligned loads of 64-byte arrays; callers run with AVX-512F available.
        unsafe {
            Windows {
                gather: _mm512_loadu_si512(t.gather.as_ptr().cast()),
                gather_first: _mm512_loadu_si512(t.gather_first.as_ptr().cast()),
                cut: _mm512_loadu_si512(t.cut.as_ptr().cast()),
            }
        }
    }
}

/// The 32 states of group `G` of the tile at `tile` (16-bit lanes, see the module docs).
///
/// # Safety
/// AVX-512F/BW/VBMI must be available; `tile + tile_bytes − 64 …` and
/// `tile − 2 … tile + G·stride + 62` must be readable (the stream's pads guarantee it).
#[inline(always)]
pub(super) unsafe fn group_states<const G: usize>(
    tile: *const u8,
    stride: usize,
    tile_bytes: usize,
    w: &Windows,
) -> __m512i {
    // SAFETY: the caller guarantees the ranges are readable and the features present.
    unsafe {
        let v = _mm512_loadu_si512(tile.add(G * stride).sub(2).cast());
        let lanes = if G == 0 {
            // The ring closes: the two bytes before the tile's first are its last two.
            let end = _mm512_loadu_si512(tile.add(tile_bytes).sub(64).cast());
            _mm512_permutex2var_epi8(v, w.gather_first, end)
        } else {
            _mm512_permutexvar_epi8(w.gather, v)
        };
        _mm512_multishift_epi64_epi8(w.cut, lanes)
    }
}

/// Maps 32 states (16-bit lanes) to the f32 weights of the group's two columns.
trait Codebook512 {
    /// # Safety
    /// The features of the level the implementation belongs to must be available.
    unsafe fn columns(states: __m512i) -> (__m512, __m512);
}

/// The low and high 16 bits of `s · M` (mod 2^32) for 16-bit `s`.
///
/// # Safety
/// AVX-512BW must be available.
#[inline(always)]
pub(super) unsafe fn mul_halves(s: __m512i, m: u32) -> (__m512i, __m512i) {
    // SAFETY: plain AVX-512BW arithmetic.
    unsafe {
        let m_lo = _mm512_set1_epi16(m as u16 as i16);
        let m_hi = _mm512_set1_epi16((m >> 16) as u16 as i16);
        let lo = _mm512_mullo_epi16(s, m_lo);
        let hi = _mm512_add_epi16(_mm512_mulhi_epu16(s, m_lo), _mm512_mullo_epi16(s, m_hi));
        (lo, hi)
    }
}

/// The low and high halves of 3INST's `s · 89226354 + 64248484`, carry included.
///
/// # Safety
/// AVX-512BW must be available.
#[inline(always)]
unsafe fn inst3_halves(s: __m512i) -> (__m512i, __m512i) {
    const MULTIPLIER: u32 = 89_226_354;
    const ADDEND: u32 = 64_248_484;
    // SAFETY: plain AVX-512BW arithmetic.
    unsafe {
        let (lo, hi) = mul_halves(s, MULTIPLIER);
        let add_lo = _mm512_set1_epi16(ADDEND as u16 as i16);
        let add_hi = _mm512_set1_epi16((ADDEND >> 16) as u16 as i16);
        let lo = _mm512_add_epi16(lo, add_lo);
        let carry = _mm512_cmplt_epu16_mask(lo, add_lo);
        let hi = _mm512_add_epi16(hi, add_hi);
        let hi = _mm512_mask_sub_epi16(hi, carry, hi, _mm512_set1_epi16(-1));
        (lo, hi)
    }
}

/// `(x AND 0x8FFF) XOR 0x3B60` on every 16-bit lane: each half becomes a finite fp16.
///
/// # Safety
/// AVX-512F must be available.
#[inline(always)]
unsafe fn inst_mask(x: __m512i) -> __m512i {
    // SAFETY: plain AVX-512F bit logic.
    unsafe {
        // Truth table of (a AND b) XOR c over (a, b, c) = (x, mask, xor).
        const AND_XOR: i32 = 0x6A;
        _mm512_ternarylogic_epi32::<AND_XOR>(
            x,
            _mm512_set1_epi16(0x8FFF_u16 as i16),
            _mm512_set1_epi16(0x3B60),
        )
    }
}

/// mul1's byte sum of `s · 0x83DCD12D` per 16-bit lane (0..1020).
///
/// # Safety
/// AVX-512BW must be available.
#[inline(always)]
pub(super) unsafe fn mul1_byte_sum(s: __m512i) -> __m512i {
    // SAFETY: plain AVX-512BW arithmetic.
    unsafe {
        let (lo, hi) = mul_halves(s, MUL1_MULTIPLIER);
        let ones = _mm512_set1_epi8(1);
        _mm512_add_epi16(
            _mm512_maddubs_epi16(lo, ones),
            _mm512_maddubs_epi16(hi, ones),
        )
    }
}

/// mul1's fp16 constants: 1024.0 (whose ulp is 1, so `0x6400 + b` is the bit pattern of
/// `1024 + b`), the scale (≈ 1/147.8) and the offset of its single FMA.
const MUL1_BASE_BITS: i16 = 0x6400;
const MUL1_SCALE_BITS: i16 = 0x1EEE;
const MUL1_OFFSET_BITS: i16 = 0xC931_u16 as i16;
/// The same map in f32: `fma(b, scale, value at b = 0)`. `1024·scale + offset = −3.453125`
/// is exact, so this is the reference's exact sum before its one rounding.
pub(super) const MUL1_SCALE: f32 = 1774.0 / 262_144.0;
pub(super) const MUL1_AT_ZERO: f32 = -3.453125;

/// Round f32 values to the nearest fp16 (ties to even) and widen them back, exactly.
///
/// # Safety
/// AVX-512F must be available.
#[inline(always)]
unsafe fn round_to_f16(v: __m512) -> __m512 {
    // SAFETY: plain AVX-512F conversions.
    unsafe { _mm512_cvtph_ps(_mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v)) }
}

/// The two columns of 32 fp16 values (16-bit lanes) widened to f32.
///
/// # Safety
/// AVX-512F must be available.
#[inline(always)]
unsafe fn widen(h: __m512i) -> (__m512, __m512) {
    // SAFETY: plain AVX-512F conversions.
    unsafe {
        (
            _mm512_cvtph_ps(_mm512_castsi512_si256(h)),
            _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(h)),
        )
    }
}

struct Mul1Fp16;
impl Codebook512 for Mul1Fp16 {
    #[inline(always)]
    unsafe fn columns(states: __m512i) -> (__m512, __m512) {
        // SAFETY: the caller runs with AVX-512BW and AVX512-FP16 available.
        unsafe {
            let h = _mm512_add_epi16(mul1_byte_sum(states), _mm512_set1_epi16(MUL1_BASE_BITS));
            let w = _mm512_fmadd_ph(
                _mm512_castsi512_ph(h),
                _mm512_castsi512_ph(_mm512_set1_epi16(MUL1_SCALE_BITS)),
                _mm512_castsi512_ph(_mm512_set1_epi16(MUL1_OFFSET_BITS)),
            );
            widen(_mm512_castph_si512(w))
        }
    }
}

struct Mul1F32;
impl Codebook512 for Mul1F32 {
    #[inline(always)]
    unsafe fn columns(states: __m512i) -> (__m512, __m512) {
        // SAFETY: the caller runs with AVX-512BW available.
        unsafe {
            let sum = mul1_byte_sum(states);
            let scale = _mm512_set1_ps(MUL1_SCALE);
            let at_zero = _mm512_set1_ps(MUL1_AT_ZERO);
            // b·scale + value(0) is exact in f32 (an integer below 2^21 times 2^-18).
            let affine = |half: __m256i| {
                let b = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(half));
                round_to_f16(_mm512_fmadd_ps(b, scale, at_zero))
            };
            (
                affine(_mm512_castsi512_si256(sum)),
                affine(_mm512_extracti64x4_epi64::<1>(sum)),
            )
        }
    }
}

/// 3INST / mcg: the masked halves are fp16 values; their sum rounded once to fp16.
struct InstFp16<const MCG: bool>;
impl<const MCG: bool> Codebook512 for InstFp16<MCG> {
    #[inline(always)]
    unsafe fn columns(states: __m512i) -> (__m512, __m512) {
        // SAFETY: the caller runs with AVX-512BW and AVX512-FP16 available.
        unsafe {
            let (lo, hi) = if MCG {
                mul_halves(states, MCG_MULTIPLIER)
            } else {
                inst3_halves(states)
            };
            let sum = _mm512_add_ph(
                _mm512_castsi512_ph(inst_mask(lo)),
                _mm512_castsi512_ph(inst_mask(hi)),
            );
            widen(_mm512_castph_si512(sum))
        }
    }
}

struct InstF32<const MCG: bool>;
impl<const MCG: bool> Codebook512 for InstF32<MCG> {
    #[inline(always)]
    unsafe fn columns(states: __m512i) -> (__m512, __m512) {
        // SAFETY: the caller runs with AVX-512BW available.
        unsafe {
            let (lo, hi) = if MCG {
                mul_halves(states, MCG_MULTIPLIER)
            } else {
                inst3_halves(states)
            };
            let (lo0, lo1) = widen(inst_mask(lo));
            let (hi0, hi1) = widen(inst_mask(hi));
            // Two fp16 values within a factor 16 of each other sum exactly in f32.
            (
                round_to_f16(_mm512_add_ps(lo0, hi0)),
                round_to_f16(_mm512_add_ps(lo1, hi1)),
            )
        }
    }
}

/// One group of one tile into the GEMV accumulators.
///
/// # Safety
/// As [`group_states`], plus the codebook's features.
#[inline(always)]
unsafe fn gemv_group<C: Codebook512, const G: usize>(
    tile: *const u8,
    stride: usize,
    tile_bytes: usize,
    w: &Windows,
    x: __m512,
    acc: &mut [__m512; STRIP],
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        let (lo, hi) = C::columns(group_states::<G>(tile, stride, tile_bytes, w));
        acc[G] = _mm512_fmadd_ps(lo, x, acc[G]);
        acc[G + 8] = _mm512_fmadd_ps(hi, x, acc[G + 8]);
    }
}

/// # Safety
/// The features of the codebook's level must be available; `input` holds `tiles_k·16`
/// floats and `z` 16 per strip of `strips`.
#[inline(always)]
unsafe fn gemv_body<C: Codebook512>(
    p: &PackedTrellis,
    input: &[f32],
    strips: std::ops::Range<usize>,
    z: &mut [f32],
) {
    let w = Windows::of(p);
    let (tile_bytes, stride) = (p.tile_bytes, group_stride(p.tile_bytes));
    let tiles_k = p.tiles_k();
    assert!(input.len() >= tiles_k * STRIP && z.len() >= strips.len() * STRIP);
    assert!(strips.end <= p.strips());
    for (strip, zs) in strips.zip(z.chunks_exact_mut(STRIP)) {
        // SAFETY: tiles of strips below `p.strips()` lie inside the stream, whose pads cover
        // the vector loads around them; `input` has 16 floats per tile (asserted above).
        unsafe {
            let mut acc = [_mm512_setzero_ps(); STRIP];
            let mut tile = p.stream().as_ptr().add(p.tile_offset(strip, 0));
            for kt in 0..tiles_k {
                prefetch_ahead(tile, tile_bytes);
                let x = _mm512_loadu_ps(input.as_ptr().add(kt * STRIP));
                gemv_group::<C, 0>(tile, stride, tile_bytes, &w, x, &mut acc);
                gemv_group::<C, 1>(tile, stride, tile_bytes, &w, x, &mut acc);
                gemv_group::<C, 2>(tile, stride, tile_bytes, &w, x, &mut acc);
                gemv_group::<C, 3>(tile, stride, tile_bytes, &w, x, &mut acc);
                gemv_group::<C, 4>(tile, stride, tile_bytes, &w, x, &mut acc);
                gemv_group::<C, 5>(tile, stride, tile_bytes, &w, x, &mut acc);
                gemv_group::<C, 6>(tile, stride, tile_bytes, &w, x, &mut acc);
                gemv_group::<C, 7>(tile, stride, tile_bytes, &w, x, &mut acc);
                tile = tile.add(tile_bytes);
            }
            _mm512_storeu_ps(zs.as_mut_ptr(), sum_lanes(&acc));
        }
    }
}

/// How far ahead of the tile being decoded the GEMV prefetches its weights. The hardware
/// prefetchers alone leave a DRAM-streamed K = 6 head at ~2.8 GB/s on one core here; 4 KiB
/// ahead measured 13–20 % faster there and no slower on cached weights.
const PREFETCH_AHEAD: usize = 4096;

/// Prefetch the tile [`PREFETCH_AHEAD`] bytes past `tile` into L1.
#[inline(always)]
pub(super) fn prefetch_ahead(tile: *const u8, tile_bytes: usize) {
    crate::cpu::simd::prefetch(tile, PREFETCH_AHEAD, tile_bytes);
}

/// Lane c of the result = the sum of all lanes of `acc[c]` (a transpose-and-add tree).
///
/// # Safety
/// AVX-512F must be available.
#[inline(always)]
unsafe fn sum_lanes(acc: &[__m512; STRIP]) -> __m512 {
    // SAFETY: plain AVX-512F shuffles and adds.
    unsafe {
        // Each step halves the vectors: pair (a, b) → lanes where a's and b's halves of
        // width `w` are summed side by side, interleaved so the final lanes are in order.
        let mut v = *acc;
        let mut n = STRIP;
        // Step 1: 16 → 8, 256-bit halves.
        for i in 0..n / 2 {
            let (a, b) = (v[2 * i], v[2 * i + 1]);
            let lo = _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b); // a.lo256, b.lo256
            let hi = _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b); // a.hi256, b.hi256
            v[i] = _mm512_add_ps(lo, hi);
        }
        n /= 2;
        // Step 2: 8 → 4, 128-bit halves of each 256-bit half.
        for i in 0..n / 2 {
            let (a, b) = (v[2 * i], v[2 * i + 1]);
            let lo = _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b);
            let hi = _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b);
            v[i] = _mm512_add_ps(lo, hi);
        }
        n /= 2;
        // Step 3: 4 → 2, 64-bit halves within 128-bit lanes.
        for i in 0..n / 2 {
            let (a, b) = (v[2 * i], v[2 * i + 1]);
            let lo = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
            let hi = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
            v[i] = _mm512_add_ps(lo, hi);
        }
        // Step 4: 2 → 1, 32-bit halves.
        let (a, b) = (v[0], v[1]);
        let lo = _mm512_shuffle_ps::<0b10_00_10_00>(a, b);
        let hi = _mm512_shuffle_ps::<0b11_01_11_01>(a, b);
        let s = _mm512_add_ps(lo, hi);
        // The tree leaves column c at a permuted lane; undo it with one permute.
        _mm512_permutexvar_ps(_mm512_loadu_si512(SUM_LANES_ORDER.as_ptr().cast()), s)
    }
}

/// The lane where `sum_lanes`' tree leaves column c: 4·(c mod 4) + c/4 (checked by a test).
static SUM_LANES_ORDER: [u32; 16] = [0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15];

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512fp16")]
unsafe fn gemv_fp16<C: Codebook512>(
    p: &PackedTrellis,
    input: &[f32],
    strips: std::ops::Range<usize>,
    z: &mut [f32],
) {
    // SAFETY: the features of every codebook are enabled on this function.
    unsafe { gemv_body::<C>(p, input, strips, z) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,f16c")]
unsafe fn gemv_base<C: Codebook512>(
    p: &PackedTrellis,
    input: &[f32],
    strips: std::ops::Range<usize>,
    z: &mut [f32],
) {
    // SAFETY: the features of the F32 codebooks are enabled on this function.
    unsafe { gemv_body::<C>(p, input, strips, z) }
}

/// GEMV over `strips` (see `scalar::gemv`).
pub fn gemv(
    p: &PackedTrellis,
    isa: Isa,
    input: &[f32],
    strips: std::ops::Range<usize>,
    z: &mut [f32],
) {
    use trellis_codec::Codebook::*;
    assert!(isa.is_supported());
    // SAFETY: the level's features were checked just above.
    unsafe {
        match (isa, p.codebook) {
            (Isa::Avx512Fp16, Mul1) => gemv_fp16::<Mul1Fp16>(p, input, strips, z),
            (Isa::Avx512Fp16, Mcg) => gemv_fp16::<InstFp16<true>>(p, input, strips, z),
            (Isa::Avx512Fp16, Inst3) => gemv_fp16::<InstFp16<false>>(p, input, strips, z),
            (_, Mul1) => gemv_base::<Mul1F32>(p, input, strips, z),
            (_, Mcg) => gemv_base::<InstF32<true>>(p, input, strips, z),
            (_, Inst3) => gemv_base::<InstF32<false>>(p, input, strips, z),
        }
    }
}

/// # Safety
/// As [`gemv_body`].
#[inline(always)]
unsafe fn decode_group<C: Codebook512, const G: usize>(
    tile: *const u8,
    stride: usize,
    tile_bytes: usize,
    w: &Windows,
    wt: &mut [f32; TILE_WEIGHTS],
) {
    // SAFETY: forwarded from the caller; the stores are inside `wt`.
    unsafe {
        let (lo, hi) = C::columns(group_states::<G>(tile, stride, tile_bytes, w));
        _mm512_storeu_ps(wt.as_mut_ptr().add(G * STRIP), lo);
        _mm512_storeu_ps(wt.as_mut_ptr().add((G + 8) * STRIP), hi);
    }
}

/// # Safety
/// As [`gemv_body`].
#[inline(always)]
unsafe fn decode_tiles_body<C: Codebook512>(
    p: &PackedTrellis,
    strip: usize,
    kt0: usize,
    wt: &mut [f32],
) {
    let tiles = wt.len() / TILE_WEIGHTS;
    assert!(strip < p.strips() && kt0 + tiles <= p.tiles_k());
    let w = Windows::of(p);
    let (tb, stride) = (p.tile_bytes, group_stride(p.tile_bytes));
    for (t, wt) in wt.chunks_exact_mut(TILE_WEIGHTS).enumerate() {
        let wt: &mut [f32; TILE_WEIGHTS] = wt.try_into().expect("one tile");
        // SAFETY: the tile lies inside the stream (asserted above), whose pads cover the
        // loads around it.
        unsafe {
            let tile = p.stream().as_ptr().add(p.tile_offset(strip, kt0 + t));
            decode_group::<C, 0>(tile, stride, tb, &w, wt);
            decode_group::<C, 1>(tile, stride, tb, &w, wt);
            decode_group::<C, 2>(tile, stride, tb, &w, wt);
            decode_group::<C, 3>(tile, stride, tb, &w, wt);
            decode_group::<C, 4>(tile, stride, tb, &w, wt);
            decode_group::<C, 5>(tile, stride, tb, &w, wt);
            decode_group::<C, 6>(tile, stride, tb, &w, wt);
            decode_group::<C, 7>(tile, stride, tb, &w, wt);
        }
    }
    debug_assert_eq!(GROUPS, 8);
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512fp16")]
unsafe fn decode_tiles_fp16<C: Codebook512>(
    p: &PackedTrellis,
    strip: usize,
    kt0: usize,
    wt: &mut [f32],
) {
    // SAFETY: the features of every codebook are enabled on this function.
    unsafe { decode_tiles_body::<C>(p, strip, kt0, wt) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,f16c")]
unsafe fn decode_tiles_base<C: Codebook512>(
    p: &PackedTrellis,
    strip: usize,
    kt0: usize,
    wt: &mut [f32],
) {
    // SAFETY: the features of the F32 codebooks are enabled on this function.
    unsafe { decode_tiles_body::<C>(p, strip, kt0, wt) }
}

/// Decode tiles `kt0…` of `strip` (as many as `wt` holds) into `wt[t·256 + c·16 + i]`, row
/// `CHUNK_ROW_ORDER[i]`.
pub fn decode_tiles(p: &PackedTrellis, isa: Isa, strip: usize, kt0: usize, wt: &mut [f32]) {
    use trellis_codec::Codebook::*;
    assert!(isa.is_supported());
    // SAFETY: the level's features were checked just above.
    unsafe {
        match (isa, p.codebook) {
            (Isa::Avx512Fp16, Mul1) => decode_tiles_fp16::<Mul1Fp16>(p, strip, kt0, wt),
            (Isa::Avx512Fp16, Mcg) => decode_tiles_fp16::<InstFp16<true>>(p, strip, kt0, wt),
            (Isa::Avx512Fp16, Inst3) => decode_tiles_fp16::<InstFp16<false>>(p, strip, kt0, wt),
            (_, Mul1) => decode_tiles_base::<Mul1F32>(p, strip, kt0, wt),
            (_, Mcg) => decode_tiles_base::<InstF32<true>>(p, strip, kt0, wt),
            (_, Inst3) => decode_tiles_base::<InstF32<false>>(p, strip, kt0, wt),
        }
    }
}

#[target_feature(enable = "avx512f")]
unsafe fn accumulate_rows_avx512(
    wt: &[f32],
    tiles: usize,
    inputs: &[f32],
    input_stride: usize,
    acc: &mut [f32],
) {
    let rows = acc.len() / TILE_WEIGHTS;
    assert!(wt.len() >= tiles * TILE_WEIGHTS);
    assert!(rows == 0 || (rows - 1) * input_stride + tiles * STRIP <= inputs.len());
    // Two rows at a time over half the columns: each weight vector loaded feeds two FMAs,
    // which keeps the loads (two per cycle) from limiting the FMAs.
    let pairs = rows / 2;
    for pair in 0..pairs {
        let row = 2 * pair;
        for half in 0..2 {
            // SAFETY: every access is inside the slices (asserted above).
            unsafe {
                let a0_ptr = acc.as_mut_ptr().add(row * TILE_WEIGHTS + half * 8 * STRIP);
                let a1_ptr = a0_ptr.add(TILE_WEIGHTS);
                let x0_ptr = inputs.as_ptr().add(row * input_stride);
                let x1_ptr = x0_ptr.add(input_stride);
                let mut a0: [__m512; 8] =
                    std::array::from_fn(|c| _mm512_loadu_ps(a0_ptr.add(STRIP * c)));
                let mut a1: [__m512; 8] =
                    std::array::from_fn(|c| _mm512_loadu_ps(a1_ptr.add(STRIP * c)));
                for t in 0..tiles {
                    let x0 = _mm512_loadu_ps(x0_ptr.add(t * STRIP));
                    let x1 = _mm512_loadu_ps(x1_ptr.add(t * STRIP));
                    let w = wt.as_ptr().add(t * TILE_WEIGHTS + half * 8 * STRIP);
                    for c in 0..8 {
                        let column = _mm512_loadu_ps(w.add(c * STRIP));
                        a0[c] = _mm512_fmadd_ps(column, x0, a0[c]);
                        a1[c] = _mm512_fmadd_ps(column, x1, a1[c]);
                    }
                }
                for c in 0..8 {
                    _mm512_storeu_ps(a0_ptr.add(STRIP * c), a0[c]);
                    _mm512_storeu_ps(a1_ptr.add(STRIP * c), a1[c]);
                }
            }
        }
    }
    for row in 2 * pairs..rows {
        // SAFETY: every access is inside the slices (asserted above).
        unsafe {
            let a_ptr = acc.as_mut_ptr().add(row * TILE_WEIGHTS);
            let x_ptr = inputs.as_ptr().add(row * input_stride);
            let mut a: [__m512; STRIP] =
                std::array::from_fn(|c| _mm512_loadu_ps(a_ptr.add(STRIP * c)));
            for t in 0..tiles {
                let x = _mm512_loadu_ps(x_ptr.add(t * STRIP));
                let w = wt.as_ptr().add(t * TILE_WEIGHTS);
                for (c, a) in a.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(_mm512_loadu_ps(w.add(c * STRIP)), x, *a);
                }
            }
            for (c, a) in a.iter().enumerate() {
                _mm512_storeu_ps(a_ptr.add(STRIP * c), *a);
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
    assert!(std::arch::is_x86_feature_detected!("avx512f"));
    // SAFETY: AVX-512F was checked just above.
    unsafe { accumulate_rows_avx512(wt, tiles, inputs, input_stride, acc) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lane order constant matches what the tree actually does.
    #[test]
    fn sum_lanes_puts_column_c_in_lane_c() {
        if !Isa::Avx512.is_supported() {
            return;
        }
        #[target_feature(enable = "avx512f")]
        unsafe fn run() -> [f32; 16] {
            // SAFETY: AVX-512F is enabled on this function.
            unsafe {
                let acc: [__m512; 16] = std::array::from_fn(|c| {
                    let lanes: [f32; 16] = std::array::from_fn(|l| (c * 1000 + l) as f32);
                    _mm512_loadu_ps(lanes.as_ptr())
                });
                let mut out = [0.0f32; 16];
                _mm512_storeu_ps(out.as_mut_ptr(), sum_lanes(&acc));
                out
            }
        }
        // SAFETY: AVX-512F was checked at the start of the test.
        let got = unsafe { run() };
        for (c, &v) in got.iter().enumerate() {
            assert_eq!(v, (c * 16000 + 120) as f32, "column {c}");
        }
    }

    #[test]
    fn mul1_constants() {
        use half::f16;
        let value = |bits: i16| f16::from_bits(bits as u16).to_f64();
        assert_eq!(value(MUL1_BASE_BITS), 1024.0);
        assert_eq!(value(MUL1_BASE_BITS + 1020), 2044.0);
        assert_eq!(value(MUL1_SCALE_BITS), f64::from(MUL1_SCALE));
        assert_eq!(
            1024.0 * value(MUL1_SCALE_BITS) + value(MUL1_OFFSET_BITS),
            f64::from(MUL1_AT_ZERO)
        );
    }
}

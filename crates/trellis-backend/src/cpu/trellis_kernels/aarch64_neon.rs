//! aarch64 NEON kernels: vectors of 4 consecutive trellis positions, which are 4 rows
//! (2c, 2c+1, 2c+8, 2c+9) of one output column, so the tile is decoded in trellis-position
//! order and every weight vector multiplies one vector of the input in chunk row order.
//!
//! States: the windows of a chunk of 8 consecutive positions lie inside 16 bytes (as for
//! AVX2); two `tbl` lookups form each lane's big-endian 32-bit word at its window's first
//! byte, a variable left shift puts the state in the top half and a right shift by 16 leaves
//! it. A chunk consumes 8·K bits, whole bytes for integer K and a multiple of 4 bits for
//! half-integer K, so chunks c and c+2 see the same picture from their first byte: two sets of
//! lookup and shift vectors serve every chunk, which keeps them in registers.
//!
//! * [`Isa::Neon`](super::Isa::Neon) (base ASIMD, every aarch64 CPU): codebooks in 32-bit
//!   integer lanes; the reference's single fp16 rounding is a round trip through
//!   `fcvtn`/`fcvtl`, which round to nearest even and keep fp16 subnormals.
//! * [`Isa::NeonFp16`](super::Isa::NeonFp16) (ARMv8.2 FEAT_FP16): the codebook's one fp16
//!   operation (3INST/mcg's add, mul1's FMA) runs natively on 8 half lanes, then widens.
//!
//! FEAT_DotProd would give mul1's byte sum in one `udot` per 4 lanes, but the pairwise adds
//! used here (`uaddlp` per vector, one `addp` for two) already produce the 16-bit sums that
//! the fp16 FMA wants in three instructions per 8 lanes, and its intrinsics are not stable
//! Rust; so no level needs it.

use super::layout::{
    GROUPS, GroupTables, PackedTrellis, PerWidth, STRIP, group_stride, per_width, per_width_cache,
};
use std::arch::aarch64::*;
use trellis_codec::codebook::{MCG_MULTIPLIER, MUL1_MULTIPLIER};
use trellis_codec::{BitWidth, TILE_WEIGHTS};

/// Chunks of 8 positions per group.
const CHUNKS: usize = 4;

/// Where the windows of each chunk lie, relative to the group's start 16 bits before its
/// first code bit (as in `layout`), for one bit width.
struct ChunkTables {
    /// First byte of the chunk's 16-byte window.
    base: [usize; CHUNKS],
    /// `tbl` indices of the two vectors (positions 0..4 and 4..8) of chunks of parity `c % 2`.
    index: [[[u8; 16]; 2]; 2],
    /// Left shift that puts each lane's state in its top 16 bits, per parity and vector.
    shift: [[[i32; 4]; 2]; 2],
}

impl ChunkTables {
    fn compute(bits: BitWidth) -> ChunkTables {
        let mut t = ChunkTables {
            base: [0; CHUNKS],
            index: [[[0; 16]; 2]; 2],
            shift: [[[0; 4]; 2]; 2],
        };
        let g = GroupTables::of(bits);
        for c in 0..CHUNKS {
            let base = usize::from(g.start_byte[8 * c]);
            t.base[c] = base;
            let mut index = [[0u8; 16]; 2];
            let mut shift = [[0i32; 4]; 2];
            for lane in 0..8 {
                let (byte, bit) = (g.start_byte[8 * c + lane], g.start_bit[8 * c + lane]);
                let rel = usize::from(byte) - base;
                assert!(rel + 3 < 16, "8 windows fit in 16 bytes");
                let (half, l) = (lane / 4, lane % 4);
                // Little-endian lane: its lowest byte is the big-endian word's last.
                for i in 0..4 {
                    index[half][4 * l + i] = (rel + 3 - i) as u8;
                }
                shift[half][l] = i32::from(bit);
            }
            if c < 2 {
                (t.index[c], t.shift[c]) = (index, shift);
            } else {
                assert!(
                    (t.index[c % 2], t.shift[c % 2]) == (index, shift),
                    "chunks c and c+2 have the same picture"
                );
            }
        }
        t
    }

    fn of(bits: BitWidth) -> &'static ChunkTables {
        static TABLES: PerWidth<ChunkTables> = per_width_cache();
        per_width(&TABLES, bits, ChunkTables::compute)
    }
}

/// The 8 states of chunk `c` of group `G` of the tile at `tile`, positions 0..4 and 4..8.
///
/// # Safety
/// NEON must be available; `tile − 2 … tile + tile_bytes + 16` must be readable.
#[inline(always)]
unsafe fn chunk_states<const G: usize>(
    tile: *const u8,
    stride: usize,
    tile_bytes: usize,
    t: &ChunkTables,
    c: usize,
) -> [uint32x4_t; 2] {
    // SAFETY: the caller guarantees the range is readable and NEON present; the tables are
    // 16-byte and 4-lane arrays read whole.
    unsafe {
        let parity = c % 2;
        let base = t.base[c];
        let src = tile.add(G * stride + base).sub(2);
        let mut bytes = vld1q_u8(src);
        if G == 0 && base < 2 {
            // The ring closes: the two bytes before the tile's first are its last two.
            let last = tile.add(tile_bytes - 2).cast::<u16>().read_unaligned();
            bytes = if base == 0 {
                vreinterpretq_u8_u16(vsetq_lane_u16::<0>(last, vreinterpretq_u16_u8(bytes)))
            } else {
                vsetq_lane_u8::<0>((last >> 8) as u8, bytes)
            };
        }
        let state = |half: usize| {
            let index = vld1q_u8(t.index[parity][half].as_ptr());
            let words = vreinterpretq_u32_u8(vqtbl1q_u8(bytes, index));
            let top = vshlq_u32(words, vld1q_s32(t.shift[parity][half].as_ptr()));
            vshrq_n_u32::<16>(top)
        };
        [state(0), state(1)]
    }
}

/// Maps 8 states (two vectors of 32-bit lanes) to their f32 weights.
trait Codebook {
    /// # Safety
    /// NEON must be available, and FEAT_FP16 for the `Fp16` codebooks.
    unsafe fn weights(states: [uint32x4_t; 2]) -> [float32x4_t; 2];
}

/// Round f32 values to the nearest fp16 (ties to even) and widen them back, exactly.
///
/// # Safety
/// NEON must be available.
#[inline(always)]
unsafe fn round_to_f16(v: float32x4_t) -> float32x4_t {
    // SAFETY: plain base-ASIMD conversions (the default FPCR rounds to nearest even and
    // does not flush fp16 subnormals).
    unsafe { vcvt_f32_f16(vcvt_f16_f32(v)) }
}

/// `s · M` in 32-bit lanes for mul1 and mcg, `s · M + A` for 3INST.
///
/// # Safety
/// NEON must be available.
#[inline(always)]
unsafe fn lcg<const MULTIPLIER: u32, const ADDEND: u32>(s: uint32x4_t) -> uint32x4_t {
    // SAFETY: plain NEON integer arithmetic.
    unsafe {
        let x = vmulq_u32(s, vdupq_n_u32(MULTIPLIER));
        if ADDEND == 0 {
            x
        } else {
            vaddq_u32(x, vdupq_n_u32(ADDEND))
        }
    }
}

/// 3INST's mask and xor: each 32-bit lane becomes two finite fp16 halves.
///
/// # Safety
/// NEON must be available.
#[inline(always)]
unsafe fn inst_halves(x: uint32x4_t) -> uint32x4_t {
    // SAFETY: plain NEON integer arithmetic.
    unsafe {
        veorq_u32(
            vandq_u32(x, vdupq_n_u32(0x8FFF_8FFF)),
            vdupq_n_u32(0x3B60_3B60),
        )
    }
}

/// The 8 byte sums of mul1 (`Σ bytes of s·M`) as 16-bit lanes, positions 0..8.
///
/// # Safety
/// NEON must be available.
#[inline(always)]
unsafe fn mul1_byte_sums(states: [uint32x4_t; 2]) -> uint16x8_t {
    // SAFETY: plain NEON integer arithmetic.
    unsafe {
        let pairs = states.map(|s| {
            let x = lcg::<MUL1_MULTIPLIER, 0>(s);
            vpaddlq_u8(vreinterpretq_u8_u32(x))
        });
        vpaddq_u16(pairs[0], pairs[1])
    }
}

const INST3_MULTIPLIER: u32 = 89_226_354;
const INST3_ADDEND: u32 = 64_248_484;

struct Mul1;
impl Codebook for Mul1 {
    #[inline(always)]
    unsafe fn weights(states: [uint32x4_t; 2]) -> [float32x4_t; 2] {
        // SAFETY: the caller runs with NEON available.
        unsafe {
            let sums = mul1_byte_sums(states);
            let sums = [vmovl_u16(vget_low_u16(sums)), vmovl_high_u16(sums)];
            // sum · scale + (value at sum 0) has at most 21 significant bits, so this FMA is
            // exact and the only rounding is the reference's, to fp16.
            sums.map(|s| {
                round_to_f16(vfmaq_f32(
                    vdupq_n_f32(-3.453125),
                    vcvtq_f32_u32(s),
                    vdupq_n_f32(1774.0 / 262_144.0),
                ))
            })
        }
    }
}

/// 3INST (`MCG == false`) and mcg.
struct Inst<const MCG: bool>;
impl<const MCG: bool> Codebook for Inst<MCG> {
    #[inline(always)]
    unsafe fn weights(states: [uint32x4_t; 2]) -> [float32x4_t; 2] {
        // SAFETY: the caller runs with NEON available.
        unsafe {
            states.map(|s| {
                let x = if MCG {
                    lcg::<MCG_MULTIPLIER, 0>(s)
                } else {
                    lcg::<INST3_MULTIPLIER, INST3_ADDEND>(s)
                };
                let halves = vreinterpretq_f16_u32(inst_halves(x));
                // Widened lanes alternate low and high halves: a pairwise add sums each
                // state's two, exactly (two fp16 values within a factor 16 of each other).
                let a = vcvt_f32_f16(vget_low_f16(halves));
                let b = vcvt_high_f32_f16(halves);
                round_to_f16(vpaddq_f32(a, b))
            })
        }
    }
}

/// Widen 8 fp16 weights to two f32 vectors (positions 0..4 and 4..8).
///
/// # Safety
/// NEON must be available.
#[inline(always)]
unsafe fn widen(w: float16x8_t) -> [float32x4_t; 2] {
    // SAFETY: base-ASIMD conversions.
    unsafe { [vcvt_f32_f16(vget_low_f16(w)), vcvt_high_f32_f16(w)] }
}

/// mul1 with its FMA done in fp16 (FEAT_FP16).
struct Mul1Fp16;
impl Codebook for Mul1Fp16 {
    // Not `inline(always)`, which cannot carry target features; inlined all the same into the
    // kernels, which are compiled for the same features.
    #[inline]
    #[target_feature(enable = "neon,fp16")]
    unsafe fn weights(states: [uint32x4_t; 2]) -> [float32x4_t; 2] {
        // SAFETY: the caller runs with NEON and FEAT_FP16 available.
        unsafe {
            let sums = mul1_byte_sums(states);
            // 0x6400 is fp16 1024.0 with an ulp of 1: adding the sum (< 1024) to the bits
            // gives 1024 + sum exactly, as the format defines it.
            let h = vreinterpretq_f16_u16(vaddq_u16(sums, vdupq_n_u16(0x6400)));
            let scale = vreinterpretq_f16_u16(vdupq_n_u16(0x1EEE));
            let offset = vreinterpretq_f16_u16(vdupq_n_u16(0xC931));
            widen(vfmaq_f16(offset, h, scale))
        }
    }
}

/// 3INST (`MCG == false`) and mcg with their add done in fp16 (FEAT_FP16).
struct InstFp16<const MCG: bool>;
impl<const MCG: bool> Codebook for InstFp16<MCG> {
    // Not `inline(always)`, which cannot carry target features; inlined all the same into the
    // kernels, which are compiled for the same features.
    #[inline]
    #[target_feature(enable = "neon,fp16")]
    unsafe fn weights(states: [uint32x4_t; 2]) -> [float32x4_t; 2] {
        // SAFETY: the caller runs with NEON and FEAT_FP16 available.
        unsafe {
            let x = states.map(|s| {
                let x = if MCG {
                    lcg::<MCG_MULTIPLIER, 0>(s)
                } else {
                    lcg::<INST3_MULTIPLIER, INST3_ADDEND>(s)
                };
                vreinterpretq_u16_u32(inst_halves(x))
            });
            let lo = vreinterpretq_f16_u16(vuzp1q_u16(x[0], x[1]));
            let hi = vreinterpretq_f16_u16(vuzp2q_u16(x[0], x[1]));
            widen(vaddq_f16(lo, hi))
        }
    }
}

/// Group `G` of one tile into the accumulators of its columns G and G+8.
///
/// # Safety
/// As [`chunk_states`].
#[inline(always)]
unsafe fn gemv_group<C: Codebook, const G: usize>(
    tile: *const u8,
    stride: usize,
    tile_bytes: usize,
    t: &ChunkTables,
    x: &[float32x4_t; CHUNKS],
    acc: &mut [float32x4_t; 2],
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        for (c, &xc) in x.iter().enumerate() {
            let [w0, w1] = C::weights(chunk_states::<G>(tile, stride, tile_bytes, t, c));
            acc[0] = vfmaq_f32(acc[0], w0, xc);
            acc[1] = vfmaq_f32(acc[1], w1, xc);
        }
    }
}

/// Groups G0..G3 of every tile of one strip (starting at `tile`): their 8 columns' sums, the
/// 4 input vectors, the lookup tables and the codebook's constants fit the 32 registers
/// (all 16 columns at once spill sums to the stack). Pair i holds columns Gi and Gi+8.
///
/// # Safety
/// As [`chunk_states`] for every tile of the strip; `input` holds 16 floats per tile.
#[inline(always)]
unsafe fn gemv_pass<
    C: Codebook,
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
) -> [[float32x4_t; 2]; 4] {
    // SAFETY: forwarded from the caller.
    unsafe {
        let mut acc = [[vdupq_n_f32(0.0); 2]; 4];
        for kt in 0..tiles_k {
            let xp = input.add(kt * STRIP);
            let x: [float32x4_t; CHUNKS] = std::array::from_fn(|c| vld1q_f32(xp.add(4 * c)));
            gemv_group::<C, G0>(tile, stride, tile_bytes, t, &x, &mut acc[0]);
            gemv_group::<C, G1>(tile, stride, tile_bytes, t, &x, &mut acc[1]);
            gemv_group::<C, G2>(tile, stride, tile_bytes, t, &x, &mut acc[2]);
            gemv_group::<C, G3>(tile, stride, tile_bytes, t, &x, &mut acc[3]);
            tile = tile.add(tile_bytes);
        }
        acc
    }
}

/// The GEMV body, inlined into an entry point compiled for the codebook's features.
///
/// # Safety
/// NEON (and FEAT_FP16 for the `Fp16` codebooks) must be available.
#[inline(always)]
unsafe fn gemv_body<C: Codebook>(
    p: &PackedTrellis,
    input: &[f32],
    strips: std::ops::Range<usize>,
    z: &mut [f32],
) {
    let t = ChunkTables::of(p.bits);
    let (tb, stride) = (p.tile_bytes, group_stride(p.tile_bytes));
    let tiles_k = p.tiles_k();
    assert!(input.len() >= tiles_k * STRIP && z.len() >= strips.len() * STRIP);
    assert!(strips.end <= p.strips());
    for (strip, zs) in strips.zip(z.chunks_exact_mut(STRIP)) {
        // SAFETY: tiles of strips below `p.strips()` lie inside the stream, whose pads cover
        // the loads around them; `input` has 16 floats per tile (asserted above).
        unsafe {
            let tile = p.stream().as_ptr().add(p.tile_offset(strip, 0));
            let x = input.as_ptr();
            // Two passes over the strip (the second finds it in L1/L2).
            let first = gemv_pass::<C, 0, 1, 2, 3>(tile, tiles_k, stride, tb, t, x);
            let second = gemv_pass::<C, 4, 5, 6, 7>(tile, tiles_k, stride, tb, t, x);
            for (g, [a, b]) in first.iter().chain(&second).enumerate() {
                zs[g] = vaddvq_f32(*a);
                zs[g + 8] = vaddvq_f32(*b);
            }
        }
    }
}

#[target_feature(enable = "neon")]
unsafe fn gemv_neon<C: Codebook>(
    p: &PackedTrellis,
    input: &[f32],
    strips: std::ops::Range<usize>,
    z: &mut [f32],
) {
    // SAFETY: NEON is enabled for this function; the codebooks used with it need no more.
    unsafe { gemv_body::<C>(p, input, strips, z) }
}

#[target_feature(enable = "neon,fp16")]
unsafe fn gemv_fp16<C: Codebook>(
    p: &PackedTrellis,
    input: &[f32],
    strips: std::ops::Range<usize>,
    z: &mut [f32],
) {
    // SAFETY: NEON and FEAT_FP16 are enabled for this function.
    unsafe { gemv_body::<C>(p, input, strips, z) }
}

/// GEMV over `strips` at `isa` (`Neon` or `NeonFp16`); `input` holds 16 floats per tile, rows
/// in chunk order.
pub fn gemv(
    p: &PackedTrellis,
    isa: super::Isa,
    input: &[f32],
    strips: std::ops::Range<usize>,
    z: &mut [f32],
) {
    use super::Isa;
    use trellis_codec::Codebook::*;
    assert!(isa.is_supported());
    // SAFETY: the level's features were checked just above.
    unsafe {
        match (isa, p.codebook) {
            (Isa::NeonFp16, Mul1) => gemv_fp16::<Mul1Fp16>(p, input, strips, z),
            (Isa::NeonFp16, Mcg) => gemv_fp16::<InstFp16<true>>(p, input, strips, z),
            (Isa::NeonFp16, Inst3) => gemv_fp16::<InstFp16<false>>(p, input, strips, z),
            (_, Mul1) => gemv_neon::<self::Mul1>(p, input, strips, z),
            (_, Mcg) => gemv_neon::<Inst<true>>(p, input, strips, z),
            (_, Inst3) => gemv_neon::<Inst<false>>(p, input, strips, z),
        }
    }
}

/// The decode body, inlined into an entry point compiled for the codebook's features.
///
/// # Safety
/// NEON (and FEAT_FP16 for the `Fp16` codebooks) must be available.
#[inline(always)]
unsafe fn decode_body<C: Codebook>(p: &PackedTrellis, strip: usize, kt0: usize, wt: &mut [f32]) {
    let tiles = wt.len() / TILE_WEIGHTS;
    assert!(strip < p.strips() && kt0 + tiles <= p.tiles_k());
    let t = ChunkTables::of(p.bits);
    let (tb, stride) = (p.tile_bytes, group_stride(p.tile_bytes));
    for (i, wt) in wt.chunks_exact_mut(TILE_WEIGHTS).enumerate() {
        let out = wt.as_mut_ptr();
        // SAFETY: the tile lies inside the stream (asserted above), whose pads cover the
        // loads around it; the stores are inside this tile's 256 floats of `wt`.
        unsafe {
            let tile = p.stream().as_ptr().add(p.tile_offset(strip, kt0 + i));
            macro_rules! group {
                ($g:literal) => {
                    for c in 0..CHUNKS {
                        let w = C::weights(chunk_states::<$g>(tile, stride, tb, t, c));
                        vst1q_f32(out.add(32 * $g + 8 * c), w[0]);
                        vst1q_f32(out.add(32 * $g + 8 * c + 4), w[1]);
                    }
                };
            }
            group!(0);
            group!(1);
            group!(2);
            group!(3);
            group!(4);
            group!(5);
            group!(6);
            group!(7);
        }
    }
}

#[target_feature(enable = "neon")]
unsafe fn decode_neon<C: Codebook>(p: &PackedTrellis, strip: usize, kt0: usize, wt: &mut [f32]) {
    // SAFETY: NEON is enabled for this function; the codebooks used with it need no more.
    unsafe { decode_body::<C>(p, strip, kt0, wt) }
}

#[target_feature(enable = "neon,fp16")]
unsafe fn decode_fp16<C: Codebook>(p: &PackedTrellis, strip: usize, kt0: usize, wt: &mut [f32]) {
    // SAFETY: NEON and FEAT_FP16 are enabled for this function.
    unsafe { decode_body::<C>(p, strip, kt0, wt) }
}

/// Decode tiles `kt0…` of `strip` (as many as `wt` holds) into `wt[t·256 + p]` for trellis
/// position p, at `isa` (`Neon` or `NeonFp16`).
pub fn decode_tiles(p: &PackedTrellis, isa: super::Isa, strip: usize, kt0: usize, wt: &mut [f32]) {
    use super::Isa;
    use trellis_codec::Codebook::*;
    assert!(isa.is_supported());
    // SAFETY: the level's features were checked just above.
    unsafe {
        match (isa, p.codebook) {
            (Isa::NeonFp16, Mul1) => decode_fp16::<Mul1Fp16>(p, strip, kt0, wt),
            (Isa::NeonFp16, Mcg) => decode_fp16::<InstFp16<true>>(p, strip, kt0, wt),
            (Isa::NeonFp16, Inst3) => decode_fp16::<InstFp16<false>>(p, strip, kt0, wt),
            (_, Mul1) => decode_neon::<self::Mul1>(p, strip, kt0, wt),
            (_, Mcg) => decode_neon::<Inst<true>>(p, strip, kt0, wt),
            (_, Inst3) => decode_neon::<Inst<false>>(p, strip, kt0, wt),
        }
    }
}

#[target_feature(enable = "neon")]
fn accumulate_rows_neon(
    wt: &[f32],
    tiles: usize,
    inputs: &[f32],
    input_stride: usize,
    acc: &mut [f32],
) {
    let rows = acc.len() / TILE_WEIGHTS;
    assert!(wt.len() >= tiles * TILE_WEIGHTS);
    assert!(rows == 0 || (rows - 1) * input_stride + tiles * STRIP <= inputs.len());
    for row in 0..rows {
        // SAFETY: every access is inside the slices (asserted above); a row's accumulators
        // are the first 64 of its 256 floats.
        unsafe {
            // One vector per column, as in the GEMV.
            let a_ptr = acc.as_mut_ptr().add(row * TILE_WEIGHTS);
            let x_ptr = inputs.as_ptr().add(row * input_stride);
            let mut a: [float32x4_t; STRIP] = std::array::from_fn(|j| vld1q_f32(a_ptr.add(4 * j)));
            for t in 0..tiles {
                let x: [float32x4_t; CHUNKS] =
                    std::array::from_fn(|c| vld1q_f32(x_ptr.add(t * STRIP + 4 * c)));
                let w = wt.as_ptr().add(t * TILE_WEIGHTS);
                for g in 0..GROUPS {
                    for (c, &xc) in x.iter().enumerate() {
                        let v = w.add(32 * g + 8 * c);
                        a[g] = vfmaq_f32(a[g], vld1q_f32(v), xc);
                        a[g + 8] = vfmaq_f32(a[g + 8], vld1q_f32(v.add(4)), xc);
                    }
                }
            }
            for (j, a) in a.iter().enumerate() {
                vst1q_f32(a_ptr.add(4 * j), *a);
            }
        }
    }
}

/// GEMM row sweep over decoded tiles (see `super::accumulate_rows`): `acc[row][4·col + l]`.
pub fn accumulate_rows(
    wt: &[f32],
    tiles: usize,
    inputs: &[f32],
    input_stride: usize,
    acc: &mut [f32],
) {
    assert!(super::Isa::Neon.is_supported());
    // SAFETY: NEON was checked just above.
    unsafe { accumulate_rows_neon(wt, tiles, inputs, input_stride, acc) }
}

//! Viterbi encoder: the minimum-squared-error tail-biting walk of the bitshift trellis.
//!
//! A tile is one ring of 256 trellis positions. Position t's 16-bit state is the previous
//! state shifted left by `D(t)` bits with `D(t)` new code bits below, so a walk is fixed by
//! its codes and the high bits the first state borrows from the last one. The encoder runs
//! the dynamic program twice (QTIP's tail-biting trick, format reference §9.7):
//!
//! 1. over the ring rotated by half (positions 128..=255, then 0..=127) with every start
//!    allowed, to learn which overlap the best walk carries across the wrap point 255 → 0;
//! 2. over positions 0..=255 with the start forced to that overlap and the end required to
//!    return to it, so the walk closes.
//!
//! The dynamic program keeps, after each step, one survivor per *overlap*: the low bits of the
//! state that the next step keeps. A step with shift `d` followed by a step with shift `d'`
//! looks at every 16-bit candidate `s`; its predecessor survivor is `s >> d` and the survivor
//! it competes for is `s & (2^(16−d') − 1)`. The 2^d' candidates competing for one survivor
//! differ only in their top d' bits (`hi` below); a backpointer stores just that `hi`.
//!
//! All costs are f32 and accumulate in walk order; because rounding is monotonic,
//! `min(a, b) + e` rounds to `min(a + e, b + e)`, so the program's result is exactly the
//! minimum over walks of their f32 running sums.
//!
//! Each step evaluates all 65536 candidates. The x86-64 kernels (AVX-512, else AVX2, chosen at
//! run time) put SIMD lanes over consecutive survivors; other CPUs use plain Rust written for
//! the auto-vectoriser. Backpointers are stored as `d'` bit planes per step (at most 1 MiB per
//! pass), and every buffer lives in a per-thread scratch reused across tiles. All kernels do
//! the same f32 operations and break ties the same way, so the output is identical on every
//! machine.

use crate::bits::{BitWidth, STATE_BITS, TILE_WEIGHTS};
use crate::codebook::Codebook;
use crate::tile::{POSITION_TO_TILE_INDEX, pack_states};
use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::OnceLock;

#[cfg(target_arch = "x86_64")]
mod fixed;

/// One encoded 16×16 tile.
#[derive(Clone, Debug, PartialEq)]
pub struct EncodedTile {
    /// The 16-bit trellis state of every position, in trellis position order. They form a
    /// closed walk (`tile::is_valid_walk`).
    pub states: [u16; TILE_WEIGHTS],
    /// The packed tile: 16·K int16 words exactly as stored in a `.trellis` tensor.
    pub words: Vec<u16>,
    /// The reconstruction in row-major 16×16 tile order (row = input channel): the exact
    /// codebook value of each position's state.
    pub values: [f32; TILE_WEIGHTS],
    /// Σ (values − target)², recomputed in f64 from `values`.
    pub squared_error: f64,
}

impl EncodedTile {
    /// The tile of a walk found for `target`: its packed words, its values and their squared
    /// error. `states` must be a closed walk (`tile::is_valid_walk`) in position order.
    pub fn from_walk(
        states: [u16; TILE_WEIGHTS],
        target: &[f32; TILE_WEIGHTS],
        bits: BitWidth,
        codebook: Codebook,
    ) -> EncodedTile {
        let table = codebook.table_f32();
        let mut values = [0f32; TILE_WEIGHTS];
        for (t, &s) in states.iter().enumerate() {
            values[usize::from(POSITION_TO_TILE_INDEX[t])] = table[usize::from(s)];
        }
        let squared_error = values
            .iter()
            .zip(target)
            .map(|(&v, &x)| (f64::from(v) - f64::from(x)).powi(2))
            .sum();
        EncodedTile {
            words: pack_states(&states, bits),
            states,
            values,
            squared_error,
        }
    }
}

/// One tile's target (row-major 16×16) in trellis position order, the order the search walks.
fn in_position_order(target: &[f32; TILE_WEIGHTS]) -> [f32; TILE_WEIGHTS] {
    POSITION_TO_TILE_INDEX.map(|i| target[usize::from(i)])
}

/// The targets of `targets` in trellis position order (position t of tile i at
/// `i · 256 + t`), as a search running elsewhere wants them.
pub fn targets_in_position_order(targets: &[[f32; TILE_WEIGHTS]]) -> Vec<f32> {
    targets.iter().flat_map(in_position_order).collect()
}

/// A tile search that runs outside this crate, on an accelerator (the CUDA backend has
/// one). It must find exactly the walks of [`encode_tile`] (the [`Effort::Exact`] search),
/// so that its output is the CPU's, byte for byte.
pub trait TileSearch: Send + Sync {
    /// What runs the search, for messages (e.g. the GPU's name).
    fn name(&self) -> String;

    /// Tiles per call that keep the device busy; callers batch at least this many when they
    /// can.
    fn preferred_batch(&self) -> usize;

    /// `encode_tile(&targets[i], bits, codebook)` for every i. Targets must be finite and
    /// below [`MAX_TARGET`] in magnitude; the error says why the search could not run.
    fn encode_tiles(
        &self,
        targets: &[[f32; TILE_WEIGHTS]],
        bits: BitWidth,
        codebook: Codebook,
    ) -> Result<Vec<EncodedTile>, String>;
}

/// Encode one tile: the best tail-biting walk found by the two-pass Viterbi search.
///
/// `target` holds 256 values in row-major 16×16 tile order (row = input channel), already
/// scaled to the codebook's scale. Values must be finite and below [`MAX_TARGET`] in
/// magnitude (so that no walk's f32 cost overflows); anything else panics.
pub fn encode_tile(
    target: &[f32; TILE_WEIGHTS],
    bits: BitWidth,
    codebook: Codebook,
) -> EncodedTile {
    SCRATCH.with(|s| encode_tile_with(target, bits, codebook, Kernel::Auto, &mut s.borrow_mut()).0)
}

/// Encode many tiles in parallel (rayon); element i of the result is `encode_tile(&targets[i], …)`.
pub fn encode_tiles(
    targets: &[[f32; TILE_WEIGHTS]],
    bits: BitWidth,
    codebook: Codebook,
) -> Vec<EncodedTile> {
    // Build the shared tables once, before the workers race for them.
    tile_code(bits, codebook);
    targets
        .par_iter()
        .map(|t| encode_tile(t, bits, codebook))
        .collect()
}

/// How thorough the search is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effort {
    /// The full two-pass search with exact f32 costs: identical results on every machine
    /// and kernel (what [`encode_tile`] does).
    Exact,
    /// What a quantizer wants for millions of tiles: the same two passes in cheaper
    /// arithmetic. With AVX-512BW and K ≤ 4 they run in 16-bit fixed point ([`fixed`]: 32
    /// candidates a vector for five operations), both over the whole tile: 2.0–3.5× the
    /// speed of [`Effort::Exact`] for the same squared error on Gaussian tiles
    /// (`encoder_effort`, two threads). Otherwise, on AVX-512, the f32 step keeps its winner
    /// in the low mantissa bits of the cost, so the compare-and-select costs one min (costs
    /// lose ≤ 8 of 24 mantissa bits), reading the codebook as fp16, and pass 1 only runs over
    /// the [`fast_window`] positions either side of the wrap point (a survivor's memory is
    /// ⌈16/K⌉ steps, so positions farther away rarely change which overlap crosses the wrap):
    /// ~1.8× Exact's speed at K = 6 and 8. Results may differ between machines. (The
    /// fixed-point pass 1 was windowed too until its step got ~2.8× faster; over the whole
    /// tile the quantizer's proxy error fell 1.3 % on the tiny GLM fixture at 4.0 bpw, for
    /// ~20 % more conversion time.)
    Fast,
}

/// Positions on each side of the wrap point that [`Effort::Fast`]'s first pass looks at with
/// the f32 kernels: eight survivor memories (16/K steps each). Measured on Gaussian tiles,
/// this keeps the squared error within ≈ 0.5 % of the full pass at every K.
pub fn fast_window(bits: BitWidth) -> usize {
    (128.0 / bits.as_f64()).ceil() as usize
}

/// [`encode_tiles`] with a choice of [`Effort`].
pub fn encode_tiles_with_effort(
    targets: &[[f32; TILE_WEIGHTS]],
    bits: BitWidth,
    codebook: Codebook,
    effort: Effort,
) -> Vec<EncodedTile> {
    tile_code(bits, codebook);
    let kernel = match effort {
        Effort::Exact => Kernel::Auto,
        Effort::Fast => Kernel::fast(bits),
    };
    let window = match effort {
        Effort::Exact => None,
        Effort::Fast => kernel.fast_first_pass(bits),
    };
    targets
        .par_iter()
        .map(|t| {
            SCRATCH.with(|s| {
                encode_tile_windowed(t, bits, codebook, kernel, window, &mut s.borrow_mut()).0
            })
        })
        .collect()
}

/// Cost of a forbidden start in the tagged kernel: finite (infinity with tag bits would be a
/// NaN) and far above any real walk (256 errors of at most [`MAX_TARGET`]² ≈ 2.6e32).
const TAGGED_FORBIDDEN: f32 = 1e36;

/// Largest target magnitude [`encode_tile`] accepts: 256 squared errors of this size stay far
/// below f32's range. Real targets are codebook-scaled, i.e. of order 1.
pub const MAX_TARGET: f32 = 1e15;

/// Costs of the two passes, kept for tests and diagnostics.
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(test), allow(dead_code))]
struct PassCosts {
    /// Best unconstrained walk over the rotated ring.
    open: f32,
    /// Best walk closing through the overlap that pass 1 chose.
    closed: f32,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

fn encode_tile_with(
    target: &[f32; TILE_WEIGHTS],
    bits: BitWidth,
    codebook: Codebook,
    kernel: Kernel,
    scratch: &mut Scratch,
) -> (EncodedTile, PassCosts) {
    encode_tile_windowed(target, bits, codebook, kernel, None, scratch)
}

/// The two-pass search; `window: Some(w)` limits pass 1 to `w` positions either side of the
/// wrap point.
fn encode_tile_windowed(
    target: &[f32; TILE_WEIGHTS],
    bits: BitWidth,
    codebook: Codebook,
    kernel: Kernel,
    window: Option<usize>,
    scratch: &mut Scratch,
) -> (EncodedTile, PassCosts) {
    assert!(
        target.iter().all(|v| v.abs() <= MAX_TARGET),
        "encode_tile needs finite targets of magnitude ≤ {MAX_TARGET:e}"
    );
    let code = tile_code(bits, codebook);
    const HALF: usize = TILE_WEIGHTS / 2;

    let x = in_position_order(target);
    let shifts: [u32; TILE_WEIGHTS] = std::array::from_fn(|t| bits.code_bits(t));

    // Pass 1 over the ring rotated by half: its wrap point 255 → 0 sits mid-walk, where the
    // search has had context from both sides. 128 is even, so every position keeps its shift.
    let mut x_rot = [0f32; TILE_WEIGHTS];
    let mut shifts_rot = [0u32; TILE_WEIGHTS];
    x_rot[..HALF].copy_from_slice(&x[HALF..]);
    x_rot[HALF..].copy_from_slice(&x[..HALF]);
    shifts_rot[..HALF].copy_from_slice(&shifts[HALF..]);
    shifts_rot[HALF..].copy_from_slice(&shifts[..HALF]);
    // The window is kept even so that it starts on an even position, as the shifts of
    // half-integer widths alternate.
    let w = window.map_or(HALF, |w| (w.div_ceil(2) * 2).clamp(2, HALF));
    let (lo, hi) = (HALF - w, HALF + w);
    let mut walk = [0u16; TILE_WEIGHTS];
    let retry_in_f32 = |scratch: &mut Scratch| {
        #[cfg(target_arch = "x86_64")]
        let kernel = Kernel::Avx512Tagged;
        encode_tile_windowed(target, bits, codebook, kernel, window, scratch)
    };
    let Some(open) = viterbi_pass(
        code,
        &x_rot[lo..hi],
        &shifts_rot[lo..hi],
        if hi < TILE_WEIGHTS {
            shifts_rot[hi]
        } else {
            shifts[HALF]
        },
        None,
        None,
        kernel,
        scratch,
        &mut walk[..2 * w],
    ) else {
        return retry_in_f32(scratch);
    };
    // walk[w − 1] is position 255; the overlap it hands to position 0 pins the ring.
    let wrap = u32::from(walk[w - 1]) & low_mask(STATE_BITS - shifts[0]);

    let mut states = [0u16; TILE_WEIGHTS];
    let Some(closed) = viterbi_pass(
        code,
        &x,
        &shifts,
        shifts[0],
        Some(wrap),
        Some(wrap),
        kernel,
        scratch,
        &mut states,
    ) else {
        return retry_in_f32(scratch);
    };
    assert!(
        closed < TAGGED_FORBIDDEN,
        "no closed walk through overlap {wrap:#x}"
    );

    let tile = EncodedTile::from_walk(states, target, bits, codebook);
    (tile, PassCosts { open, closed })
}

#[inline]
fn low_mask(bits: u32) -> u32 {
    (1u32 << bits) - 1
}

/// A trellis code: the state width, the value of every state, and re-ordered copies of the
/// values for the portable kernel's steps with short shifts (see [`step_narrow`]).
struct Code<'a> {
    state_bits: u32,
    table: &'a [f32],
    /// Keyed by (shift, next shift); built on first use, since the SIMD kernels never need them.
    permuted: Vec<Permuted>,
    /// The table as fp16 bits (every codebook value is an fp16 number, so this is exact):
    /// half the bytes per step for the tagged kernel, which is bound by reading the table.
    /// Only the x86-64 kernels have a tagged variant.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    half: OnceLock<Box<[u16]>>,
    /// The table in the fixed point of [`fixed`]'s pass.
    #[cfg(target_arch = "x86_64")]
    fixed: OnceLock<Box<[i16]>>,
}

/// A lazily built table for the steps with shift `d` followed by `dn`.
struct Permuted {
    d: u32,
    dn: u32,
    table: OnceLock<Box<[f32]>>,
}

/// Steps whose shift is at most this read a permuted table, with lanes over the overlap;
/// longer shifts put lanes over the code bits, which are then contiguous already.
const NARROW_MAX_SHIFT: u32 = 2;

impl<'a> Code<'a> {
    /// `ring_shifts` are the shifts of every position of the ring (it wraps), which fixes the
    /// (shift, next shift) pairs any pass over it can meet.
    fn new(state_bits: u32, table: &'a [f32], ring_shifts: &[u32]) -> Code<'a> {
        assert!((2..=STATE_BITS).contains(&state_bits));
        assert_eq!(table.len(), 1 << state_bits, "one value per state");
        let n = ring_shifts.len();
        let mut permuted: Vec<Permuted> = Vec::new();
        for t in 0..n {
            let (d, dn) = (ring_shifts[t], ring_shifts[(t + 1) % n]);
            assert!(
                d >= 1 && dn >= 1 && d + dn <= state_bits && dn <= 8,
                "shifts {d}, {dn} do not fit a {state_bits}-bit state"
            );
            if d <= NARROW_MAX_SHIFT && !permuted.iter().any(|p| (p.d, p.dn) == (d, dn)) {
                permuted.push(Permuted {
                    d,
                    dn,
                    table: OnceLock::new(),
                });
            }
        }
        Code {
            state_bits,
            table,
            permuted,
            half: OnceLock::new(),
            #[cfg(target_arch = "x86_64")]
            fixed: OnceLock::new(),
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn fixed_table(&self) -> &[i16] {
        self.fixed.get_or_init(|| fixed::table(self.table))
    }

    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn half_table(&self) -> &[u16] {
        self.half.get_or_init(|| {
            self.table
                .iter()
                .map(|&v| half::f16::from_f32(v).to_bits())
                .collect()
        })
    }

    fn permuted(&self, d: u32, dn: u32) -> Option<&[f32]> {
        let p = self.permuted.iter().find(|p| (p.d, p.dn) == (d, dn))?;
        Some(
            p.table
                .get_or_init(|| permute_narrow(self.table, self.state_bits, d, dn)),
        )
    }
}

/// The table re-indexed as `[hi][code][mid]` for a step with shift `d` followed by `dn`.
///
/// A candidate state is `hi ‖ mid ‖ code` (dn, l − d − dn and d bits). Its predecessor
/// survivor `hi ‖ mid` and its own survivor `mid ‖ code` are then both contiguous in `mid`
/// once the table is laid out this way.
fn permute_narrow(table: &[f32], l: u32, d: u32, dn: u32) -> Box<[f32]> {
    let mid_bits = l - d - dn;
    let mut out = vec![0f32; table.len()];
    for (s, &v) in table.iter().enumerate() {
        let code = s & low_mask(d) as usize;
        let mid = (s >> d) & low_mask(mid_bits) as usize;
        let hi = s >> (l - dn);
        out[(((hi << d) | code) << mid_bits) | mid] = v;
    }
    out.into_boxed_slice()
}

/// The production code of (K, codebook), built on first use and shared by all threads.
fn tile_code(bits: BitWidth, codebook: Codebook) -> &'static Code<'static> {
    static CODES: [[OnceLock<Code<'static>>; BitWidth::ALL.len()]; Codebook::ALL.len()] =
        [const { [const { OnceLock::new() }; BitWidth::ALL.len()] }; Codebook::ALL.len()];
    let b = BitWidth::ALL
        .iter()
        .position(|&w| w == bits)
        .expect("listed width");
    let c = Codebook::ALL
        .iter()
        .position(|&cb| cb == codebook)
        .expect("listed codebook");
    CODES[c][b].get_or_init(|| {
        let shifts: Vec<u32> = (0..TILE_WEIGHTS).map(|t| bits.code_bits(t)).collect();
        Code::new(STATE_BITS, codebook.table_f32(), &shifts)
    })
}

/// Buffers reused across passes and tiles.
#[derive(Default)]
struct Scratch {
    cost: Vec<f32>,
    next: Vec<f32>,
    /// Backpointers of every step as bit planes: ≈ 256 · K · 2^(16−K) bits per pass, at most
    /// 1 MiB, so they stay in cache.
    back: Vec<u16>,
    back_start: Vec<usize>,
    /// One winner per survivor, for the kernels that do not write bit planes directly.
    args: Vec<u8>,
    #[cfg(target_arch = "x86_64")]
    fixed: fixed::FixedScratch,
}

/// u16 words of one backpointer bit plane for `survivors` survivors.
#[inline]
fn plane_words(survivors: usize) -> usize {
    survivors.div_ceil(16)
}

/// Spread one winner `hi` per survivor into `hi_bits` bit planes: bit p of survivor o's winner
/// is bit `o % 16` of word `p · plane_words + o / 16`.
fn pack_planes(args: &[u8], hi_bits: u32, back: &mut [u16]) {
    let words = plane_words(args.len());
    for (p, plane) in back
        .chunks_exact_mut(words)
        .take(hi_bits as usize)
        .enumerate()
    {
        for (word, chunk) in plane.iter_mut().zip(args.chunks(16)) {
            *word = chunk
                .iter()
                .enumerate()
                .fold(0, |w, (i, &a)| w | (u16::from((a >> p) & 1) << i));
        }
    }
}

/// Which step implementation a pass uses. Every kernel performs the same f32 operations in
/// the same order and breaks ties towards the smallest `hi`, so all of them return identical
/// walks on every machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    /// The fastest kernel this CPU supports, falling back per step where a shape is too
    /// small for its vectors.
    Auto,
    /// One candidate at a time, straight from the definition; the reference for tests.
    #[cfg_attr(not(test), allow(dead_code))]
    Scalar,
    /// Plain Rust written for the auto-vectoriser; used where no explicit SIMD kernel applies.
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// AVX-512 with the winner kept in the cost's low mantissa bits ([`Effort::Fast`]).
    #[cfg(target_arch = "x86_64")]
    Avx512Tagged,
    /// [`Effort::Fast`]'s 16-bit fixed-point pass (AVX-512BW, shifts ≤ [`fixed::MAX_SHIFT`]);
    /// a tile it cannot take is encoded by [`Kernel::Avx512Tagged`] instead.
    #[cfg(target_arch = "x86_64")]
    Avx512Fixed,
}

impl Kernel {
    /// Positions either side of the wrap point that [`Effort::Fast`]'s first pass covers with
    /// this kernel (None: the whole tile). The fixed-point pass is cheap enough to cover the
    /// whole tile; its f32 fallback keeps the same choice for the tiles it takes over.
    fn fast_first_pass(self, bits: BitWidth) -> Option<usize> {
        #[cfg(target_arch = "x86_64")]
        if self == Kernel::Avx512Fixed {
            return None;
        }
        Some(fast_window(bits))
    }

    /// The kernel of [`Effort::Fast`]: the fixed-point pass where the CPU has AVX-512BW and no
    /// step shifts more than [`fixed::MAX_SHIFT`] bits, else the tagged AVX-512 step, else the
    /// exact kernels.
    fn fast(bits: BitWidth) -> Kernel {
        #[cfg(target_arch = "x86_64")]
        {
            if fixed::supported() && (0..2).all(|t| bits.code_bits(t) <= fixed::MAX_SHIFT) {
                return Kernel::Avx512Fixed;
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Kernel::Avx512Tagged;
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = bits;
        Kernel::Auto
    }

    /// Whether costs carry tag bits (and forbidden starts must stay finite).
    fn tagged(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if self == Kernel::Avx512Tagged {
            return true;
        }
        false
    }

    /// The explicit SIMD kernel to use on this CPU, if any.
    fn detect() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Kernel::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                return Kernel::Avx2;
            }
        }
        Kernel::Portable
    }

    /// Kernels runnable here, for tests that compare them.
    #[cfg(test)]
    fn available() -> Vec<Kernel> {
        let all = vec![Kernel::Auto, Kernel::Scalar, Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        let all = {
            let mut all = all;
            if std::arch::is_x86_feature_detected!("avx2") {
                all.push(Kernel::Avx2);
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                all.push(Kernel::Avx512);
            }
            all
        };
        all
    }
}

/// Readable slack after the cost array: SIMD kernels load whole vectors of predecessor costs
/// even when the last lanes are not used.
const COST_PAD: usize = 16;

/// One Viterbi pass over `xs.len()` steps; returns the cost of the chosen walk and writes its
/// states (step order) to `states`.
///
/// * `shifts[t]`: bits step t shifts in; `final_shift`: the shift of whatever follows the last
///   step, which sets how many low bits of the last state form its survivor index.
/// * `start`: `None` lets the walk begin anywhere; `Some(o)` forces the overlap the first state
///   inherits (its top `L − shifts[0]` bits) to `o`.
/// * `end`: `None` ends at the cheapest survivor; `Some(o)` at survivor `o` (the low
///   `L − final_shift` bits of the last state).
///
/// An unreachable `end` gives an infinite cost and meaningless states. `None` only comes from
/// [`Kernel::Avx512Fixed`]: the fixed-point pass could not take these targets (see [`fixed`]).
#[allow(clippy::too_many_arguments)]
fn viterbi_pass(
    code: &Code,
    xs: &[f32],
    shifts: &[u32],
    final_shift: u32,
    start: Option<u32>,
    end: Option<u32>,
    kernel: Kernel,
    scratch: &mut Scratch,
    states: &mut [u16],
) -> Option<f32> {
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::Avx512Fixed {
        return fixed::viterbi_pass(code, xs, shifts, final_shift, start, end, scratch, states);
    }
    let l = code.state_bits;
    let n = xs.len();
    assert!(n >= 1 && shifts.len() == n && states.len() == n);
    let kernel = match kernel {
        Kernel::Auto => Kernel::detect(),
        k => k,
    };

    plan_back_planes(scratch, l, shifts, final_shift);
    let Scratch {
        cost,
        next,
        back,
        back_start,
        args,
        ..
    } = scratch;
    let forbidden = if kernel.tagged() {
        TAGGED_FORBIDDEN
    } else {
        f32::INFINITY
    };
    start_costs(cost, next, COST_PAD, l, shifts[0], start, 0.0, forbidden);

    for t in 0..n {
        let (d, dn) = (shifts[t], shift_after(shifts, final_shift, t));
        let width = 1usize << (l - dn);
        let step = Step {
            code,
            l,
            d,
            dn,
            x: xs[t],
            cost,
            next: &mut next[..width],
            back: &mut back[back_start[t]..][..dn as usize * plane_words(width)],
            args,
        };
        step.run(kernel);
        std::mem::swap(cost, next);
    }

    let survivors = &cost[..1 << (l - final_shift)];
    let last = end_survivor(survivors, end);
    let best = survivors[last];
    backtrack(back, back_start, l, shifts, final_shift, last, states);
    Some(best)
}

/// The shift of the step after step `t` of a pass over `shifts` (`final_shift` after the last).
#[inline]
fn shift_after(shifts: &[u32], final_shift: u32, t: usize) -> u32 {
    shifts.get(t + 1).copied().unwrap_or(final_shift)
}

/// Size both cost buffers for the widest step (plus `pad` readable values) and set the first
/// step's predecessor costs: all `open` for a free start, else `forbidden` but the forced
/// overlap, which is `open`.
#[allow(clippy::too_many_arguments)]
fn start_costs<T: Copy + Default>(
    cost: &mut Vec<T>,
    next: &mut Vec<T>,
    pad: usize,
    l: u32,
    first_shift: u32,
    start: Option<u32>,
    open: T,
    forbidden: T,
) {
    let len = (1usize << (l - 1)) + pad;
    for buf in [&mut *cost, &mut *next] {
        if buf.len() < len {
            buf.resize(len, T::default());
        }
    }
    let first = &mut cost[..1 << (l - first_shift)];
    match start {
        None => first.fill(open),
        Some(o) => {
            first.fill(forbidden);
            first[o as usize] = open;
        }
    }
}

/// The survivor a pass ends at: `end` when forced, else the first cheapest one, so that ties
/// resolve the same way in every kernel.
fn end_survivor<T: PartialOrd>(survivors: &[T], end: Option<u32>) -> usize {
    match end {
        Some(o) => o as usize,
        None => {
            (0..survivors.len()).fold(0, |b, i| if survivors[i] < survivors[b] { i } else { b })
        }
    }
}

/// Lay out the backpointer planes of a pass in `scratch.back` (step t's at
/// `scratch.back_start[t]`).
fn plan_back_planes(scratch: &mut Scratch, l: u32, shifts: &[u32], final_shift: u32) {
    let Scratch {
        back, back_start, ..
    } = scratch;
    back_start.clear();
    let mut total = 0;
    for t in 0..shifts.len() {
        back_start.push(total);
        let dn = shift_after(shifts, final_shift, t);
        total += dn as usize * plane_words(1 << (l - dn));
    }
    // Every kernel overwrites its whole share, so stale contents never need clearing.
    if back.len() < total {
        back.resize(total, 0);
    }
}

/// Follow the backpointers from survivor `last` after the final step, writing the walk's
/// states (step order).
fn backtrack(
    back: &[u16],
    back_start: &[usize],
    l: u32,
    shifts: &[u32],
    final_shift: u32,
    last: usize,
    states: &mut [u16],
) {
    let n = shifts.len();
    let mut o = last;
    for t in (0..n).rev() {
        let (d, dn) = (shifts[t], shift_after(shifts, final_shift, t));
        let words = plane_words(1 << (l - dn));
        let planes = &back[back_start[t]..];
        let hi = (0..dn as usize).fold(0, |hi, p| {
            hi | (usize::from((planes[p * words + o / 16] >> (o % 16)) & 1) << p)
        });
        let s = (hi << (l - dn)) | o;
        states[t] = s as u16;
        o = s >> d;
    }
}

/// One step of the dynamic program: `next[o']` becomes the minimum over the 2^dn candidates
/// `s` with `s & (2^(l−dn) − 1) = o'` of `cost[s >> d] + (table[s] − x)²`, and the winner's
/// top dn bits (`hi`) go to the backpointer planes (see [`pack_planes`]). Candidates are tried
/// in increasing `hi` and only a strictly smaller cost replaces the incumbent.
struct Step<'a> {
    code: &'a Code<'a>,
    /// State bits (`code.state_bits`).
    l: u32,
    /// Bits this step shifts in.
    d: u32,
    /// Bits the next step shifts in: survivors are indexed by the low l − dn state bits.
    dn: u32,
    x: f32,
    /// 2^(l−d) predecessor costs followed by at least [`COST_PAD`] readable values.
    cost: &'a [f32],
    /// 2^(l−dn) survivor costs.
    next: &'a mut [f32],
    /// dn bit planes of `plane_words(2^(l−dn))` words.
    back: &'a mut [u16],
    /// Room for one winner per survivor, for kernels that pack planes afterwards.
    args: &'a mut Vec<u8>,
}

impl Step<'_> {
    /// Run a kernel that writes one winner byte per survivor, then pack them into planes.
    fn via_args(self, kernel: fn(Args)) {
        let Step {
            code,
            l,
            d,
            dn,
            x,
            cost,
            next,
            back,
            args,
        } = self;
        args.resize(next.len(), 0);
        kernel(Args {
            code,
            l,
            d,
            dn,
            x,
            cost,
            next,
            back: args,
        });
        pack_planes(args, dn, back);
    }

    fn run(self, kernel: Kernel) {
        match kernel {
            Kernel::Auto => self.run(Kernel::detect()),
            Kernel::Scalar => self.via_args(step_scalar),
            Kernel::Portable => self.via_args(step_portable),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => {
                if self.next.len() < x86::AVX2_BLOCK {
                    return self.run(Kernel::Portable);
                }
                assert!(std::arch::is_x86_feature_detected!("avx2"));
                // SAFETY: the CPU supports AVX2, checked just above.
                unsafe { x86::step_avx2(self) }
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => {
                if self.next.len() < x86::AVX512_BLOCK {
                    return self.run(Kernel::Avx2);
                }
                assert!(std::arch::is_x86_feature_detected!("avx512f"));
                // SAFETY: the CPU supports AVX-512F, checked just above.
                unsafe { x86::step_avx512(self) }
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Fixed => unreachable!("the fixed-point kernel has its own pass"),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Tagged => {
                if self.next.len() < x86::AVX512_BLOCK {
                    // Small steps are rare (K = 8 only) and cheap; the exact kernels handle
                    // finite forbidden costs the same way.
                    return self.run(Kernel::Avx2);
                }
                assert!(std::arch::is_x86_feature_detected!("avx512f"));
                // SAFETY: the CPU supports AVX-512F, checked just above.
                unsafe { x86_tagged::step(self) }
            }
        }
    }
}

/// A step whose backpointers are one winner byte per survivor (`back[o']`).
struct Args<'a> {
    code: &'a Code<'a>,
    l: u32,
    d: u32,
    dn: u32,
    x: f32,
    cost: &'a [f32],
    next: &'a mut [f32],
    back: &'a mut [u8],
}

fn step_scalar(st: Args) {
    let Args {
        code,
        l,
        d,
        dn,
        x,
        cost,
        next,
        back,
        ..
    } = st;
    let table = code.table;
    for (o, (best, bp)) in next.iter_mut().zip(back.iter_mut()).enumerate() {
        *best = f32::INFINITY;
        *bp = 0;
        for hi in 0..1usize << dn {
            let s = (hi << (l - dn)) | o;
            let e = table[s] - x;
            let cand = cost[s >> d] + e * e;
            if cand < *best {
                *best = cand;
                *bp = hi as u8;
            }
        }
    }
}

fn step_portable(st: Args) {
    let mids = 1usize << (st.l - st.d - st.dn);
    if let Some(perm) = st.code.permuted(st.d, st.dn) {
        macro_rules! narrow {
            ($nc:literal) => {
                match mids {
                    4.. => step_narrow::<$nc, 4>(st, perm),
                    2 => step_narrow::<$nc, 2>(st, perm),
                    _ => step_narrow::<$nc, 1>(st, perm),
                }
            };
        }
        match st.d {
            1 => narrow!(2),
            2 => narrow!(4),
            _ => unreachable!("permuted tables exist only for short shifts"),
        }
    } else {
        match st.d {
            4.. => step_wide::<16>(st),
            3 => step_wide::<8>(st),
            2 => step_wide::<4>(st),
            _ => step_wide::<2>(st),
        }
    }
}

/// Lanes over the code bits: for d ≥ log2(W) the candidates of one (hi, mid) are W
/// consecutive table entries sharing one predecessor cost, and their survivors are W
/// consecutive entries of `next`.
#[inline]
fn step_wide<const W: usize>(st: Args) {
    let Args {
        code,
        l,
        d,
        dn,
        x,
        cost,
        next,
        back,
        ..
    } = st;
    let table = code.table;
    let codes = 1usize << d;
    let mid_bits = l - d - dn;
    let mids = 1usize << mid_bits;
    debug_assert!(codes.is_multiple_of(W));
    for mid in 0..mids {
        for cb in (0..codes).step_by(W) {
            let mut acc = [f32::INFINITY; W];
            let mut arg = [0u32; W];
            for hi in 0..1usize << dn {
                let cv = cost[(hi << mid_bits) | mid];
                let tv: &[f32; W] = table[(hi << (l - dn)) | (mid << d) | cb..][..W]
                    .try_into()
                    .unwrap();
                for i in 0..W {
                    let e = tv[i] - x;
                    let cand = cv + e * e;
                    let take = cand < acc[i];
                    acc[i] = if take { cand } else { acc[i] };
                    arg[i] = if take { hi as u32 } else { arg[i] };
                }
            }
            let o = (mid << d) | cb;
            next[o..][..W].copy_from_slice(&acc);
            for (b, &a) in back[o..][..W].iter_mut().zip(&arg) {
                *b = a as u8;
            }
        }
    }
}

/// Lanes over the overlap: with only 2^d ∈ {2, 4} codes per predecessor, W consecutive
/// `mid`s of a fixed (hi, code) read W consecutive predecessor costs and W consecutive
/// entries of the permuted table; the NC codes are kept side by side and interleaved into
/// survivor order once per block.
#[inline]
fn step_narrow<const NC: usize, const W: usize>(st: Args, perm: &[f32]) {
    let Args {
        l,
        d,
        dn,
        x,
        cost,
        next,
        back,
        ..
    } = st;
    debug_assert_eq!(1usize << d, NC);
    let mids = 1usize << (l - d - dn);
    debug_assert!(mids.is_multiple_of(W));
    for mb in (0..mids).step_by(W) {
        let mut acc = [[f32::INFINITY; W]; NC];
        let mut arg = [[0u32; W]; NC];
        for hi in 0..1usize << dn {
            let cv: &[f32; W] = cost[hi * mids + mb..][..W].try_into().unwrap();
            for c in 0..NC {
                let tv: &[f32; W] = perm[(hi * NC + c) * mids + mb..][..W].try_into().unwrap();
                let (acc, arg) = (&mut acc[c], &mut arg[c]);
                for i in 0..W {
                    let e = tv[i] - x;
                    let cand = cv[i] + e * e;
                    let take = cand < acc[i];
                    acc[i] = if take { cand } else { acc[i] };
                    arg[i] = if take { hi as u32 } else { arg[i] };
                }
            }
        }
        let out: &mut [f32] = &mut next[mb * NC..][..W * NC];
        let bp: &mut [u8] = &mut back[mb * NC..][..W * NC];
        for i in 0..W {
            for c in 0..NC {
                out[i * NC + c] = acc[c][i];
                bp[i * NC + c] = arg[c][i] as u8;
            }
        }
    }
}

/// Explicit AVX2 / AVX-512 kernels.
///
/// Lanes run over consecutive survivors `o'` in their natural order, so the table row of one
/// `hi` and the outputs are contiguous; the predecessor cost of lane i is `cost[(hi ‖ mid) ]`
/// with `mid = (o' + i) >> d`, i.e. each of a few consecutive costs repeated 2^d times, which
/// one permute (or a broadcast once 2^d ≥ lanes) produces. Several vectors are processed per
/// `hi` so that the compare–select chains of different vectors overlap.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Step;
    use std::arch::x86_64::*;

    const AVX2_LANES: usize = 8;
    const AVX512_LANES: usize = 16;
    /// Vectors in flight per block. AVX2's backpointer packing assumes 4.
    const AVX2_UNROLL: usize = 4;
    const AVX512_UNROLL: usize = 8;
    pub(super) const AVX2_BLOCK: usize = AVX2_LANES * AVX2_UNROLL;
    pub(super) const AVX512_BLOCK: usize = AVX512_LANES * AVX512_UNROLL;

    #[inline]
    fn load8(v: &[f32]) -> [f32; 8] {
        v[..8].try_into().unwrap()
    }

    #[inline]
    fn load16(v: &[f32]) -> [f32; 16] {
        v[..16].try_into().unwrap()
    }

    #[target_feature(enable = "avx2")]
    pub(super) fn step_avx2(st: Step) {
        if st.d >= 3 {
            avx2_body::<true>(st)
        } else {
            avx2_body::<false>(st)
        }
    }

    /// `BROADCAST`: 2^d ≥ 8, so all lanes of a vector share one predecessor.
    #[target_feature(enable = "avx2")]
    fn avx2_body<const BROADCAST: bool>(st: Step) {
        const W: usize = AVX2_LANES;
        let Step {
            code,
            l,
            d,
            dn,
            x,
            cost,
            next,
            back,
            ..
        } = st;
        let table = code.table;
        let mid_bits = l - d - dn;
        let row = 1usize << (l - dn);
        let xv = _mm256_set1_ps(x);
        let spread: __m256i = bytemuck::cast(std::array::from_fn::<i32, W, _>(|i| (i >> d) as i32));
        let inf = _mm256_set1_ps(f32::INFINITY);
        let words = super::plane_words(next.len());
        for (block, next) in next.chunks_exact_mut(AVX2_BLOCK).enumerate() {
            let base = block * AVX2_BLOCK;
            let mut acc = [inf; AVX2_UNROLL];
            let mut arg = [_mm256_setzero_si256(); AVX2_UNROLL];
            for hi in 0..1usize << dn {
                let h = _mm256_set1_epi32(hi as i32);
                let t_row = &table[hi * row + base..][..AVX2_BLOCK];
                let c_row = &cost[(hi << mid_bits) + (base >> d)..];
                for u in 0..AVX2_UNROLL {
                    let t: __m256 = bytemuck::cast(load8(&t_row[u * W..]));
                    let e = _mm256_sub_ps(t, xv);
                    let c = if BROADCAST {
                        _mm256_set1_ps(c_row[(u * W) >> d])
                    } else {
                        let v: __m256 = bytemuck::cast(load8(&c_row[(u * W) >> d..]));
                        _mm256_permutevar8x32_ps(v, spread)
                    };
                    let cand = _mm256_add_ps(c, _mm256_mul_ps(e, e));
                    let take = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(cand, acc[u]));
                    // minps(a, b) is `a < b ? a : b`, the strict replacement rule.
                    acc[u] = _mm256_min_ps(cand, acc[u]);
                    // hi only grows, so the newest winner is also the largest recorded.
                    arg[u] = _mm256_max_epi32(arg[u], _mm256_and_si256(take, h));
                }
            }
            for (u, acc) in acc.iter().enumerate() {
                let out: [f32; W] = bytemuck::cast(*acc);
                next[u * W..][..W].copy_from_slice(&out);
            }
            // Narrow 4 × 8 dwords to 32 bytes: the packs work per 128-bit half, the permute
            // restores order.
            let lo = _mm256_packs_epi32(arg[0], arg[1]);
            let hi = _mm256_packs_epi32(arg[2], arg[3]);
            let bytes = _mm256_packus_epi16(lo, hi);
            let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
            let bytes = _mm256_permutevar8x32_epi32(bytes, order);
            for p in 0..dn as usize {
                // Move bit p of every byte to its top bit, where movemask collects it.
                let shift = _mm_cvtsi32_si128(7 - p as i32);
                let bits = _mm256_movemask_epi8(_mm256_sll_epi16(bytes, shift)) as u32;
                let at = p * words + base / 16;
                back[at] = bits as u16;
                back[at + 1] = (bits >> 16) as u16;
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) fn step_avx512(st: Step) {
        if st.d >= 4 {
            avx512_body::<true>(st)
        } else {
            avx512_body::<false>(st)
        }
    }

    /// `BROADCAST`: 2^d ≥ 16, so all lanes of a vector share one predecessor.
    #[target_feature(enable = "avx512f")]
    fn avx512_body<const BROADCAST: bool>(st: Step) {
        const W: usize = AVX512_LANES;
        let Step {
            code,
            l,
            d,
            dn,
            x,
            cost,
            next,
            back,
            ..
        } = st;
        let table = code.table;
        let mid_bits = l - d - dn;
        let row = 1usize << (l - dn);
        let xv = _mm512_set1_ps(x);
        let spread: __m512i = bytemuck::cast(std::array::from_fn::<i32, W, _>(|i| (i >> d) as i32));
        let inf = _mm512_set1_ps(f32::INFINITY);
        let words = super::plane_words(next.len());
        for (block, next) in next.chunks_exact_mut(AVX512_BLOCK).enumerate() {
            let base = block * AVX512_BLOCK;
            let mut acc = [inf; AVX512_UNROLL];
            let mut arg = [_mm512_setzero_si512(); AVX512_UNROLL];
            for hi in 0..1usize << dn {
                let h = _mm512_set1_epi32(hi as i32);
                let t_row = &table[hi * row + base..][..AVX512_BLOCK];
                let c_row = &cost[(hi << mid_bits) + (base >> d)..];
                for u in 0..AVX512_UNROLL {
                    let t: __m512 = bytemuck::cast(load16(&t_row[u * W..]));
                    let e = _mm512_sub_ps(t, xv);
                    let c = if BROADCAST {
                        _mm512_set1_ps(c_row[(u * W) >> d])
                    } else {
                        let v: __m512 = bytemuck::cast(load16(&c_row[(u * W) >> d..]));
                        _mm512_permutexvar_ps(spread, v)
                    };
                    let cand = _mm512_add_ps(c, _mm512_mul_ps(e, e));
                    let take = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(cand, acc[u]);
                    acc[u] = _mm512_mask_mov_ps(acc[u], take, cand);
                    arg[u] = _mm512_mask_mov_epi32(arg[u], take, h);
                }
            }
            for u in 0..AVX512_UNROLL {
                let out: [f32; W] = bytemuck::cast(acc[u]);
                next[u * W..][..W].copy_from_slice(&out);
                for p in 0..dn as usize {
                    let bit = _mm512_set1_epi32(1 << p);
                    back[p * words + base / 16 + u] = _mm512_test_epi32_mask(arg[u], bit);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86_tagged {
    use super::Step;
    use std::arch::x86_64::*;

    const W: usize = 16;
    const UNROLL: usize = 8;
    const BLOCK: usize = W * UNROLL;

    #[inline]
    fn load16(v: &[f32]) -> [f32; 16] {
        v[..16].try_into().unwrap()
    }

    #[target_feature(enable = "avx512f")]
    pub(super) fn step(st: Step) {
        if st.d >= 4 {
            body::<true>(st)
        } else {
            body::<false>(st)
        }
    }

    /// The AVX-512 step with the candidate's `hi` written into the low `dn` bits of its
    /// (non-negative) cost: a single unsigned min then keeps the cheapest candidate and its
    /// identity together, ties going to the smallest `hi` as in the exact kernels.
    #[target_feature(enable = "avx512f")]
    fn body<const BROADCAST: bool>(st: Step) {
        let Step {
            code,
            l,
            d,
            dn,
            x,
            cost,
            next,
            back,
            ..
        } = st;
        let table = code.half_table();
        let mid_bits = l - d - dn;
        let row = 1usize << (l - dn);
        let xv = _mm512_set1_ps(x);
        let spread: __m512i = bytemuck::cast(std::array::from_fn::<i32, W, _>(|i| (i >> d) as i32));
        let tag_mask = _mm512_set1_epi32(((1u32 << dn) - 1) as i32);
        let max = _mm512_set1_epi32(-1);
        let words = super::plane_words(next.len());
        for (block, next) in next.chunks_exact_mut(BLOCK).enumerate() {
            let base = block * BLOCK;
            let mut acc = [max; UNROLL];
            for hi in 0..1usize << dn {
                let h = _mm512_set1_epi32(hi as i32);
                let t_row = &table[hi * row + base..][..BLOCK];
                let c_row = &cost[(hi << mid_bits) + (base >> d)..];
                for u in 0..UNROLL {
                    let halves: [u16; W] = t_row[u * W..][..W].try_into().unwrap();
                    let t = _mm512_cvtph_ps(bytemuck::cast::<_, __m256i>(halves));
                    let e = _mm512_sub_ps(t, xv);
                    let c = if BROADCAST {
                        _mm512_set1_ps(c_row[(u * W) >> d])
                    } else {
                        let v: __m512 = bytemuck::cast(load16(&c_row[(u * W) >> d..]));
                        _mm512_permutexvar_ps(spread, v)
                    };
                    let cand = _mm512_castps_si512(_mm512_fmadd_ps(e, e, c));
                    // (cand & !tag_mask) | h in one ternary-logic op (truth table 0xD8:
                    // a = cand, b = h, c = tag_mask → c ? b : a).
                    let tagged = _mm512_ternarylogic_epi32::<0xD8>(cand, h, tag_mask);
                    acc[u] = _mm512_min_epu32(acc[u], tagged);
                }
            }
            for u in 0..UNROLL {
                let out: [f32; W] = bytemuck::cast(_mm512_andnot_si512(tag_mask, acc[u]));
                next[u * W..][..W].copy_from_slice(&out);
                let arg = _mm512_and_si512(acc[u], tag_mask);
                for p in 0..dn as usize {
                    let bit = _mm512_set1_epi32(1 << p);
                    back[p * words + base / 16 + u] = _mm512_test_epi32_mask(arg, bit);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use rand_distr::StandardNormal;

    fn gaussian(rng: &mut StdRng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.sample(StandardNormal)).collect()
    }

    /// f32 running sum in walk order: exactly what the dynamic program minimises.
    fn walk_cost(table: &[f32], xs: &[f32], states: &[u16]) -> f32 {
        let mut c = 0f32;
        for (&x, &s) in xs.iter().zip(states) {
            let e = table[usize::from(s)] - x;
            c += e * e;
        }
        c
    }

    /// Every walk of the small trellis: start overlap `o0` (or all when `None`), then every
    /// code sequence. Returns the minimum running-sum cost among walks whose final survivor
    /// index (low `l − final_shift` bits) equals `end` (any when `None`).
    fn brute_force(
        table: &[f32],
        l: u32,
        xs: &[f32],
        shifts: &[u32],
        final_shift: u32,
        start: Option<u32>,
        end: Option<u32>,
    ) -> f32 {
        let code_bits: u32 = shifts.iter().sum();
        let starts: Vec<u32> = match start {
            Some(o) => vec![o],
            None => (0..1 << (l - shifts[0])).collect(),
        };
        let mut best = f32::INFINITY;
        for &o0 in &starts {
            for codes in 0u64..1 << code_bits {
                let mut rest = codes;
                let mut prev = o0;
                let mut c = 0f32;
                for (&x, &d) in xs.iter().zip(shifts) {
                    let s = ((prev << d) | (rest as u32 & low_mask(d))) & low_mask(l);
                    rest >>= d;
                    let e = table[s as usize] - x;
                    c += e * e;
                    prev = s;
                }
                let survivor = prev & low_mask(l - final_shift);
                if end.is_none_or(|o| o == survivor) && c < best {
                    best = c;
                }
            }
        }
        best
    }

    fn is_open_walk(l: u32, states: &[u16], shifts: &[u32]) -> bool {
        states.windows(2).zip(&shifts[1..]).all(|(w, &d)| {
            let high = (u32::from(w[0]) << d) & low_mask(l);
            u32::from(w[1]) & !low_mask(d) & low_mask(l) == high
        })
    }

    /// Short trellises: (state bits, shift ring, steps).
    /// Most are wide enough for the SIMD kernels (blocks of 32 / 128 survivors) and
    /// together they reach both of their cost-spreading paths.
    const SMALL: [(u32, &[u32], usize); 12] = [
        (6, &[1], 8),
        (7, &[1], 7),
        (8, &[1], 8),
        (6, &[2], 5),
        (8, &[2], 6),
        (7, &[3], 4),
        (10, &[3], 4),
        (10, &[4], 3),
        (11, &[4], 3),
        (7, &[1, 2], 6),
        (8, &[2, 3], 4),
        (9, &[2, 3], 4),
    ];

    fn small_case(
        rng: &mut StdRng,
        l: u32,
        pattern: &[u32],
        steps: usize,
    ) -> (Vec<f32>, Vec<f32>, Vec<u32>, u32) {
        let table = gaussian(rng, 1 << l);
        let xs = gaussian(rng, steps);
        let shifts: Vec<u32> = (0..steps).map(|t| pattern[t % pattern.len()]).collect();
        let final_shift = pattern[steps % pattern.len()];
        (table, xs, shifts, final_shift)
    }

    #[test]
    fn open_walk_matches_brute_force() {
        let mut rng = StdRng::seed_from_u64(11);
        let mut scratch = Scratch::default();
        for (l, pattern, steps) in SMALL {
            for _ in 0..4 {
                let (table, xs, shifts, fin) = small_case(&mut rng, l, pattern, steps);
                let code = Code::new(l, &table, pattern);
                let want = brute_force(&table, l, &xs, &shifts, fin, None, None);
                for kernel in Kernel::available() {
                    let mut states = vec![0u16; steps];
                    let got = viterbi_pass(
                        &code,
                        &xs,
                        &shifts,
                        fin,
                        None,
                        None,
                        kernel,
                        &mut scratch,
                        &mut states,
                    )
                    .expect("the f32 kernels always give a result");
                    assert_eq!(got, want, "L={l} {pattern:?} T={steps} {kernel:?}");
                    assert!(is_open_walk(l, &states, &shifts));
                    assert_eq!(walk_cost(&table, &xs, &states), got);
                }
            }
        }
    }

    #[test]
    fn forced_overlap_walk_matches_brute_force() {
        let mut rng = StdRng::seed_from_u64(12);
        let mut scratch = Scratch::default();
        for (l, pattern, steps) in SMALL {
            for _ in 0..4 {
                let (table, xs, shifts, fin) = small_case(&mut rng, l, pattern, steps);
                let code = Code::new(l, &table, pattern);
                let width = l - shifts[0];
                // The closing constraint compares the same overlap at both ends, so the
                // final survivor must be measured with the first step's shift.
                assert_eq!(fin, shifts[0], "closed ring of whole shift periods");
                let o = rng.random_range(0..1u32 << width);
                let want = brute_force(&table, l, &xs, &shifts, fin, Some(o), Some(o));
                for kernel in Kernel::available() {
                    let mut states = vec![0u16; steps];
                    let got = viterbi_pass(
                        &code,
                        &xs,
                        &shifts,
                        fin,
                        Some(o),
                        Some(o),
                        kernel,
                        &mut scratch,
                        &mut states,
                    )
                    .expect("the f32 kernels always give a result");
                    assert_eq!(got, want, "L={l} {pattern:?} T={steps} o={o} {kernel:?}");
                    if got.is_finite() {
                        assert!(is_open_walk(l, &states, &shifts));
                        assert_eq!(u32::from(states[0]) >> shifts[0], o, "starts at o");
                        assert_eq!(u32::from(states[steps - 1]) & low_mask(width), o);
                        assert_eq!(walk_cost(&table, &xs, &states), got);
                    }
                }
            }
        }
    }

    /// The fixed-point pass on the small trellises (values scaled into its range): a valid
    /// walk whose exact cost is within its rounding of the brute-force optimum, and whose
    /// reported cost is within that rounding of the walk's exact cost.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn fixed_pass_is_within_its_rounding_of_brute_force() {
        let mut rng = StdRng::seed_from_u64(15);
        let mut scratch = Scratch::default();
        for (l, pattern, steps) in SMALL {
            for case in 0..4 {
                let (table, xs, shifts, fin) = small_case(&mut rng, l, pattern, steps);
                let shrink = |v: Vec<f32>| -> Vec<f32> { v.iter().map(|x| 0.2 * x).collect() };
                let (table, xs) = (shrink(table), shrink(xs));
                let code = Code::new(l, &table, pattern);
                // Per step: half a cost unit from rounding e², and e off by at most 2^-13
                // (x and the table entry each rounded), times 2|e| ≤ 2·1.6.
                let tolerance = steps as f32 * (0.5 + 3.2 * 2048.0 / 8192.0) / fixed::COST_UNIT;
                let forced = (case % 2 == 1).then(|| rng.random_range(0..1u32 << (l - shifts[0])));
                let want = brute_force(&table, l, &xs, &shifts, fin, forced, forced);
                let mut states = vec![0u16; steps];
                let got = fixed::viterbi_pass(
                    &code,
                    &xs,
                    &shifts,
                    fin,
                    forced,
                    forced,
                    &mut scratch,
                    &mut states,
                )
                .unwrap_or_else(|| panic!("L={l} {pattern:?}: no fixed-point result"));
                assert!(is_open_walk(l, &states, &shifts), "L={l} {pattern:?}");
                if let Some(o) = forced {
                    assert_eq!(u32::from(states[0]) >> shifts[0], o, "starts at o");
                    assert_eq!(u32::from(states[steps - 1]) & low_mask(l - fin), o);
                }
                let exact = walk_cost(&table, &xs, &states);
                assert!(
                    exact <= want + tolerance,
                    "L={l} {pattern:?}: walk {exact} vs optimum {want} (±{tolerance})"
                );
                assert!(
                    (got - exact).abs() <= tolerance,
                    "L={l} {pattern:?}: reported {got} vs walk {exact}"
                );
            }
        }
    }

    /// The fast effort's first pass: the whole tile where its kernel is the fixed-point pass,
    /// [`fast_window`] positions either side of the wrap with the f32 kernels, tile for tile.
    #[test]
    fn fast_effort_windows_only_the_f32_kernels() {
        let mut rng = StdRng::seed_from_u64(23);
        let targets: Vec<[f32; TILE_WEIGHTS]> = (0..4)
            .map(|_| tile_target(&mut rng, CODEBOOK_RMS))
            .collect();
        let mut scratch = Scratch::default();
        for bits in [2.0, 3.0, 4.0, 6.0].map(|b| BitWidth::from_f64(b).unwrap()) {
            let kernel = Kernel::fast(bits);
            #[cfg(target_arch = "x86_64")]
            let window = (kernel != Kernel::Avx512Fixed).then(|| fast_window(bits));
            #[cfg(not(target_arch = "x86_64"))]
            let window = Some(fast_window(bits));
            let fast = encode_tiles_with_effort(&targets, bits, Codebook::Mul1, Effort::Fast);
            for (got, target) in fast.iter().zip(&targets) {
                let (want, _) = encode_tile_windowed(
                    target,
                    bits,
                    Codebook::Mul1,
                    kernel,
                    window,
                    &mut scratch,
                );
                assert_eq!(got, &want, "K={bits}");
            }
        }
    }

    /// Whole tiles through the fixed-point kernel (no window, so only the arithmetic differs
    /// from the exact search): valid closed walks, the total squared error within 0.5 % of the
    /// exact one at every width it takes; a target out of its range falls back to f32.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn fixed_kernel_tiles_are_close_to_exact() {
        if !fixed::supported() {
            eprintln!("no AVX-512BW here: the fixed-point kernel is never chosen on this CPU");
            return;
        }
        let mut rng = StdRng::seed_from_u64(16);
        let mut scratch = Scratch::default();
        for bits in BitWidth::ALL {
            if (0..2).any(|t| bits.code_bits(t) > fixed::MAX_SHIFT) {
                assert_ne!(Kernel::fast(bits), Kernel::Avx512Fixed, "{bits}");
                continue;
            }
            assert_eq!(Kernel::fast(bits), Kernel::Avx512Fixed, "{bits}");
            for cb in Codebook::ALL {
                let (mut fixed_sse, mut exact_sse) = (0.0, 0.0);
                for _ in 0..3 {
                    let target = tile_target(&mut rng, CODEBOOK_RMS);
                    let (tile, _) =
                        encode_tile_with(&target, bits, cb, Kernel::Avx512Fixed, &mut scratch);
                    assert!(
                        crate::tile::is_valid_walk(&tile.states, bits),
                        "{bits} {cb:?}"
                    );
                    assert_eq!(tile.words, pack_states(&tile.states, bits));
                    fixed_sse += tile.squared_error;
                    exact_sse += encode_tile_with(&target, bits, cb, Kernel::Auto, &mut scratch)
                        .0
                        .squared_error;
                }
                assert!(
                    fixed_sse <= 1.005 * exact_sse,
                    "{bits} {cb:?}: fixed {fixed_sse} vs exact {exact_sse}"
                );
            }
        }
        let bits = BitWidth::from_f64(3.0).unwrap();
        let mut target = tile_target(&mut rng, CODEBOOK_RMS);
        target[17] = 5.0;
        let fixed = encode_tile_with(
            &target,
            bits,
            Codebook::Mul1,
            Kernel::Avx512Fixed,
            &mut scratch,
        );
        let tagged = encode_tile_with(
            &target,
            bits,
            Codebook::Mul1,
            Kernel::Avx512Tagged,
            &mut scratch,
        );
        assert_eq!(
            fixed.0, tagged.0,
            "an out-of-range target is encoded in f32"
        );
    }

    /// Best code at each step given the previous state, starting from the best first state.
    fn greedy(table: &[f32], xs: &[f32], shifts: &[u32]) -> Vec<u16> {
        let nearest = |candidates: &mut dyn Iterator<Item = usize>, x: f32| {
            candidates
                .min_by(|&a, &b| (table[a] - x).abs().total_cmp(&(table[b] - x).abs()))
                .unwrap()
        };
        let mut states = Vec::with_capacity(xs.len());
        let mut prev = nearest(&mut (0..table.len()), xs[0]);
        states.push(prev as u16);
        for (&x, &d) in xs.iter().zip(shifts).skip(1) {
            let base = (prev << d) & 0xFFFF;
            prev = nearest(&mut (base..base + (1 << d)), x);
            states.push(prev as u16);
        }
        states
    }

    fn tile_target(rng: &mut StdRng, scale: f32) -> [f32; TILE_WEIGHTS] {
        let v = gaussian(rng, TILE_WEIGHTS);
        std::array::from_fn(|i| v[i] * scale)
    }

    #[test]
    fn never_worse_than_greedy_and_closing_costs_more() {
        let mut rng = StdRng::seed_from_u64(13);
        let mut scratch = Scratch::default();
        for bits in BitWidth::ALL {
            for cb in Codebook::ALL {
                let target = tile_target(&mut rng, CODEBOOK_RMS);
                let (tile, costs) = encode_tile_with(&target, bits, cb, Kernel::Auto, &mut scratch);
                let table = cb.table_f32();
                let rotate = |v: &[f32]| -> Vec<f32> {
                    let pos: Vec<f32> = (0..TILE_WEIGHTS)
                        .map(|t| v[usize::from(POSITION_TO_TILE_INDEX[t])])
                        .collect();
                    [&pos[128..], &pos[..128]].concat()
                };
                let xs = rotate(&target);
                let shifts: Vec<u32> = (0..TILE_WEIGHTS)
                    .map(|t| bits.code_bits((t + 128) % 256))
                    .collect();
                let greedy_cost = walk_cost(table, &xs, &greedy(table, &xs, &shifts));
                assert!(
                    costs.open <= greedy_cost,
                    "{bits} {cb:?}: {} > greedy {greedy_cost}",
                    costs.open
                );
                // The closed walk is also an open walk of the rotated ring.
                let closed_rot = [&tile.states[128..], &tile.states[..128]].concat();
                assert!(
                    costs.open <= walk_cost(table, &xs, &closed_rot),
                    "{bits} {cb:?}"
                );
                assert!(costs.open <= costs.closed * (1.0 + 1e-5), "{bits} {cb:?}");
                let rel = (f64::from(costs.closed) - tile.squared_error).abs() / tile.squared_error;
                assert!(
                    rel < 1e-5,
                    "{bits} {cb:?}: pass cost {} vs {}",
                    costs.closed,
                    tile.squared_error
                );
            }
        }
    }

    /// Roughly the scale the quantizer feeds: unit Gaussian times the 3INST RMS.
    const CODEBOOK_RMS: f32 = crate::codebook::CODEBOOK_SCALE;

    #[test]
    fn every_kernel_matches_scalar_reference() {
        let mut rng = StdRng::seed_from_u64(14);
        let mut scratch = Scratch::default();
        for bits in BitWidth::ALL {
            let cb = Codebook::ALL[bits.tile_words() % 3];
            let target = tile_target(&mut rng, CODEBOOK_RMS);
            let (want, want_costs) =
                encode_tile_with(&target, bits, cb, Kernel::Scalar, &mut scratch);
            for kernel in Kernel::available() {
                let (got, got_costs) = encode_tile_with(&target, bits, cb, kernel, &mut scratch);
                assert_eq!(got, want, "{bits} {cb:?} {kernel:?}");
                assert_eq!(got_costs.open, want_costs.open);
                assert_eq!(got_costs.closed, want_costs.closed);
            }
        }
    }
}

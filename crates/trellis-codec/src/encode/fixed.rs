//! [`Effort::Fast`](super::Effort::Fast)'s Viterbi pass in 16-bit fixed point (AVX-512BW).
//!
//! The f32 step costs about six vector operations per sixteen candidates. In 16-bit lanes a
//! vector holds 32 candidates for five (error, square, spread of the predecessor costs, add,
//! min); on a Zen 4 core that is ≈ 1,450 tiles/s at K = 4 (`viterbi_speed`). What it gives
//! up is resolution:
//!
//! * values (codebook entries and targets) are stored as `round(v · 2^13)`, so they must lie
//!   in (−4, 4); every codebook does (their magnitudes stay below 3.5), and a tile with a
//!   larger target is left to the f32 kernels;
//! * a candidate's squared error is `mulhrs(e, e)`, i.e. rounded to units of 2^-11; an error
//!   beyond ±4 saturates at 16. Over a 256-step walk the rounding moves a walk's cost by a
//!   few of those units, ≈ 0.1 % of a K = 4 tile's error; at K ≥ 5 a step's error is only a
//!   few units itself, so those widths keep the f32 kernels ([`MAX_SHIFT`]);
//! * costs are unsigned and saturate at 65535 units; whenever the cheapest survivor passes
//!   [`RENORMALIZE_ABOVE`] it is subtracted from all of them, so only walks whose squared
//!   error is already ≈ 24 above the best one's lose information.
//!
//! The step keeps no backpointers: every step's survivor costs stay in a per-pass history
//! (≈ 2 MiB at K = 4), and the backtrack recomputes the 2^dn candidates of the one survivor
//! it follows per step, with the step's arithmetic and tie rule, so it picks the winner the
//! step did. Tracking the winner in the step cost two of its seven vector operations per 32
//! candidates and a bit-plane extraction per block.
//!
//! A pass reports `None` when its result cannot be trusted (a target out of range, a forced
//! end that saturated, a walk that does not start where it was forced to); the caller then
//! encodes the tile with the f32 kernels.

use super::{Code, Scratch};

/// Fixed-point scale of values: 2^13, so that ±4 fits in i16.
const VALUE_SCALE: f32 = 8192.0;
/// A squared error of 1.0 in cost units: `mulhrs` of two 2^13-scaled values is their product
/// in units of 2^26 / 2^15.
pub(super) const COST_UNIT: f32 = 2048.0;
/// Largest target magnitude the fixed-point pass accepts.
const MAX_VALUE: f32 = 3.999;
/// Largest shift the fixed-point pass is used for (see the module notes).
pub(super) const MAX_SHIFT: u32 = 4;
/// Cheapest survivor cost above which all costs are lowered by it.
const RENORMALIZE_ABOVE: u16 = 16384;
/// Readable slack after the cost array: a step loads 32 predecessor costs at a time.
const COST_PAD: usize = 32;

/// Whether the fixed-point pass runs on this CPU.
pub(super) fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The codebook in fixed point (every entry is below 4 in magnitude).
pub(super) fn table(values: &[f32]) -> Box<[i16]> {
    values
        .iter()
        .map(|&v| {
            assert!(
                v.abs() < 4.0,
                "codebook value {v} outside the fixed-point range"
            );
            (v * VALUE_SCALE).round() as i16
        })
        .collect()
}

/// Buffers of the fixed-point pass, reused across tiles.
#[derive(Default)]
pub(super) struct FixedScratch {
    /// Row t (of `stride` values) holds the predecessor costs step t reads; row n the final
    /// survivors.
    history: Vec<u16>,
}

/// A value in the fixed point of the pass.
fn to_fixed(v: f32) -> i16 {
    (v * VALUE_SCALE).round() as i16
}

/// The fixed-point pass behind [`super::viterbi_pass`] for [`super::Kernel::Avx512Fixed`] (same
/// arguments); returns the chosen walk's cost, or `None` when the caller must redo the tile in
/// f32.
#[allow(clippy::too_many_arguments)]
pub(super) fn viterbi_pass(
    code: &Code,
    xs: &[f32],
    shifts: &[u32],
    final_shift: u32,
    start: Option<u32>,
    end: Option<u32>,
    scratch: &mut Scratch,
    states: &mut [u16],
) -> Option<f32> {
    let l = code.state_bits;
    let n = xs.len();
    assert!(n >= 1 && shifts.len() == n && states.len() == n);
    if xs.iter().any(|x| x.abs() > MAX_VALUE)
        || shifts.iter().chain([&final_shift]).any(|&d| d > MAX_SHIFT)
    {
        return None;
    }
    let table = code.fixed_table();
    // Widest cost row of the pass: predecessors of every step and the final survivors.
    let widest = shifts
        .iter()
        .chain([&final_shift])
        .map(|&d| 1usize << (l - d))
        .max()
        .unwrap_or(0);
    let stride = (widest + COST_PAD).next_multiple_of(32);
    let history = &mut scratch.fixed.history;
    if history.len() < (n + 1) * stride {
        history.resize((n + 1) * stride, 0);
    }
    let first = &mut history[..1 << (l - shifts[0])];
    match start {
        None => first.fill(0),
        Some(o) => {
            first.fill(u16::MAX);
            first[o as usize] = 0;
        }
    }

    let mut offset = 0u64;
    for t in 0..n {
        let (d, dn) = (shifts[t], super::shift_after(shifts, final_shift, t));
        let width = 1usize << (l - dn);
        let (done, rest) = history.split_at_mut((t + 1) * stride);
        let next = &mut rest[..width];
        let step = Step {
            table,
            l,
            d,
            dn,
            x: to_fixed(xs[t]),
            cost: &done[t * stride..],
            next,
        };
        let lowest = step.run();
        if lowest > RENORMALIZE_ABOVE {
            for c in &mut rest[..width] {
                *c = c.saturating_sub(lowest);
            }
            offset += u64::from(lowest);
        }
    }

    let survivors = &history[n * stride..][..1 << (l - final_shift)];
    let last = super::end_survivor(survivors, end);
    let best = survivors[last];
    if best == u16::MAX {
        return None;
    }
    backtrack(
        history,
        stride,
        table,
        l,
        xs,
        shifts,
        final_shift,
        last,
        states,
    );
    if start.is_some_and(|o| u32::from(states[0]) >> shifts[0] != o) {
        return None;
    }
    Some(((offset + u64::from(best)) as f64 / f64::from(COST_UNIT)) as f32)
}

/// The cheapest of a survivor's 2^dn candidates given its step's predecessor costs, ties to
/// the smallest `hi`: the step's own rule, so the backtrack finds the step's winner.
#[allow(clippy::too_many_arguments)]
fn winner(table: &[i16], cost: &[u16], l: u32, d: u32, dn: u32, x: i16, o: usize) -> (usize, u16) {
    let mut best = u16::MAX;
    let mut arg = 0;
    for hi in 0..1usize << dn {
        let s = (hi << (l - dn)) | o;
        let cand = cost[s >> d].saturating_add(squared_error(table[s], x));
        if hi == 0 || cand < best {
            best = cand;
            arg = hi;
        }
    }
    (arg, best)
}

/// Follow the winners back from survivor `last` after the final step, recomputing each
/// step's choice from the cost history; writes the walk's states (step order).
#[allow(clippy::too_many_arguments)]
fn backtrack(
    history: &[u16],
    stride: usize,
    table: &[i16],
    l: u32,
    xs: &[f32],
    shifts: &[u32],
    final_shift: u32,
    last: usize,
    states: &mut [u16],
) {
    let mut o = last;
    for t in (0..shifts.len()).rev() {
        let (d, dn) = (shifts[t], super::shift_after(shifts, final_shift, t));
        let cost = &history[t * stride..][..stride];
        let (hi, _) = winner(table, cost, l, d, dn, to_fixed(xs[t]), o);
        let s = (hi << (l - dn)) | o;
        states[t] = s as u16;
        o = s >> d;
    }
}

/// One step: as [`super::Step`], with fixed-point values and saturating u16 costs.
struct Step<'a> {
    table: &'a [i16],
    l: u32,
    d: u32,
    dn: u32,
    x: i16,
    /// 2^(l−d) predecessor costs followed by at least [`COST_PAD`] readable values.
    cost: &'a [u16],
    next: &'a mut [u16],
}

impl Step<'_> {
    /// Runs the step; returns the cheapest survivor's cost.
    fn run(self) -> u16 {
        #[cfg(target_arch = "x86_64")]
        if self.next.len() >= x86::BLOCK && supported() {
            // SAFETY: the CPU supports AVX-512F and AVX-512BW, checked just above.
            return unsafe { x86::step(self) };
        }
        self.run_scalar()
    }

    /// Straight from the definition, for steps narrower than a SIMD block and for CPUs without
    /// the SIMD kernel (production never runs the pass there, but its tests do).
    fn run_scalar(self) -> u16 {
        let Step {
            table,
            l,
            d,
            dn,
            x,
            cost,
            next,
        } = self;
        let mut lowest = u16::MAX;
        for (o, best) in next.iter_mut().enumerate() {
            *best = winner(table, cost, l, d, dn, x, o).1;
            lowest = lowest.min(*best);
        }
        lowest
    }
}

/// `mulhrs(e, e)` of the saturated difference, as the SIMD kernel computes it.
fn squared_error(t: i16, x: i16) -> u16 {
    let e = i32::from(t.saturating_sub(x));
    (((e * e) + (1 << 14)) >> 15) as u16
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Step;
    use std::arch::x86_64::*;

    const W: usize = 32;
    const UNROLL: usize = 16;
    pub(super) const BLOCK: usize = W * UNROLL;

    /// Lanes over consecutive survivors, as in the f32 kernels: the predecessor cost of lane i
    /// is the `(i >> d)`-th of the block's consecutive predecessors, spread by one permute.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) fn step(st: Step) -> u16 {
        match st.d {
            1 => step_d::<1>(st),
            2 => step_d::<2>(st),
            3 => step_d::<3>(st),
            4 => step_d::<4>(st),
            d => unreachable!("shift {d} is above the fixed-point pass's limit"),
        }
    }

    /// A step with shift `D` (a constant, so that every offset in the block is one).
    #[target_feature(enable = "avx512f,avx512bw")]
    fn step_d<const D: u32>(st: Step) -> u16 {
        let Step {
            table,
            l,
            d,
            dn,
            x,
            cost,
            next,
        } = st;
        debug_assert_eq!(d, D);
        let mid_bits = l - D - dn;
        let row = 1usize << (l - dn);
        let xv = _mm512_set1_epi16(x);
        let spread: __m512i = bytemuck::cast(std::array::from_fn::<i16, W, _>(|i| (i >> D) as i16));
        let max = _mm512_set1_epi16(-1);
        // Predecessor costs one block reads, through the end of its last load.
        let c_span = (((UNROLL - 1) * W) >> D) + if D >= 2 { 8 } else { 16 };
        let mut lowest = max;
        for (block, next) in next.chunks_exact_mut(BLOCK).enumerate() {
            let base = block * BLOCK;
            let mut acc = [max; UNROLL];
            for hi in 0..1usize << dn {
                let t_row = &table[hi * row + base..][..BLOCK];
                let c_row = &cost[(hi << mid_bits) + (base >> D)..][..c_span];
                for u in 0..UNROLL {
                    let t: [i16; W] = t_row[u * W..][..W].try_into().unwrap();
                    let e = _mm512_subs_epi16(bytemuck::cast(t), xv);
                    // e·e rounded to 2^-11 units; mulhrs(−32768, −32768) = 0x8000, which
                    // read as unsigned is the right 32768.
                    let e2 = _mm512_mulhrs_epi16(e, e);
                    // Only W >> d predecessors are needed: a load no wider than that never
                    // splits a cache line, where a full 64-byte load at a 4-byte step would.
                    let c_at = &c_row[(u * W) >> D..];
                    let c = if D >= 2 {
                        let c: [u16; 8] = c_at[..8].try_into().unwrap();
                        _mm512_zextsi128_si512(bytemuck::cast(c))
                    } else {
                        let c: [u16; 16] = c_at[..16].try_into().unwrap();
                        _mm512_zextsi256_si512(bytemuck::cast(c))
                    };
                    let c = _mm512_permutexvar_epi16(spread, c);
                    acc[u] = _mm512_min_epu16(_mm512_adds_epu16(c, e2), acc[u]);
                }
            }
            for u in 0..UNROLL {
                let out: [u16; W] = bytemuck::cast(acc[u]);
                next[u * W..][..W].copy_from_slice(&out);
                lowest = _mm512_min_epu16(lowest, acc[u]);
            }
        }
        let lanes: [u16; W] = bytemuck::cast(lowest);
        lanes.into_iter().min().unwrap_or(u16::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codebook::Codebook;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// The SIMD step reproduces the scalar definition exactly (survivor costs, cheapest
    /// cost) for every pair of shifts, with costs spanning the saturated top.
    #[test]
    fn simd_step_matches_scalar_step() {
        if !supported() {
            eprintln!("no AVX-512BW here: only the scalar step exists on this CPU");
            return;
        }
        let mut rng = StdRng::seed_from_u64(21);
        let l = 16;
        for cb in Codebook::ALL {
            let table = table(cb.table_f32());
            for d in 1..=MAX_SHIFT {
                for dn in 1..=MAX_SHIFT {
                    let width = 1usize << (l - dn);
                    let cost: Vec<u16> = (0..(1usize << (l - d)) + COST_PAD)
                        .map(|_| match rng.random_range(0..8) {
                            0 => u16::MAX,
                            1 => u16::MAX - rng.random_range(0..40000),
                            _ => rng.random_range(0..20000),
                        })
                        .collect();
                    let x = rng.random_range(-32000..32000);
                    let run = |simd: bool| {
                        let mut next = vec![0u16; width];
                        let step = Step {
                            table: &table,
                            l,
                            d,
                            dn,
                            x,
                            cost: &cost,
                            next: &mut next,
                        };
                        let lowest = if simd { step.run() } else { step.run_scalar() };
                        (next, lowest)
                    };
                    assert!(run(true) == run(false), "{cb:?} d={d} dn={dn}");
                }
            }
        }
    }

    /// The pass as it was written before the cost history: scalar steps that record each
    /// survivor's winner as they go, the same renormalisation, a backtrack over the records.
    #[allow(clippy::too_many_arguments)]
    fn recorded_pass(
        table: &[i16],
        l: u32,
        xs: &[f32],
        shifts: &[u32],
        final_shift: u32,
        start: Option<u32>,
        end: Option<u32>,
    ) -> Option<(Vec<u16>, f32)> {
        if xs.iter().any(|x| x.abs() > MAX_VALUE) {
            return None;
        }
        let mut cost = vec![0u16; 1 << (l - shifts[0])];
        if let Some(o) = start {
            cost.fill(u16::MAX);
            cost[o as usize] = 0;
        }
        let mut records: Vec<Vec<usize>> = Vec::new();
        let mut offset = 0u64;
        for (t, &d) in shifts.iter().enumerate() {
            let dn = shifts.get(t + 1).copied().unwrap_or(final_shift);
            let x = to_fixed(xs[t]);
            // The step's candidate rule (`winner`), with each survivor's choice recorded.
            let (args, mut next): (Vec<usize>, Vec<u16>) = (0..1usize << (l - dn))
                .map(|o| winner(table, &cost, l, d, dn, x, o))
                .unzip();
            let lowest = *next.iter().min().unwrap();
            if lowest > RENORMALIZE_ABOVE {
                next.iter_mut().for_each(|c| *c = c.saturating_sub(lowest));
                offset += u64::from(lowest);
            }
            records.push(args);
            cost = next;
        }
        let last = super::super::end_survivor(&cost, end);
        if cost[last] == u16::MAX {
            return None;
        }
        let mut states = vec![0u16; xs.len()];
        let mut o = last;
        for t in (0..xs.len()).rev() {
            let dn = shifts.get(t + 1).copied().unwrap_or(final_shift);
            let s = (records[t][o] << (l - dn)) | o;
            states[t] = s as u16;
            o = s >> shifts[t];
        }
        if start.is_some_and(|o| u32::from(states[0]) >> shifts[0] != o) {
            return None;
        }
        let total = offset + u64::from(cost[last]);
        Some((states, (total as f64 / f64::from(COST_UNIT)) as f32))
    }

    /// Whole passes over the 16-bit code reproduce the recorded-winner pass exactly (walk and
    /// cost), free and forced, at every width the pass takes, with tiles small enough that
    /// costs renormalise and large enough that some saturate.
    #[test]
    fn pass_matches_recorded_pass() {
        use crate::bits::{BitWidth, STATE_BITS};
        let mut rng = StdRng::seed_from_u64(22);
        let mut scratch = Scratch::default();
        for bits in BitWidth::ALL {
            let steps = 64;
            let shifts: Vec<u32> = (0..steps).map(|t| bits.code_bits(t)).collect();
            let final_shift = bits.code_bits(steps);
            if shifts.iter().chain([&final_shift]).any(|&d| d > MAX_SHIFT) {
                continue;
            }
            let l = STATE_BITS;
            for cb in Codebook::ALL {
                let fixed = table(cb.table_f32());
                let code = Code::new(l, cb.table_f32(), &shifts);
                for case in 0..4 {
                    // The last case sits beyond the codebook's reach (≥ 0.16 a step), so that
                    // the costs renormalise several times.
                    let xs: Vec<f32> = (0..shifts.len())
                        .map(|_| match case {
                            3 => 3.9f32.copysign(rng.random_range(-1.0f32..1.0)),
                            _ => ([0.3, 1.0, 2.5][case] * rng.random_range(-1.5f32..1.5))
                                .clamp(-3.9, 3.9),
                        })
                        .collect();
                    let forced = (case != 1).then(|| rng.random_range(0..1u32 << (l - shifts[0])));
                    let end = forced.filter(|_| final_shift == shifts[0]);
                    let want = recorded_pass(&fixed, l, &xs, &shifts, final_shift, forced, end);
                    let mut states = vec![0u16; xs.len()];
                    let got = viterbi_pass(
                        &code,
                        &xs,
                        &shifts,
                        final_shift,
                        forced,
                        end,
                        &mut scratch,
                        &mut states,
                    );
                    assert_eq!(got.map(|c| (states, c)), want, "{bits} {cb:?} case {case}");
                }
            }
        }
    }

    #[test]
    fn squared_error_rounds_and_saturates() {
        assert_eq!(squared_error(8192, 0), 2048); // 1.0² is one cost unit of 2048
        assert_eq!(squared_error(0, 4096), 512); // 0.5²
        assert_eq!(squared_error(45, 0), 0); // 45² / 2^15 = 0.06 rounds to 0
        assert_eq!(squared_error(182, 0), 1); // 1.01 rounds to 1
        assert_eq!(squared_error(-30000, 30000), 32768); // saturated difference: 4.0²
        assert_eq!(squared_error(30000, -30000), 32766); // 32767² / 2^15 = 32766.0
    }
}

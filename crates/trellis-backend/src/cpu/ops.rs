//! Elementwise and row-wise ops: embedding lookup, RMSNorm, RoPE, gated activations.

use super::linear::DenseData;
use crate::spec::{Batch, RopeSpec};
use rayon::prelude::*;

/// Rows below this many values are not worth sending to other threads.
const PARALLEL_MIN: usize = 1 << 14;

pub fn embed(table: &DenseData, hidden: usize, tokens: &[u32], scale: f32, out: &mut [f32]) {
    for (row, &tok) in out.chunks_exact_mut(hidden).zip(tokens) {
        table.row_into(tok as usize, hidden, row);
        if scale != 1.0 {
            for v in row.iter_mut() {
                *v *= scale;
            }
        }
    }
}

#[inline]
fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let sum_sq = super::linear::dot(x, x);
    let inv = 1.0 / (sum_sq / x.len() as f32 + eps).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = g * (v * inv);
    }
}

pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, rows: usize, out: &mut [f32]) {
    let d = w.len();
    let (x, out) = (&x[..rows * d], &mut out[..rows * d]);
    if rows * d >= PARALLEL_MIN {
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .for_each(|(o, xr)| rms_norm_row(xr, w, eps, o));
    } else {
        for (o, xr) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
            rms_norm_row(xr, w, eps, o);
        }
    }
}

pub fn rms_norm_inplace(x: &mut [f32], w: &[f32], eps: f32, rows: usize) {
    let d = w.len();
    let norm_row = |row: &mut [f32]| {
        let sum_sq = super::linear::dot(row, row);
        let inv = 1.0 / (sum_sq / d as f32 + eps).sqrt();
        for (v, &g) in row.iter_mut().zip(w) {
            *v = g * (*v * inv);
        }
    };
    let x = &mut x[..rows * d];
    if x.len() >= PARALLEL_MIN {
        x.par_chunks_mut(d).for_each(norm_row);
    } else {
        x.chunks_exact_mut(d).for_each(norm_row);
    }
}

/// `f(x_chunk, y_chunk)` over matching chunks of two equally long slices: in parallel for
/// prefill-sized inputs (from two chunks of [`PARALLEL_MIN`] values, so that every task has a
/// whole one), inline for a decode step's few thousand values (no thread pool).
fn elementwise(x: &mut [f32], y: &[f32], f: impl Fn(&mut [f32], &[f32]) + Sync) {
    assert_eq!(x.len(), y.len(), "elementwise operands differ in length");
    if x.len() >= 2 * PARALLEL_MIN {
        x.par_chunks_mut(PARALLEL_MIN)
            .zip(y.par_chunks(PARALLEL_MIN))
            .for_each(|(a, b)| f(a, b));
    } else {
        f(x, y);
    }
}

/// Rotate `x[..rope.dim()]` in place for position `pos`.
#[inline]
pub fn rope_vector(x: &mut [f32], rope: &RopeSpec, pos: u32) {
    let len = x.len().max(1);
    rope_heads(x, len, 0, rope, pos);
}

/// Angles whose sine and cosine one pass computes (stack arrays, no allocation).
const ROPE_CHUNK: usize = 64;

/// Rotate every head of one row (`head_dim` values from `offset` on in each) by the angles of
/// position `pos`, computing each angle's sine and cosine once for all the row's heads.
fn rope_heads(row: &mut [f32], head_dim: usize, offset: usize, rope: &RopeSpec, pos: u32) {
    let half = rope.inv_freq.len();
    let p = pos as f32;
    for first in (0..half).step_by(ROPE_CHUNK) {
        let n = ROPE_CHUNK.min(half - first);
        let (mut sin, mut cos) = ([0.0f32; ROPE_CHUNK], [0.0f32; ROPE_CHUNK]);
        for (j, &f) in rope.inv_freq[first..first + n].iter().enumerate() {
            // The angle is formed in f32 exactly as transformers does, so long positions round
            // alike.
            let (s, c) = (p * f).sin_cos();
            (sin[j], cos[j]) = (s * rope.attention_scaling, c * rope.attention_scaling);
        }
        for head in row.chunks_exact_mut(head_dim) {
            let x = &mut head[offset..];
            for j in 0..n {
                let i = first + j;
                let (a, b) = if rope.interleaved {
                    (2 * i, 2 * i + 1)
                } else {
                    (i, i + half)
                };
                let (x0, x1) = (x[a], x[b]);
                x[a] = x0 * cos[j] - x1 * sin[j];
                x[b] = x1 * cos[j] + x0 * sin[j];
            }
        }
    }
}

pub fn rope(
    x: &mut [f32],
    rope: &RopeSpec,
    heads: usize,
    head_dim: usize,
    offset: usize,
    batch: &Batch<'_>,
) {
    let width = heads * head_dim;
    let rows = x.len() / width.max(1);
    let positions = &batch.positions[..rows.min(batch.positions.len())];
    if x.len() >= PARALLEL_MIN {
        x.par_chunks_mut(width)
            .zip(positions.par_iter())
            .for_each(|(row, &pos)| rope_heads(row, head_dim, offset, rope, pos));
    } else {
        for (row, &pos) in x.chunks_exact_mut(width).zip(positions) {
            rope_heads(row, head_dim, offset, rope, pos);
        }
    }
}

/// The gated activations with libm's `exp` and `tanh`: the reference the fast versions below
/// are tested against.
#[cfg_attr(not(test), allow(dead_code))]
pub mod reference {
    #[inline]
    pub fn silu(v: f32) -> f32 {
        v / (1.0 + (-v).exp())
    }

    /// GELU with the tanh approximation (`gelu_pytorch_tanh`).
    #[inline]
    pub fn gelu_tanh(v: f32) -> f32 {
        0.5 * v * (1.0 + (super::SQRT_2_OVER_PI * (v + 0.044_715 * v * v * v)).tanh())
    }

    pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
        for (g, &u) in gate.iter_mut().zip(up) {
            *g = silu(*g) * u;
        }
    }

    pub fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
        for (g, &u) in gate.iter_mut().zip(up) {
            *g = gelu_tanh(*g) * u;
        }
    }
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;

/// `e^x` in plain arithmetic that the compiler vectorises (libm's `expf` is a call per value,
/// which dominated whole MLP forwards): `2^n · p(r)` with `x = n·ln2 + r`, `|r| ≤ ln2/2`, and a
/// degree-6 Taylor polynomial; relative error below 2e-7 (tested). Inputs are clamped to
/// ±87, so the result is finite and, below e^-87, a tiny normal number instead of 0.
#[inline(always)]
fn exp_vectorisable(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5·2^23 rounds to the nearest integer without SSE4.1's round.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 87.0);
    let n = (x * LOG2_E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

#[inline(always)]
fn silu_fast(v: f32) -> f32 {
    v / (1.0 + exp_vectorisable(-v))
}

/// `0.5·v·(1 + tanh y)` written as `v · sigmoid(2y)`, the same function without the
/// cancellation of `1 + tanh y` where tanh is close to −1.
#[inline(always)]
fn gelu_tanh_fast(v: f32) -> f32 {
    let y = SQRT_2_OVER_PI * (v + 0.044_715 * v * v * v);
    v / (1.0 + exp_vectorisable(-2.0 * y))
}

#[inline(always)]
fn silu_mul_body(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = silu_fast(*g) * u;
    }
}

#[inline(always)]
fn gelu_tanh_mul_body(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = gelu_tanh_fast(*g) * u;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn silu_mul_avx2(gate: &mut [f32], up: &[f32]) {
    silu_mul_body(gate, up)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn gelu_tanh_mul_avx2(gate: &mut [f32], up: &[f32]) {
    gelu_tanh_mul_body(gate, up)
}

/// Whether the AVX2 + FMA builds may run: every vector level of the backend implies both (and
/// `TRELLIS_CPU_ISA=scalar` turns them off with the rest).
#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    super::simd::Level::selected() != super::simd::Level::Scalar
}

#[inline(always)]
fn exp_shifted_sum_body(v: &mut [f32], shift: f32) -> f32 {
    // Eight running sums so the adds vectorise too.
    let mut sums = [0.0f32; 8];
    let mut chunks = v.chunks_exact_mut(8);
    for chunk in &mut chunks {
        for (x, s) in chunk.iter_mut().zip(&mut sums) {
            *x = exp_vectorisable(*x - shift);
            *s += *x;
        }
    }
    let mut total: f32 = sums.iter().sum();
    for x in chunks.into_remainder() {
        *x = exp_vectorisable(*x - shift);
        total += *x;
    }
    total
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn exp_shifted_sum_avx2(v: &mut [f32], shift: f32) -> f32 {
    exp_shifted_sum_body(v, shift)
}

/// The largest of `v` (−∞ for none), in eight running maxima so that it vectorises; a NaN
/// among the inputs makes it NaN (never silently dropped).
pub fn max_of(v: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut nan = false;
    let mut chunks = v.chunks_exact(8);
    for chunk in &mut chunks {
        for (m, &x) in lanes.iter_mut().zip(chunk) {
            nan |= x.is_nan();
            *m = if x > *m { x } else { *m };
        }
    }
    for &x in chunks.remainder() {
        nan |= x.is_nan();
        lanes[0] = if x > lanes[0] { x } else { lanes[0] };
    }
    if nan {
        return f32::NAN;
    }
    lanes.into_iter().fold(f32::NEG_INFINITY, f32::max)
}

/// `v[i] = e^(v[i] − shift)`, returning their sum: the exponentials of a softmax. Inputs are
/// expected finite with `v[i] ≤ shift` (masked positions are the caller's to zero).
pub fn exp_shifted_sum(v: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: as in `silu_mul`.
        return unsafe { exp_shifted_sum_avx2(v, shift) };
    }
    exp_shifted_sum_body(v, shift)
}

/// `gate[i] = silu(gate[i]) · up[i]`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    elementwise(gate, up, |gate, up| {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU has AVX2 and FMA (`has_avx2`), all the function was compiled for.
            return unsafe { silu_mul_avx2(gate, up) };
        }
        silu_mul_body(gate, up)
    })
}

/// `gate[i] = gelu_tanh(gate[i]) · up[i]`.
pub fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
    elementwise(gate, up, |gate, up| {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: as in `silu_mul`.
            return unsafe { gelu_tanh_mul_avx2(gate, up) };
        }
        gelu_tanh_mul_body(gate, up)
    })
}

pub fn add(x: &mut [f32], y: &[f32]) {
    elementwise(x, y, |x, y| {
        for (a, &b) in x.iter_mut().zip(y) {
            *a += b;
        }
    })
}

/// Numerically stable softmax in place.
pub fn softmax(v: &mut [f32]) {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for x in v.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    let inv = 1.0 / sum;
    for x in v.iter_mut() {
        *x *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values across the range that matters, the clamps and the special points.
    fn inputs() -> Vec<f32> {
        let mut v: Vec<f32> = (0..20_001).map(|i| (i as f32 - 10_000.0) * 0.003).collect();
        v.extend([
            0.0, -0.0, 1e-30, -1e-30, 1e-8, -1e-8, 60.0, -60.0, 88.0, -88.0, 200.0, -200.0,
        ]);
        v
    }

    fn close(got: f32, want: f32, rel: f32, abs: f32) -> bool {
        !got.is_nan() && (got - want).abs() <= rel * want.abs() + abs
    }

    #[test]
    fn exp_matches_libm() {
        for x in (0..17_401).map(|i| (i as f32 - 8_700.0) * 0.01) {
            let (got, want) = (exp_vectorisable(x), x.exp());
            assert!(close(got, want, 4e-7, 0.0), "exp({x}) = {got}, libm {want}");
        }
    }

    #[test]
    fn max_of_finds_the_largest_and_keeps_nan() {
        let v: Vec<f32> = (0..37).map(|i| ((i * 29) % 37) as f32 - 20.0).collect();
        assert_eq!(max_of(&v), 16.0);
        assert_eq!(
            max_of(&v[..3]),
            v[..3].iter().copied().fold(f32::MIN, f32::max)
        );
        assert_eq!(max_of(&[]), f32::NEG_INFINITY);
        for at in [0, 5, 20, 36] {
            let mut w = v.clone();
            w[at] = f32::NAN;
            assert!(max_of(&w).is_nan(), "NaN at {at}");
        }
    }

    #[test]
    fn shifted_exponentials_and_their_sum_match_libm() {
        let v: Vec<f32> = (0..1_003).map(|i| -(i as f32) * 0.037).collect();
        let want: Vec<f32> = v.iter().map(|&x| (x - 1.5).exp()).collect();
        let want_sum: f64 = want.iter().map(|&x| x as f64).sum();
        for fast in [exp_shifted_sum, exp_shifted_sum_body] {
            let mut got = v.clone();
            let sum = fast(&mut got, 1.5);
            for (&g, &w) in got.iter().zip(&want) {
                assert!(close(g, w, 4e-7, 0.0), "{g} vs libm {w}");
            }
            assert!(
                close(sum, want_sum as f32, 1e-6, 0.0),
                "sum {sum} vs {want_sum}"
            );
        }
    }

    /// The fast paths (the dispatched one and the portable body) against the libm reference.
    #[test]
    fn gated_activations_match_the_reference() {
        let gate = inputs();
        let up: Vec<f32> = (0..gate.len())
            .map(|i| 1.0 + (i % 7) as f32 * 0.25)
            .collect();
        type Op = fn(&mut [f32], &[f32]);
        let cases: [(&str, Op, Op, Op); 2] = [
            ("silu", silu_mul, silu_mul_body, reference::silu_mul),
            (
                "gelu",
                gelu_tanh_mul,
                gelu_tanh_mul_body,
                reference::gelu_tanh_mul,
            ),
        ];
        let up_max = 2.5;
        for (name, dispatched, body, reference) in cases {
            let mut want = gate.clone();
            reference(&mut want, &up);
            for fast in [dispatched, body] {
                let mut got = gate.clone();
                fast(&mut got, &up);
                for ((&g, &w), &x) in got.iter().zip(&want).zip(&gate) {
                    assert!(
                        // The reference's `1 + tanh` is only good to ulp(1) ≈ 6e-8.
                        close(g, w, 2e-6, 1e-7 * x.abs() * up_max),
                        "{name}({x}): {g} vs reference {w}"
                    );
                }
            }
        }
    }
}

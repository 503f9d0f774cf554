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
    for row in x[..rows * d].chunks_exact_mut(d) {
        let sum_sq = super::linear::dot(row, row);
        let inv = 1.0 / (sum_sq / d as f32 + eps).sqrt();
        for (v, &g) in row.iter_mut().zip(w) {
            *v = g * (*v * inv);
        }
    }
}

/// Rotate `x[..rope.dim()]` in place for position `pos`.
#[inline]
pub fn rope_vector(x: &mut [f32], rope: &RopeSpec, pos: u32) {
    let half = rope.inv_freq.len();
    let p = pos as f32;
    for (i, &f) in rope.inv_freq.iter().enumerate() {
        // The angle is formed in f32 exactly as transformers does, so long positions round alike.
        let angle = p * f;
        let (sin, cos) = angle.sin_cos();
        let (sin, cos) = (sin * rope.attention_scaling, cos * rope.attention_scaling);
        let (a, b) = if rope.interleaved {
            (2 * i, 2 * i + 1)
        } else {
            (i, i + half)
        };
        let (x0, x1) = (x[a], x[b]);
        x[a] = x0 * cos - x1 * sin;
        x[b] = x1 * cos + x0 * sin;
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
    for (row, &pos) in x.chunks_exact_mut(width).zip(batch.positions) {
        for head in row.chunks_exact_mut(head_dim) {
            rope_vector(&mut head[offset..], rope, pos);
        }
    }
}

#[inline]
fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

/// GELU with the tanh approximation (`gelu_pytorch_tanh`).
#[inline]
fn gelu_tanh(v: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * v * (1.0 + (SQRT_2_OVER_PI * (v + 0.044_715 * v * v * v)).tanh())
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

pub fn add(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
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

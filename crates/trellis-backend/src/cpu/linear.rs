//! Linear layers on the CPU: EXL3 trellis weights decoded tile by tile inside the product,
//! and dense f32/f16/bf16 weights.

use super::scratch::{with_op_scratch, with_task_scratch};
use half::{bf16, f16};
use rayon::prelude::*;
use trellis_codec::hadamard::{HADAMARD_SIZE, hadamard_blocks};
use trellis_codec::tile::{POSITION_TO_TILE_INDEX, TILE_SIZE, tile_states};
use trellis_codec::{TILE_WEIGHTS, TrellisLinear};

/// Dense weights in HF orientation `[out, in]`, kept in their stored precision.
pub enum DenseData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl DenseData {
    /// Row `o` (one output channel) widened into `dst`.
    #[inline]
    pub fn row_into(&self, o: usize, width: usize, dst: &mut [f32]) {
        let range = o * width..(o + 1) * width;
        match self {
            DenseData::F32(w) => dst.copy_from_slice(&w[range]),
            DenseData::F16(w) => {
                for (d, s) in dst.iter_mut().zip(&w[range]) {
                    *d = s.to_f32();
                }
            }
            DenseData::BF16(w) => {
                for (d, s) in dst.iter_mut().zip(&w[range]) {
                    *d = s.to_f32();
                }
            }
        }
    }

    /// `Σ_i x[i] · W[o][i]`.
    #[inline]
    pub fn row_dot(&self, o: usize, x: &[f32]) -> f32 {
        let width = x.len();
        let range = o * width..(o + 1) * width;
        match self {
            DenseData::F32(w) => dot(&w[range], x),
            DenseData::F16(w) => w[range].iter().zip(x).map(|(a, b)| a.to_f32() * b).sum(),
            DenseData::BF16(w) => w[range].iter().zip(x).map(|(a, b)| a.to_f32() * b).sum(),
        }
    }

    pub fn bytes(&self) -> usize {
        match self {
            DenseData::F32(w) => 4 * w.len(),
            DenseData::F16(w) => 2 * w.len(),
            DenseData::BF16(w) => 2 * w.len(),
        }
    }
}

#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent partial sums let the compiler vectorise and keep f32 error small.
    let mut acc = [0.0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += a[8 * c + l] * b[8 * c + l];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for i in 8 * chunks..a.len() {
        sum += a[i] * b[i];
    }
    sum
}

/// A linear layer uploaded to the CPU backend.
pub enum CpuLinear {
    Trellis(TrellisLinear<'static>),
    Dense {
        weight: DenseData,
        bias: Option<Vec<f32>>,
        in_features: usize,
        out_features: usize,
    },
}

impl CpuLinear {
    pub fn in_features(&self) -> usize {
        match self {
            CpuLinear::Trellis(t) => t.in_features,
            CpuLinear::Dense { in_features, .. } => *in_features,
        }
    }

    pub fn out_features(&self) -> usize {
        match self {
            CpuLinear::Trellis(t) => t.out_features,
            CpuLinear::Dense { out_features, .. } => *out_features,
        }
    }

    /// Bytes one full evaluation reads.
    pub fn weight_bytes(&self) -> usize {
        match self {
            CpuLinear::Trellis(t) => t.storage_bytes(),
            CpuLinear::Dense { weight, bias, .. } => {
                weight.bytes() + 4 * bias.as_ref().map_or(0, Vec::len)
            }
        }
    }

    /// `out[rows, out_features] = x[rows, in_features] · W (+ bias)`.
    pub fn forward(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        match self {
            CpuLinear::Trellis(t) => trellis_forward(t, x, rows, out),
            CpuLinear::Dense {
                weight,
                bias,
                in_features,
                out_features,
            } => dense_forward(
                weight,
                bias.as_deref(),
                *in_features,
                *out_features,
                x,
                rows,
                out,
            ),
        }
    }
}

pub(crate) fn dense_forward(
    weight: &DenseData,
    bias: Option<&[f32]>,
    in_f: usize,
    out_f: usize,
    x: &[f32],
    rows: usize,
    out: &mut [f32],
) {
    const OUT_BLOCK: usize = 16;
    let x = &x[..rows * in_f];
    let out = &mut out[..rows * out_f];
    if rows == 1 {
        out.par_chunks_mut(64).enumerate().for_each(|(chunk, dst)| {
            for (j, y) in dst.iter_mut().enumerate() {
                let o = chunk * 64 + j;
                *y = weight.row_dot(o, x) + bias.map_or(0.0, |b| b[o]);
            }
        });
        return;
    }
    // Several rows: widen each weight row once and use it for all of them; each output block
    // is owned by one task, which writes `[rows, OUT_BLOCK]` into its part of the scratch.
    with_op_scratch(rows * out_f.next_multiple_of(OUT_BLOCK), |blocks| {
        blocks
            .par_chunks_mut(rows * OUT_BLOCK)
            .enumerate()
            .for_each(|(b, block)| {
                let o0 = b * OUT_BLOCK;
                let o1 = (o0 + OUT_BLOCK).min(out_f);
                with_task_scratch(in_f, |w_row| {
                    for o in o0..o1 {
                        weight.row_into(o, in_f, w_row);
                        let bias_o = bias.map_or(0.0, |b| b[o]);
                        for r in 0..rows {
                            block[r * OUT_BLOCK + (o - o0)] =
                                dot(w_row, &x[r * in_f..(r + 1) * in_f]) + bias_o;
                        }
                    }
                });
            });
        scatter_blocks(blocks, OUT_BLOCK, rows, out_f, out);
    });
}

/// Copy block-major results `[block][rows][block_width]` into row-major `out[rows, width]`.
fn scatter_blocks(blocks: &[f32], block_width: usize, rows: usize, width: usize, out: &mut [f32]) {
    for (b, block) in blocks.chunks_exact(rows * block_width).enumerate() {
        let c0 = b * block_width;
        if c0 >= width {
            break;
        }
        let w = block_width.min(width - c0);
        for r in 0..rows {
            out[r * width + c0..r * width + c0 + w]
                .copy_from_slice(&block[r * block_width..r * block_width + w]);
        }
    }
}

/// Decode tile (kt, nt) into a row-major 16×16 f32 block.
#[inline]
fn decode_tile_f32(
    t: &TrellisLinear<'_>,
    table: &[f32],
    kt: usize,
    nt: usize,
    tile: &mut [f32; TILE_WEIGHTS],
) {
    let states = tile_states(t.tile_words(kt, nt), t.bits);
    for (p, &s) in states.iter().enumerate() {
        tile[usize::from(POSITION_TO_TILE_INDEX[p])] = table[usize::from(s)];
    }
}

/// `y = ((x ⊙ suh)·H̃ · W̃)·H̃ ⊙ svh (+ bias)`, with W̃ decoded on the fly.
///
/// Work is split over 128-wide output blocks: each task decodes the tiles of its block once
/// for all rows, then applies the output Hadamard to its own block, so tasks share nothing.
fn trellis_forward(t: &TrellisLinear<'_>, x: &[f32], rows: usize, out: &mut [f32]) {
    let (k, n) = (t.k_padded, t.n_padded);
    let (in_f, out_f) = (t.in_features, t.out_features);
    let table = t.codebook.table_f32();
    with_op_scratch(rows * (k + n), |scratch| {
        let (xh, z) = scratch.split_at_mut(rows * k);
        xh.par_chunks_mut(k)
            .zip(x[..rows * in_f].par_chunks(in_f))
            .for_each(|(h, xr)| {
                for ((hv, &xv), s) in h.iter_mut().zip(xr).zip(t.suh.iter()) {
                    *hv = xv * s.to_f32();
                }
                h[in_f..].fill(0.0);
                hadamard_blocks(h);
            });
        let xh: &[f32] = xh;
        let tiles_per_block = HADAMARD_SIZE / TILE_SIZE;
        z.par_chunks_mut(rows * HADAMARD_SIZE)
            .enumerate()
            .for_each(|(b, z)| {
                z.fill(0.0);
                let mut tile = [0.0f32; TILE_WEIGHTS];
                for kt in 0..t.tiles_k() {
                    for tn in 0..tiles_per_block {
                        decode_tile_f32(t, table, kt, b * tiles_per_block + tn, &mut tile);
                        for r in 0..rows {
                            let xs = &xh[r * k + kt * TILE_SIZE..r * k + (kt + 1) * TILE_SIZE];
                            let z0 = r * HADAMARD_SIZE + tn * TILE_SIZE;
                            let zs = &mut z[z0..z0 + TILE_SIZE];
                            for (i, &xv) in xs.iter().enumerate() {
                                let w = &tile[i * TILE_SIZE..(i + 1) * TILE_SIZE];
                                for (zv, &wv) in zs.iter_mut().zip(w) {
                                    *zv += xv * wv;
                                }
                            }
                        }
                    }
                }
                for zr in z.chunks_exact_mut(HADAMARD_SIZE) {
                    hadamard_blocks(zr);
                    for (j, v) in zr.iter_mut().enumerate() {
                        let col = b * HADAMARD_SIZE + j;
                        *v *= t.svh[col].to_f32();
                        if let Some(bias) = &t.bias {
                            *v += bias[col].to_f32();
                        }
                    }
                }
            });
        scatter_blocks(z, HADAMARD_SIZE, rows, out_f, &mut out[..rows * out_f]);
    });
}

//! Linear layers on the CPU: EXL3 trellis weights repacked at upload and decoded inside the
//! product by the SIMD kernels of `trellis_kernels`, and dense f32/f16/bf16 weights.

use super::matmul::{MatMut, MatRef, matmul};
use super::scratch::with_op_scratch;
use super::simd;
use super::trellis_kernels::{self, PackedTrellis};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;
use std::sync::Arc;
use trellis_codec::TrellisLinear;

/// Dense weights in HF orientation `[out, in]`, kept in their stored precision. Shared, so
/// that one table can serve as both the embedding and a tied output head.
#[derive(Clone)]
pub enum DenseData {
    F32(Arc<[f32]>),
    F16(Arc<[f16]>),
    BF16(Arc<[bf16]>),
}

impl DenseData {
    /// The values as little-endian bytes, as a safetensors file stores them.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            DenseData::F32(w) => bytemuck::cast_slice(w),
            DenseData::F16(w) => bytemuck::cast_slice(w),
            DenseData::BF16(w) => bytemuck::cast_slice(w),
        }
    }

    /// Row `o` (one output channel) widened into `dst`.
    #[inline]
    pub fn row_into(&self, o: usize, width: usize, dst: &mut [f32]) {
        let range = o * width..(o + 1) * width;
        match self {
            DenseData::F32(w) => dst.copy_from_slice(&w[range]),
            DenseData::F16(w) => w[range].convert_to_f32_slice(dst),
            DenseData::BF16(w) => w[range].convert_to_f32_slice(dst),
        }
    }

    /// `Σ_i x[i] · W[o][i]`.
    #[inline]
    pub fn row_dot(&self, o: usize, x: &[f32]) -> f32 {
        let width = x.len();
        let range = o * width..(o + 1) * width;
        match self {
            DenseData::F32(w) => simd::dot(&w[range], x),
            DenseData::F16(w) => simd::dot(&w[range], x),
            DenseData::BF16(w) => simd::dot(&w[range], x),
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

/// `Σ_i a[i]·b[i]` (equal lengths) with the selected vector level.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    simd::dot(a, b)
}

/// A linear layer uploaded to the CPU backend.
pub enum CpuLinear {
    Trellis(PackedTrellis),
    Dense {
        weight: DenseData,
        bias: Option<Vec<f32>>,
        in_features: usize,
        out_features: usize,
    },
}

impl CpuLinear {
    /// Upload an EXL3 linear: its tiles are repacked straight from `t` (usually the memory
    /// map) into the kernels' layout, so no intermediate copy is held.
    pub fn trellis(t: &TrellisLinear<'_>) -> CpuLinear {
        CpuLinear::Trellis(PackedTrellis::new(t))
    }

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
            CpuLinear::Trellis(t) => t.stored_bytes,
            CpuLinear::Dense { weight, bias, .. } => {
                weight.bytes() + 4 * bias.as_ref().map_or(0, Vec::len)
            }
        }
    }

    /// `out[rows, out_features] = x[rows, in_features] · W (+ bias)`.
    pub fn forward(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        match self {
            CpuLinear::Trellis(t) => trellis_kernels::forward(t, x, rows, out),
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
    if rows >= GEMM_MIN_ROWS {
        return dense_forward_packed(weight, bias, in_f, out_f, x, rows, out);
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
                let n = o1 - o0;
                let range = o0 * in_f..o1 * in_f;
                match weight {
                    DenseData::F32(w) => {
                        simd::gemm_nt(&w[range], n, x, rows, in_f, block, OUT_BLOCK)
                    }
                    DenseData::F16(w) => {
                        simd::gemm_nt(&w[range], n, x, rows, in_f, block, OUT_BLOCK)
                    }
                    DenseData::BF16(w) => {
                        simd::gemm_nt(&w[range], n, x, rows, in_f, block, OUT_BLOCK)
                    }
                }
                if let Some(b) = bias {
                    for r in 0..rows {
                        for (v, &bo) in block[r * OUT_BLOCK..r * OUT_BLOCK + n]
                            .iter_mut()
                            .zip(&b[o0..o1])
                        {
                            *v += bo;
                        }
                    }
                }
            });
        scatter_blocks(blocks, OUT_BLOCK, rows, out_f, out);
    });
}

/// Rows from which a dense product goes through the packed GEMM of [`matmul`]: below, its
/// packing costs more than it saves.
const GEMM_MIN_ROWS: usize = 32;

/// Weights widened to f32 at a time by [`dense_forward_packed`] (16 MB), so that a large
/// head is converted in slices rather than all at once.
const WIDENED_WEIGHTS: usize = 1 << 22;

/// The many-row dense product by the `gemm` crate: output columns in slices whose weights
/// are widened to f32 (in parallel), each slice one packed product reading the weight rows
/// as the columns of the right-hand side.
fn dense_forward_packed(
    weight: &DenseData,
    bias: Option<&[f32]>,
    in_f: usize,
    out_f: usize,
    x: &[f32],
    rows: usize,
    out: &mut [f32],
) {
    let slice_cols = (WIDENED_WEIGHTS / in_f.max(1)).clamp(64, out_f.max(64));
    let lhs = MatRef {
        data: x,
        rows,
        cols: in_f,
        row_stride: in_f,
        col_stride: 1,
    };
    let product = |w: &[f32], o0: usize, n: usize, out: &mut [f32]| {
        matmul(
            MatMut {
                data: &mut out[o0..],
                rows,
                cols: n,
                row_stride: out_f,
                col_stride: 1,
            },
            lhs,
            MatRef {
                data: w,
                rows: in_f,
                cols: n,
                row_stride: 1,
                col_stride: in_f,
            },
            false,
            true,
        )
    };
    for o0 in (0..out_f).step_by(slice_cols) {
        let n = slice_cols.min(out_f - o0);
        let range = o0 * in_f..(o0 + n) * in_f;
        match weight {
            DenseData::F32(w) => product(&w[range], o0, n, out),
            DenseData::F16(_) | DenseData::BF16(_) => with_op_scratch(n * in_f, |wide| {
                wide.par_chunks_mut(in_f)
                    .enumerate()
                    .for_each(|(j, row)| weight.row_into(o0 + j, in_f, row));
                product(wide, o0, n, out)
            }),
        }
    }
    if let Some(b) = bias {
        for row in out.chunks_exact_mut(out_f) {
            for (v, &bo) in row.iter_mut().zip(b) {
                *v += bo;
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_testutil::noise;

    /// Dense products on one row (dot products), a few rows (the blocked kernel) and many
    /// (the packed GEMM, including a weight too large to widen in one slice), in every stored
    /// precision, with and without bias, against an f64 sum over the widened weights.
    #[test]
    fn dense_forward_matches_the_definition() {
        const {
            assert!(
                WIDENED_WEIGHTS / 4096 < 1100,
                "the last case is widened in two slices"
            )
        };
        for (in_f, out_f, rows) in [(96, 70, 1), (96, 70, 5), (96, 70, 40), (4096, 1100, 33)] {
            let values: Vec<f32> = (0..in_f * out_f).map(|i| noise(i, 3)).collect();
            let x: Vec<f32> = (0..rows * in_f).map(|i| noise(i, 4)).collect();
            let bias: Vec<f32> = (0..out_f).map(|i| noise(i, 5)).collect();
            for weight in [
                DenseData::F32(values.clone().into()),
                DenseData::F16(values.iter().map(|&v| f16::from_f32(v)).collect()),
                DenseData::BF16(values.iter().map(|&v| bf16::from_f32(v)).collect()),
            ] {
                for bias in [None, Some(bias.clone())] {
                    let mut wide = vec![0f32; in_f];
                    let mut want = vec![0f64; rows * out_f];
                    for o in 0..out_f {
                        weight.row_into(o, in_f, &mut wide);
                        for r in 0..rows {
                            let xr = &x[r * in_f..][..in_f];
                            want[r * out_f + o] = xr
                                .iter()
                                .zip(&wide)
                                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                                .sum::<f64>()
                                + bias.as_ref().map_or(0.0, |b| f64::from(b[o]));
                        }
                    }
                    let linear = CpuLinear::Dense {
                        weight: weight.clone(),
                        bias: bias.clone(),
                        in_features: in_f,
                        out_features: out_f,
                    };
                    let mut got = vec![f32::NAN; rows * out_f];
                    linear.forward(&x, rows, &mut got);
                    let (mut err, mut norm) = (0f64, 0f64);
                    for (&g, &w) in got.iter().zip(&want) {
                        assert!(g.is_finite(), "{in_f}x{out_f} rows {rows}: {g}");
                        err += (f64::from(g) - w).powi(2);
                        norm += w * w;
                    }
                    let rel = (err / norm).sqrt();
                    assert!(
                        rel < 1e-5,
                        "{in_f}x{out_f} rows {rows} bias {}: relative error {rel:e}",
                        bias.is_some()
                    );
                }
            }
        }
    }
}

//! Linear layers on the CPU: EXL3 trellis weights repacked at upload and decoded inside the
//! product by the SIMD kernels of `trellis_kernels`, and dense f32/f16/bf16 weights.

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

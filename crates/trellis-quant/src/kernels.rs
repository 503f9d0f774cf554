//! The dense arithmetic of the quantizer that is worth making fast: Gram matrices `xᵀx` of
//! activations (Hessian capture) and the row-times-matrix products of LDLQ's error feedback.
//!
//! The Gram matrices are blocks of packed products by the `gemm` crate (through the CPU
//! backend's `matmul`, which picks its ISA at run time). The feedback products are plain loops
//! over fixed-width register tiles that the compiler vectorises; on x86-64 the same code is
//! also compiled for AVX2 + FMA, chosen at run time by the CPU backend's vector `Level`, since
//! the workspace builds for the baseline CPU.

use rayon::prelude::*;
use trellis_backend::cpu::matmul::{MatMut, MatRef, matmul};
use trellis_backend::cpu::simd::Level;

/// Accumulator rows and columns of one block of the Gram product: one packed product per
/// pair of column blocks of the activations, upper triangle only.
const GRAM_BLOCK: usize = 128;
/// Activation rows per packed product. Partial sums over one chunk are formed in f32 (by the
/// `gemm` crate) and then added to the f64 accumulator.
const GRAM_CHUNK_ROWS: usize = 1024;

/// `acc[i·dim + j] += Σ_r x[r·dim + i] · x[r·dim + j]` for `j ≥ i` (the upper triangle; the
/// lower one is left untouched), over the `rows` rows of `x`. Partial sums over chunks of rows
/// are formed in f32 and accumulated in f64.
pub fn gram_upper_accumulate(x: &[f32], rows: usize, dim: usize, acc: &mut [f64]) {
    assert_eq!(x.len(), rows * dim, "activation shape");
    assert_eq!(acc.len(), dim * dim, "accumulator shape");
    if dim == 0 || rows == 0 {
        return;
    }
    // One task per band of accumulator rows, one product per chunk of rows reaching from the
    // band's diagonal block to the last column (early bands carry more work: rayon balances
    // them). Wide products keep the packed band of the chunk in use across all its columns.
    acc.par_chunks_mut(GRAM_BLOCK * dim)
        .enumerate()
        .for_each(|(band, acc_rows)| {
            let i0 = band * GRAM_BLOCK;
            let ni = acc_rows.len() / dim;
            let width = dim - i0;
            let mut block = vec![0f32; ni * width];
            for r0 in (0..rows).step_by(GRAM_CHUNK_ROWS) {
                let nr = GRAM_CHUNK_ROWS.min(rows - r0);
                let chunk = &x[r0 * dim..(r0 + nr) * dim];
                matmul(
                    MatMut {
                        data: &mut block,
                        rows: ni,
                        cols: width,
                        row_stride: width,
                        col_stride: 1,
                    },
                    // Columns i0.. of the chunk, transposed.
                    MatRef {
                        data: &chunk[i0..],
                        rows: ni,
                        cols: nr,
                        row_stride: 1,
                        col_stride: dim,
                    },
                    MatRef {
                        data: &chunk[i0..],
                        rows: nr,
                        cols: width,
                        row_stride: dim,
                        col_stride: 1,
                    },
                    false,
                    false,
                );
                for i in 0..ni {
                    let out = &mut acc_rows[i * dim + i0 + i..][..width - i];
                    for (o, &v) in out.iter_mut().zip(&block[i * width + i..][..width - i]) {
                        *o += f64::from(v);
                    }
                }
            }
        });
}

/// `out[r][c] += Σ_i coef[i·coef_stride + r] · m[i][c]` for `r < out_rows`: a short, wide
/// product `coefᵀ·m` where row i of `coef` starts at `i·coef_stride` (its first `out_rows`
/// values used), `m` is `[inner, width]` and `out` is `[out_rows, width]`, row-major.
/// Parallel over columns.
pub fn add_coef_t_times(
    coef: &[f32],
    coef_stride: usize,
    m: &[f32],
    width: usize,
    out: &mut [f32],
    out_rows: usize,
) {
    let inner = m.len() / width;
    assert_eq!(m.len(), inner * width);
    assert!(inner == 0 || coef.len() >= (inner - 1) * coef_stride + out_rows);
    assert_eq!(out.len(), out_rows * width);
    const COLS: usize = 64;
    let chunks = width.div_ceil(COLS);
    let results: Vec<(usize, Vec<f32>)> = (0..chunks)
        .into_par_iter()
        .map(|ci| {
            let c0 = ci * COLS;
            let nc = COLS.min(width - c0);
            let mut local = vec![0.0f32; out_rows * nc];
            coef_t_times_columns(coef, coef_stride, m, width, c0, nc, &mut local, out_rows);
            (c0, local)
        })
        .collect();
    for (c0, local) in results {
        let nc = local.len() / out_rows;
        for r in 0..out_rows {
            for (o, v) in out[r * width + c0..r * width + c0 + nc]
                .iter_mut()
                .zip(&local[r * nc..(r + 1) * nc])
            {
                *o += v;
            }
        }
    }
}

/// One column block of [`add_coef_t_times`] into `local` (`[out_rows, nc]`), with AVX2 + FMA
/// where the CPU has them.
#[allow(clippy::too_many_arguments)]
fn coef_t_times_columns(
    coef: &[f32],
    coef_stride: usize,
    m: &[f32],
    width: usize,
    c0: usize,
    nc: usize,
    local: &mut [f32],
    out_rows: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if Level::selected() != Level::Scalar {
        // SAFETY: every vector level implies AVX2 and FMA, all the function was compiled for.
        return unsafe {
            coef_t_times_columns_avx2(coef, coef_stride, m, width, c0, nc, local, out_rows)
        };
    }
    coef_t_times_columns_body(coef, coef_stride, m, width, c0, nc, local, out_rows)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn coef_t_times_columns_avx2(
    coef: &[f32],
    coef_stride: usize,
    m: &[f32],
    width: usize,
    c0: usize,
    nc: usize,
    local: &mut [f32],
    out_rows: usize,
) {
    coef_t_times_columns_body(coef, coef_stride, m, width, c0, nc, local, out_rows)
}

/// Plain multiply and add (not `mul_add`, which is a libm call where FMA is not compiled in).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn coef_t_times_columns_body(
    coef: &[f32],
    coef_stride: usize,
    m: &[f32],
    width: usize,
    c0: usize,
    nc: usize,
    local: &mut [f32],
    out_rows: usize,
) {
    let inner = m.len() / width;
    for i in 0..inner {
        let mrow = &m[i * width + c0..i * width + c0 + nc];
        let crow = &coef[i * coef_stride..i * coef_stride + out_rows];
        for (r, &cv) in crow.iter().enumerate() {
            if cv == 0.0 {
                continue;
            }
            for (o, &mv) in local[r * nc..(r + 1) * nc].iter_mut().zip(mrow) {
                *o += cv * mv;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gram_matches_the_definition() {
        // Partial blocks, more than one block and more than one chunk of rows.
        for (rows, dim) in [(300, 37), (1100, 150), (2100, 300)] {
            check_gram(rows, dim);
        }
    }

    fn check_gram(rows: usize, dim: usize) {
        let x: Vec<f32> = (0..rows * dim)
            .map(|i| ((i * 7919 % 1013) as f32 - 500.0) / 300.0)
            .collect();
        let mut acc = vec![0.0f64; dim * dim];
        gram_upper_accumulate(&x, rows, dim, &mut acc);
        for i in 0..dim {
            for j in 0..dim {
                let want: f64 = (0..rows)
                    .map(|r| f64::from(x[r * dim + i]) * f64::from(x[r * dim + j]))
                    .sum();
                if j >= i {
                    assert!((acc[i * dim + j] - want).abs() < 1e-3 * want.abs().max(1.0));
                } else {
                    assert_eq!(acc[i * dim + j], 0.0);
                }
            }
        }
    }

    #[test]
    fn coef_transpose_product_matches_the_definition() {
        let (inner, width, stride, out_rows) = (21, 150, 20, 16);
        let coef: Vec<f32> = (0..inner * stride).map(|i| (i % 13) as f32 - 6.0).collect();
        let m: Vec<f32> = (0..inner * width).map(|i| (i % 7) as f32 * 0.5).collect();
        let mut out = vec![1.0f32; out_rows * width];
        add_coef_t_times(&coef, stride, &m, width, &mut out, out_rows);
        for r in 0..out_rows {
            for c in 0..width {
                let want: f32 = 1.0
                    + (0..inner)
                        .map(|i| coef[i * stride + r] * m[i * width + c])
                        .sum::<f32>();
                assert!((out[r * width + c] - want).abs() < 1e-3);
            }
        }
    }
}

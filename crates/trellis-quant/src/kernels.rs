//! The dense arithmetic of the quantizer that is worth making fast: Gram matrices `xᵀx` of
//! activations (Hessian capture) and the row-times-matrix products of LDLQ's error feedback.
//!
//! Both are written as plain loops over fixed-width register tiles that the compiler
//! vectorises; on x86-64 the same code is also compiled for AVX2 + FMA and chosen at run time,
//! since the workspace builds for the baseline CPU.

use rayon::prelude::*;

/// Output columns of one register tile of the Gram kernel.
const GRAM_TILE_COLS: usize = 16;
/// Output rows of one register tile of the Gram kernel.
const GRAM_TILE_ROWS: usize = 8;
/// Activation rows summed in f32 before the partial sums are added to the f64 accumulator:
/// short enough that f32 partial sums lose nothing that matters, long enough to amortise.
const GRAM_ROW_CHUNK: usize = 256;

/// `acc[i·dim + j] += Σ_r x[r·dim + i] · x[r·dim + j]` for `j ≥ i` (the upper triangle; the
/// lower one is left untouched), over the `rows` rows of `x`. Partial sums over chunks of rows
/// are formed in f32 and accumulated in f64.
pub fn gram_upper_accumulate(x: &[f32], rows: usize, dim: usize, acc: &mut [f64]) {
    assert_eq!(x.len(), rows * dim, "activation shape");
    assert_eq!(acc.len(), dim * dim, "accumulator shape");
    let row_blocks = dim.div_ceil(GRAM_TILE_ROWS);
    // Each task owns GRAM_TILE_ROWS rows of the accumulator.
    acc.par_chunks_mut(GRAM_TILE_ROWS * dim)
        .enumerate()
        .for_each(|(bi, acc_rows)| {
            debug_assert!(bi < row_blocks);
            let i0 = bi * GRAM_TILE_ROWS;
            let ni = GRAM_TILE_ROWS.min(dim - i0);
            let mut j0 = i0 - i0 % GRAM_TILE_COLS;
            while j0 < dim {
                let nj = GRAM_TILE_COLS.min(dim - j0);
                let mut r0 = 0;
                while r0 < rows {
                    let nr = GRAM_ROW_CHUNK.min(rows - r0);
                    let tile = gram_tile(x, dim, r0, nr, i0, ni, j0, nj);
                    for i in 0..ni {
                        for j in 0..nj {
                            if j0 + j >= i0 + i {
                                acc_rows[i * dim + j0 + j] += f64::from(tile[i][j]);
                            }
                        }
                    }
                    r0 += nr;
                }
                j0 += GRAM_TILE_COLS;
            }
        });
}

type GramTile = [[f32; GRAM_TILE_COLS]; GRAM_TILE_ROWS];

#[allow(clippy::too_many_arguments)]
fn gram_tile(
    x: &[f32],
    dim: usize,
    r0: usize,
    nr: usize,
    i0: usize,
    ni: usize,
    j0: usize,
    nj: usize,
) -> GramTile {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above), the only requirement of
        // a function compiled with those target features.
        return unsafe { gram_tile_avx2(x, dim, r0, nr, i0, ni, j0, nj) };
    }
    gram_tile_portable(x, dim, r0, nr, i0, ni, j0, nj)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn gram_tile_avx2(
    x: &[f32],
    dim: usize,
    r0: usize,
    nr: usize,
    i0: usize,
    ni: usize,
    j0: usize,
    nj: usize,
) -> GramTile {
    gram_tile_portable(x, dim, r0, nr, i0, ni, j0, nj)
}

/// One register tile: `tile[i][j] = Σ_{r in r0..r0+nr} x[r][i0+i] · x[r][j0+j]`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn gram_tile_portable(
    x: &[f32],
    dim: usize,
    r0: usize,
    nr: usize,
    i0: usize,
    ni: usize,
    j0: usize,
    nj: usize,
) -> GramTile {
    let mut tile = [[0.0f32; GRAM_TILE_COLS]; GRAM_TILE_ROWS];
    let mut a = [0.0f32; GRAM_TILE_ROWS];
    let mut b = [0.0f32; GRAM_TILE_COLS];
    for row in x[r0 * dim..(r0 + nr) * dim].chunks_exact(dim) {
        a[..ni].copy_from_slice(&row[i0..i0 + ni]);
        b[..nj].copy_from_slice(&row[j0..j0 + nj]);
        for (t, &av) in tile.iter_mut().zip(&a) {
            for (tv, &bv) in t.iter_mut().zip(&b) {
                *tv = av.mul_add(bv, *tv);
            }
        }
    }
    tile
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
            for i in 0..inner {
                let mrow = &m[i * width + c0..i * width + c0 + nc];
                let crow = &coef[i * coef_stride..i * coef_stride + out_rows];
                for (r, &cv) in crow.iter().enumerate() {
                    if cv == 0.0 {
                        continue;
                    }
                    for (o, &mv) in local[r * nc..(r + 1) * nc].iter_mut().zip(mrow) {
                        *o = cv.mul_add(mv, *o);
                    }
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gram_matches_the_definition() {
        let (rows, dim) = (300, 37);
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

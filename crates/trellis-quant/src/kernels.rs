//! The dense arithmetic of the quantizer that is worth making fast: Gram matrices `xᵀx` of
//! activations (Hessian capture) and the row-times-matrix products of LDLQ's error feedback.
//!
//! Both are written as plain loops over fixed-width register tiles that the compiler
//! vectorises; on x86-64 the same code is also compiled for AVX2 + FMA (and full Gram tiles
//! written for AVX-512), chosen at run time by the CPU backend's vector `Level`, since the
//! workspace builds for the baseline CPU.

use rayon::prelude::*;
use trellis_backend::cpu::simd::Level;

/// Output rows and columns of one register tile of the Gram kernel (16 AVX-512 registers).
const GRAM_TILE_ROWS: usize = 8;
const GRAM_TILE_COLS: usize = 32;
/// Accumulator rows one parallel task owns: its tiles share the activation rows they read,
/// which then stay in L1.
const GRAM_TASK_ROWS: usize = 64;
/// Activation bytes per row chunk: the chunk is swept once per task, so it should sit in L2.
/// Partial sums over one chunk are formed in f32 and then added to the f64 accumulator.
const GRAM_CHUNK_BYTES: usize = 1 << 20;

/// `acc[i·dim + j] += Σ_r x[r·dim + i] · x[r·dim + j]` for `j ≥ i` (the upper triangle; the
/// lower one is left untouched), over the `rows` rows of `x`. Partial sums over chunks of rows
/// are formed in f32 and accumulated in f64.
pub fn gram_upper_accumulate(x: &[f32], rows: usize, dim: usize, acc: &mut [f64]) {
    assert_eq!(x.len(), rows * dim, "activation shape");
    assert_eq!(acc.len(), dim * dim, "accumulator shape");
    if dim == 0 {
        return;
    }
    let level = Level::selected();
    let chunk_rows = (GRAM_CHUNK_BYTES / (4 * dim)).clamp(16, 512);
    acc.par_chunks_mut(GRAM_TASK_ROWS * dim)
        .enumerate()
        .for_each(|(task, acc_rows)| {
            let task_i0 = task * GRAM_TASK_ROWS;
            let task_rows = acc_rows.len() / dim;
            let first_j0 = task_i0 - task_i0 % GRAM_TILE_COLS;
            let mut r0 = 0;
            while r0 < rows {
                let nr = chunk_rows.min(rows - r0);
                let chunk = &x[r0 * dim..(r0 + nr) * dim];
                for j0 in (first_j0..dim).step_by(GRAM_TILE_COLS) {
                    let nj = GRAM_TILE_COLS.min(dim - j0);
                    for ti in (0..task_rows).step_by(GRAM_TILE_ROWS) {
                        let i0 = task_i0 + ti;
                        let ni = GRAM_TILE_ROWS.min(task_rows - ti);
                        if j0 + nj <= i0 {
                            continue; // wholly below the diagonal
                        }
                        let tile = gram_tile(level, chunk, dim, i0, ni, j0, nj);
                        for (i, tile_row) in tile.iter().enumerate().take(ni) {
                            let out = &mut acc_rows[(ti + i) * dim..(ti + i + 1) * dim];
                            for (j, &v) in tile_row.iter().enumerate().take(nj) {
                                if j0 + j >= i0 + i {
                                    out[j0 + j] += f64::from(v);
                                }
                            }
                        }
                    }
                }
                r0 += nr;
            }
        });
}

type GramTile = [[f32; GRAM_TILE_COLS]; GRAM_TILE_ROWS];

/// `tile[i][j] = Σ_r x[r][i0+i] · x[r][j0+j]` over the rows of `x`, for `i < ni ≤ 8` and
/// `j < nj ≤ 32` (the rest of the tile is zero), at the backend's vector `level` (so that
/// `TRELLIS_CPU_ISA` forces this kernel too).
fn gram_tile(
    level: Level,
    x: &[f32],
    dim: usize,
    i0: usize,
    ni: usize,
    j0: usize,
    nj: usize,
) -> GramTile {
    assert!(i0 + ni <= dim && j0 + nj <= dim && x.len().is_multiple_of(dim));
    match level {
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 if ni == GRAM_TILE_ROWS && nj == GRAM_TILE_COLS => {
            // SAFETY: a selected or available level is supported by this CPU (AVX-512F
            // included), and the tile lies inside every row (asserted), all the kernel reads.
            unsafe { gram_tile_avx512(x, dim, i0, j0) }
        }
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 | Level::Avx512 => {
            // SAFETY: either level implies AVX2 and FMA, all the function was compiled for.
            unsafe { gram_tile_avx2(x, dim, i0, ni, j0, nj) }
        }
        _ => gram_tile_portable(x, dim, i0, ni, j0, nj),
    }
}

/// A full 8 × 32 tile: per row, two vectors of the `j` columns times eight broadcast `i`
/// values, sixteen accumulators in registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn gram_tile_avx512(x: &[f32], dim: usize, i0: usize, j0: usize) -> GramTile {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; GRAM_TILE_ROWS];
    for row in x.chunks_exact(dim) {
        let b: &[f32; GRAM_TILE_COLS] = row[j0..j0 + GRAM_TILE_COLS].try_into().unwrap();
        let a: &[f32; GRAM_TILE_ROWS] = row[i0..i0 + GRAM_TILE_ROWS].try_into().unwrap();
        // SAFETY: each pointer addresses 16 floats inside `b`.
        let (b0, b1) = unsafe {
            (
                _mm512_loadu_ps(b.as_ptr()),
                _mm512_loadu_ps(b.as_ptr().add(16)),
            )
        };
        for (acc_i, &av) in acc.iter_mut().zip(a) {
            let av = _mm512_set1_ps(av);
            acc_i[0] = _mm512_fmadd_ps(av, b0, acc_i[0]);
            acc_i[1] = _mm512_fmadd_ps(av, b1, acc_i[1]);
        }
    }
    let mut tile = [[0.0f32; GRAM_TILE_COLS]; GRAM_TILE_ROWS];
    for (t, [lo, hi]) in tile.iter_mut().zip(acc) {
        // SAFETY: each pointer addresses 16 floats inside the 32 of `t`.
        unsafe {
            _mm512_storeu_ps(t.as_mut_ptr(), lo);
            _mm512_storeu_ps(t.as_mut_ptr().add(16), hi);
        }
    }
    tile
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn gram_tile_avx2(x: &[f32], dim: usize, i0: usize, ni: usize, j0: usize, nj: usize) -> GramTile {
    gram_tile_portable(x, dim, i0, ni, j0, nj)
}

/// Any tile, as two halves of 8 × 16 so that the accumulators fit 256-bit registers.
#[inline(always)]
fn gram_tile_portable(
    x: &[f32],
    dim: usize,
    i0: usize,
    ni: usize,
    j0: usize,
    nj: usize,
) -> GramTile {
    const HALF: usize = GRAM_TILE_COLS / 2;
    let mut tile = [[0.0f32; GRAM_TILE_COLS]; GRAM_TILE_ROWS];
    for half in 0..2 {
        let jh = j0 + half * HALF;
        let nh = nj.saturating_sub(half * HALF).min(HALF);
        if nh == 0 {
            break;
        }
        let mut part = [[0.0f32; HALF]; GRAM_TILE_ROWS];
        let mut a = [0.0f32; GRAM_TILE_ROWS];
        let mut b = [0.0f32; HALF];
        for row in x.chunks_exact(dim) {
            for (av, &v) in a.iter_mut().zip(&row[i0..i0 + ni]) {
                *av = v;
            }
            for (bv, &v) in b.iter_mut().zip(&row[jh..jh + nh]) {
                *bv = v;
            }
            for (p, &av) in part.iter_mut().zip(&a) {
                for (pv, &bv) in p.iter_mut().zip(&b) {
                    *pv += av * bv;
                }
            }
        }
        for (t, p) in tile.iter_mut().zip(&part) {
            t[half * HALF..][..HALF].copy_from_slice(p);
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
        for (rows, dim) in [(300, 37), (1100, 150)] {
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

    /// Every tile kernel this CPU runs, on shapes with full and partial tiles, against f64.
    #[test]
    fn gram_tile_kernels_match_the_definition() {
        let (rows, dim) = (77, 70);
        let x: Vec<f32> = (0..rows * dim)
            .map(|i| ((i * 7919 % 1013) as f32 - 500.0) / 300.0)
            .collect();
        for level in Level::available() {
            for (i0, ni, j0, nj) in [
                (0, 8, 0, 32),
                (8, 8, 32, 32),
                (64, 6, 64, 6),
                (3, 5, 40, 17),
            ] {
                let tile = gram_tile(level, &x, dim, i0, ni, j0, nj);
                for i in 0..ni {
                    for j in 0..nj {
                        let want: f64 = (0..rows)
                            .map(|r| {
                                f64::from(x[r * dim + i0 + i]) * f64::from(x[r * dim + j0 + j])
                            })
                            .sum();
                        let got = f64::from(tile[i][j]);
                        assert!(
                            (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                            "tile ({i0},{j0}) [{i}][{j}]: {got} vs {want}"
                        );
                    }
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

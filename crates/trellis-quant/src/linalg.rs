//! Dense linear algebra in f64 for Hessians: Cholesky, the 16×16 block LDL that LDLQ needs,
//! and the block-diagonal 128-point Hadamard applied to both sides of a matrix.
//!
//! Hessians are accumulated and factorised in f64: a Hessian of a few thousand channels can
//! have a condition number near 1/σ_reg·(max diag/mean diag), and the LDL factor's feedback
//! terms are differences of nearly equal products; f32 loses them.

use rayon::prelude::*;
use trellis_codec::hadamard::HADAMARD_SIZE;

/// Rows and columns of one LDL block (one trellis tile's input rows).
pub const LDL_BLOCK: usize = 16;

/// A square row-major f64 matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct Matrix {
    pub n: usize,
    pub data: Vec<f64>,
}

impl Matrix {
    pub fn zeros(n: usize) -> Matrix {
        Matrix {
            n,
            data: vec![0.0; n * n],
        }
    }

    pub fn identity(n: usize) -> Matrix {
        let mut m = Matrix::zeros(n);
        for i in 0..n {
            m.data[i * n + i] = 1.0;
        }
        m
    }

    #[inline]
    pub fn at(&self, i: usize, j: usize) -> f64 {
        self.data[i * self.n + j]
    }

    #[inline]
    pub fn at_mut(&mut self, i: usize, j: usize) -> &mut f64 {
        &mut self.data[i * self.n + j]
    }

    pub fn diagonal(&self) -> Vec<f64> {
        (0..self.n).map(|i| self.at(i, i)).collect()
    }

    /// `A ← D·A·D` for the diagonal `d`.
    pub fn scale_both_sides(&mut self, d: &[f64]) {
        let n = self.n;
        self.data
            .par_chunks_mut(n)
            .zip(d.par_iter())
            .for_each(|(row, &di)| {
                for (v, &dj) in row.iter_mut().zip(d) {
                    *v *= di * dj;
                }
            });
    }

    /// `A ← H̃·A·H̃` with H̃ the block-diagonal normalised 128-point Hadamard (n must be a
    /// multiple of 128). H̃ is symmetric, so this is the rotation `H̃ A H̃ᵀ`.
    pub fn hadamard_both_sides(&mut self) {
        let n = self.n;
        assert!(
            n.is_multiple_of(HADAMARD_SIZE),
            "Hadamard needs n % 128 == 0"
        );
        // Rows: A·H̃ transforms every row.
        self.data.par_chunks_mut(n).for_each(hadamard_blocks_f64);
        // Columns: H̃·A = (Aᵀ·H̃)ᵀ; A·H̃ is symmetric when A is, but do not rely on it.
        transpose_in_place(&mut self.data, n);
        self.data.par_chunks_mut(n).for_each(hadamard_blocks_f64);
        transpose_in_place(&mut self.data, n);
    }

    /// Mirror the upper triangle into the lower one.
    pub fn symmetrize_from_upper(&mut self) {
        let n = self.n;
        for i in 0..n {
            for j in 0..i {
                self.data[i * n + j] = self.data[j * n + i];
            }
        }
    }
}

/// Normalised fast Walsh–Hadamard transform of every 128-element block of `v`, in f64.
pub fn hadamard_blocks_f64(v: &mut [f64]) {
    assert!(v.len().is_multiple_of(HADAMARD_SIZE));
    let scale = 1.0 / (HADAMARD_SIZE as f64).sqrt();
    for block in v.chunks_exact_mut(HADAMARD_SIZE) {
        let mut h = 1;
        while h < HADAMARD_SIZE {
            for pair in block.chunks_exact_mut(2 * h) {
                let (lo, hi) = pair.split_at_mut(h);
                for (a, b) in lo.iter_mut().zip(hi.iter_mut()) {
                    let (x, y) = (*a, *b);
                    *a = x + y;
                    *b = x - y;
                }
            }
            h *= 2;
        }
        for x in block.iter_mut() {
            *x *= scale;
        }
    }
}

fn transpose_in_place(a: &mut [f64], n: usize) {
    for i in 0..n {
        for j in i + 1..n {
            a.swap(i * n + j, j * n + i);
        }
    }
}

/// The matrix is not (numerically) positive definite.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NotPositiveDefinite {
    /// The pivot where the factorisation failed.
    pub pivot: usize,
}

/// `Σ a[i]·b[i]` in eight running sums, so that it vectorises (a single running sum is one
/// dependent add after another: the factorisation of a 2048-wide Hessian took 0.7 s).
fn dot_f64(a: &[f64], b: &[f64]) -> f64 {
    let mut sums = [0.0f64; 8];
    let (chunks_a, chunks_b) = (a.chunks_exact(8), b.chunks_exact(8));
    let (rest_a, rest_b) = (chunks_a.remainder(), chunks_b.remainder());
    for (ca, cb) in chunks_a.zip(chunks_b) {
        for ((s, x), y) in sums.iter_mut().zip(ca).zip(cb) {
            *s += x * y;
        }
    }
    let mut total: f64 = sums.iter().sum();
    for (x, y) in rest_a.iter().zip(rest_b) {
        total += x * y;
    }
    total
}

/// Columns of one panel of the blocked Cholesky factorisation.
const CHOLESKY_PANEL: usize = 64;

/// Lower Cholesky factor `C` with `A = C·Cᵀ` (the upper triangle of the result is zero).
///
/// Right-looking by panels of [`CHOLESKY_PANEL`] columns: factor the panel's diagonal block,
/// solve the rows below it (in parallel), then subtract the panel's outer product from the
/// trailing matrix with one f64 GEMM. (Column by column, a 2048-wide Hessian took 0.5 s,
/// bound by streaming the whole factor once per column.)
pub fn cholesky(a: &Matrix) -> Result<Matrix, NotPositiveDefinite> {
    let n = a.n;
    let mut c = a.clone();
    let mut panel = Vec::new();
    for k0 in (0..n).step_by(CHOLESKY_PANEL) {
        let kb = CHOLESKY_PANEL.min(n - k0);
        let k1 = k0 + kb;
        // The diagonal block, column by column (earlier panels are already subtracted).
        for j in k0..k1 {
            let (head, tail) = c.data.split_at_mut((j + 1) * n);
            let row_j = &mut head[j * n..];
            let d = row_j[j] - dot_f64(&row_j[k0..j], &row_j[k0..j]);
            // NaN fails `d > 0.0` too.
            if d.is_nan() || d <= 0.0 || !d.is_finite() {
                return Err(NotPositiveDefinite { pivot: j });
            }
            row_j[j] = d.sqrt();
            let row_j: &[f64] = row_j;
            for row_i in tail.chunks_exact_mut(n).take(k1 - j - 1) {
                row_i[j] = (row_i[j] - dot_f64(&row_i[k0..j], &row_j[k0..j])) / row_j[j];
            }
        }
        if k1 == n {
            break;
        }
        // The rows below: x · L11ᵀ = A21, by forward substitution, each row on its own.
        let (top, below) = c.data.split_at_mut(k1 * n);
        let top: &[f64] = top;
        below.par_chunks_mut(n).for_each(|row_i| {
            for j in k0..k1 {
                let row_j = &top[j * n..j * n + n];
                row_i[j] = (row_i[j] - dot_f64(&row_i[k0..j], &row_j[k0..j])) / row_j[j];
            }
        });
        // A22 −= L21·L21ᵀ over the trailing square (its upper half is cleared at the end).
        let m = n - k1;
        panel.clear();
        panel.extend(
            below
                .chunks_exact(n)
                .flat_map(|row| row[k0..k1].iter().copied()),
        );
        let parallelism = if rayon::current_num_threads() > 1 {
            gemm::Parallelism::Rayon(rayon::current_num_threads())
        } else {
            gemm::Parallelism::None
        };
        // SAFETY: `dst` addresses the m × m block at (k1, k1) of `c` with row stride n, inside
        // `below` (m rows of n values from column k1 on); `panel` is a separate m × kb buffer
        // read as L21 (row stride kb) and as L21ᵀ (column stride kb), so nothing aliases the
        // destination.
        unsafe {
            gemm::gemm(
                m,
                m,
                kb,
                below.as_mut_ptr().add(k1),
                1,
                n as isize,
                true,
                panel.as_ptr(),
                1,
                kb as isize,
                panel.as_ptr(),
                kb as isize,
                1,
                1.0,
                -1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
    }
    for i in 0..n {
        c.data[i * n + i + 1..(i + 1) * n].fill(0.0);
    }
    Ok(c)
}

/// Inverse of a lower-triangular `b × b` block (row-major), by forward substitution.
fn invert_lower(block: &[f64], b: usize) -> Vec<f64> {
    let mut inv = vec![0.0; b * b];
    for col in 0..b {
        for i in col..b {
            let mut s = if i == col { 1.0 } else { 0.0 };
            for k in col..i {
                s -= block[i * b + k] * inv[k * b + col];
            }
            inv[i * b + col] = s / block[i * b + i];
        }
    }
    inv
}

/// Block LDL of a positive definite `H` with 16×16 blocks: `H = L·D·Lᵀ` with `L` unit lower
/// block-triangular (identity diagonal blocks) and `D` block-diagonal. Returns `L` with its
/// diagonal blocks set to zero — only the feedback terms LDLQ uses — as f32, row-major.
///
/// From the Cholesky factor `C` (`H = C·Cᵀ`): `L = C·blockdiag(C)⁻¹`, so that
/// `L·(blockdiag(C)·blockdiag(C)ᵀ)·Lᵀ = C·Cᵀ`.
pub fn block_ldl(h: &Matrix) -> Result<Vec<f32>, NotPositiveDefinite> {
    let n = h.n;
    assert!(n.is_multiple_of(LDL_BLOCK), "block LDL needs n % 16 == 0");
    let c = cholesky(h)?;
    let blocks = n / LDL_BLOCK;
    let inverses: Vec<Vec<f64>> = (0..blocks)
        .into_par_iter()
        .map(|bj| {
            let mut block = vec![0.0; LDL_BLOCK * LDL_BLOCK];
            for r in 0..LDL_BLOCK {
                for col in 0..LDL_BLOCK {
                    block[r * LDL_BLOCK + col] = c.at(bj * LDL_BLOCK + r, bj * LDL_BLOCK + col);
                }
            }
            invert_lower(&block, LDL_BLOCK)
        })
        .collect();
    let mut l = vec![0.0f32; n * n];
    l.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
        let bi = i / LDL_BLOCK;
        // Strictly below the diagonal block: L[i, block j] = C[i, block j] · inv(C_jj).
        for (bj, inv) in inverses.iter().enumerate().take(bi) {
            let c_row = &c.data[i * n + bj * LDL_BLOCK..i * n + (bj + 1) * LDL_BLOCK];
            for col in 0..LDL_BLOCK {
                let v: f64 = (0..LDL_BLOCK)
                    .map(|k| c_row[k] * inv[k * LDL_BLOCK + col])
                    .sum();
                row[bj * LDL_BLOCK + col] = v as f32;
            }
        }
    });
    Ok(l)
}

/// Solve `A·x = b` for a symmetric positive definite `A` (by Cholesky).
pub fn solve_positive(a: &Matrix, b: &[f64]) -> Result<Vec<f64>, NotPositiveDefinite> {
    let c = cholesky(a)?;
    let n = a.n;
    // C·y = b, then Cᵀ·x = y.
    let mut y = vec![0.0; n];
    for i in 0..n {
        let s: f64 = (0..i).map(|k| c.at(i, k) * y[k]).sum();
        y[i] = (b[i] - s) / c.at(i, i);
    }
    let mut x = vec![0.0; n];
    for i in (0..n).rev() {
        let s: f64 = (i + 1..n).map(|k| c.at(k, i) * x[k]).sum();
        x[i] = (y[i] - s) / c.at(i, i);
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// A random positive definite matrix `XᵀX/m + εI` with correlated columns.
    fn random_spd(n: usize, seed: u64) -> Matrix {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let m = 2 * n;
        let x: Vec<f64> = (0..m * n).map(|_| rng.random::<f64>() - 0.5).collect();
        let mut h = Matrix::zeros(n);
        for i in 0..n {
            for j in 0..n {
                let mut s = 0.0;
                for r in 0..m {
                    // Mix neighbouring columns so the matrix is far from diagonal.
                    let xi = x[r * n + i] + 0.5 * x[r * n + (i + 1) % n];
                    let xj = x[r * n + j] + 0.5 * x[r * n + (j + 1) % n];
                    s += xi * xj;
                }
                *h.at_mut(i, j) = s / m as f64 + if i == j { 1e-3 } else { 0.0 };
            }
        }
        h
    }

    fn matmul(a: &[f64], b: &[f64], n: usize) -> Vec<f64> {
        let mut c = vec![0.0; n * n];
        for i in 0..n {
            for k in 0..n {
                let aik = a[i * n + k];
                for j in 0..n {
                    c[i * n + j] += aik * b[k * n + j];
                }
            }
        }
        c
    }

    fn transpose(a: &[f64], n: usize) -> Vec<f64> {
        let mut t = a.to_vec();
        transpose_in_place(&mut t, n);
        t
    }

    #[test]
    fn cholesky_reconstructs() {
        // One panel, and several with a partial last one (the trailing GEMM updates).
        for n in [48, 150] {
            let h = random_spd(n, 1);
            let c = cholesky(&h).unwrap();
            for i in 0..n {
                assert!(c.data[i * n + i + 1..(i + 1) * n].iter().all(|&v| v == 0.0));
            }
            let back = matmul(&c.data, &transpose(&c.data, n), n);
            let scale = h.data.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            for (a, b) in back.iter().zip(&h.data) {
                assert!((a - b).abs() < 1e-12 * scale, "n {n}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn cholesky_rejects_indefinite() {
        let mut h = Matrix::identity(4);
        *h.at_mut(2, 2) = -1.0;
        assert_eq!(cholesky(&h), Err(NotPositiveDefinite { pivot: 2 }));
    }

    /// H = (L + I)·D·(L + I)ᵀ with D = the block diagonal of the Cholesky factor squared.
    #[test]
    fn block_ldl_reconstructs_h() {
        let n = 64;
        let h = random_spd(n, 2);
        let l = block_ldl(&h).unwrap();
        let mut unit_l: Vec<f64> = l.iter().map(|&v| f64::from(v)).collect();
        for i in 0..n {
            // Diagonal blocks are zero; the strictly-lower blocks only.
            for j in 0..n {
                if i / LDL_BLOCK <= j / LDL_BLOCK {
                    assert_eq!(
                        l[i * n + j],
                        0.0,
                        "({i},{j}) outside the strictly lower blocks"
                    );
                }
            }
            unit_l[i * n + i] = 1.0;
        }
        // D = blockdiag(C)·blockdiag(C)ᵀ.
        let c = cholesky(&h).unwrap();
        let mut cd = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                if i / LDL_BLOCK == j / LDL_BLOCK {
                    cd[i * n + j] = c.at(i, j);
                }
            }
        }
        let d = matmul(&cd, &transpose(&cd, n), n);
        let back = matmul(&matmul(&unit_l, &d, n), &transpose(&unit_l, n), n);
        let scale = h.data.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        for (a, b) in back.iter().zip(&h.data) {
            // L is stored in f32.
            assert!((a - b).abs() < 1e-5 * scale, "{a} vs {b}");
        }
    }

    #[test]
    fn hadamard_rotation_is_orthogonal() {
        let n = 256;
        let h = random_spd(n, 3);
        let mut r = h.clone();
        r.hadamard_both_sides();
        let trace = |m: &Matrix| (0..m.n).map(|i| m.at(i, i)).sum::<f64>();
        assert!((trace(&r) - trace(&h)).abs() < 1e-9 * trace(&h));
        r.hadamard_both_sides();
        for (a, b) in r.data.iter().zip(&h.data) {
            assert!((a - b).abs() < 1e-12);
        }
    }

    #[test]
    fn positive_solve() {
        let h = random_spd(32, 4);
        let x: Vec<f64> = (0..32).map(|i| i as f64 - 10.0).collect();
        let b: Vec<f64> = (0..32)
            .map(|i| (0..32).map(|j| h.at(i, j) * x[j]).sum())
            .collect();
        let got = solve_positive(&h, &b).unwrap();
        for (g, w) in got.iter().zip(&x) {
            assert!((g - w).abs() < 1e-8, "{g} vs {w}");
        }
    }
}

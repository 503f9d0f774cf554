//! Hessians of linear layers: `H = E[xᵀx]` over the calibration activations a linear sees.
//!
//! Linears fed the same input share one accumulator (q/k/v; gate/up; all experts' gate/up),
//! as in the reference quantizer. Sums are kept in f64; finalising divides by the row count
//! and adds the damping `σ_reg · mean(diag H) · I`.

use crate::kernels::gram_upper_accumulate;
use crate::linalg::Matrix;

/// The reference damping factor σ_reg (ExLlamaV3 uses 0.025; QTIP 0.01).
pub const SIGMA_REG: f64 = 0.025;

/// Running `Σ xᵀx` and row count for one input.
#[derive(Clone, Debug)]
pub struct HessianAccumulator {
    dim: usize,
    /// Upper triangle of `Σ xᵀx`, row-major `dim × dim`.
    sum: Vec<f64>,
    rows: u64,
    /// Rows with a non-finite value, skipped (an overflow must not poison the whole sum).
    non_finite_rows: u64,
}

/// A finished Hessian: the mean `xᵀx` and its damped form.
#[derive(Clone, Debug)]
pub struct Hessian {
    /// `E[xᵀx]` (undamped): the exact output-error metric on the calibration set.
    pub mean: Matrix,
    /// `mean + σ_reg · mean(diag) · I`: what the quantizer factorises.
    pub damped: Matrix,
    /// Calibration rows behind it.
    pub rows: u64,
}

impl HessianAccumulator {
    pub fn new(dim: usize) -> HessianAccumulator {
        HessianAccumulator {
            dim,
            sum: vec![0.0; dim * dim],
            rows: 0,
            non_finite_rows: 0,
        }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Add `rows` activation rows of width `dim` (row-major).
    pub fn add(&mut self, x: &[f32], rows: usize) {
        assert_eq!(
            x.len(),
            rows * self.dim,
            "activation rows of the wrong width"
        );
        if x.iter().all(|v| v.is_finite()) {
            gram_upper_accumulate(x, rows, self.dim, &mut self.sum);
            self.rows += rows as u64;
            return;
        }
        let finite: Vec<f32> = x
            .chunks_exact(self.dim)
            .filter(|row| row.iter().all(|v| v.is_finite()))
            .flatten()
            .copied()
            .collect();
        let kept = finite.len() / self.dim;
        self.non_finite_rows += (rows - kept) as u64;
        if kept > 0 {
            gram_upper_accumulate(&finite, kept, self.dim, &mut self.sum);
            self.rows += kept as u64;
        }
    }

    /// Rows skipped for holding inf or NaN.
    pub fn non_finite_rows(&self) -> u64 {
        self.non_finite_rows
    }

    /// The mean and damped Hessian, or `None` when nothing usable was seen (no rows, or a
    /// diagonal so small that the layer gets no calibration signal): the caller then
    /// quantizes without LDLQ feedback.
    pub fn finish(self) -> Option<Hessian> {
        if self.rows == 0 {
            return None;
        }
        let mut mean = Matrix {
            n: self.dim,
            data: self.sum,
        };
        let inv = 1.0 / self.rows as f64;
        mean.data.iter_mut().for_each(|v| *v *= inv);
        mean.symmetrize_from_upper();
        let diag_mean = mean.diagonal().iter().sum::<f64>() / self.dim as f64;
        if !diag_mean.is_finite() || diag_mean < 1e-20 {
            return None;
        }
        let mut damped = mean.clone();
        for i in 0..self.dim {
            *damped.at_mut(i, i) += SIGMA_REG * diag_mean;
        }
        Some(Hessian {
            mean,
            damped,
            rows: self.rows,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_damping() {
        let mut acc = HessianAccumulator::new(2);
        acc.add(&[1.0, 2.0, 3.0, 4.0], 2);
        acc.add(&[f32::NAN, 1.0], 1);
        assert_eq!(acc.non_finite_rows(), 1);
        let h = acc.finish().unwrap();
        // E[xᵀx] over rows (1,2) and (3,4).
        assert_eq!(h.mean.data, vec![5.0, 7.0, 7.0, 10.0]);
        let lambda = SIGMA_REG * 7.5;
        assert_eq!(h.damped.data, vec![5.0 + lambda, 7.0, 7.0, 10.0 + lambda]);
        assert_eq!(h.rows, 2);
    }

    #[test]
    fn no_rows_means_no_hessian() {
        assert!(HessianAccumulator::new(4).finish().is_none());
        let mut zeros = HessianAccumulator::new(2);
        zeros.add(&[0.0; 4], 2);
        assert!(zeros.finish().is_none());
    }
}

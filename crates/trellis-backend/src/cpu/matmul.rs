//! Strided f32 matrix products by the `gemm` crate: packed, cache-blocked kernels with run-time
//! ISA dispatch, for the prefill paths whose operands are large enough to pay for packing
//! (MLA's key/value expansion and its blocked attention). Views carry strides, so operands
//! are read where they lie (a head's columns inside a wider row, a transposed weight) without
//! copies.

/// A read-only matrix: element (i, j) at `data[i · row_stride + j · col_stride]`.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

/// A writable matrix, laid out as [`MatRef`].
pub struct MatMut<'a> {
    pub data: &'a mut [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

/// Whether every element a view addresses lies inside its slice.
fn fits(len: usize, rows: usize, cols: usize, row_stride: usize, col_stride: usize) -> bool {
    rows == 0
        || cols == 0
        || (rows - 1)
            .checked_mul(row_stride)
            .zip((cols - 1).checked_mul(col_stride))
            .and_then(|(a, b)| a.checked_add(b))
            .is_some_and(|last| last < len)
}

/// `dst = lhs · rhs`, or `dst += lhs · rhs` with `accumulate`. `parallel` spreads the product
/// over the rayon pool (call it from outside the pool); otherwise it runs on this thread.
///
/// Panics when the shapes disagree or a view reaches outside its slice.
pub fn matmul(dst: MatMut<'_>, lhs: MatRef<'_>, rhs: MatRef<'_>, accumulate: bool, parallel: bool) {
    assert!(
        lhs.rows == dst.rows && rhs.cols == dst.cols && lhs.cols == rhs.rows,
        "matmul shapes: [{}×{}] · [{}×{}] into [{}×{}]",
        lhs.rows,
        lhs.cols,
        rhs.rows,
        rhs.cols,
        dst.rows,
        dst.cols
    );
    for (len, rows, cols, rs, cs) in [
        (
            lhs.data.len(),
            lhs.rows,
            lhs.cols,
            lhs.row_stride,
            lhs.col_stride,
        ),
        (
            rhs.data.len(),
            rhs.rows,
            rhs.cols,
            rhs.row_stride,
            rhs.col_stride,
        ),
        (
            dst.data.len(),
            dst.rows,
            dst.cols,
            dst.row_stride,
            dst.col_stride,
        ),
    ] {
        assert!(
            fits(len, rows, cols, rs, cs),
            "matmul view outside its slice"
        );
    }
    if dst.rows == 0 || dst.cols == 0 {
        return;
    }
    if lhs.cols == 0 {
        if !accumulate {
            for i in 0..dst.rows {
                for j in 0..dst.cols {
                    dst.data[i * dst.row_stride + j * dst.col_stride] = 0.0;
                }
            }
        }
        return;
    }
    let parallelism = if parallel && rayon::current_num_threads() > 1 {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    let stride = |s: usize| s as isize;
    // SAFETY: the asserts above keep every element the three views address inside their
    // slices (strides are non-negative and in bounds), the shapes agree, and `dst` is an
    // exclusive borrow, so it aliases neither operand.
    unsafe {
        gemm::gemm(
            dst.rows,
            dst.cols,
            lhs.cols,
            dst.data.as_mut_ptr(),
            stride(dst.col_stride),
            stride(dst.row_stride),
            accumulate,
            lhs.data.as_ptr(),
            stride(lhs.col_stride),
            stride(lhs.row_stride),
            rhs.data.as_ptr(),
            stride(rhs.col_stride),
            stride(rhs.row_stride),
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_testutil::noise;

    /// Strided views (a transposed operand, columns inside wider rows), overwrite and
    /// accumulate, serial and parallel, against the triple loop.
    #[test]
    fn strided_products_match_the_definition() {
        let (m, k, n) = (37, 70, 45);
        // lhs: rows of width 80, the product uses columns 5..75.
        let lhs_data: Vec<f32> = (0..m * 80).map(|i| noise(i, 1)).collect();
        // rhs stored transposed: element (c, j) at rhs_t[j * k + c].
        let rhs_t: Vec<f32> = (0..n * k).map(|i| noise(i, 2)).collect();
        let start: Vec<f32> = (0..m * n).map(|i| noise(i, 3)).collect();
        for accumulate in [false, true] {
            for parallel in [false, true] {
                let mut dst = start.clone();
                matmul(
                    MatMut {
                        data: &mut dst,
                        rows: m,
                        cols: n,
                        row_stride: n,
                        col_stride: 1,
                    },
                    MatRef {
                        data: &lhs_data[5..],
                        rows: m,
                        cols: k,
                        row_stride: 80,
                        col_stride: 1,
                    },
                    MatRef {
                        data: &rhs_t,
                        rows: k,
                        cols: n,
                        row_stride: 1,
                        col_stride: k,
                    },
                    accumulate,
                    parallel,
                );
                for i in 0..m {
                    for j in 0..n {
                        let mut want: f64 = if accumulate {
                            start[i * n + j] as f64
                        } else {
                            0.0
                        };
                        for c in 0..k {
                            want += lhs_data[5 + i * 80 + c] as f64 * rhs_t[j * k + c] as f64;
                        }
                        let got = dst[i * n + j];
                        assert!(
                            !got.is_nan() && (got as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "({i}, {j}) accumulate {accumulate} parallel {parallel}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "outside its slice")]
    fn a_view_past_its_slice_is_refused() {
        let a = vec![0.0f32; 10];
        let b = vec![0.0f32; 12];
        let mut c = vec![0.0f32; 4];
        matmul(
            MatMut {
                data: &mut c,
                rows: 2,
                cols: 2,
                row_stride: 2,
                col_stride: 1,
            },
            MatRef {
                data: &a,
                rows: 2,
                cols: 6,
                row_stride: 6,
                col_stride: 1,
            },
            MatRef {
                data: &b,
                rows: 6,
                cols: 2,
                row_stride: 2,
                col_stride: 1,
            },
            false,
            false,
        );
    }
}

//! One EXL3 quantized linear layer and its plain reference paths: decode the inner trellis
//! matrix, reconstruct the dense weight, and apply the layer to activations.
//!
//! Orientation is EXL3's: the weight is (in × out) and `y = x · W` for row vectors `x`.
//! `W = diag(suh) · H̃ · W̃ · H̃ · diag(svh)`, with W̃ decoded from 16×16 trellis tiles.

use crate::bits::{BitWidth, TILE_WEIGHTS};
use crate::codebook::Codebook;
use crate::hadamard::{HADAMARD_SCALE, HADAMARD_SIZE, hadamard_blocks};
use crate::tile::{POSITION_TO_TILE_INDEX, TILE_SIZE, tile_states};
use half::f16;
use std::borrow::Cow;

/// Why a set of tensors does not form a valid trellis linear.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LinearShapeError {
    #[error("padded dimension {0} is not a positive multiple of 128")]
    NotPadded(usize),
    #[error("{what} has {got} elements, expected {expected}")]
    Length {
        what: &'static str,
        got: usize,
        expected: usize,
    },
    #[error("logical size {logical} exceeds padded size {padded} ({what})")]
    LogicalTooLarge {
        what: &'static str,
        logical: usize,
        padded: usize,
    },
}

/// The tensors of one EXL3 linear, borrowed (usually from a memory map) or owned.
#[derive(Clone, Debug)]
pub struct TrellisLinear<'a> {
    /// Tile words, `[k/16][n/16][16·K]` row-major.
    pub trellis: Cow<'a, [u16]>,
    /// Input-side sign × scale, length `k_padded`.
    pub suh: Cow<'a, [f16]>,
    /// Output-side sign × scale, length `n_padded`.
    pub svh: Cow<'a, [f16]>,
    /// Optional bias, length `n_padded`.
    pub bias: Option<Cow<'a, [f16]>>,
    pub bits: BitWidth,
    pub codebook: Codebook,
    /// Logical input features (≤ `k_padded`).
    pub in_features: usize,
    /// Logical output features (≤ `n_padded`); padded outputs are dropped.
    pub out_features: usize,
    pub k_padded: usize,
    pub n_padded: usize,
}

impl<'a> TrellisLinear<'a> {
    /// Check every length against the padded shape and build the linear.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        trellis: Cow<'a, [u16]>,
        suh: Cow<'a, [f16]>,
        svh: Cow<'a, [f16]>,
        bias: Option<Cow<'a, [f16]>>,
        bits: BitWidth,
        codebook: Codebook,
        in_features: usize,
        out_features: usize,
    ) -> Result<Self, LinearShapeError> {
        let k_padded = suh.len();
        let n_padded = svh.len();
        for padded in [k_padded, n_padded] {
            if padded == 0 || padded % HADAMARD_SIZE != 0 {
                return Err(LinearShapeError::NotPadded(padded));
            }
        }
        let expected = (k_padded / TILE_SIZE) * (n_padded / TILE_SIZE) * bits.tile_words();
        if trellis.len() != expected {
            return Err(LinearShapeError::Length {
                what: "trellis",
                got: trellis.len(),
                expected,
            });
        }
        if let Some(b) = bias.as_ref().filter(|b| b.len() != n_padded) {
            return Err(LinearShapeError::Length {
                what: "bias",
                got: b.len(),
                expected: n_padded,
            });
        }
        if in_features > k_padded {
            return Err(LinearShapeError::LogicalTooLarge {
                what: "in_features",
                logical: in_features,
                padded: k_padded,
            });
        }
        if out_features > n_padded {
            return Err(LinearShapeError::LogicalTooLarge {
                what: "out_features",
                logical: out_features,
                padded: n_padded,
            });
        }
        Ok(TrellisLinear {
            trellis,
            suh,
            svh,
            bias,
            bits,
            codebook,
            in_features,
            out_features,
            k_padded,
            n_padded,
        })
    }

    pub fn tiles_k(&self) -> usize {
        self.k_padded / TILE_SIZE
    }

    pub fn tiles_n(&self) -> usize {
        self.n_padded / TILE_SIZE
    }

    /// The words of tile (kt, nt).
    pub fn tile_words(&self, kt: usize, nt: usize) -> &[u16] {
        let w = self.bits.tile_words();
        let start = (kt * self.tiles_n() + nt) * w;
        &self.trellis[start..start + w]
    }

    /// Bytes of packed weights, scales and bias: what one full pass over this layer reads.
    pub fn storage_bytes(&self) -> usize {
        2 * (self.trellis.len()
            + self.suh.len()
            + self.svh.len()
            + self.bias.as_ref().map_or(0, |b| b.len()))
    }

    /// Decode W̃, the raw codebook output before Hadamards and scales:
    /// `k_padded × n_padded` fp16, row-major (row = input channel). Bit-exact.
    pub fn decode_inner(&self) -> Vec<f16> {
        let mut out = vec![f16::ZERO; self.k_padded * self.n_padded];
        let table = self.codebook.table();
        for kt in 0..self.tiles_k() {
            for nt in 0..self.tiles_n() {
                let states = tile_states(self.tile_words(kt, nt), self.bits);
                for (t, &s) in states.iter().enumerate() {
                    let idx = usize::from(POSITION_TO_TILE_INDEX[t]);
                    let (r, c) = (idx / TILE_SIZE, idx % TILE_SIZE);
                    out[(kt * TILE_SIZE + r) * self.n_padded + nt * TILE_SIZE + c] =
                        table[usize::from(s)];
                }
            }
        }
        out
    }

    /// The dense weight `diag(suh)·H̃·W̃·H̃·diag(svh)` in EXL3 orientation, trimmed to
    /// `in_features × out_features`, evaluated in f32 (no intermediate fp16 rounding).
    pub fn reconstruct(&self) -> Vec<f32> {
        let (k, n) = (self.k_padded, self.n_padded);
        let mut w: Vec<f32> = self.decode_inner().iter().map(|v| v.to_f32()).collect();
        // Input Hadamard acts on columns of W̃: transform each column over the k rows.
        let mut column = vec![0.0f32; k];
        for j in 0..n {
            for i in 0..k {
                column[i] = w[i * n + j];
            }
            hadamard_blocks(&mut column);
            for i in 0..k {
                w[i * n + j] = column[i] * self.suh[i].to_f32();
            }
        }
        // Output Hadamard acts on rows.
        for row in w.chunks_exact_mut(n) {
            hadamard_blocks(row);
            for (x, s) in row.iter_mut().zip(self.svh.iter()) {
                *x *= s.to_f32();
            }
        }
        trim(&w, n, self.in_features, self.out_features)
    }

    /// [`TrellisLinear::reconstruct`] transposed to Hugging Face orientation
    /// (`out_features × in_features`, row = output channel), computed in parallel: what a
    /// dense matrix product needs to run this layer exactly on many rows at once.
    ///
    /// Each 128-output block is decoded straight into transposed rows; the input Hadamard
    /// then runs along each row, the output Hadamard as butterflies between whole rows of the
    /// block. The same sums as `reconstruct` in another order, so equal to float rounding.
    pub fn dequantize_transposed(&self) -> Vec<f32> {
        use rayon::prelude::*;
        let (k, n) = (self.k_padded, self.n_padded);
        let table = self.codebook.table_f32();
        let mut wt = vec![0.0f32; n * k];
        wt.par_chunks_mut(HADAMARD_SIZE * k)
            .enumerate()
            .for_each(|(block, rows)| {
                let tiles_per_block = HADAMARD_SIZE / TILE_SIZE;
                for nt in block * tiles_per_block..(block + 1) * tiles_per_block {
                    for kt in 0..self.tiles_k() {
                        let states = tile_states(self.tile_words(kt, nt), self.bits);
                        for (t, &s) in states.iter().enumerate() {
                            let idx = usize::from(POSITION_TO_TILE_INDEX[t]);
                            let (r, c) = (idx / TILE_SIZE, idx % TILE_SIZE);
                            let row = (nt - block * tiles_per_block) * TILE_SIZE + c;
                            rows[row * k + kt * TILE_SIZE + r] = table[usize::from(s)];
                        }
                    }
                }
                // Input side: H̃ along each row, then suh.
                for row in rows.chunks_exact_mut(k) {
                    hadamard_blocks(row);
                    for (v, s) in row.iter_mut().zip(self.suh.iter()) {
                        *v *= s.to_f32();
                    }
                }
                // Output side: the 128-point transform across the block's rows.
                let mut h = 1;
                while h < HADAMARD_SIZE {
                    for pair in rows.chunks_exact_mut(2 * h * k) {
                        let (lo, hi) = pair.split_at_mut(h * k);
                        for (a, b) in lo.iter_mut().zip(hi.iter_mut()) {
                            let (x, y) = (*a, *b);
                            *a = x + y;
                            *b = x - y;
                        }
                    }
                    h *= 2;
                }
                for (o, row) in rows.chunks_exact_mut(k).enumerate() {
                    let scale = HADAMARD_SCALE * self.svh[block * HADAMARD_SIZE + o].to_f32();
                    row.iter_mut().for_each(|v| *v *= scale);
                }
            });
        trim(&wt, k, self.out_features, self.in_features)
    }

    /// Reference forward `y = x · W (+ bias)` for `m` rows of `in_features` inputs, in f32.
    /// Returns `m × out_features`.
    pub fn apply(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.in_features, "input shape");
        let (k, n) = (self.k_padded, self.n_padded);
        // xh = (x ⊙ suh) · H̃, zero-padded to k.
        let mut xh = vec![0.0f32; m * k];
        for (row_in, row_h) in x.chunks_exact(self.in_features).zip(xh.chunks_exact_mut(k)) {
            for ((h, &v), s) in row_h.iter_mut().zip(row_in).zip(self.suh.iter()) {
                *h = v * s.to_f32();
            }
            hadamard_blocks(row_h);
        }
        // z = xh · W̃, one decoded tile at a time.
        let mut z = vec![0.0f32; m * n];
        let table = self.codebook.table_f32();
        let mut tile = [0.0f32; TILE_WEIGHTS];
        for kt in 0..self.tiles_k() {
            for nt in 0..self.tiles_n() {
                let states = tile_states(self.tile_words(kt, nt), self.bits);
                for (t, &s) in states.iter().enumerate() {
                    tile[usize::from(POSITION_TO_TILE_INDEX[t])] = table[usize::from(s)];
                }
                for (row_h, row_z) in xh.chunks_exact(k).zip(z.chunks_exact_mut(n)) {
                    let xs = &row_h[kt * TILE_SIZE..(kt + 1) * TILE_SIZE];
                    let zs = &mut row_z[nt * TILE_SIZE..(nt + 1) * TILE_SIZE];
                    for (r, &xv) in xs.iter().enumerate() {
                        for (c, zv) in zs.iter_mut().enumerate() {
                            *zv += xv * tile[r * TILE_SIZE + c];
                        }
                    }
                }
            }
        }
        // y = (z · H̃) ⊙ svh + bias, trimmed.
        for row in z.chunks_exact_mut(n) {
            hadamard_blocks(row);
            for (j, v) in row.iter_mut().enumerate() {
                *v *= self.svh[j].to_f32();
                if let Some(b) = &self.bias {
                    *v += b[j].to_f32();
                }
            }
        }
        trim(&z, n, m, self.out_features)
    }
}

/// Keep the first `rows × cols` block of a row-major matrix with row stride `stride`.
fn trim(w: &[f32], stride: usize, rows: usize, cols: usize) -> Vec<f32> {
    w.chunks_exact(stride)
        .take(rows)
        .flat_map(|row| row[..cols].iter().copied())
        .collect()
}

//! Quantizing linear layers: regularisation (random signs, channel scales, Hadamards), the
//! global scale search, block LDL of the rotated Hessian and LDLQ over 16-row strips with the
//! Viterbi tile encoder (exl3-format.md §9.2–§9.7).
//!
//! Orientation is EXL3's throughout: a weight is `in × out` and `y = x·W`. For a weight `W`
//! with input Hessian `H` the quantizer finds sign/scale vectors `su`, `sv` and a trellis
//! matrix `W̃` with `W ≈ diag(su)·H̃·W̃·H̃·diag(sv)`:
//!
//! 1. `sv` = random output signs × (optionally) output-channel RMS; `W ← W / sv`, `W ← W·H̃`;
//! 2. `su` = random input signs × input-row RMS / −1.2437; `W ← W / su`, `W ← H̃·W`;
//! 3. a global scale `g` (searched on sample tiles): `W ← g·W`, `su ← su / g`;
//! 4. the target `T = W` is quantized strip by strip from the last 16 input rows to the first,
//!    each strip corrected by the LDL feedback `Σ_{j>b} L_jbᵀ (T_j − W̃_j)` of the strips done.
//!
//! The LDL factor comes from the Hessian of `W̃` itself, `H̃·diag(su)·H·diag(su)·H̃`, i.e.
//! the input side's signs *and* scales (ExLlamaV3 rotates by the signs only; including the
//! scales makes the feedback exact for the scaled rows and costs nothing).

use crate::hessian::Hessian;
use crate::kernels::{add_coef_t_times, gram_upper_accumulate};
use crate::linalg::{Matrix, block_ldl};
use half::f16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::borrow::Cow;
use trellis_codec::encode::{Effort, EncodedTile, encode_tiles_with_effort};
use trellis_codec::hadamard::{HADAMARD_SIZE, hadamard_blocks};
use trellis_codec::tile::TILE_SIZE;
use trellis_codec::{BitWidth, CODEBOOK_SCALE, Codebook, TILE_WEIGHTS, TrellisLinear};

/// Whether output-channel RMS scales are folded into `svh` (`out_scales` of the config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutScales {
    Always,
    Never,
    /// Always, except when the input is very irregular (the reference's skew rule).
    Auto,
}

impl OutScales {
    pub fn name(self) -> &'static str {
        match self {
            OutScales::Always => "always",
            OutScales::Never => "never",
            OutScales::Auto => "auto",
        }
    }
}

/// How to quantize one linear.
#[derive(Clone, Copy, Debug)]
pub struct LinearSettings {
    pub bits: BitWidth,
    pub codebook: Codebook,
    /// Seed of the random sign flips (per tensor, so reruns and resumes are identical).
    pub seed: u64,
    pub out_scales: OutScales,
    /// How thoroughly the Viterbi searches.
    pub effort: Effort,
}

/// A dense weight to quantize, EXL3 orientation (`in_features × out_features`, row-major).
#[derive(Clone, Debug)]
pub struct DenseLinear {
    pub weight: Vec<f32>,
    pub in_features: usize,
    pub out_features: usize,
    pub bias: Option<Vec<f32>>,
}

impl DenseLinear {
    /// From a Hugging Face weight `[out, in]`.
    pub fn from_hf(weight_out_in: &[f32], in_features: usize, out_features: usize) -> Self {
        assert_eq!(weight_out_in.len(), in_features * out_features);
        let mut weight = vec![0.0f32; in_features * out_features];
        for o in 0..out_features {
            for i in 0..in_features {
                weight[i * out_features + o] = weight_out_in[o * in_features + i];
            }
        }
        DenseLinear {
            weight,
            in_features,
            out_features,
            bias: None,
        }
    }
}

/// What happened while quantizing one linear.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LinearReport {
    /// `tr(EᵀHE) / tr(WᵀHW)` with the undamped calibration Hessian: the relative squared
    /// output error of the layer on the calibration set. `None` without a Hessian.
    pub proxy_error: Option<f64>,
    /// `‖E‖² / ‖W‖²`: the plain relative weight error.
    pub weight_error: f64,
    pub global_scale: f64,
    pub out_scales: bool,
    /// Quantized tile by tile without LDL feedback (no usable Hessian).
    pub fallback: bool,
}

/// An EXL3 linear: the tensors to write and what the quantizer measured.
#[derive(Clone, Debug)]
pub struct QuantizedLinear {
    /// Tile words `[k/16][n/16][16·K]`.
    pub trellis: Vec<u16>,
    pub suh: Vec<f16>,
    pub svh: Vec<f16>,
    pub bias: Option<Vec<f16>>,
    pub bits: BitWidth,
    pub codebook: Codebook,
    pub in_features: usize,
    pub out_features: usize,
    pub report: LinearReport,
}

impl QuantizedLinear {
    pub fn k_padded(&self) -> usize {
        self.suh.len()
    }

    pub fn n_padded(&self) -> usize {
        self.svh.len()
    }

    /// The linear as the codec sees it (borrowing the tensors).
    pub fn as_trellis(&self) -> TrellisLinear<'_> {
        TrellisLinear::new(
            Cow::Borrowed(&self.trellis),
            Cow::Borrowed(&self.suh),
            Cow::Borrowed(&self.svh),
            self.bias.as_deref().map(Cow::Borrowed),
            self.bits,
            self.codebook,
            self.in_features,
            self.out_features,
        )
        .expect("the quantizer builds consistent shapes")
    }
}

/// The trellis search of the quantizer. [`Effort::Fast`] (16-bit fixed-point or tagged f32
/// steps) is within ≈ 1 % of the exhaustive search's squared error at 1.8–3.5× its speed
/// (`encoder_effort`).
fn encode_tiles(
    tiles: &[[f32; TILE_WEIGHTS]],
    bits: BitWidth,
    codebook: Codebook,
    effort: Effort,
) -> Vec<EncodedTile> {
    encode_tiles_with_effort(tiles, bits, codebook, effort)
}

/// `x` rounded up to a multiple of 128.
fn pad128(x: usize) -> usize {
    x.div_ceil(HADAMARD_SIZE) * HADAMARD_SIZE
}

/// The LDLQ input stream grows along the recursion (feedback adds error); the reference
/// inflates the scale-search samples by the drift it measured, so the scale lands the
/// recursion's mean input at the codebook's operating point.
fn ldlq_drift(bits: BitWidth) -> f32 {
    match bits.as_f64() {
        x if x <= 1.0 => 1.08,
        x if x <= 1.5 => 1.035,
        x if x <= 2.0 => 1.018,
        x if x <= 2.5 => 1.009,
        x if x <= 3.0 => 1.004,
        _ => 1.0,
    }
}

/// Most sample tiles the global scale search quantizes per grid point (the reference takes a
/// wrapped diagonal of width 3 plus the extreme tiles; on a CPU that costs more than the
/// layer itself for small matrices, so the sample is thinned evenly to this many).
const SCALE_SAMPLE_TILES: usize = 48;
/// Coarse grid of the scale search (the reference's 0.1 … 1.9).
const COARSE_SCALES: [f32; 10] = [0.1, 0.3, 0.5, 0.7, 0.9, 1.1, 1.3, 1.5, 1.7, 1.9];
const FINE_STEP: f32 = 0.075;

/// A weight after regularisation, ready for the scale search and LDLQ.
struct Regularized {
    /// `k × n`, row-major, padded.
    w: Vec<f32>,
    k: usize,
    n: usize,
    /// Input-side sign × scale (before dividing by the global scale).
    su: Vec<f32>,
    sv: Vec<f32>,
    out_scales: bool,
}

/// Row RMS of a row-major `rows × cols` matrix.
fn row_rms(w: &[f32], cols: usize) -> Vec<f32> {
    w.par_chunks(cols)
        .map(|row| {
            let s: f64 = row.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
            (s / cols as f64).sqrt() as f32
        })
        .collect()
}

fn column_rms(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut sums = vec![0.0f64; cols];
    for row in w.chunks_exact(cols) {
        for (s, &v) in sums.iter_mut().zip(row) {
            *s += f64::from(v) * f64::from(v);
        }
    }
    sums.iter()
        .map(|s| (s / rows as f64).sqrt() as f32)
        .collect()
}

fn random_signs(rng: &mut ChaCha8Rng, len: usize) -> Vec<f32> {
    (0..len)
        .map(|_| if rng.random::<bool>() { 1.0 } else { -1.0 })
        .collect()
}

/// The reference's rule for `out_scales: auto`: fold output-channel scales in unless the
/// input is very irregular (the top 2 % of channels carry ≥ 15 % of the RMS sum).
fn auto_out_scales(damped_diag: &[f64]) -> bool {
    let mut rms: Vec<f64> = damped_diag.iter().map(|d| d.max(0.0).sqrt()).collect();
    rms.sort_by(|a, b| b.total_cmp(a));
    let cutoff = rms.len() / 50;
    let total: f64 = rms.iter().sum();
    if total <= 0.0 {
        return true;
    }
    rms[..cutoff].iter().sum::<f64>() / total < 0.15
}

/// Transpose a row-major `rows × cols` matrix.
fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; rows * cols];
    t.par_chunks_mut(rows).enumerate().for_each(|(c, trow)| {
        for (r, v) in trow.iter_mut().enumerate() {
            *v = w[r * cols + c];
        }
    });
    t
}

/// Steps 1–2 of the module doc: signs, channel scales and both Hadamards.
fn regularize(
    dense: &DenseLinear,
    hessian: Option<&Hessian>,
    settings: &LinearSettings,
) -> Regularized {
    let (in_f, out_f) = (dense.in_features, dense.out_features);
    let (k, n) = (pad128(in_f), pad128(out_f));
    let mut w = vec![0.0f32; k * n];
    for (i, row) in dense.weight.chunks_exact(out_f).enumerate() {
        w[i * n..i * n + out_f].copy_from_slice(row);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(settings.seed);
    let su_signs = random_signs(&mut rng, k);
    let sv_signs = random_signs(&mut rng, n);

    let out_scales = match (settings.out_scales, hessian) {
        (OutScales::Always, _) => true,
        (OutScales::Never, _) => false,
        (OutScales::Auto, Some(h)) => auto_out_scales(&h.damped.diagonal()),
        (OutScales::Auto, None) => true,
    };
    // Output channels: RMS normalised to mean 1; all-zero channels (padding) end with sv = 0.
    let mut col_scales = column_rms(&w, k, n);
    let mean = col_scales.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
    let zero_cols: Vec<bool> = col_scales
        .iter()
        .map(|&v| mean <= 1e-30 || f64::from(v) / mean < 1e-30)
        .collect();
    if mean > 1e-30 {
        col_scales
            .iter_mut()
            .for_each(|v| *v = (f64::from(*v) / mean) as f32);
    }
    let mut sv: Vec<f32> = sv_signs
        .iter()
        .zip(&col_scales)
        .zip(&zero_cols)
        .map(|((&s, &c), &zero)| {
            if out_scales {
                s * if zero { 0.1 } else { c } + 1e-10
            } else {
                s
            }
        })
        .collect();
    w.par_chunks_mut(n).for_each(|row| {
        for (v, &s) in row.iter_mut().zip(&sv) {
            *v /= s;
        }
        hadamard_blocks(row);
    });
    for (s, &zero) in sv.iter_mut().zip(&zero_cols) {
        if zero {
            *s = 0.0;
        }
    }

    // Input rows: RMS after the output Hadamard, with the codebook's scale and a sign.
    let rows = row_rms(&w, n);
    let su: Vec<f32> = su_signs
        .iter()
        .zip(&rows)
        .map(|(&s, &r)| {
            let r = if r.abs() < 1e-30 { 0.1 } else { r };
            s * r / -CODEBOOK_SCALE + 1e-10
        })
        .collect();
    w.par_chunks_mut(n)
        .zip(su.par_iter())
        .for_each(|(row, &s)| {
            row.iter_mut().for_each(|v| *v /= s);
        });
    // Input Hadamard over each column: transform the transpose's rows.
    let mut t = transpose(&w, k, n);
    t.par_chunks_mut(k).for_each(hadamard_blocks);
    let w = transpose(&t, n, k);
    Regularized {
        w,
        k,
        n,
        su,
        sv,
        out_scales,
    }
}

/// The 16×16 tile (kt, nt) of a row-major matrix with `n` columns, row-major.
fn extract_tile(w: &[f32], n: usize, kt: usize, nt: usize) -> [f32; TILE_WEIGHTS] {
    let mut tile = [0.0f32; TILE_WEIGHTS];
    for r in 0..TILE_SIZE {
        let src = (kt * TILE_SIZE + r) * n + nt * TILE_SIZE;
        tile[r * TILE_SIZE..(r + 1) * TILE_SIZE].copy_from_slice(&w[src..src + TILE_SIZE]);
    }
    tile
}

/// Sample tiles for the scale search: a wrapped diagonal band of width 3 (every tile row and
/// column is hit) plus the highest- and lowest-RMS tiles, thinned evenly to at most
/// [`SCALE_SAMPLE_TILES`].
fn sample_tiles(reg: &Regularized) -> Vec<[f32; TILE_WEIGHTS]> {
    let (tk, tn) = (reg.k / TILE_SIZE, reg.n / TILE_SIZE);
    let diag_len = tk.max(tn);
    let mut coords: Vec<(usize, usize)> = (0..diag_len)
        .flat_map(|i| (0..3).map(move |w| (i % tk, (i + w) % tn)))
        .collect();
    let mut by_rms: Vec<(f64, usize, usize)> = (0..tk)
        .flat_map(|kt| (0..tn).map(move |nt| (kt, nt)))
        .map(|(kt, nt)| {
            let t = extract_tile(&reg.w, reg.n, kt, nt);
            (t.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>(), kt, nt)
        })
        .collect();
    by_rms.sort_by(|a, b| b.0.total_cmp(&a.0));
    let extremes = (diag_len * 3 / 16).max(8).min(by_rms.len().div_ceil(2));
    coords.extend(by_rms[..extremes].iter().map(|&(_, kt, nt)| (kt, nt)));
    coords.extend(
        by_rms[by_rms.len() - extremes..]
            .iter()
            .map(|&(_, kt, nt)| (kt, nt)),
    );
    let step = coords.len().div_ceil(SCALE_SAMPLE_TILES).max(1);
    coords
        .iter()
        .step_by(step)
        .map(|&(kt, nt)| extract_tile(&reg.w, reg.n, kt, nt))
        .collect()
}

/// Mean squared error of quantizing `tiles·g` and scaling back, per scale.
fn scale_errors(
    tiles: &[[f32; TILE_WEIGHTS]],
    scales: &[f32],
    bits: BitWidth,
    codebook: Codebook,
    effort: Effort,
) -> Vec<f64> {
    let scaled: Vec<[f32; TILE_WEIGHTS]> = scales
        .iter()
        .flat_map(|&g| tiles.iter().map(move |t| t.map(|v| v * g)))
        .collect();
    let encoded = encode_tiles(&scaled, bits, codebook, effort);
    encoded
        .chunks(tiles.len().max(1))
        .zip(scales)
        .map(|(chunk, &g)| {
            let g2 = f64::from(g) * f64::from(g);
            chunk.iter().map(|e| e.squared_error).sum::<f64>()
                / (g2 * (tiles.len() * TILE_WEIGHTS) as f64)
        })
        .collect()
}

/// The coarse stage of the scale search: the best point of the reference's 0.1 … 1.9 grid on
/// a third of the samples. Tensors that share a Hessian and a bit width share one coarse
/// search over their pooled samples, since their regularised weights follow one
/// distribution; each then refines on its own samples.
fn coarse_scale(
    samples: &[[f32; TILE_WEIGHTS]],
    bits: BitWidth,
    codebook: Codebook,
    effort: Effort,
) -> f32 {
    let sub: Vec<[f32; TILE_WEIGHTS]> = samples.iter().step_by(3).copied().collect();
    let errors = scale_errors(&sub, &COARSE_SCALES, bits, codebook, effort);
    let best = (0..errors.len())
        .min_by(|&a, &b| errors[a].total_cmp(&errors[b]))
        .expect("a non-empty grid");
    COARSE_SCALES[best]
}

/// The fine stage: five points spaced 0.075 around `center`, then a parabola through the best
/// point and its neighbours.
fn fine_scale(
    samples: &[[f32; TILE_WEIGHTS]],
    center: f32,
    bits: BitWidth,
    codebook: Codebook,
    effort: Effort,
) -> f32 {
    let grid: Vec<f32> = (0..5)
        .map(|i| center + FINE_STEP * (i as f32 - 2.0))
        .collect();
    let errors = scale_errors(samples, &grid, bits, codebook, effort);
    let best = (0..5)
        .min_by(|&a, &b| errors[a].total_cmp(&errors[b]))
        .expect("five points");
    let mut offset = 0.0;
    if best > 0 && best < 4 {
        let (y0, y1, y2) = (errors[best - 1], errors[best], errors[best + 1]);
        let denom = y0 - 2.0 * y1 + y2;
        if denom > 0.0 {
            offset = (0.5 * (y0 - y2) / denom).clamp(-0.5, 0.5);
        }
    }
    (grid[best] + offset as f32 * FINE_STEP).max(0.01)
}

/// Attempts at the block LDL before giving up on feedback: each adds another
/// 2·σ_reg·mean(diag) to the diagonal (as the reference does).
const LDL_RETRIES: usize = 10;

/// The LDL feedback factor of `W̃`'s Hessian `H̃·diag(su)·H·diag(su)·H̃` (padded inputs get
/// the damping on their diagonal), or `None` when it cannot be factorised.
fn feedback_factor(hessian: &Hessian, su: &[f32], k: usize) -> Option<Vec<f32>> {
    let d = hessian.damped.n;
    let mut h = Matrix::zeros(k);
    let diag_mean = hessian.damped.diagonal().iter().sum::<f64>() / d as f64;
    let damping = diag_mean - hessian.mean.diagonal().iter().sum::<f64>() / d as f64;
    for i in 0..k {
        for j in 0..k {
            *h.at_mut(i, j) = if i < d && j < d {
                hessian.damped.at(i, j)
            } else if i == j {
                damping.max(1e-12 * diag_mean.max(1e-30))
            } else {
                0.0
            };
        }
    }
    let scale: Vec<f64> = su.iter().map(|&s| f64::from(s)).collect();
    h.scale_both_sides(&scale);
    h.hadamard_both_sides();
    let rotated_diag_mean = h.diagonal().iter().sum::<f64>() / k as f64;
    for _ in 0..=LDL_RETRIES {
        match block_ldl(&h) {
            Ok(l) if l.iter().all(|v| v.is_finite()) => return Some(l),
            _ => {
                for i in 0..k {
                    *h.at_mut(i, i) += 2.0 * crate::hessian::SIGMA_REG * rotated_diag_mean;
                }
            }
        }
    }
    None
}

/// LDLQ: quantize `target` (`k × n`) strip by strip from the last 16 rows to the first; with
/// `l`, each strip's target is corrected by `Σ_{j>b} L_jbᵀ·(T_j − Q_j)` over the strips done
/// (without, tiles are independent). Returns the reconstruction and the tile words.
pub fn ldlq(
    target: &[f32],
    k: usize,
    n: usize,
    l: Option<&[f32]>,
    bits: BitWidth,
    codebook: Codebook,
    effort: Effort,
) -> (Vec<f32>, Vec<u16>) {
    let (tk, tn) = (k / TILE_SIZE, n / TILE_SIZE);
    let tile_words = bits.tile_words();
    let mut q = vec![0.0f32; k * n];
    let mut words = vec![0u16; tk * tn * tile_words];
    let place = |kt: usize, encoded: &[EncodedTile], q: &mut [f32], words: &mut [u16]| {
        for (nt, e) in encoded.iter().enumerate() {
            for r in 0..TILE_SIZE {
                let dst = (kt * TILE_SIZE + r) * n + nt * TILE_SIZE;
                q[dst..dst + TILE_SIZE]
                    .copy_from_slice(&e.values[r * TILE_SIZE..(r + 1) * TILE_SIZE]);
            }
            let w0 = (kt * tn + nt) * tile_words;
            words[w0..w0 + tile_words].copy_from_slice(&e.words);
        }
    };
    let Some(l) = l else {
        // Independent tiles: one batch over the whole matrix.
        let tiles: Vec<[f32; TILE_WEIGHTS]> = (0..tk)
            .flat_map(|kt| (0..tn).map(move |nt| (kt, nt)))
            .map(|(kt, nt)| extract_tile(target, n, kt, nt))
            .collect();
        let encoded = encode_tiles(&tiles, bits, codebook, effort);
        for (kt, strip) in encoded.chunks(tn).enumerate() {
            place(kt, strip, &mut q, &mut words);
        }
        return (q, words);
    };
    let mut err = vec![0.0f32; k * n];
    for kt in (0..tk).rev() {
        let r0 = kt * TILE_SIZE;
        let below = r0 + TILE_SIZE;
        let mut strip = target[r0 * n..below * n].to_vec();
        if below < k {
            add_coef_t_times(
                &l[below * k + r0..],
                k,
                &err[below * n..],
                n,
                &mut strip,
                TILE_SIZE,
            );
        }
        let tiles: Vec<[f32; TILE_WEIGHTS]> =
            (0..tn).map(|nt| extract_tile(&strip, n, 0, nt)).collect();
        let encoded = encode_tiles(&tiles, bits, codebook, effort);
        place(kt, &encoded, &mut q, &mut words);
        for i in r0 * n..below * n {
            err[i] = target[i] - q[i];
        }
    }
    (q, words)
}

/// `tr(EᵀHE)` for `e` given as `[n][k]` rows (HF orientation: one row per output channel).
fn hessian_trace(rows_out_in: &[f32], k: usize, h: &Matrix) -> f64 {
    let n = rows_out_in.len() / k;
    let mut gram = vec![0.0f64; k * k];
    gram_upper_accumulate(rows_out_in, n, k, &mut gram);
    // Σ_ij H_ij G_ij over the full symmetric G, from its upper triangle.
    (0..k)
        .into_par_iter()
        .map(|i| {
            let mut s = h.at(i, i) * gram[i * k + i];
            for j in i + 1..k {
                s += 2.0 * h.at(i, j) * gram[i * k + j];
            }
            s
        })
        .sum()
}

/// Quantize linears that share one input (and so one Hessian), each with its own settings.
/// `hessian` is `None` when the input saw no calibration: the tensors are then quantized
/// tile by tile without feedback.
pub fn quantize_group(
    members: &[(&DenseLinear, LinearSettings)],
    hessian: Option<&Hessian>,
) -> Vec<QuantizedLinear> {
    quantize_group_with(members, hessian, true)
}

/// [`quantize_group`], optionally without LDLQ feedback (tiles rounded independently against
/// the same regularised weight), so tests can measure what the feedback buys.
fn quantize_group_with(
    members: &[(&DenseLinear, LinearSettings)],
    hessian: Option<&Hessian>,
    feedback: bool,
) -> Vec<QuantizedLinear> {
    if let Some(h) = hessian {
        for (m, _) in members {
            assert_eq!(h.mean.n, m.in_features, "Hessian size vs in_features");
        }
    }
    let regs: Vec<Regularized> = members
        .par_iter()
        .map(|(m, s)| regularize(m, hessian, s))
        .collect();
    let samples: Vec<Vec<[f32; TILE_WEIGHTS]>> = regs
        .iter()
        .zip(members)
        .map(|(r, (_, s))| {
            let drift = ldlq_drift(s.bits);
            sample_tiles(r)
                .into_iter()
                .map(|t| t.map(|v| v * drift))
                .collect()
        })
        .collect();
    // One coarse search per (bit width, codebook) present in the group.
    let mut coarse: Vec<((BitWidth, Codebook), f32)> = Vec::new();
    for (_, s) in members {
        let key = (s.bits, s.codebook);
        if coarse.iter().any(|(k, _)| *k == key) {
            continue;
        }
        let pooled: Vec<[f32; TILE_WEIGHTS]> = members
            .iter()
            .zip(&samples)
            .filter(|((_, ms), _)| (ms.bits, ms.codebook) == key)
            .flat_map(|(_, smp)| smp.iter().copied())
            .collect();
        let step = pooled.len().div_ceil(3 * SCALE_SAMPLE_TILES).max(1);
        let thinned: Vec<_> = pooled.into_iter().step_by(step).collect();
        coarse.push((key, coarse_scale(&thinned, s.bits, s.codebook, s.effort)));
    }
    members
        .iter()
        .zip(regs)
        .zip(&samples)
        .map(|(((dense, settings), mut reg), smp)| {
            let center = coarse
                .iter()
                .find(|(key, _)| *key == (settings.bits, settings.codebook))
                .map(|(_, c)| *c)
                .expect("every key searched");
            let g = fine_scale(
                smp,
                center,
                settings.bits,
                settings.codebook,
                settings.effort,
            );
            reg.w.par_iter_mut().for_each(|v| *v *= g);
            reg.su.iter_mut().for_each(|s| *s /= g);
            let l = hessian
                .filter(|_| feedback)
                .and_then(|h| feedback_factor(h, &reg.su, reg.k));
            let (_, words) = ldlq(
                &reg.w,
                reg.k,
                reg.n,
                l.as_deref(),
                settings.bits,
                settings.codebook,
                settings.effort,
            );
            let fallback = feedback && l.is_none();
            finish(dense, settings, reg, g, words, hessian, fallback)
        })
        .collect()
}

/// Build the stored tensors and measure the result against the dense weight.
fn finish(
    dense: &DenseLinear,
    settings: &LinearSettings,
    reg: Regularized,
    g: f32,
    trellis: Vec<u16>,
    hessian: Option<&Hessian>,
    fallback: bool,
) -> QuantizedLinear {
    let mut bias = dense
        .bias
        .as_ref()
        .map(|b| b.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>());
    if let Some(b) = bias.as_mut() {
        b.resize(reg.n, f16::ZERO);
    }
    let mut q = QuantizedLinear {
        trellis,
        suh: reg.su.iter().map(|&v| f16::from_f32(v)).collect(),
        svh: reg.sv.iter().map(|&v| f16::from_f32(v)).collect(),
        bias,
        bits: settings.bits,
        codebook: settings.codebook,
        in_features: dense.in_features,
        out_features: dense.out_features,
        report: LinearReport {
            proxy_error: None,
            weight_error: 0.0,
            global_scale: f64::from(g),
            out_scales: reg.out_scales,
            fallback,
        },
    };
    let (in_f, out_f) = (dense.in_features, dense.out_features);
    // Both in HF orientation (one row per output), as `hessian_trace` takes them.
    let dense_t = transpose(&dense.weight, in_f, out_f);
    let recon_t = q.as_trellis().dequantize_transposed();
    let err_t: Vec<f32> = dense_t.iter().zip(&recon_t).map(|(w, r)| w - r).collect();
    let sq = |v: &[f32]| v.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>();
    q.report.weight_error = sq(&err_t) / sq(&dense_t).max(1e-30);
    if let Some(h) = hessian {
        let num = hessian_trace(&err_t, in_f, &h.mean);
        let den = hessian_trace(&dense_t, in_f, &h.mean);
        q.report.proxy_error = Some(num / den.max(1e-30));
    }
    q
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hessian::HessianAccumulator;

    /// Activations with strongly correlated channels (a few latent factors plus noise, with
    /// uneven channel scales), as real layer inputs have.
    fn correlated_hessian(dim: usize, rows: usize, seed: u64) -> Hessian {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let factors = 8;
        let mix: Vec<f32> = (0..factors * dim)
            .map(|_| rng.random::<f32>() - 0.5)
            .collect();
        let scale: Vec<f32> = (0..dim).map(|i| 0.2 + (i % 7) as f32 * 0.3).collect();
        let mut x = vec![0.0f32; rows * dim];
        for row in x.chunks_exact_mut(dim) {
            let z: Vec<f32> = (0..factors)
                .map(|_| rng.random::<f32>() * 2.0 - 1.0)
                .collect();
            for (i, v) in row.iter_mut().enumerate() {
                let latent: f32 = (0..factors).map(|f| z[f] * mix[f * dim + i]).sum();
                *v = scale[i] * (2.0 * latent + 0.1 * (rng.random::<f32>() - 0.5));
            }
        }
        let mut acc = HessianAccumulator::new(dim);
        acc.add(&x, rows);
        acc.finish().expect("a usable Hessian")
    }

    fn gaussian_linear(in_f: usize, out_f: usize, seed: u64) -> DenseLinear {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let weight = (0..in_f * out_f)
            .map(|_| {
                // Sum of uniforms: close enough to a Gaussian for weights.
                (0..4).map(|_| rng.random::<f32>() - 0.5).sum::<f32>() * 0.02
            })
            .collect();
        DenseLinear {
            weight,
            in_features: in_f,
            out_features: out_f,
            bias: None,
        }
    }

    fn settings(bits: BitWidth) -> LinearSettings {
        LinearSettings {
            bits,
            codebook: Codebook::Mul1,
            seed: 11,
            out_scales: OutScales::Auto,
            effort: Effort::Fast,
        }
    }

    /// The exact search is the optimum of each tile, so without feedback (independent tiles)
    /// its weight error is never above the fast one's beyond the scale search's choice.
    #[test]
    fn exact_effort_no_worse_than_fast() {
        let (in_f, out_f) = (256, 128);
        let h = correlated_hessian(in_f, 2048, 5);
        let dense = gaussian_linear(in_f, out_f, 9);
        let bits = BitWidth::from_f64(3.0).unwrap();
        let error = |effort| {
            let s = LinearSettings {
                effort,
                ..settings(bits)
            };
            let q = quantize_group_with(&[(&dense, s)], Some(&h), false);
            q[0].report.weight_error
        };
        let (fast, exact) = (error(Effort::Fast), error(Effort::Exact));
        assert!(fast.is_finite() && exact.is_finite() && exact > 0.0);
        assert!(exact <= fast * 1.005, "exact {exact} vs fast {fast}");
    }

    /// LDLQ's feedback never loses to rounding every tile on its own (same regularisation,
    /// same scale), measured by the proxy error tr(EᵀHE)/tr(WᵀHW) it minimises.
    #[test]
    fn ldlq_never_worse_than_direct_rounding() {
        let (in_f, out_f) = (256, 128);
        let h = correlated_hessian(in_f, 2048, 3);
        for (seed, bits) in [(1, BitWidth::from_f64(2.0)), (2, BitWidth::from_f64(4.0))] {
            let bits = bits.unwrap();
            let dense = gaussian_linear(in_f, out_f, seed);
            let with = quantize_group_with(&[(&dense, settings(bits))], Some(&h), true);
            let without = quantize_group_with(&[(&dense, settings(bits))], Some(&h), false);
            let (pw, pn) = (
                with[0].report.proxy_error.unwrap(),
                without[0].report.proxy_error.unwrap(),
            );
            eprintln!(
                "K={}: proxy error with LDLQ {pw:.5}, direct {pn:.5}",
                bits.as_f64()
            );
            assert!(!with[0].report.fallback);
            assert!(pw <= pn, "K={}: LDLQ {pw} vs direct {pn}", bits.as_f64());
            // On correlated inputs the feedback is worth a clear margin, not noise.
            assert!(
                pw < 0.9 * pn,
                "K={}: LDLQ {pw} vs direct {pn}",
                bits.as_f64()
            );
        }
    }

    /// The stored tensors reproduce the weight: the reconstruction error is near the
    /// trellis' distortion at that width, and the proxy error is reported.
    #[test]
    fn quantized_linear_reconstructs_the_weight() {
        let dense = gaussian_linear(200, 136, 5);
        let h = correlated_hessian(200, 1024, 6);
        let q = quantize_group(
            &[(&dense, settings(BitWidth::from_f64(4.0).unwrap()))],
            Some(&h),
        );
        let q = &q[0];
        assert_eq!((q.k_padded(), q.n_padded()), (256, 256));
        assert!(q.report.weight_error < 0.02, "{:?}", q.report);
        assert!(q.report.proxy_error.unwrap() < 0.02, "{:?}", q.report);
        // Without calibration: tile by tile, flagged as a fallback.
        let q = quantize_group(
            &[(&dense, settings(BitWidth::from_f64(4.0).unwrap()))],
            None,
        );
        assert!(q[0].report.fallback && q[0].report.proxy_error.is_none());
        assert!(q[0].report.weight_error < 0.02, "{:?}", q[0].report);
    }

    #[test]
    fn auto_out_scales_rule() {
        assert!(auto_out_scales(&[1.0; 100]));
        let mut skewed = vec![0.01; 100];
        skewed[0] = 1e4;
        skewed[1] = 1e4;
        assert!(!auto_out_scales(&skewed));
    }
}

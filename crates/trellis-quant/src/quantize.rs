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
use std::sync::Arc;
use trellis_codec::encode::{Effort, EncodedTile, TileSearch, encode_tiles_with_effort};
use trellis_codec::hadamard::{HADAMARD_SIZE, hadamard_blocks};
use trellis_codec::tile::TILE_SIZE;
use trellis_codec::{BitWidth, CODEBOOK_SCALE, Codebook, TILE_WEIGHTS, TrellisLinear};

use crate::{QuantError, Result};

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

/// Where the Viterbi searches tiles.
#[derive(Clone)]
pub enum Search {
    /// On this machine's cores, as thoroughly as the [`Effort`] says.
    Cpu(Effort),
    /// On an accelerator, which finds the walks of the CPU's [`Effort::Exact`] search. Linears
    /// that share a Hessian then run LDLQ side by side, so that each call searches at least
    /// [`TileSearch::preferred_batch`] tiles when the group has that many.
    Device(Arc<dyn TileSearch>),
}

impl std::fmt::Debug for Search {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Search::Cpu(effort) => write!(f, "Cpu({effort:?})"),
            Search::Device(device) => write!(f, "Device({})", device.name()),
        }
    }
}

impl Search {
    /// The best walk of every target.
    fn encode(
        &self,
        tiles: &[[f32; TILE_WEIGHTS]],
        bits: BitWidth,
        codebook: Codebook,
    ) -> Result<Vec<EncodedTile>> {
        match self {
            Search::Cpu(effort) => Ok(encode_tiles_with_effort(tiles, bits, codebook, *effort)),
            Search::Device(device) => {
                device
                    .encode_tiles(tiles, bits, codebook)
                    .map_err(|message| QuantError::Search {
                        device: device.name(),
                        message,
                    })
            }
        }
    }

    /// Whether both search the same way (so their tiles may share a call).
    fn same_as(&self, other: &Search) -> bool {
        match (self, other) {
            (Search::Cpu(a), Search::Cpu(b)) => a == b,
            (Search::Device(a), Search::Device(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// Tiles a search call should have: 0 for the CPU, whose calls split their tiles over
    /// the cores whatever their number.
    fn batch_tiles(&self) -> usize {
        match self {
            Search::Cpu(_) => 0,
            Search::Device(device) => device.preferred_batch(),
        }
    }
}

/// How to quantize one linear.
#[derive(Clone, Debug)]
pub struct LinearSettings {
    pub bits: BitWidth,
    pub codebook: Codebook,
    /// Seed of the random sign flips (per tensor, so reruns and resumes are identical).
    pub seed: u64,
    pub out_scales: OutScales,
    /// Where and how thoroughly the Viterbi searches.
    pub search: Search,
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

/// Mean squared error of quantizing `tiles·g` and scaling back, for every scale `g` of each
/// set's grid: one search call for all of them.
fn scale_errors(
    sets: &[(&[[f32; TILE_WEIGHTS]], &[f32])],
    bits: BitWidth,
    codebook: Codebook,
    search: &Search,
) -> Result<Vec<Vec<f64>>> {
    let scaled: Vec<[f32; TILE_WEIGHTS]> = sets
        .iter()
        .flat_map(|&(tiles, scales)| {
            scales
                .iter()
                .flat_map(move |&g| tiles.iter().map(move |t| t.map(|v| v * g)))
        })
        .collect();
    let encoded = search.encode(&scaled, bits, codebook)?;
    let mut results = encoded.iter();
    let mut errors = Vec::with_capacity(sets.len());
    for &(tiles, scales) in sets {
        let per_scale = scales
            .iter()
            .map(|&g| {
                let g2 = f64::from(g) * f64::from(g);
                let sum: f64 = results
                    .by_ref()
                    .take(tiles.len())
                    .map(|e| e.squared_error)
                    .sum();
                sum / (g2 * (tiles.len() * TILE_WEIGHTS) as f64)
            })
            .collect();
        errors.push(per_scale);
    }
    Ok(errors)
}

/// The coarse stage of the scale search: the best point of the reference's 0.1 … 1.9 grid on
/// a third of the samples. Tensors that share a Hessian and a bit width share one coarse
/// search over their pooled samples, since their regularised weights follow one
/// distribution; each then refines on its own samples.
fn coarse_scale(
    samples: &[[f32; TILE_WEIGHTS]],
    bits: BitWidth,
    codebook: Codebook,
    search: &Search,
) -> Result<f32> {
    let sub: Vec<[f32; TILE_WEIGHTS]> = samples.iter().step_by(3).copied().collect();
    let errors = scale_errors(&[(&sub, &COARSE_SCALES)], bits, codebook, search)?;
    let errors = &errors[0];
    let best = (0..errors.len())
        .min_by(|&a, &b| errors[a].total_cmp(&errors[b]))
        .expect("a non-empty grid");
    Ok(COARSE_SCALES[best])
}

/// The fine stage's grid: five points spaced 0.075 around `center`.
fn fine_grid(center: f32) -> [f32; 5] {
    std::array::from_fn(|i| center + FINE_STEP * (i as f32 - 2.0))
}

/// The fine stage's choice: the best point of the grid, moved to the vertex of the parabola
/// through it and its neighbours.
fn fine_scale(grid: &[f32; 5], errors: &[f64]) -> f32 {
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

/// One weight for [`ldlq`]: its target (`k × n`, row-major) and, for feedback, its LDL factor
/// (`k × k`).
struct LdlqJob<'a> {
    target: &'a [f32],
    k: usize,
    n: usize,
    l: Option<&'a [f32]>,
}

/// LDLQ: quantize each job's target strip by strip from the last 16 rows to the first; with
/// `l`, each strip's target is corrected by `Σ_{j>b} L_jbᵀ·(T_j − Q_j)` over the strips done
/// (without, tiles are independent). The jobs (all `k` rows tall) advance together, so each
/// search call takes one strip of every job. Returns each job's tile words.
fn ldlq(
    jobs: &[LdlqJob<'_>],
    bits: BitWidth,
    codebook: Codebook,
    search: &Search,
) -> Result<Vec<Vec<u16>>> {
    let Some(k) = jobs.first().map(|j| j.k) else {
        return Ok(Vec::new());
    };
    assert!(jobs.iter().all(|j| j.k == k), "LDLQ jobs of one height");
    let tk = k / TILE_SIZE;
    let tile_words = bits.tile_words();
    let mut words: Vec<Vec<u16>> = jobs
        .iter()
        .map(|j| vec![0u16; tk * (j.n / TILE_SIZE) * tile_words])
        .collect();
    let place = |kt: usize, tn: usize, encoded: &[EncodedTile], words: &mut [u16]| {
        for (nt, e) in encoded.iter().enumerate() {
            let w0 = (kt * tn + nt) * tile_words;
            words[w0..w0 + tile_words].copy_from_slice(&e.words);
        }
    };
    if jobs.iter().all(|j| j.l.is_none()) {
        // Independent tiles: one search over every tile of every job.
        let tiles: Vec<[f32; TILE_WEIGHTS]> = jobs
            .iter()
            .flat_map(|j| {
                let tn = j.n / TILE_SIZE;
                (0..tk * tn).map(move |i| extract_tile(j.target, j.n, i / tn, i % tn))
            })
            .collect();
        let encoded = search.encode(&tiles, bits, codebook)?;
        let mut rest = &encoded[..];
        for (j, w) in jobs.iter().zip(&mut words) {
            let tn = j.n / TILE_SIZE;
            let (mine, later) = rest.split_at(tk * tn);
            for (kt, strip) in mine.chunks(tn).enumerate() {
                place(kt, tn, strip, w);
            }
            rest = later;
        }
        return Ok(words);
    }
    // The error `T − Q` of the strips done, per job with feedback.
    let mut errs: Vec<Vec<f32>> = jobs
        .iter()
        .map(|j| {
            if j.l.is_some() {
                vec![0.0f32; k * j.n]
            } else {
                Vec::new()
            }
        })
        .collect();
    for kt in (0..tk).rev() {
        let r0 = kt * TILE_SIZE;
        let below = r0 + TILE_SIZE;
        let mut tiles: Vec<[f32; TILE_WEIGHTS]> = Vec::new();
        for (j, err) in jobs.iter().zip(&errs) {
            let n = j.n;
            let mut strip = Cow::Borrowed(&j.target[r0 * n..below * n]);
            if let Some(l) = j.l
                && below < k
            {
                add_coef_t_times(
                    &l[below * k + r0..],
                    k,
                    &err[below * n..],
                    n,
                    strip.to_mut(),
                    TILE_SIZE,
                );
            }
            tiles.extend((0..n / TILE_SIZE).map(|nt| extract_tile(&strip, n, 0, nt)));
        }
        let encoded = search.encode(&tiles, bits, codebook)?;
        let mut rest = &encoded[..];
        for ((j, w), err) in jobs.iter().zip(&mut words).zip(&mut errs) {
            let (n, tn) = (j.n, j.n / TILE_SIZE);
            let (mine, later) = rest.split_at(tn);
            rest = later;
            place(kt, tn, mine, w);
            if j.l.is_none() {
                continue;
            }
            for (nt, e) in mine.iter().enumerate() {
                for r in 0..TILE_SIZE {
                    let i = (r0 + r) * n + nt * TILE_SIZE;
                    let values = &e.values[r * TILE_SIZE..(r + 1) * TILE_SIZE];
                    for ((d, &t), &q) in err[i..i + TILE_SIZE]
                        .iter_mut()
                        .zip(&j.target[i..i + TILE_SIZE])
                        .zip(values)
                    {
                        *d = t - q;
                    }
                }
            }
        }
    }
    Ok(words)
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
) -> Result<Vec<QuantizedLinear>> {
    quantize_group_with(members, hessian, true)
}

/// Most bytes of LDL factors that members quantized side by side may hold at once (a factor
/// is `k × k` f32: 16 MiB at k = 2048, 784 MiB at k = 14336).
const SIDE_BY_SIDE_FACTOR_BYTES: usize = 1 << 30;

/// Runs of consecutive members quantized side by side: same width, codebook, search and
/// height, until the run's strips hold the search's preferred batch (one member at a time on
/// the CPU) or its LDL factors [`SIDE_BY_SIDE_FACTOR_BYTES`].
fn side_by_side_runs(
    members: &[(&DenseLinear, LinearSettings)],
    regs: &[Regularized],
) -> Vec<std::ops::Range<usize>> {
    let mut runs = Vec::new();
    let mut start = 0;
    while start < members.len() {
        let first = &members[start].1;
        let batch = first.search.batch_tiles();
        let factor_bytes = regs[start].k * regs[start].k * 4;
        let mut end = start + 1;
        let mut strip_tiles = regs[start].n / TILE_SIZE;
        while end < members.len()
            && strip_tiles < batch
            && (end - start + 1) * factor_bytes <= SIDE_BY_SIDE_FACTOR_BYTES
            && members[end].1.bits == first.bits
            && members[end].1.codebook == first.codebook
            && members[end].1.search.same_as(&first.search)
            && regs[end].k == regs[start].k
        {
            strip_tiles += regs[end].n / TILE_SIZE;
            end += 1;
        }
        runs.push(start..end);
        start = end;
    }
    runs
}

/// [`quantize_group`], optionally without LDLQ feedback (tiles rounded independently against
/// the same regularised weight), so tests can measure what the feedback buys.
fn quantize_group_with(
    members: &[(&DenseLinear, LinearSettings)],
    hessian: Option<&Hessian>,
    feedback: bool,
) -> Result<Vec<QuantizedLinear>> {
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
        coarse.push((key, coarse_scale(&thinned, s.bits, s.codebook, &s.search)?));
    }
    let runs = side_by_side_runs(members, &regs);
    let mut regs: Vec<Option<Regularized>> = regs.into_iter().map(Some).collect();
    let mut out = Vec::with_capacity(members.len());
    for run in runs {
        let settings = &members[run.start].1;
        let center = coarse
            .iter()
            .find(|(key, _)| *key == (settings.bits, settings.codebook))
            .map(|(_, c)| *c)
            .expect("every key searched");
        let grid = fine_grid(center);
        let sets: Vec<(&[[f32; TILE_WEIGHTS]], &[f32])> = samples[run.clone()]
            .iter()
            .map(|smp| (&smp[..], &grid[..]))
            .collect();
        let errors = scale_errors(&sets, settings.bits, settings.codebook, &settings.search)?;
        let mut done: Vec<(Regularized, f32, Option<Vec<f32>>)> = Vec::new();
        for (i, errors) in run.clone().zip(&errors) {
            let mut reg = regs[i].take().expect("each member once");
            let g = fine_scale(&grid, errors);
            reg.w.par_iter_mut().for_each(|v| *v *= g);
            reg.su.iter_mut().for_each(|s| *s /= g);
            let l = hessian
                .filter(|_| feedback)
                .and_then(|h| feedback_factor(h, &reg.su, reg.k));
            done.push((reg, g, l));
        }
        let jobs: Vec<LdlqJob> = done
            .iter()
            .map(|(reg, _, l)| LdlqJob {
                target: &reg.w,
                k: reg.k,
                n: reg.n,
                l: l.as_deref(),
            })
            .collect();
        let words = ldlq(&jobs, settings.bits, settings.codebook, &settings.search)?;
        drop(jobs);
        for ((i, (reg, g, l)), words) in run.zip(done).zip(words) {
            let (dense, settings) = &members[i];
            let fallback = feedback && l.is_none();
            out.push(finish(dense, settings, reg, g, words, hessian, fallback));
        }
    }
    Ok(out)
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
            search: Search::Cpu(Effort::Fast),
        }
    }

    /// The CPU's exact search presented as a device that wants large batches, counting its
    /// calls: it makes the quantizer run linears side by side, as it does for a GPU.
    #[derive(Default)]
    struct BatchingSearch {
        calls: std::sync::atomic::AtomicUsize,
    }

    impl TileSearch for BatchingSearch {
        fn name(&self) -> String {
            "the CPU, batched".to_string()
        }

        fn preferred_batch(&self) -> usize {
            1 << 20
        }

        fn encode_tiles(
            &self,
            targets: &[[f32; TILE_WEIGHTS]],
            bits: BitWidth,
            codebook: Codebook,
        ) -> std::result::Result<Vec<EncodedTile>, String> {
            self.calls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(encode_tiles_with_effort(
                targets,
                bits,
                codebook,
                Effort::Exact,
            ))
        }
    }

    /// Linears run side by side (one search call per strip for all of them) get exactly the
    /// bytes that one-at-a-time LDLQ gives them with the same search; a member of another
    /// width starts a new run.
    #[test]
    fn side_by_side_ldlq_matches_one_linear_at_a_time() {
        let in_f = 128;
        let h = correlated_hessian(in_f, 1024, 21);
        let widths = [3.0, 3.0, 3.0, 2.0];
        let outs = [64, 32, 64, 64];
        let dense: Vec<DenseLinear> = outs
            .iter()
            .enumerate()
            .map(|(i, &o)| gaussian_linear(in_f, o, 40 + i as u64))
            .collect();
        let members = |search: &Search| -> Vec<(&DenseLinear, LinearSettings)> {
            dense
                .iter()
                .zip(widths)
                .enumerate()
                .map(|(i, (d, w))| {
                    let s = LinearSettings {
                        bits: BitWidth::from_f64(w).unwrap(),
                        seed: 100 + i as u64,
                        search: search.clone(),
                        ..settings(BitWidth::from_f64(w).unwrap())
                    };
                    (d, s)
                })
                .collect()
        };
        let one_at_a_time =
            quantize_group(&members(&Search::Cpu(Effort::Exact)), Some(&h)).unwrap();
        let device = Arc::new(BatchingSearch::default());
        let side_by_side =
            quantize_group(&members(&Search::Device(device.clone())), Some(&h)).unwrap();
        for (i, (a, b)) in one_at_a_time.iter().zip(&side_by_side).enumerate() {
            assert!(!a.report.fallback, "member {i} had no feedback");
            assert_eq!(a.trellis, b.trellis, "member {i}: tile words");
            assert_eq!((&a.suh, &a.svh), (&b.suh, &b.svh), "member {i}: scales");
        }
        // Two runs (three 3-bit members, then the 2-bit one), each one coarse and one fine
        // scale search plus one call per 16-row strip.
        let strips = in_f / TILE_SIZE;
        assert_eq!(
            device.calls.load(std::sync::atomic::Ordering::Relaxed),
            2 * (2 + strips)
        );
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
                search: Search::Cpu(effort),
                ..settings(bits)
            };
            let q = quantize_group_with(&[(&dense, s)], Some(&h), false).unwrap();
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
            let with = quantize_group_with(&[(&dense, settings(bits))], Some(&h), true).unwrap();
            let without =
                quantize_group_with(&[(&dense, settings(bits))], Some(&h), false).unwrap();
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
        )
        .unwrap();
        let q = &q[0];
        assert_eq!((q.k_padded(), q.n_padded()), (256, 256));
        assert!(q.report.weight_error < 0.02, "{:?}", q.report);
        assert!(q.report.proxy_error.unwrap() < 0.02, "{:?}", q.report);
        // Without calibration: tile by tile, flagged as a fallback.
        let q = quantize_group(
            &[(&dense, settings(BitWidth::from_f64(4.0).unwrap()))],
            None,
        )
        .unwrap();
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

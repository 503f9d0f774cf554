//! Attention over the paged cache: standard GQA, and MLA in its absorbed form over the
//! compressed latent.

use super::kv::{CpuKvCache, KvData};
use super::linear::{DenseData, dense_forward, dot};
use super::matmul::{MatMut, MatRef, matmul};
use super::ops::{exp_shifted_sum, max_of, rope_vector, softmax};
use super::scratch::{with_layer_scratch, with_task_scratch};
use super::simd::{self, Elem, Level};
use crate::spec::{AttentionSpec, Batch, MlaSpec, RopeSpec};
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

/// First position token `i` attends to.
fn window_start(pos: u32, window: Option<usize>) -> u32 {
    match window {
        Some(w) if (pos as usize) >= w => pos + 1 - w as u32,
        _ => 0,
    }
}

pub fn kv_append(k: &[f32], v: &[f32], batch: &Batch<'_>, cache: &mut CpuKvCache, layer: usize) {
    let width = cache.layout.values_per_token / 2;
    for i in 0..batch.rows() {
        let slot = batch.slot(batch.sequence[i], batch.positions[i]);
        cache.write_row(layer, slot, 0, &k[i * width..(i + 1) * width]);
        cache.write_row(layer, slot, width, &v[i * width..(i + 1) * width]);
    }
}

/// The attention logit of a query–key dot product: scaled, then soft-capped if the model caps.
#[inline]
fn score(spec: &AttentionSpec, dot: f32) -> f32 {
    let x = dot * spec.softmax_scale;
    match spec.logit_softcap {
        Some(cap) => (x / cap).tanh() * cap,
        None => x,
    }
}

/// Batches with at least this many rows (prefill) take [`attention_blocked`].
const BLOCKED_MIN_ROWS: usize = 8;
/// Rows of one blocked task (at most; fewer when that leaves a thread idle), and keys per
/// step of its online softmax. A task gathers the keys of its context once for all its rows.
const BLOCK_ROWS: usize = 64;
const MIN_BLOCK_ROWS: usize = 16;
const KEY_BLOCK: usize = 256;

/// Scores → softmax → weighted values for every (token, head). Keys occupy the first half of
/// a slot's row, values the second. Decode batches go token by token; prefill batches go in
/// blocks whose products are matrix products.
pub fn attention(
    q: &[f32],
    spec: &AttentionSpec,
    batch: &Batch<'_>,
    cache: &CpuKvCache,
    layer: usize,
    out: &mut [f32],
) {
    if batch.rows() >= BLOCKED_MIN_ROWS {
        attention_blocked(q, spec, batch, cache, layer, out);
    } else {
        attention_per_token(q, spec, batch, cache, layer, out);
    }
}

/// Each (token, head) pair is one task: scores over the token's visible positions, softmax,
/// weighted sum of values. The reference the blocked form is tested against.
pub fn attention_per_token(
    q: &[f32],
    spec: &AttentionSpec,
    batch: &Batch<'_>,
    cache: &CpuKvCache,
    layer: usize,
    out: &mut [f32],
) {
    let (h, d) = (spec.heads, spec.head_dim);
    let group = h / spec.kv_heads;
    let v_start = spec.kv_heads * d;
    out[..batch.rows() * h * d]
        .par_chunks_mut(d)
        .enumerate()
        .for_each(|(task, o)| {
            let (i, head) = (task / h, task % h);
            let kv_head = head / group;
            let (seq, pos) = (batch.sequence[i], batch.positions[i]);
            let first = window_start(pos, spec.sliding_window);
            let qh = &q[(i * h + head) * d..(i * h + head + 1) * d];
            let n = (pos - first + 1) as usize;
            with_task_scratch(n, |scores| {
                for (s, p) in scores.iter_mut().zip(first..=pos) {
                    let slot = batch.slot(seq, p);
                    *s = score(spec, cache.dot_row(layer, slot, kv_head * d, qh));
                }
                softmax(scores);
                o.fill(0.0);
                for (&s, p) in scores.iter().zip(first..=pos) {
                    cache.axpy_row(layer, batch.slot(seq, p), v_start + kv_head * d, s, o);
                }
            });
        });
}

/// Tasks of [`BLOCK_ROWS`] batch rows. Within a task, each run of rows of one sequence at
/// consecutive positions meets each KV head once: its queries (rows × the heads sharing that
/// KV head) are multiplied with [`KEY_BLOCK`] gathered keys at a time, and the softmax is kept
/// online (running maximum and sum per query), so memory does not grow with the context.
pub fn attention_blocked(
    q: &[f32],
    spec: &AttentionSpec,
    batch: &Batch<'_>,
    cache: &CpuKvCache,
    layer: usize,
    out: &mut [f32],
) {
    let (h, d) = (spec.heads, spec.head_dim);
    let rows = batch.rows();
    let block_rows = rows
        .div_ceil(2 * rayon::current_num_threads())
        .clamp(MIN_BLOCK_ROWS, BLOCK_ROWS);
    out[..rows * h * d]
        .par_chunks_mut(block_rows * h * d)
        .enumerate()
        .for_each(|(block, out_block)| {
            let first_row = block * block_rows;
            let last_row = (first_row + block_rows).min(rows);
            let mut a = first_row;
            while a < last_row {
                let mut b = a + 1;
                while b < last_row
                    && batch.sequence[b] == batch.sequence[a]
                    && batch.positions[b] == batch.positions[b - 1] + 1
                {
                    b += 1;
                }
                let run_out = &mut out_block[(a - first_row) * h * d..(b - first_row) * h * d];
                for kv_head in 0..spec.kv_heads {
                    attend_run(q, spec, batch, cache, layer, a..b, kv_head, run_out);
                }
                a = b;
            }
        });
}

/// Rows `run` (one sequence, consecutive positions) against KV head `kv_head`; writes those
/// rows' outputs of the heads that share it into `out` (the run's rows, all heads).
#[allow(clippy::too_many_arguments)]
fn attend_run(
    q: &[f32],
    spec: &AttentionSpec,
    batch: &Batch<'_>,
    cache: &CpuKvCache,
    layer: usize,
    run: std::ops::Range<usize>,
    kv_head: usize,
    out: &mut [f32],
) {
    let (h, d) = (spec.heads, spec.head_dim);
    let group = h / spec.kv_heads;
    let v_start = spec.kv_heads * d;
    let seq = batch.sequence[run.start];
    let (p0, p1) = (batch.positions[run.start], batch.positions[run.end - 1]);
    let first = window_start(p0, spec.sliding_window);
    let m = run.len() * group;
    // Scratch: queries [m, d], keys [KEY_BLOCK, d], values [KEY_BLOCK, d],
    // scores [m, KEY_BLOCK], output accumulator [m, d], max and sum [m].
    let sizes = [
        m * d,
        KEY_BLOCK * d,
        KEY_BLOCK * d,
        m * KEY_BLOCK,
        m * d,
        m,
        m,
    ];
    with_task_scratch(sizes.iter().sum(), |scratch| {
        let [qs, keys, values, scores, acc, max, sum] = split_scratch(scratch, sizes);
        for (r, i) in run.clone().enumerate() {
            for g in 0..group {
                let head = kv_head * group + g;
                qs[(r * group + g) * d..][..d].copy_from_slice(&q[(i * h + head) * d..][..d]);
            }
        }
        acc.fill(0.0);
        max.fill(f32::NEG_INFINITY);
        sum.fill(0.0);
        let mut k0 = first;
        while k0 <= p1 {
            let nb = (KEY_BLOCK as u32).min(p1 - k0 + 1) as usize;
            for (j, p) in (k0..k0 + nb as u32).enumerate() {
                let slot = batch.slot(seq, p);
                cache.read_row(layer, slot, kv_head * d, &mut keys[j * d..(j + 1) * d]);
                cache.read_row(
                    layer,
                    slot,
                    v_start + kv_head * d,
                    &mut values[j * d..][..d],
                );
            }
            // scores [m, nb] = queries · keysᵀ
            matmul(
                MatMut {
                    data: &mut scores[..m * nb],
                    rows: m,
                    cols: nb,
                    row_stride: nb,
                    col_stride: 1,
                },
                MatRef {
                    data: qs,
                    rows: m,
                    cols: d,
                    row_stride: d,
                    col_stride: 1,
                },
                MatRef {
                    data: &keys[..nb * d],
                    rows: d,
                    cols: nb,
                    row_stride: 1,
                    col_stride: d,
                },
                false,
                false,
            );
            for (r, i) in run.clone().enumerate() {
                let pos = batch.positions[i];
                let lo = window_start(pos, spec.sliding_window);
                // The keys this row sees in the block: one run, [lo, pos] ∩ [k0, k0 + nb).
                let seen_from = (lo.saturating_sub(k0) as usize).min(nb);
                let seen_to = ((pos + 1).saturating_sub(k0) as usize).clamp(seen_from, nb);
                for g in 0..group {
                    let qi = r * group + g;
                    let row = &mut scores[qi * nb..(qi + 1) * nb];
                    row[..seen_from].fill(0.0);
                    row[seen_to..].fill(0.0);
                    let seen = &mut row[seen_from..seen_to];
                    if seen.is_empty() {
                        continue; // nothing visible in this block
                    }
                    for s in seen.iter_mut() {
                        *s = score(spec, *s);
                    }
                    let new_max = max[qi].max(max_of(seen));
                    let rescale = (max[qi] - new_max).exp();
                    sum[qi] = sum[qi] * rescale + exp_shifted_sum(seen, new_max);
                    max[qi] = new_max;
                    for a in &mut acc[qi * d..(qi + 1) * d] {
                        *a *= rescale;
                    }
                }
            }
            // acc [m, d] += probabilities · values
            matmul(
                MatMut {
                    data: acc,
                    rows: m,
                    cols: d,
                    row_stride: d,
                    col_stride: 1,
                },
                MatRef {
                    data: &scores[..m * nb],
                    rows: m,
                    cols: nb,
                    row_stride: nb,
                    col_stride: 1,
                },
                MatRef {
                    data: &values[..nb * d],
                    rows: nb,
                    cols: d,
                    row_stride: d,
                    col_stride: 1,
                },
                true,
                false,
            );
            k0 += nb as u32;
        }
        for r in 0..run.len() {
            for g in 0..group {
                let (qi, head) = (r * group + g, kv_head * group + g);
                let inv = 1.0 / sum[qi];
                let o = &mut out[(r * h + head) * d..][..d];
                for (o, &a) in o.iter_mut().zip(&acc[qi * d..(qi + 1) * d]) {
                    *o = a * inv;
                }
            }
        }
    });
}

/// Consecutive pieces of `scratch` with the given lengths.
fn split_scratch<const N: usize>(mut scratch: &mut [f32], sizes: [usize; N]) -> [&mut [f32]; N] {
    sizes.map(|len| {
        let (piece, rest) = std::mem::take(&mut scratch).split_at_mut(len);
        scratch = rest;
        piece
    })
}

/// `kv_b_proj` split per head for the absorbed form: `uk[h]` is `[qk_nope, rank]` (maps a
/// latent to a head's no-rope key) and `uv[h]` is `[v_head, rank]` (latent to value).
pub struct MlaKvB {
    pub weight: KvBWeight,
    pub rank: usize,
}

impl MlaKvB {
    /// Bytes one absorbed decode step reads.
    pub fn bytes(&self) -> usize {
        match &self.weight {
            KvBWeight::Dense(w) => w.as_bytes().len(),
            KvBWeight::Int8(m) => m.values.len() + 4 * (m.row_scale.len() + m.col_scale.len()),
        }
    }

    /// Whether the weight is held as [`Int8Matrix`].
    pub fn is_int8(&self) -> bool {
        matches!(self.weight, KvBWeight::Int8(_))
    }
}

/// How `kv_b_proj` is held.
pub enum KvBWeight {
    /// In the precision the model file stores (f16 in EXL3 files, as ExLlamaV3 keeps it).
    Dense(DenseData),
    /// Rounded to int8 at load (`--kv-b-int8`): half the bytes of f16 for every decode step.
    Int8(Int8Matrix),
}

/// A matrix held as `w[r][c] ≈ row_scale[r] · col_scale[c] · values[r][c]`.
///
/// The column scales take out each latent channel's range first, so that one channel many
/// times larger than the rest (as outlier channels are in real models) does not coarsen every
/// row; the row scales then spread each row over ±127. On the Gaussian weights of the test
/// fixtures the round trip errs by 0.75–0.76 % of the weights' norm.
pub struct Int8Matrix {
    pub values: Vec<i8>,
    pub row_scale: Vec<f32>,
    pub col_scale: Vec<f32>,
}

impl Int8Matrix {
    /// Round the row-major `[rows, cols]` matrix `w`; every row's largest scaled value maps to
    /// ±127 exactly. `None` if `w` holds a NaN or an infinity, which no scale represents.
    pub fn quantize(w: &[f32], cols: usize) -> Option<Int8Matrix> {
        assert!(cols > 0 && w.len().is_multiple_of(cols));
        if !w.iter().all(|x| x.is_finite()) {
            return None;
        }
        let mut col_scale = vec![0.0f32; cols];
        for row in w.chunks_exact(cols) {
            for (m, &x) in col_scale.iter_mut().zip(row) {
                *m = m.max(x.abs());
            }
        }
        for m in &mut col_scale {
            if *m == 0.0 {
                *m = 1.0;
            }
        }
        let mut values = vec![0i8; w.len()];
        let mut row_scale = vec![0.0f32; w.len() / cols];
        values
            .par_chunks_mut(cols)
            .zip(row_scale.par_iter_mut())
            .zip(w.par_chunks(cols))
            .for_each(|((q, scale), row)| {
                let peak = row
                    .iter()
                    .zip(&col_scale)
                    .fold(0.0f32, |m, (&x, &c)| m.max((x / c).abs()));
                *scale = if peak > 0.0 { peak / 127.0 } else { 1.0 };
                for ((q, &x), &c) in q.iter_mut().zip(row).zip(&col_scale) {
                    *q = (x / c / *scale).round().clamp(-127.0, 127.0) as i8;
                }
            });
        Some(Int8Matrix {
            values,
            row_scale,
            col_scale,
        })
    }

    /// Rows `rows` widened back to f32 into `dst` (`rows.len() · cols` values).
    pub fn widen_rows(&self, rows: std::ops::Range<usize>, dst: &mut [f32]) {
        let cols = self.col_scale.len();
        for ((d, q), &r) in dst
            .chunks_exact_mut(cols)
            .zip(self.values[rows.start * cols..rows.end * cols].chunks_exact(cols))
            .zip(&self.row_scale[rows])
        {
            for ((d, &q), &c) in d.iter_mut().zip(q).zip(&self.col_scale) {
                *d = f32::from(q) * r * c;
            }
        }
    }
}

pub fn mla_append(
    ckv: &[f32],
    kv_norm: &[f32],
    rope: &RopeSpec,
    spec: &MlaSpec,
    batch: &Batch<'_>,
    cache: &mut CpuKvCache,
    layer: usize,
) {
    let width = spec.cache_width();
    let rank = spec.kv_lora_rank;
    with_task_scratch(width, |row| {
        for i in 0..batch.rows() {
            let src = &ckv[i * width..(i + 1) * width];
            let sum_sq = dot(&src[..rank], &src[..rank]);
            let inv = 1.0 / (sum_sq / rank as f32 + spec.latent_norm_eps).sqrt();
            for ((r, &x), &g) in row[..rank].iter_mut().zip(&src[..rank]).zip(kv_norm) {
                *r = g * (x * inv);
            }
            row[rank..].copy_from_slice(&src[rank..]);
            rope_vector(&mut row[rank..], rope, batch.positions[i]);
            cache.write_row(
                layer,
                batch.slot(batch.sequence[i], batch.positions[i]),
                0,
                row,
            );
        }
    });
}

/// How MLA attention is evaluated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MlaMode {
    /// Queries move into latent space (`q_lat = W_UKᵀ q_nope`) and meet the cached latent
    /// directly; values come out as `W_UV · Σ p c`. Cost per token grows with the context times
    /// 576 + 512 per head, plus two 192/256 × 512 products per head.
    Absorbed,
    /// Keys and values are expanded once per pass from the latent (`kv_b · c` for every
    /// visible position) and each token runs standard attention over them: cheaper per token
    /// when many tokens of one sequence share the expansion, i.e. prefill.
    Expanded,
}

/// The evaluation with fewer multiply-adds for this batch (all rows in one sequence).
///
/// Absorbed: per token, `heads·(nope+v)·rank` to move the query into latent space and the
/// output back, plus `heads·(2·rank+rope)` per visible position. Expanded: `heads·(nope+v)·rank`
/// once per position of the context, plus `heads·(nope+rope+v)` per visible position per token.
/// Decode (one row, long context) stays absorbed; a prefill chunk that is a good part of its
/// context expands. The `mla_prefill` example measures both (BENCHMARKS.md).
pub fn cheaper_mode(spec: &MlaSpec, batch: &Batch<'_>) -> MlaMode {
    let (h, nope, rope, v, rank) = (
        spec.heads as u64,
        spec.qk_nope_dim as u64,
        spec.qk_rope_dim as u64,
        spec.v_head_dim as u64,
        spec.kv_lora_rank as u64,
    );
    let rows = batch.rows() as u64;
    let visible: u64 = batch.positions.iter().map(|&p| u64::from(p) + 1).sum();
    let context = batch.context_len() as u64;
    let absorbed = rows * h * (nope + v) * rank + visible * h * (2 * rank + rope);
    let expanded = context * h * (nope + v) * rank + visible * h * (nope + rope + v);
    if expanded < absorbed {
        MlaMode::Expanded
    } else {
        MlaMode::Absorbed
    }
}

/// MLA attention over the latent cache, choosing the cheaper evaluation for each sequence's
/// rows.
#[allow(clippy::too_many_arguments)]
pub fn mla_attention(
    q: &mut [f32],
    kv_b: &MlaKvB,
    rope: &RopeSpec,
    spec: &MlaSpec,
    batch: &Batch<'_>,
    cache: &CpuKvCache,
    layer: usize,
    out: &mut [f32],
) {
    // Each sequence's rows get their own choice (a prefill chunk expands while the decode
    // rows of other sequences stay absorbed); neighbouring absorbed rows share one call.
    let (h, qk, vd) = (spec.heads, spec.qk_head_dim(), spec.v_head_dim);
    let rows = batch.rows();
    let mut start = 0;
    let mut absorbed_from: Option<usize> = None;
    let run_with = |mode: MlaMode, a: usize, b: usize, q: &mut [f32], out: &mut [f32]| {
        let part = Batch {
            positions: &batch.positions[a..b],
            sequence: &batch.sequence[a..b],
            ..*batch
        };
        mla_attention_with(
            mode,
            &mut q[a * h * qk..b * h * qk],
            kv_b,
            rope,
            spec,
            &part,
            cache,
            layer,
            &mut out[a * h * vd..b * h * vd],
        );
    };
    while start < rows {
        let seq = batch.sequence[start];
        let end = start
            + batch.sequence[start..]
                .iter()
                .take_while(|&&s| s == seq)
                .count();
        let part = Batch {
            positions: &batch.positions[start..end],
            sequence: &batch.sequence[start..end],
            ..*batch
        };
        // An int8 kv_b must be widened for every expansion: not worth it for short contexts.
        let mode = if kv_b.is_int8() && part.context_len() < MLA_BLOCKED_MIN_CONTEXT {
            MlaMode::Absorbed
        } else {
            cheaper_mode(spec, &part)
        };
        match mode {
            MlaMode::Absorbed => {
                absorbed_from.get_or_insert(start);
            }
            MlaMode::Expanded => {
                if let Some(a) = absorbed_from.take() {
                    run_with(MlaMode::Absorbed, a, start, q, out);
                }
                run_with(MlaMode::Expanded, start, end, q, out);
            }
        }
        start = end;
    }
    if let Some(a) = absorbed_from {
        run_with(MlaMode::Absorbed, a, rows, q, out);
    }
}

/// MLA attention evaluated the given way. `Expanded` needs every row in one sequence.
#[allow(clippy::too_many_arguments)]
pub fn mla_attention_with(
    mode: MlaMode,
    q: &mut [f32],
    kv_b: &MlaKvB,
    rope: &RopeSpec,
    spec: &MlaSpec,
    batch: &Batch<'_>,
    cache: &CpuKvCache,
    layer: usize,
    out: &mut [f32],
) {
    let (h, nope, qk) = (spec.heads, spec.qk_nope_dim, spec.qk_head_dim());
    let rows = batch.rows();
    for (row, &pos) in q[..rows * h * qk]
        .chunks_exact_mut(h * qk)
        .zip(batch.positions)
    {
        for head in row.chunks_exact_mut(qk) {
            rope_vector(&mut head[nope..], rope, pos);
        }
    }
    match mode {
        MlaMode::Absorbed => absorbed(q, kv_b, spec, batch, cache, layer, out),
        MlaMode::Expanded => expanded(q, kv_b, spec, batch, cache, layer, out),
    }
}

fn absorbed(
    q: &[f32],
    kv_b: &MlaKvB,
    spec: &MlaSpec,
    batch: &Batch<'_>,
    cache: &CpuKvCache,
    layer: usize,
    out: &mut [f32],
) {
    match &kv_b.weight {
        KvBWeight::Dense(DenseData::F32(w)) => {
            absorbed_with(w, None, q, spec, batch, cache, layer, out)
        }
        KvBWeight::Dense(DenseData::F16(w)) => {
            absorbed_with(w, None, q, spec, batch, cache, layer, out)
        }
        KvBWeight::Dense(DenseData::BF16(w)) => {
            absorbed_with(w, None, q, spec, batch, cache, layer, out)
        }
        KvBWeight::Int8(m) => absorbed_with(&m.values, Some(m), q, spec, batch, cache, layer, out),
    }
}

/// Absorbed attention with `kv_b` stored as `T`: one task per token and group of heads (at
/// most [`simd::MANY`]). Each query moves into latent space as one transposed product over its
/// head's `W_UK` rows; each cached row `[c ‖ k_rope]` meets all of the group's queries in one
/// pass (576-wide dots); after the softmax the rows pass again, a 64-column block at a time,
/// adding into every head's latent output, which leaves through `W_UV`. Every sum runs in the
/// order of one head at a time, so the results are the same bits; a row is read (and widened)
/// once per group instead of once per head, which at long contexts is most of the work
/// (`mla_prefill --decode` example, 20 heads, 2 threads: 1,437 → 793 µs at 2,048 cached
/// tokens, 5,342 → 3,035 at 8,192).
#[allow(clippy::too_many_arguments)]
fn absorbed_with<T: Elem>(
    w: &[T],
    scales: Option<&Int8Matrix>,
    q: &[f32],
    spec: &MlaSpec,
    batch: &Batch<'_>,
    cache: &CpuKvCache,
    layer: usize,
    out: &mut [f32],
) {
    match &cache.data {
        KvData::F32(rows) => absorbed_on(w, scales, rows, q, spec, batch, cache, layer, out),
        KvData::F16(rows) => absorbed_on(w, scales, rows, q, spec, batch, cache, layer, out),
    }
}

/// [`absorbed_with`] over a cache stored as `C` (`rows`: its data). With `scales`, `w` holds
/// that matrix's int8 values.
#[allow(clippy::too_many_arguments)]
fn absorbed_on<T: Elem, C: Elem>(
    w: &[T],
    scales: Option<&Int8Matrix>,
    rows: &[C],
    q: &[f32],
    spec: &MlaSpec,
    batch: &Batch<'_>,
    cache: &CpuKvCache,
    layer: usize,
    out: &mut [f32],
) {
    let (h, nope, vd, rank, rope) = (
        spec.heads,
        spec.qk_nope_dim,
        spec.v_head_dim,
        spec.kv_lora_rank,
        spec.qk_rope_dim,
    );
    let qk = spec.qk_head_dim();
    let per_head_rows = nope + vd;
    let width = rank + rope;
    let level = Level::selected();
    // Two groups a thread for one token (a thread that loses its core then holds up little);
    // more tokens give more tasks.
    let group = h
        .div_ceil(2 * rayon::current_num_threads())
        .clamp(1, simd::MANY);
    out[..batch.rows() * h * vd]
        .par_chunks_mut(h * vd)
        .enumerate()
        .for_each(|(i, out_token)| {
            let (seq, pos) = (batch.sequence[i], batch.positions[i]);
            let n = pos as usize + 1;
            let row = |p: usize| {
                let o = cache.offset(layer, batch.slot(seq, p as u32));
                &rows[o..o + width]
            };
            out_token
                .par_chunks_mut(group * vd)
                .enumerate()
                .for_each(|(g, out_group)| {
                    let heads = g * group..g * group + out_group.len() / vd;
                    let count = heads.len();
                    with_task_scratch(count * (width + rank + n + 1) + nope, |buf| {
                        let (q_full, rest) = buf.split_at_mut(count * width);
                        let (o_lat, rest) = rest.split_at_mut(count * rank);
                        let (scores, rest) = rest.split_at_mut(count * n);
                        let (dots, q_scaled) = rest.split_at_mut(count);
                        for (head, qj) in heads.clone().zip(q_full.chunks_exact_mut(width)) {
                            let qh = &q[(i * h + head) * qk..(i * h + head + 1) * qk];
                            let (q_nope, q_rope) = qh.split_at(nope);
                            let first_row = head * per_head_rows;
                            let uk = &w[first_row * rank..(first_row + nope) * rank];
                            // q_lat[c] = Σ_d q_nope[d] · W_UK[d][c], next to the rotated part.
                            match scales {
                                None => simd::gemv_t_with(level, uk, q_nope, &mut qj[..rank]),
                                Some(m) => {
                                    // Row scales go into the query, column scales onto the
                                    // result: the product itself runs on the int8 values.
                                    let row_scale = &m.row_scale[first_row..first_row + nope];
                                    for ((s, &x), &r) in
                                        q_scaled.iter_mut().zip(q_nope).zip(row_scale)
                                    {
                                        *s = x * r;
                                    }
                                    simd::gemv_t_with(level, uk, q_scaled, &mut qj[..rank]);
                                    for (v, &c) in qj[..rank].iter_mut().zip(&m.col_scale) {
                                        *v *= c;
                                    }
                                }
                            }
                            qj[rank..].copy_from_slice(q_rope);
                        }
                        for p in 0..n {
                            simd::dots_with(level, row(p), q_full, dots);
                            for (j, &d) in dots.iter().enumerate() {
                                scores[j * n + p] = d * spec.softmax_scale;
                            }
                        }
                        for s in scores.chunks_exact_mut(n) {
                            softmax(s);
                        }
                        o_lat.fill(0.0);
                        let latent = |p: usize| &row(p)[..rank];
                        simd::axpy_rows_with(level, n, latent, scores, n, o_lat, rank);
                        if let Some(m) = scales {
                            for lat in o_lat.chunks_exact_mut(rank) {
                                for (v, &c) in lat.iter_mut().zip(&m.col_scale) {
                                    *v *= c;
                                }
                            }
                        }
                        for ((head, o), lat) in heads
                            .zip(out_group.chunks_exact_mut(vd))
                            .zip(o_lat.chunks_exact(rank))
                        {
                            let first_row = head * per_head_rows;
                            let uv =
                                &w[(first_row + nope) * rank..(first_row + per_head_rows) * rank];
                            for (r, (ov, uv_row)) in
                                o.iter_mut().zip(uv.chunks_exact(rank)).enumerate()
                            {
                                simd::prefetch_ahead(uv_row);
                                *ov = simd::dot_with(level, uv_row, lat);
                                if let Some(m) = scales {
                                    *ov *= m.row_scale[first_row + nope + r];
                                }
                            }
                        }
                    });
                });
        });
}

/// Context positions expanded per step of [`expanded_blocked`].
const MLA_KEY_BLOCK: usize = 256;
/// Contexts from which [`expanded_blocked`] pays for widening `kv_b` and packing operands
/// (`mla_prefill` example: at 64 positions the two forms take the same time, at 8 the per-token
/// form is 5× faster, at 512 the blocked one 3×).
const MLA_BLOCKED_MIN_CONTEXT: usize = 128;

fn expanded(
    q: &[f32],
    kv_b: &MlaKvB,
    spec: &MlaSpec,
    batch: &Batch<'_>,
    cache: &CpuKvCache,
    layer: usize,
    out: &mut [f32],
) {
    match &kv_b.weight {
        KvBWeight::Dense(weight) if batch.context_len() < MLA_BLOCKED_MIN_CONTEXT => {
            expanded_per_token(q, weight, spec, batch, cache, layer, out)
        }
        // An int8 kv_b is widened in the blocked form's scratch (the automatic choice does
        // not expand short contexts then: see `mla_attention`).
        _ => expanded_blocked(q, kv_b, spec, batch, cache, layer, out, MLA_KEY_BLOCK),
    }
}

/// Expanded attention in key blocks, flash-style. Each block of `key_block` context positions
/// is expanded once (`kv_b · c`, one product for all heads); then each head, as one task, meets
/// it with matrix products over all its query rows — scores from the no-rope keys in the
/// expansion plus the rope keys in the cache rows, an online softmax (running maximum and sum
/// per row), and the values accumulated straight into the head's output state. Operands are
/// read in place through strided views, memory follows the block and the chunk rather than
/// the context, and rows whose positions all precede a block skip it.
#[allow(clippy::too_many_arguments)]
fn expanded_blocked(
    q: &[f32],
    kv_b: &MlaKvB,
    spec: &MlaSpec,
    batch: &Batch<'_>,
    cache: &CpuKvCache,
    layer: usize,
    out: &mut [f32],
    key_block: usize,
) {
    let (h, nope, rope, vd, rank) = (
        spec.heads,
        spec.qk_nope_dim,
        spec.qk_rope_dim,
        spec.v_head_dim,
        spec.kv_lora_rank,
    );
    let qk = spec.qk_head_dim();
    let per_head = nope + vd;
    let kv_width = h * per_head;
    let width = rank + rope;
    let rows = batch.rows();
    let seq = batch.sequence[0];
    let ctx = batch.context_len();
    let kb = key_block.min(ctx).max(1);
    let widened = match kv_b.weight {
        KvBWeight::Dense(DenseData::F32(_)) => 0,
        _ => kv_width * rank,
    };
    // Layer scratch: kv_b widened to f32 (unless it is f32), the block's cache rows and their
    // expansion, then per head: output accumulator [rows][v], running max and sum [rows].
    let sizes = [
        widened,
        kb * width,
        kb * kv_width,
        h * rows * vd,
        h * rows,
        h * rows,
    ];
    with_layer_scratch(sizes.iter().sum(), |scratch| {
        let [w32, latent, kv, acc, max, sum] = split_scratch(scratch, sizes);
        let w: &[f32] = match &kv_b.weight {
            KvBWeight::Dense(DenseData::F32(w)) => w,
            KvBWeight::Int8(m) => {
                w32.par_chunks_mut(rank)
                    .enumerate()
                    .for_each(|(r, d)| m.widen_rows(r..r + 1, d));
                w32
            }
            KvBWeight::Dense(DenseData::F16(w)) => {
                w32.par_chunks_mut(rank)
                    .zip(w.par_chunks(rank))
                    .for_each(|(d, s)| s.convert_to_f32_slice(d));
                w32
            }
            KvBWeight::Dense(DenseData::BF16(w)) => {
                w32.par_chunks_mut(rank)
                    .zip(w.par_chunks(rank))
                    .for_each(|(d, s)| s.convert_to_f32_slice(d));
                w32
            }
        };
        acc.fill(0.0);
        max.fill(f32::NEG_INFINITY);
        sum.fill(0.0);
        let mut k0 = 0;
        while k0 < ctx {
            let nb = kb.min(ctx - k0);
            // Rows before the first one that sees this block see none of it (some row does:
            // the block starts below the largest position).
            let Some(first) = batch.positions.iter().position(|&p| p as usize >= k0) else {
                break;
            };
            for (j, row) in latent[..nb * width].chunks_exact_mut(width).enumerate() {
                cache.read_row(layer, batch.slot(seq, (k0 + j) as u32), 0, row);
            }
            // kv[j] = kv_b · c_j for the block's positions (c: the first `rank` of each row).
            matmul(
                MatMut {
                    data: &mut kv[..nb * kv_width],
                    rows: nb,
                    cols: kv_width,
                    row_stride: kv_width,
                    col_stride: 1,
                },
                MatRef {
                    data: latent,
                    rows: nb,
                    cols: rank,
                    row_stride: width,
                    col_stride: 1,
                },
                MatRef {
                    data: w,
                    rows: rank,
                    cols: kv_width,
                    row_stride: 1,
                    col_stride: rank,
                },
                false,
                true,
            );
            let m = rows - first;
            let (latent, kv): (&[f32], &[f32]) = (latent, kv);
            acc.par_chunks_mut(rows * vd)
                .zip(max.par_chunks_mut(rows))
                .zip(sum.par_chunks_mut(rows))
                .enumerate()
                .for_each(|(head, ((acc, max), sum))| {
                    with_task_scratch(m * nb, |scores| {
                        let q_head = &q[(first * h + head) * qk..];
                        let key_part = |data, cols, col_stride| MatRef {
                            data,
                            rows: cols,
                            cols: nb,
                            row_stride: 1,
                            col_stride,
                        };
                        let query_part = |offset, cols| MatRef {
                            data: &q_head[offset..],
                            rows: m,
                            cols,
                            row_stride: h * qk,
                            col_stride: 1,
                        };
                        fn scores_mut(data: &mut [f32], m: usize, nb: usize) -> MatMut<'_> {
                            MatMut {
                                data,
                                rows: m,
                                cols: nb,
                                row_stride: nb,
                                col_stride: 1,
                            }
                        }
                        matmul(
                            scores_mut(scores, m, nb),
                            query_part(0, nope),
                            key_part(&kv[head * per_head..], nope, kv_width),
                            false,
                            false,
                        );
                        matmul(
                            scores_mut(scores, m, nb),
                            query_part(nope, rope),
                            key_part(&latent[rank..], rope, width),
                            true,
                            false,
                        );
                        for (r, row) in scores.chunks_exact_mut(nb).enumerate() {
                            let (i, pos) = (first + r, batch.positions[first + r] as usize);
                            let visible = (pos + 1).saturating_sub(k0).min(nb);
                            let (seen, future) = row.split_at_mut(visible);
                            future.fill(0.0);
                            if seen.is_empty() {
                                continue;
                            }
                            for s in seen.iter_mut() {
                                *s *= spec.softmax_scale;
                            }
                            let new_max = max[i].max(max_of(seen));
                            let rescale = (max[i] - new_max).exp();
                            sum[i] = sum[i] * rescale + exp_shifted_sum(seen, new_max);
                            max[i] = new_max;
                            for a in &mut acc[i * vd..(i + 1) * vd] {
                                *a *= rescale;
                            }
                        }
                        // acc += p · v, the values read in place from the expansion.
                        matmul(
                            MatMut {
                                data: &mut acc[first * vd..],
                                rows: m,
                                cols: vd,
                                row_stride: vd,
                                col_stride: 1,
                            },
                            MatRef {
                                data: scores,
                                rows: m,
                                cols: nb,
                                row_stride: nb,
                                col_stride: 1,
                            },
                            MatRef {
                                data: &kv[head * per_head + nope..],
                                rows: nb,
                                cols: vd,
                                row_stride: kv_width,
                                col_stride: 1,
                            },
                            true,
                            false,
                        );
                    });
                });
            k0 += nb;
        }
        let (acc, sum): (&[f32], &[f32]) = (acc, sum);
        out[..rows * h * vd]
            .par_chunks_mut(h * vd)
            .enumerate()
            .for_each(|(i, o)| {
                for (head, o) in o.chunks_exact_mut(vd).enumerate() {
                    let inv = 1.0 / sum[head * rows + i];
                    let a = &acc[(head * rows + i) * vd..][..vd];
                    for (o, &a) in o.iter_mut().zip(a) {
                        *o = a * inv;
                    }
                }
            });
    });
}

/// Expanded attention one (token, head) at a time over a full expansion of the context: for
/// short contexts, and the plain reference [`expanded_blocked`] is tested against.
fn expanded_per_token(
    q: &[f32],
    kv_b: &DenseData,
    spec: &MlaSpec,
    batch: &Batch<'_>,
    cache: &CpuKvCache,
    layer: usize,
    out: &mut [f32],
) {
    let (h, nope, vd, rank) = (
        spec.heads,
        spec.qk_nope_dim,
        spec.v_head_dim,
        spec.kv_lora_rank,
    );
    let qk = spec.qk_head_dim();
    let per_head = nope + vd;
    let seq = batch.sequence[0];
    let ctx = batch.context_len();
    let width = rank + spec.qk_rope_dim;
    with_layer_scratch(ctx * (width + rank + h * per_head), |buf| {
        let (latent, rest) = buf.split_at_mut(ctx * width);
        let (c, kv) = rest.split_at_mut(ctx * rank);
        for (p, row) in latent.chunks_exact_mut(width).enumerate() {
            cache.read_row(layer, batch.slot(seq, p as u32), 0, row);
        }
        for (dst, row) in c.chunks_exact_mut(rank).zip(latent.chunks_exact(width)) {
            dst.copy_from_slice(&row[..rank]);
        }
        // Keys (no-rope part) and values of every visible position: kv[s] = kv_b · c_s.
        dense_forward(kv_b, None, rank, h * per_head, c, ctx, kv);
        let (latent, kv): (&[f32], &[f32]) = (latent, kv);
        out[..batch.rows() * h * vd]
            .par_chunks_mut(vd)
            .enumerate()
            .for_each(|(task, o)| {
                let (i, head) = (task / h, task % h);
                let pos = batch.positions[i] as usize;
                let qh = &q[(i * h + head) * qk..(i * h + head + 1) * qk];
                let (q_nope, q_rope) = qh.split_at(nope);
                with_task_scratch(pos + 1, |scores| {
                    for (s, score) in scores.iter_mut().enumerate() {
                        let k = &kv[(s * h + head) * per_head..(s * h + head) * per_head + nope];
                        let k_rope = &latent[s * width + rank..(s + 1) * width];
                        *score = (dot(q_nope, k) + dot(q_rope, k_rope)) * spec.softmax_scale;
                    }
                    softmax(scores);
                    o.fill(0.0);
                    for (s, &p) in scores.iter().enumerate() {
                        let v =
                            &kv[(s * h + head) * per_head + nope..(s * h + head + 1) * per_head];
                        simd::axpy(o, p, v);
                    }
                });
            });
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{KvCacheLayout, KvDtype};
    use trellis_testutil::noise;

    /// A small MLA (3 heads, rank 32) with an f16 cache of `ctx` noise rows in blocks of 8,
    /// the blocks taken in reverse order so that slots are not positions.
    struct MlaCase {
        spec: MlaSpec,
        cache: CpuKvCache,
        block_tables: Vec<u32>,
    }

    const MLA_CASE_BLOCK: usize = 8;

    impl MlaCase {
        fn new(ctx: usize) -> MlaCase {
            let spec = MlaSpec {
                heads: 3,
                qk_nope_dim: 24,
                qk_rope_dim: 8,
                v_head_dim: 16,
                kv_lora_rank: 32,
                softmax_scale: 1.0 / 32f32.sqrt(),
                latent_norm_eps: 1e-6,
            };
            let blocks = ctx.div_ceil(MLA_CASE_BLOCK);
            let layout = KvCacheLayout {
                layers: 1,
                values_per_token: spec.cache_width(),
                block_size: MLA_CASE_BLOCK,
                num_blocks: blocks,
                dtype: KvDtype::F16,
            };
            let mut case = MlaCase {
                spec,
                cache: CpuKvCache::new(&layout),
                block_tables: (0..blocks as u32).rev().collect(),
            };
            for p in 0..ctx {
                let row: Vec<f32> = (0..case.spec.cache_width())
                    .map(|i| 2.0 * noise(i, 100 + p))
                    .collect();
                let slot = case.batch(&[], &[]).slot(0, p as u32);
                case.cache.write_row(0, slot, 0, &row);
            }
            case
        }

        /// Rows at `positions` of sequence 0 (`sequence`: as many zeros).
        fn batch<'a>(&'a self, positions: &'a [u32], sequence: &'a [u32]) -> Batch<'a> {
            Batch {
                positions,
                sequence,
                block_tables: &self.block_tables,
                blocks_per_sequence: self.block_tables.len(),
                block_size: MLA_CASE_BLOCK,
            }
        }

        /// Noise queries for `rows` tokens.
        fn queries(&self, rows: usize) -> Vec<f32> {
            (0..rows * self.spec.heads * self.spec.qk_head_dim())
                .map(|i| 2.0 * noise(i, 9))
                .collect()
        }
    }

    /// Blocked expanded MLA against the per-token expansion: a chunk that starts mid-context
    /// (so the earliest key blocks are visible to every row and the last ones only to some),
    /// key blocks smaller than the chunk and a partial last block, an f16 kv_b and f16 cache.
    #[test]
    fn blocked_mla_expansion_matches_per_token() {
        use crate::cpu::linear::DenseData;
        let case = MlaCase::new(75);
        let spec = &case.spec;
        let per_head = spec.qk_nope_dim + spec.v_head_dim;
        let weight = DenseData::F16(
            (0..spec.heads * per_head * spec.kv_lora_rank)
                .map(|i| half::f16::from_f32(0.3 * noise(i, 3)))
                .collect(),
        );
        let kv_b = MlaKvB {
            weight: KvBWeight::Dense(weight.clone()),
            rank: spec.kv_lora_rank,
        };
        let positions: Vec<u32> = (41..75).collect();
        let sequence = vec![0u32; positions.len()];
        let batch = case.batch(&positions, &sequence);
        let (rows, cache) = (positions.len(), &case.cache);
        let q = case.queries(rows);
        let n = rows * spec.heads * spec.v_head_dim;
        let mut want = vec![0.0f32; n];
        expanded_per_token(&q, &weight, spec, &batch, cache, 0, &mut want);
        for key_block in [16, 32, 256] {
            let mut got = vec![f32::NAN; n];
            expanded_blocked(&q, &kv_b, spec, &batch, cache, 0, &mut got, key_block);
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    !g.is_nan() && (g - w).abs() <= 1e-5 + 1e-4 * w.abs(),
                    "key block {key_block}: value {i}: blocked {g}, per token {w}"
                );
            }
        }
    }

    /// The int8 round trip of `--kv-b-int8`: within half a step of every value, one channel
    /// 30× larger than the rest does not coarsen the others, a zero row stays zero.
    #[test]
    fn int8_matrix_round_trip() {
        let (rows, cols) = (40usize, 96usize);
        let mut w: Vec<f32> = (0..rows * cols).map(|i| 0.05 * noise(i, 21)).collect();
        for r in 0..rows {
            w[r * cols + 17] *= 30.0;
        }
        w[5 * cols..6 * cols].fill(0.0);
        let m = Int8Matrix::quantize(&w, cols).expect("finite weights");
        let mut back = vec![f32::NAN; rows * cols];
        m.widen_rows(0..rows, &mut back);
        assert!(back[5 * cols..6 * cols].iter().all(|&v| v == 0.0));
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for r in 0..rows {
            for c in 0..cols {
                let (x, y) = (w[r * cols + c], back[r * cols + c]);
                let step = m.row_scale[r] * m.col_scale[c];
                assert!((x - y).abs() <= 0.5001 * step, "({r}, {c}): {x} vs {y}");
                if c != 17 {
                    num += f64::from(x - y).powi(2);
                    den += f64::from(x).powi(2);
                }
            }
        }
        // Rows scaled by their largest value alone would put the small channels at ~1/30 of
        // the range (≈ 10 % error); the column scales keep them near 1 %.
        let err = (num / den).sqrt();
        assert!(err < 0.02, "error outside the large channel {err}");
        for bad in [f32::NAN, f32::INFINITY] {
            w[7] = bad;
            assert!(Int8Matrix::quantize(&w, cols).is_none(), "{bad}");
        }
    }

    /// MLA with an int8 `kv_b` against the same attention over its widened f32 weights: the
    /// absorbed form (scales folded into the query and the output) and the blocked expansion.
    #[test]
    fn int8_kv_b_matches_its_widened_weights() {
        let case = MlaCase::new(150);
        let spec = &case.spec;
        let (rank, per_head) = (spec.kv_lora_rank, spec.qk_nope_dim + spec.v_head_dim);
        let mut w: Vec<f32> = (0..spec.heads * per_head * rank)
            .map(|i| 0.3 * noise(i, 3))
            .collect();
        for r in 0..spec.heads * per_head {
            w[r * rank + 5] *= 10.0;
        }
        let int8 = Int8Matrix::quantize(&w, rank).expect("finite weights");
        let mut widened = vec![0.0f32; w.len()];
        int8.widen_rows(0..spec.heads * per_head, &mut widened);
        let quantized = MlaKvB {
            weight: KvBWeight::Int8(int8),
            rank,
        };
        let dense = MlaKvB {
            weight: KvBWeight::Dense(DenseData::F32(widened.into())),
            rank,
        };
        // Decode rows at two positions, then a prefill chunk long enough to expand.
        for (positions, mode) in [
            (vec![3u32, 149], MlaMode::Absorbed),
            ((20..150).collect::<Vec<u32>>(), MlaMode::Expanded),
        ] {
            let sequence = vec![0u32; positions.len()];
            let batch = case.batch(&positions, &sequence);
            let rows = positions.len();
            let q = case.queries(rows);
            let rope = RopeSpec {
                inv_freq: (0..spec.qk_rope_dim / 2)
                    .map(|i| 10000f32.powf(-2.0 * i as f32 / spec.qk_rope_dim as f32))
                    .collect(),
                attention_scaling: 1.0,
                interleaved: true,
            };
            let n = rows * spec.heads * spec.v_head_dim;
            let mut want = vec![0.0f32; n];
            let mut got = vec![f32::NAN; n];
            for (kv_b, out) in [(&dense, &mut want), (&quantized, &mut got)] {
                let mut q = q.clone();
                mla_attention_with(mode, &mut q, kv_b, &rope, spec, &batch, &case.cache, 0, out);
            }
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    !g.is_nan() && (g - w).abs() <= 1e-5 + 1e-4 * w.abs(),
                    "{mode:?}: value {i}: int8 {g}, widened {w}"
                );
            }
        }
    }

    /// The blocked prefill form against the per-token reference: two sequences in one batch
    /// (the second starting mid-block), grouped heads, contexts longer than a key block, a
    /// sliding window and a soft cap, f32 and f16 caches.
    #[test]
    fn blocked_attention_matches_per_token() {
        let (heads, kv_heads, d) = (4, 2, 32);
        let block_size = 16;
        for dtype in [KvDtype::F32, KvDtype::F16] {
            for (window, softcap) in [(None, None), (Some(100), Some(30.0))] {
                let spec = AttentionSpec {
                    heads,
                    kv_heads,
                    head_dim: d,
                    softmax_scale: 1.0 / (d as f32).sqrt(),
                    sliding_window: window,
                    logit_softcap: softcap,
                };
                // Sequence 0: positions 0..600 cached, the batch holds 300..600 (tasks of
                // the largest block size, runs crossing key blocks).
                // Sequence 1: positions 0..23, all in the batch.
                let lens = [600usize, 23];
                let blocks_per_sequence = 600usize.div_ceil(block_size);
                let layout = KvCacheLayout {
                    layers: 1,
                    values_per_token: 2 * kv_heads * d,
                    block_size,
                    num_blocks: 2 * blocks_per_sequence,
                    dtype,
                };
                let mut cache = CpuKvCache::new(&layout);
                // Sequence s uses blocks in reverse order, so slots are not contiguous.
                let block_tables: Vec<u32> = (0..2 * blocks_per_sequence)
                    .map(|b| (2 * blocks_per_sequence - 1 - b) as u32)
                    .collect();
                let (mut positions, mut sequence) = (Vec::new(), Vec::new());
                for (s, &len) in lens.iter().enumerate() {
                    let start = if s == 0 { 300 } else { 0 };
                    positions.extend(start as u32..len as u32);
                    sequence.extend(std::iter::repeat_n(s as u32, len - start));
                }
                let batch = Batch {
                    positions: &positions,
                    sequence: &sequence,
                    block_tables: &block_tables,
                    blocks_per_sequence,
                    block_size,
                };
                let width = kv_heads * d;
                for (s, &len) in lens.iter().enumerate() {
                    for p in 0..len {
                        let slot = batch.slot(s as u32, p as u32);
                        let row: Vec<f32> = (0..2 * width)
                            .map(|i| 2.0 * noise(i, 1000 * s + p))
                            .collect();
                        cache.write_row(0, slot, 0, &row);
                    }
                }
                let rows = positions.len();
                let q: Vec<f32> = (0..rows * heads * d).map(|i| 3.0 * noise(i, 7)).collect();
                let mut want = vec![0.0f32; rows * heads * d];
                let mut got = vec![f32::NAN; rows * heads * d];
                attention_per_token(&q, &spec, &batch, &cache, 0, &mut want);
                attention_blocked(&q, &spec, &batch, &cache, 0, &mut got);
                for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        !g.is_nan() && (g - w).abs() <= 1e-5 + 1e-4 * w.abs(),
                        "{dtype:?} window {window:?}: value {i}: blocked {g}, per token {w}"
                    );
                }
            }
        }
    }
}

//! Mixture of experts on the CPU: routing (sigmoid or softmax scores, optional selection
//! bias and group limits, top-k, renormalisation, scaling) and gathered expert evaluation.

use super::linear::{CpuLinear, DenseData};
use super::ops::silu_mul;
use super::scratch::{with_layer_scratch, with_task_scratch};
use super::trellis_kernels::{
    MAX_BATCH, MAX_GEMM_BATCH, PackedTrellis, gemm_batch, gemv_batch, split_at_offsets,
};
use crate::spec::{GroupRanking, RouterSpec, ScoringFunction};
use rayon::prelude::*;

/// Token rows that a parallel task of routing, gathering or adding up takes at least (8 KiB
/// each at GLM's width): enough that a task outweighs its scheduling.
const ROWS_PER_TASK: usize = 8;

pub struct CpuRouter {
    /// `[num_experts, hidden]` in the precision the file stores (16-bit in the models we
    /// know): each logit widens its row on the fly and sums in f32, the same sums as over
    /// widened rows, with half the bytes read a layer.
    pub gate: DenseData,
    pub hidden: usize,
    pub selection_bias: Option<Vec<f32>>,
    pub spec: RouterSpec,
}

pub struct CpuRouting {
    pub top_k: usize,
    /// `[rows, top_k]`, ascending expert id within a row.
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
}

pub struct CpuExperts {
    pub experts: Vec<(CpuLinear, CpuLinear, CpuLinear)>,
}

/// The router's logits of one token, split over the pool when `split` (a few experts a
/// task); each logit is the same dot product either way.
fn router_logits(router: &CpuRouter, x: &[f32], scores: &mut [f32], split: bool) {
    let logit = |j: usize| router.gate.row_dot(j, &x[..router.hidden]);
    if split {
        scores
            .par_iter_mut()
            .enumerate()
            .with_min_len(EXPERTS_PER_TASK)
            .for_each(|(j, s)| *s = logit(j));
    } else {
        for (j, s) in scores.iter_mut().enumerate() {
            *s = logit(j);
        }
    }
}

/// Route one token from its router logits (`scores`, turned into scores in place): fills
/// `ids`/`weights` (length top_k).
fn route_row(
    router: &CpuRouter,
    scores: &mut [f32],
    select: &mut [f32],
    ids: &mut [u32],
    weights: &mut [f32],
) {
    let spec = &router.spec;
    let e = spec.num_experts;
    match spec.scoring {
        ScoringFunction::Sigmoid => scores
            .iter_mut()
            .for_each(|s| *s = 1.0 / (1.0 + (-*s).exp())),
        ScoringFunction::Softmax => super::ops::softmax(scores),
    }
    for j in 0..e {
        select[j] = scores[j] + router.selection_bias.as_ref().map_or(0.0, |b| b[j]);
    }
    if spec.n_group > 1 {
        // Keep the experts of the `topk_group` best-ranked groups; the others cannot be chosen.
        let per_group = e / spec.n_group;
        let mut group_score = [f32::NEG_INFINITY; 64];
        for (g, gs) in group_score.iter_mut().enumerate().take(spec.n_group) {
            let mut best = [f32::NEG_INFINITY; 2];
            for &v in &select[g * per_group..(g + 1) * per_group] {
                if v > best[0] {
                    best = [v, best[0]];
                } else if v > best[1] {
                    best[1] = v;
                }
            }
            *gs = match spec.group_ranking {
                GroupRanking::Max => best[0],
                GroupRanking::TopTwoSum => best[0] + if per_group > 1 { best[1] } else { 0.0 },
            };
        }
        for _ in 0..spec.n_group - spec.topk_group {
            let worst = (0..spec.n_group)
                .filter(|&g| group_score[g] != f32::INFINITY)
                .min_by(|&a, &b| group_score[a].total_cmp(&group_score[b]).then(b.cmp(&a)))
                .expect("at least one group");
            select[worst * per_group..(worst + 1) * per_group].fill(f32::NEG_INFINITY);
            group_score[worst] = f32::INFINITY;
        }
    }
    // Top-k by selection score; ties go to the lower expert id.
    for slot in 0..spec.top_k {
        let mut best = usize::MAX;
        for j in 0..e {
            if ids[..slot].contains(&(j as u32)) {
                continue;
            }
            if best == usize::MAX || select[j] > select[best] {
                best = j;
            }
        }
        ids[slot] = best as u32;
    }
    ids.sort_unstable();
    for (w, &id) in weights.iter_mut().zip(ids.iter()) {
        *w = scores[id as usize];
    }
    if spec.normalize {
        let sum: f32 = weights.iter().sum::<f32>() + 1e-20;
        weights.iter_mut().for_each(|w| *w /= sum);
    }
    weights.iter_mut().for_each(|w| *w *= spec.scaling);
}

/// Route one token with `buf` (2 × num_experts floats) as scratch, its logits split over the
/// pool when `split`.
fn route_token(
    router: &CpuRouter,
    x: &[f32],
    buf: &mut [f32],
    ids: &mut [u32],
    weights: &mut [f32],
    split: bool,
) {
    let (scores, select) = buf.split_at_mut(router.spec.num_experts);
    router_logits(router, x, scores, split);
    route_row(router, scores, select, ids, weights);
}

/// Threads from which one token's router logits are split over the pool. On the 2-core Intel
/// box the split was slower (61–66 → 68–71 µs a layer: waking the sleeping worker cost what
/// the second thread saved). On the H200 host's 16-core Xeon one thread took 53–62 µs a layer
/// (6 % of a decode step at 16 threads), reading the 512 KB of f32 router weights alone; split,
/// 17–21 µs at 16 threads and 23–26 (from 44–45) at 4.
const PARALLEL_ROUTE_THREADS: usize = 4;

/// Router rows (experts) a task of one token's logits takes at least.
const EXPERTS_PER_TASK: usize = 4;

/// Route `rows` tokens, a few tokens a task. One token (decode) has its logits split over the
/// pool from [`PARALLEL_ROUTE_THREADS`] threads on, and is routed on the calling thread. A
/// token's numbers are the same either way (each logit is the same dot product).
pub fn route(router: &CpuRouter, x: &[f32], rows: usize, routing: &mut CpuRouting) {
    let e = router.spec.num_experts;
    let k = router.spec.top_k;
    let hidden = router.hidden;
    routing.top_k = k;
    let (ids, weights) = (
        &mut routing.ids[..rows * k],
        &mut routing.weights[..rows * k],
    );
    if rows == 1 {
        let split = rayon::current_num_threads() >= PARALLEL_ROUTE_THREADS;
        with_layer_scratch(2 * e, |buf| {
            route_token(router, &x[..hidden], buf, ids, weights, split)
        });
        return;
    }
    ids.par_chunks_mut(k)
        .zip(weights.par_chunks_mut(k))
        .zip(x[..rows * hidden].par_chunks(hidden))
        .with_min_len(ROWS_PER_TASK)
        .for_each(|((ids, weights), x)| {
            with_task_scratch(2 * e, |buf| {
                route_token(router, x, buf, ids, weights, false)
            })
        });
}

/// For each expert with tokens: gather its tokens' rows, run the gated MLP on them together,
/// and add the weighted results back to those tokens' rows of `out`.
pub fn experts(
    experts: &CpuExperts,
    x: &[f32],
    rows: usize,
    hidden: usize,
    routing: &CpuRouting,
    out: &mut [f32],
) {
    let k = routing.top_k;
    out[..rows * hidden].fill(0.0);
    let inter = experts
        .experts
        .first()
        .map_or(0, |(g, _, _)| g.out_features());
    // Layout of the scratch: token list, weights, gathered x, gate, up, down.
    let len = 2 * rows + rows * hidden + 2 * rows * inter + rows * hidden;
    with_layer_scratch(len, |buf| {
        let (tokens, rest) = buf.split_at_mut(rows);
        let (token_weights, rest) = rest.split_at_mut(rows);
        let (xg, rest) = rest.split_at_mut(rows * hidden);
        let (gate, rest) = rest.split_at_mut(rows * inter);
        let (up, down) = rest.split_at_mut(rows * inter);
        for (e, (w_gate, w_up, w_down)) in experts.experts.iter().enumerate() {
            let mut count = 0;
            for r in 0..rows {
                for j in 0..k {
                    if routing.ids[r * k + j] as usize == e {
                        // Token indices are small integers, exactly representable in f32.
                        tokens[count] = r as f32;
                        token_weights[count] = routing.weights[r * k + j];
                        xg[count * hidden..(count + 1) * hidden]
                            .copy_from_slice(&x[r * hidden..(r + 1) * hidden]);
                        count += 1;
                    }
                }
            }
            if count == 0 {
                continue;
            }
            w_gate.forward(xg, count, gate);
            w_up.forward(xg, count, up);
            silu_mul(&mut gate[..count * inter], &up[..count * inter]);
            w_down.forward(gate, count, down);
            for c in 0..count {
                let r = tokens[c] as usize;
                let w = token_weights[c];
                for (o, &d) in out[r * hidden..(r + 1) * hidden]
                    .iter_mut()
                    .zip(&down[c * hidden..(c + 1) * hidden])
                {
                    *o += w * d;
                }
            }
        }
    });
}

/// The packed trellis of a linear, if it is one.
fn packed(l: &CpuLinear) -> Option<&PackedTrellis> {
    match l {
        CpuLinear::Trellis(p) => Some(p),
        CpuLinear::Dense { .. } => None,
    }
}

/// One token's routed experts and the shared expert (`[gate, up, down]`) with every product of
/// a phase in one parallel region: all gates and ups, then all downs. `out` gets
/// `Σ_j w_j·expert_j(h)` in ascending expert order, then the shared expert's output added.
/// Returns false, touching nothing, when some linear is not trellis-quantized or the layer has
/// too many experts per token for one batch; the caller then evaluates the experts one by one.
pub fn block_decode(
    experts: &CpuExperts,
    shared: Option<[&CpuLinear; 3]>,
    h: &[f32],
    hidden: usize,
    routing: &CpuRouting,
    out: &mut [f32],
) -> bool {
    let k = routing.top_k;
    let m = k + usize::from(shared.is_some());
    if 2 * m > MAX_BATCH {
        return false;
    }
    // Member j: the j-th routed expert, then the shared expert.
    let member = |j: usize| -> [&CpuLinear; 3] {
        if j < k {
            let (g, u, d) = &experts.experts[routing.ids[j] as usize];
            [g, u, d]
        } else {
            shared.expect("the shared expert is the last member")
        }
    };
    let mut packed_members: [[Option<&PackedTrellis>; 3]; MAX_BATCH / 2] =
        [[None; 3]; MAX_BATCH / 2];
    let mut act_len = 0;
    for (j, slot) in packed_members.iter_mut().enumerate().take(m) {
        let linears = member(j);
        for (s, l) in slot.iter_mut().zip(linears) {
            *s = packed(l);
            if s.is_none() {
                return false;
            }
        }
        act_len += 2 * linears[0].out_features();
    }
    let get = |j: usize, which: usize| -> &PackedTrellis {
        packed_members[j][which].expect("checked above")
    };
    with_layer_scratch(act_len + m * hidden, |buf| {
        let (act, down) = buf.split_at_mut(act_len);
        // Gates and ups: [gate_0, up_0, gate_1, up_1, …].
        gemv_batch(2 * m, |i| (get(i / 2, i % 2), h), act);
        let mut at = 0;
        let mut act_at = [0usize; MAX_BATCH / 2];
        for (j, a) in act_at.iter_mut().enumerate().take(m) {
            let inter = get(j, 0).out_features;
            let (gate, up) = act[at..at + 2 * inter].split_at_mut(inter);
            silu_mul(gate, up);
            *a = at;
            at += 2 * inter;
        }
        let act: &[f32] = act;
        gemv_batch(
            m,
            |j| {
                let inter = get(j, 0).out_features;
                (get(j, 2), &act[act_at[j]..act_at[j] + inter])
            },
            down,
        );
        let out = &mut out[..hidden];
        out.fill(0.0);
        for (j, d) in down.chunks_exact(hidden).enumerate().take(m) {
            let w = if j < k { routing.weights[j] } else { 1.0 };
            if j < k {
                for (o, &v) in out.iter_mut().zip(d) {
                    *o += w * v;
                }
            } else {
                for (o, &v) in out.iter_mut().zip(d) {
                    *o += v;
                }
            }
        }
    });
    true
}

/// Several tokens' routed experts and the shared expert with every product of a phase in one
/// parallel region: each active expert's tokens are gathered and run as one GEMM (each tile
/// decoded once for all of them), all gates and ups together, then all downs. `out` gets, per
/// token, `Σ_j w_j·expert_j(h)` in ascending expert order, then the shared expert's output
/// added. Returns false, touching nothing, when some linear is not trellis-quantized.
pub fn block_batched(
    experts: &CpuExperts,
    shared: Option<[&CpuLinear; 3]>,
    x: &[f32],
    rows: usize,
    hidden: usize,
    routing: &CpuRouting,
    out: &mut [f32],
) -> bool {
    let k = routing.top_k;
    let n_experts = experts.experts.len();
    // Members: active routed experts in ascending order, then the shared expert.
    let mut counts = [0usize; MAX_GEMM_BATCH / 2];
    if n_experts + 1 > counts.len() {
        return false;
    }
    for &id in &routing.ids[..rows * k] {
        counts[id as usize] += 1;
    }
    let mut members = [0usize; MAX_GEMM_BATCH / 2];
    let mut m = 0;
    for (e, &count) in counts.iter().enumerate().take(n_experts) {
        if count > 0 {
            let (g, u, d) = &experts.experts[e];
            if packed(g).is_none() || packed(u).is_none() || packed(d).is_none() {
                return false;
            }
            members[m] = e;
            m += 1;
        }
    }
    if let Some(s) = shared {
        if s.iter().any(|l| packed(l).is_none()) {
            return false;
        }
        members[m] = usize::MAX;
        m += 1;
    }
    let linears = |i: usize| -> [&PackedTrellis; 3] {
        let ls: [&CpuLinear; 3] = if members[i] == usize::MAX {
            shared.expect("the shared expert is the last member")
        } else {
            let (g, u, d) = &experts.experts[members[i]];
            [g, u, d]
        };
        ls.map(|l| packed(l).expect("checked above"))
    };
    let member_rows = |i: usize| -> usize {
        if members[i] == usize::MAX {
            rows
        } else {
            counts[members[i]]
        }
    };
    // Gathered rows, member by member: x rows, then gate|up, then down.
    let mut row_at = [0usize; MAX_GEMM_BATCH / 2 + 1];
    let mut act_at = [0usize; MAX_GEMM_BATCH / 2 + 1];
    for i in 0..m {
        row_at[i + 1] = row_at[i] + member_rows(i);
        act_at[i + 1] = act_at[i] + 2 * member_rows(i) * linears(i)[0].out_features;
    }
    let gathered = row_at[m];
    // Per token, its gathered rows in member order (`per_token` of them): what it adds up.
    let per_token = k + usize::from(shared.is_some());
    let len = 2 * gathered + rows * per_token + gathered * hidden + act_at[m] + gathered * hidden;
    with_layer_scratch(len, |buf| {
        let (tokens, rest) = buf.split_at_mut(gathered);
        let (token_weights, rest) = rest.split_at_mut(gathered);
        let (rows_of_token, rest) = rest.split_at_mut(rows * per_token);
        let (xg, rest) = rest.split_at_mut(gathered * hidden);
        let (act, down) = rest.split_at_mut(act_at[m]);
        // Token lists by one pass over the routing: tokens ascend within each member, and a
        // token's experts ascend (as `CpuRouting` keeps them), so its rows come in member order.
        // Indices below 2^24 are exact in f32.
        let mut member_of = [usize::MAX; MAX_GEMM_BATCH / 2];
        for (i, &e) in members[..m].iter().enumerate() {
            if e != usize::MAX {
                member_of[e] = i;
            }
        }
        let mut next = row_at;
        for r in 0..rows {
            let slots = &mut rows_of_token[r * per_token..(r + 1) * per_token];
            for (j, slot) in slots.iter_mut().enumerate() {
                let (i, w) = if j < k {
                    let at = r * k + j;
                    (member_of[routing.ids[at] as usize], routing.weights[at])
                } else {
                    (m - 1, 1.0)
                };
                let c = next[i];
                next[i] += 1;
                tokens[c] = r as f32;
                token_weights[c] = w;
                *slot = c as f32;
            }
        }
        debug_assert!((0..m).all(|i| next[i] == row_at[i + 1]));
        let tokens: &[f32] = tokens;
        xg.par_chunks_mut(hidden)
            .zip(tokens.par_iter())
            .with_min_len(ROWS_PER_TASK)
            .for_each(|(dst, &r)| {
                let r = r as usize;
                dst.copy_from_slice(&x[r * hidden..(r + 1) * hidden]);
            });
        let xg: &[f32] = xg;
        // Gates and ups: [gate_0 (rows_0 × inter), up_0, gate_1, up_1, …].
        gemm_batch(
            2 * m,
            |j| {
                let i = j / 2;
                (
                    linears(i)[j % 2],
                    &xg[row_at[i] * hidden..row_at[i + 1] * hidden],
                    member_rows(i),
                )
            },
            act,
        );
        // One parallel region for all members (most hold a few rows each).
        split_at_offsets(act, &act_at[..=m])[..m]
            .par_iter_mut()
            .for_each(|part| {
                let (gate, up) = part.split_at_mut(part.len() / 2);
                silu_mul(gate, up);
            });
        let act: &[f32] = act;
        gemm_batch(
            m,
            |i| {
                let half = (act_at[i + 1] - act_at[i]) / 2;
                (
                    linears(i)[2],
                    &act[act_at[i]..act_at[i] + half],
                    member_rows(i),
                )
            },
            down,
        );
        // Per token: routed experts in ascending order, then the shared expert, as the
        // reference adds them (the shared one's weight is 1, so `w·v` is `v`).
        let (rows_of_token, token_weights, down): (&[f32], &[f32], &[f32]) =
            (rows_of_token, token_weights, down);
        out[..rows * hidden]
            .par_chunks_mut(hidden)
            .zip(rows_of_token.par_chunks(per_token))
            .with_min_len(ROWS_PER_TASK)
            .for_each(|(o, slots)| {
                o.fill(0.0);
                for &c in slots {
                    let c = c as usize;
                    let w = token_weights[c];
                    for (o, &v) in o.iter_mut().zip(&down[c * hidden..(c + 1) * hidden]) {
                        *o += w * v;
                    }
                }
            });
    });
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};
    use trellis_codec::{BitWidth, Codebook};
    use trellis_testutil::random_trellis;

    fn random_linear(rng: &mut StdRng, in_f: usize, out_f: usize) -> CpuLinear {
        let bits = BitWidth::integer(3).unwrap();
        CpuLinear::trellis(&random_trellis(
            rng,
            in_f,
            out_f,
            bits,
            Codebook::Mul1,
            false,
        ))
    }

    /// The reference: each routed expert alone over its gathered tokens ([`experts`]), then
    /// the shared expert by plain linears, added.
    fn reference(
        e: &CpuExperts,
        shared: [&CpuLinear; 3],
        x: &[f32],
        rows: usize,
        hidden: usize,
        routing: &CpuRouting,
    ) -> Vec<f32> {
        let mut out = vec![0.0; rows * hidden];
        experts(e, x, rows, hidden, routing, &mut out);
        let inter = shared[0].out_features();
        let (mut g, mut u, mut d) = (
            vec![0.0; rows * inter],
            vec![0.0; rows * inter],
            vec![0.0; rows * hidden],
        );
        shared[0].forward(x, rows, &mut g);
        shared[1].forward(x, rows, &mut u);
        for (a, b) in g.iter_mut().zip(&u) {
            *a = *a / (1.0 + (-*a).exp()) * b;
        }
        shared[2].forward(&g, rows, &mut d);
        for (o, v) in out.iter_mut().zip(&d) {
            *o += v;
        }
        out
    }

    /// GLM's rule (sigmoid scores, renormalised, scaled by 1.8), with `n_group` groups of
    /// which the better half are kept.
    fn sigmoid_routing(num_experts: usize, top_k: usize, n_group: usize) -> RouterSpec {
        RouterSpec {
            num_experts,
            top_k,
            scoring: ScoringFunction::Sigmoid,
            n_group,
            topk_group: n_group.div_ceil(2),
            group_ranking: GroupRanking::TopTwoSum,
            normalize: true,
            scaling: 1.8,
        }
    }

    #[test]
    fn routing_many_tokens_in_parallel_matches_each_token_alone() {
        let mut rng = StdRng::seed_from_u64(5);
        let (hidden, e, k, rows) = (96, 16, 3, 45);
        let bits = |w: &[f32]| w.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let wide_pool = rayon::ThreadPoolBuilder::new()
            .num_threads(PARALLEL_ROUTE_THREADS)
            .build()
            .expect("a thread pool");
        for n_group in [1, 4] {
            let router = CpuRouter {
                gate: DenseData::F32(
                    (0..e * hidden)
                        .map(|_| rng.random_range(-0.2f32..0.2))
                        .collect(),
                ),
                hidden,
                selection_bias: Some((0..e).map(|_| rng.random_range(-0.1f32..0.1)).collect()),
                spec: sigmoid_routing(e, k, n_group),
            };
            let x: Vec<f32> = (0..rows * hidden)
                .map(|_| rng.random_range(-1.0f32..1.0))
                .collect();
            let empty = |n: usize| CpuRouting {
                top_k: 0,
                ids: vec![u32::MAX; n * k],
                weights: vec![f32::NAN; n * k],
            };
            let mut all = empty(rows);
            route(&router, &x, rows, &mut all);
            assert_eq!(all.top_k, k);
            for r in 0..rows {
                let mut one = empty(1);
                route(&router, &x[r * hidden..(r + 1) * hidden], 1, &mut one);
                assert_eq!(&all.ids[r * k..(r + 1) * k], &one.ids[..], "row {r}");
                // One token with its logits split over a pool of many threads.
                let mut split = empty(1);
                wide_pool
                    .install(|| route(&router, &x[r * hidden..(r + 1) * hidden], 1, &mut split));
                assert_eq!(split.ids, one.ids, "row {r}");
                assert_eq!(bits(&split.weights), bits(&one.weights), "row {r}");
                assert!(
                    one.ids.windows(2).all(|p| p[0] < p[1]),
                    "row {r}: {:?}",
                    one.ids
                );
                assert_eq!(bits(&all.weights[r * k..(r + 1) * k]), bits(&one.weights));
                let sum: f32 = one.weights.iter().sum();
                assert!((sum - 1.8).abs() < 1e-5, "row {r}: weights sum to {sum}");
            }
        }
    }

    #[test]
    fn a_16_bit_router_routes_as_its_widened_copy() {
        let mut rng = StdRng::seed_from_u64(11);
        let bits = |w: &[f32]| w.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        // Widths with and without a tail after the vector loop.
        for hidden in [2048, 200] {
            let (e, k) = (64, 4);
            let values: Vec<f32> = (0..e * hidden)
                .map(|_| rng.random_range(-0.05f32..0.05))
                .collect();
            let spec = sigmoid_routing(e, k, 1);
            let bias: Vec<f32> = (0..e).map(|_| rng.random_range(-0.01f32..0.01)).collect();
            let router = |gate: DenseData| CpuRouter {
                gate,
                hidden,
                selection_bias: Some(bias.clone()),
                spec: spec.clone(),
            };
            let as_bf16: Vec<half::bf16> =
                values.iter().map(|&v| half::bf16::from_f32(v)).collect();
            let as_f16: Vec<half::f16> = values.iter().map(|&v| half::f16::from_f32(v)).collect();
            let pairs = [
                (
                    router(DenseData::BF16(as_bf16.iter().copied().collect())),
                    router(DenseData::F32(as_bf16.iter().map(|v| v.to_f32()).collect())),
                ),
                (
                    router(DenseData::F16(as_f16.iter().copied().collect())),
                    router(DenseData::F32(as_f16.iter().map(|v| v.to_f32()).collect())),
                ),
            ];
            let rows = 3;
            let x: Vec<f32> = (0..rows * hidden)
                .map(|_| rng.random_range(-2.0f32..2.0))
                .collect();
            for (narrow, wide) in &pairs {
                for r in 0..rows {
                    let x = &x[r * hidden..(r + 1) * hidden];
                    let route_one = |router: &CpuRouter| {
                        let mut out = CpuRouting {
                            top_k: 0,
                            ids: vec![u32::MAX; k],
                            weights: vec![f32::NAN; k],
                        };
                        route(router, x, 1, &mut out);
                        out
                    };
                    let (a, b) = (route_one(narrow), route_one(wide));
                    assert_eq!(a.ids, b.ids, "hidden {hidden}, row {r}");
                    assert_eq!(
                        bits(&a.weights),
                        bits(&b.weights),
                        "hidden {hidden}, row {r}"
                    );
                    assert!(a.weights.iter().all(|w| w.is_finite() && *w > 0.0));
                }
            }
        }
    }

    #[test]
    fn fused_expert_blocks_match_one_expert_at_a_time() {
        let mut rng = StdRng::seed_from_u64(23);
        let (hidden, inter, n, k) = (256, 128, 8, 3);
        let e = CpuExperts {
            experts: (0..n)
                .map(|_| {
                    (
                        random_linear(&mut rng, hidden, inter),
                        random_linear(&mut rng, hidden, inter),
                        random_linear(&mut rng, inter, hidden),
                    )
                })
                .collect(),
        };
        let s = [
            random_linear(&mut rng, hidden, 2 * inter),
            random_linear(&mut rng, hidden, 2 * inter),
            random_linear(&mut rng, 2 * inter, hidden),
        ];
        let shared = [&s[0], &s[1], &s[2]];
        for rows in [1usize, 2, 5, 17] {
            let x: Vec<f32> = (0..rows * hidden)
                .map(|_| rng.random_range(-1.0f32..1.0))
                .collect();
            let mut routing = CpuRouting {
                top_k: k,
                ids: vec![0; rows * k],
                weights: vec![0.0; rows * k],
            };
            for r in 0..rows {
                let mut ids: Vec<u32> = Vec::new();
                while ids.len() < k {
                    let id = rng.random_range(0..n as u32);
                    if !ids.contains(&id) {
                        ids.push(id);
                    }
                }
                ids.sort_unstable();
                routing.ids[r * k..(r + 1) * k].copy_from_slice(&ids);
                for w in &mut routing.weights[r * k..(r + 1) * k] {
                    *w = rng.random_range(0.1f32..1.0);
                }
            }
            let want = reference(&e, shared, &x, rows, hidden, &routing);
            let mut got = vec![f32::NAN; rows * hidden];
            assert!(block_batched(
                &e,
                Some(shared),
                &x,
                rows,
                hidden,
                &routing,
                &mut got
            ));
            let err = trellis_testutil::rel_l2(&got, &want);
            assert!(err < 1e-5, "batched, {rows} rows: rel L2 {err:e}");
            // Each token alone gets the same bits: rows never mix, and a token's experts are
            // added in the same order however many tokens share the batch.
            for r in 0..rows {
                let one = CpuRouting {
                    top_k: k,
                    ids: routing.ids[r * k..(r + 1) * k].to_vec(),
                    weights: routing.weights[r * k..(r + 1) * k].to_vec(),
                };
                let mut alone = vec![f32::NAN; hidden];
                let x_r = &x[r * hidden..(r + 1) * hidden];
                assert!(block_batched(
                    &e,
                    Some(shared),
                    x_r,
                    1,
                    hidden,
                    &one,
                    &mut alone
                ));
                let row = &got[r * hidden..(r + 1) * hidden];
                assert!(
                    row.iter()
                        .zip(&alone)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{rows} rows: row {r} differs from the token alone"
                );
            }
            if rows == 1 {
                let mut got = vec![f32::NAN; hidden];
                assert!(block_decode(
                    &e,
                    Some(shared),
                    &x,
                    hidden,
                    &routing,
                    &mut got
                ));
                let err = trellis_testutil::rel_l2(&got, &want);
                assert!(err < 1e-5, "decode: rel L2 {err:e}");
            }
        }
    }
}

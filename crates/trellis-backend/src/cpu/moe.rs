//! Mixture of experts on the CPU: routing (sigmoid or softmax scores, optional selection
//! bias and group limits, top-k, renormalisation, scaling) and gathered expert evaluation.

use super::linear::CpuLinear;
use super::ops::silu_mul;
use super::scratch::with_layer_scratch;
use crate::spec::{GroupRanking, RouterSpec, ScoringFunction};

pub struct CpuRouter {
    /// `[num_experts, hidden]`, widened to f32: routing runs in f32.
    pub gate: Vec<f32>,
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

/// Route one token: returns nothing, fills `ids`/`weights` (length top_k).
fn route_row(
    router: &CpuRouter,
    x: &[f32],
    scores: &mut [f32],
    select: &mut [f32],
    ids: &mut [u32],
    weights: &mut [f32],
) {
    let spec = &router.spec;
    let e = spec.num_experts;
    for (j, s) in scores.iter_mut().enumerate() {
        *s = super::linear::dot(&router.gate[j * router.hidden..(j + 1) * router.hidden], x);
    }
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

pub fn route(router: &CpuRouter, x: &[f32], rows: usize, routing: &mut CpuRouting) {
    let e = router.spec.num_experts;
    let k = router.spec.top_k;
    routing.top_k = k;
    with_layer_scratch(2 * e, |buf| {
        let (scores, select) = buf.split_at_mut(e);
        for r in 0..rows {
            route_row(
                router,
                &x[r * router.hidden..(r + 1) * router.hidden],
                scores,
                select,
                &mut routing.ids[r * k..(r + 1) * k],
                &mut routing.weights[r * k..(r + 1) * k],
            );
        }
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

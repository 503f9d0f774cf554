//! Bit allocation: a fractional target (e.g. 3.75 bpw) as a mix of per-tensor widths.
//!
//! As in the reference (exl3-format.md §9.10), every budgeted tensor starts at the widest
//! allowed width not above the target; then whole units — the attention or the feed-forward
//! linears of one layer — move up one width step, in priority order, while the average over
//! all budgeted weights stays within the target. The order: attention before feed-forward
//! (attention is small and sensitive), and within each, layers closest to either end of the
//! stack first (the first and last layers are the most sensitive).
//!
//! The average counts trellis bits per weight (K), as ExLlamaV3's `bits` does; the fp16
//! `suh`/`svh` vectors add `16·(in+out)/(in·out)` on top (≈ 0.01–0.1 bpw on small layers).

use crate::plan::{ModelPlan, Role};
use trellis_codec::{BitWidth, Codebook};

/// The widths a codebook can store, ascending: 1..8, plus 1.5 / 2.5 / 3.5 for mul1.
pub fn allowed_widths(codebook: Codebook) -> Vec<BitWidth> {
    BitWidth::ALL
        .into_iter()
        .filter(|w| w.is_integer() || codebook == Codebook::Mul1)
        .collect()
}

/// One width per budgeted linear of `plan`, in [`ModelPlan::budgeted`] order.
pub fn allocate(
    plan: &ModelPlan,
    target_bpw: f64,
    codebook: Codebook,
) -> Result<Vec<BitWidth>, String> {
    let widths = allowed_widths(codebook);
    let (lo, hi) = (widths[0].as_f64(), widths[widths.len() - 1].as_f64());
    if !(lo..=hi).contains(&target_bpw) {
        return Err(format!(
            "--bits {target_bpw}: the {} codebook stores {lo} to {hi} bits per weight",
            codebook.name()
        ));
    }
    let linears: Vec<(usize, Role, usize)> = plan
        .budgeted()
        .map(|(layer, l)| (layer, l.role, l.weights()))
        .collect();
    let base = widths
        .iter()
        .rposition(|w| w.as_f64() <= target_bpw + 1e-9)
        .expect("target ≥ the smallest width");
    let mut level = vec![base; linears.len()];
    let total: f64 = linears.iter().map(|&(_, _, w)| w as f64).sum();
    let budget = target_bpw * total;
    let mut used: f64 = linears
        .iter()
        .map(|&(_, _, w)| widths[base].as_f64() * w as f64)
        .sum();

    // Units: (priority class, distance from the nearer end of the stack, layer, is_attention).
    let layers = plan.layers.len();
    let mut units: Vec<(usize, usize, usize, bool)> = Vec::new();
    for layer in 0..layers {
        let distance = layer.min(layers - 1 - layer);
        units.push((0, distance, layer, true));
        units.push((1, distance, layer, false));
    }
    units.sort();
    // Repeated passes: a unit may move up more than one step while the budget allows.
    loop {
        let mut moved = false;
        for &(_, _, layer, attention) in &units {
            let members: Vec<usize> = (0..linears.len())
                .filter(|&i| {
                    let (l, role, _) = linears[i];
                    l == layer
                        && is_attention_unit(role) == attention
                        && level[i] + 1 < widths.len()
                })
                .collect();
            if members.is_empty() {
                continue;
            }
            let extra: f64 = members
                .iter()
                .map(|&i| {
                    (widths[level[i] + 1].as_f64() - widths[level[i]].as_f64())
                        * linears[i].2 as f64
                })
                .sum();
            if used + extra <= budget + 1e-6 * total {
                for &i in &members {
                    level[i] += 1;
                }
                used += extra;
                moved = true;
            }
        }
        if !moved {
            break;
        }
    }
    Ok(level.into_iter().map(|i| widths[i]).collect())
}

/// Attention-side units also hold the shared expert (always active, like attention).
fn is_attention_unit(role: Role) -> bool {
    matches!(role, Role::Attention | Role::SharedExpert)
}

/// Average K over the budgeted linears for the chosen widths.
pub fn average_bits(plan: &ModelPlan, widths: &[BitWidth]) -> f64 {
    let (mut bits, mut weights) = (0.0, 0.0);
    for ((_, l), w) in plan.budgeted().zip(widths) {
        bits += w.as_f64() * l.weights() as f64;
        weights += l.weights() as f64;
    }
    bits / weights
}

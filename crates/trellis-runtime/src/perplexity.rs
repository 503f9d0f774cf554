//! Perplexity over a text, computed the way llama.cpp's `perplexity` tool does so the numbers
//! compare: the tokens are cut into windows of `ctx` tokens (the first replaced by BOS when the
//! model uses one), each window is evaluated from an empty cache, and only the second half of
//! each window is scored (every scored token sees at least `ctx/2` tokens of context).

use crate::engine::{Engine, EngineError, Result};
use std::time::Instant;
use trellis_backend::Backend;

#[derive(Clone, Debug, serde::Serialize)]
pub struct PerplexityReport {
    pub ctx: usize,
    pub windows: usize,
    pub scored_tokens: usize,
    /// Mean negative log-likelihood per scored token (nats).
    pub mean_nll: f64,
    pub perplexity: f64,
    pub seconds: f64,
}

/// `log Σ exp(row) − row[target]`, in f64 for a stable sum over large vocabularies.
fn negative_log_likelihood(row: &[f32], target: u32) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
    max + sum.ln() - row[target as usize] as f64
}

/// Score `tokens` in windows of `ctx`. The engine must have been loaded with `all_logits`
/// and a context of at least `ctx`. `progress` sees (windows done, windows, running perplexity).
pub fn perplexity<B: Backend>(
    engine: &mut Engine<B>,
    tokens: &[u32],
    ctx: usize,
    bos: Option<u32>,
    mut progress: impl FnMut(usize, usize, f64),
) -> Result<PerplexityReport> {
    if ctx < 4 {
        return Err(EngineError::Invalid(format!(
            "--ctx {ctx}: windows need at least 4 tokens"
        )));
    }
    let windows = tokens.len() / ctx;
    if windows == 0 {
        return Err(EngineError::Invalid(format!(
            "the text has {} tokens, fewer than one window of {ctx}",
            tokens.len()
        )));
    }
    let vocab = engine.info().vocab_size;
    let first_scored = ctx / 2;
    let start = Instant::now();
    let (mut nll_sum, mut scored) = (0.0f64, 0usize);
    let mut window = vec![0u32; ctx];
    for w in 0..windows {
        window.copy_from_slice(&tokens[w * ctx..(w + 1) * ctx]);
        if let Some(b) = bos {
            window[0] = b;
        }
        engine.reset();
        let mut row_index = 0usize;
        engine.extend(&window, |chunk| {
            for row in chunk.chunks_exact(vocab) {
                let i = row_index;
                row_index += 1;
                if i >= first_scored && i + 1 < ctx {
                    nll_sum += negative_log_likelihood(row, window[i + 1]);
                    scored += 1;
                }
            }
        })?;
        progress(w + 1, windows, (nll_sum / scored.max(1) as f64).exp());
    }
    let mean_nll = nll_sum / scored as f64;
    Ok(PerplexityReport {
        ctx,
        windows,
        scored_tokens: scored,
        mean_nll,
        perplexity: mean_nll.exp(),
        seconds: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nll_of_a_uniform_row_is_log_vocab() {
        let row = vec![0.5f32; 1000];
        assert!((negative_log_likelihood(&row, 3) - 1000f64.ln()).abs() < 1e-9);
        let mut peaked = vec![-1e4f32; 10];
        peaked[7] = 0.0;
        assert!(negative_log_likelihood(&peaked, 7).abs() < 1e-9);
    }
}

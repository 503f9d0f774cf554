//! Speed measurement: prefill a random prompt, decode a fixed number of tokens (greedy, EOS
//! ignored), repeat, and report each run. Front ends add memory and roofline figures.

use crate::engine::{Engine, Result};
use std::ops::ControlFlow;
use trellis_backend::Backend;

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    /// Measured runs after one short warm-up run.
    pub repeat: usize,
    pub seed: u64,
}

/// One measured run.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct BenchRun {
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    /// Prefill of the prompt and the choice of the first token.
    pub ttft_ms: f64,
}

/// Prompt ids drawn uniformly from the vocabulary with a fixed-seed generator, so every
/// engine and run sees the same prompt.
pub fn random_prompt(len: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut state = seed ^ 0x2545_F491_4F6C_DD1D;
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 33) % vocab as u64) as u32
        })
        .collect()
}

/// Warm up once with a short run, then measure `repeat` runs from an empty cache each.
pub fn run<B: Backend>(engine: &mut Engine<B>, options: &BenchOptions) -> Result<Vec<BenchRun>> {
    let vocab = engine.info().vocab_size;
    let prompt = random_prompt(options.prompt_tokens, vocab, options.seed);
    let warm = &prompt[..prompt.len().min(8)];
    engine.reset();
    engine.generate_greedy_with(warm, options.gen_tokens.min(4), &mut |_| {
        ControlFlow::Continue(())
    })?;
    let mut runs = Vec::with_capacity(options.repeat);
    for _ in 0..options.repeat {
        engine.reset();
        let stats = engine.generate_greedy_with(&prompt, options.gen_tokens, &mut |_| {
            ControlFlow::Continue(())
        })?;
        runs.push(BenchRun {
            prefill_tok_s: stats.prefill_tok_s(),
            decode_tok_s: stats.decode_tok_s(),
            ttft_ms: stats.time_to_first_token * 1e3,
        });
    }
    Ok(runs)
}

/// Median of the values (the mean of the middle two for an even count).
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_prompt_is_reproducible_and_in_range() {
        let a = random_prompt(1000, 2048, 3);
        assert_eq!(a, random_prompt(1000, 2048, 3));
        assert_ne!(a, random_prompt(1000, 2048, 4));
        assert!(a.iter().all(|&t| t < 2048));
        let distinct: std::collections::HashSet<_> = a.iter().collect();
        assert!(distinct.len() > 500, "ids spread over the vocabulary");
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }
}

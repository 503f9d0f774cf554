//! Token sampling: one sampler for the CLI, the server and the bindings.
//!
//! Order of operations (as in llama.cpp and `transformers`): logit bias → penalties (repetition,
//! presence, frequency over a window of recent tokens) → greedy argmax if temperature is 0, else
//! top-k → temperature → softmax → typical-p → top-p → min-p → draw.
//!
//! Per token the sampler allocates nothing: its buffers are sized to the vocabulary at creation.
//! It never sorts the whole vocabulary: top-k uses partial selection, and top-p / typical-p find
//! their cut with a mass-weighted quickselect (probe the best 64 candidates, then halve the range
//! where the boundary lies), sorting at most 64 candidates. The passes over the whole vocabulary
//! (copy, maximum, exponentials, sums) are written to vectorise.
//!
//! Non-finite logits: NaN is treated as −∞ (the token can never be chosen) and +∞ as the largest
//! finite `f32`. If no token has a finite logit the sampler returns
//! [`SamplingError::NoFiniteLogits`] instead of picking an arbitrary token.
//!
//! Draws use ChaCha8 (`rand_chacha`, an algorithm pinned by name), so the same seed, parameters and
//! logits give the same tokens across platforms and crate upgrades.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BinaryHeap;
use trellis_backend::max_value;

/// Default number of recent tokens the penalties look at (`penalty_window`).
pub const DEFAULT_PENALTY_WINDOW: usize = 64;

/// Errors from configuring or running the sampler.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingError {
    /// A parameter is out of its range.
    #[error("invalid sampling parameter {name} = {value}: {expected}")]
    InvalidParameter {
        /// Parameter name as in [`SamplingParams`].
        name: &'static str,
        /// The value given.
        value: String,
        /// The accepted range.
        expected: &'static str,
    },
    /// A logit-bias entry names a token outside the vocabulary.
    #[error("logit bias for token {token} is outside the vocabulary (size {vocab_size})")]
    BiasTokenOutOfRange {
        /// The token id.
        token: u32,
        /// The vocabulary size.
        vocab_size: usize,
    },
    /// The logits slice does not match the vocabulary size the sampler was built for.
    #[error("expected {expected} logits, got {actual}")]
    LogitsLength {
        /// The sampler's vocabulary size.
        expected: usize,
        /// The slice length passed.
        actual: usize,
    },
    /// Every logit is NaN or −∞ (after bias and penalties): there is nothing to sample.
    #[error("no token has a finite logit (all NaN or -inf)")]
    NoFiniteLogits,
}

/// Fully resolved sampling parameters. `Default` is greedy decoding with every filter and penalty
/// off.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; 0 means greedy (argmax, ties → lowest id).
    pub temperature: f32,
    /// Keep only the `top_k` highest logits; 0 disables.
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set of most likely tokens whose mass is ≥ `top_p`;
    /// 1 disables. Range (0, 1].
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` × the top token's probability; 0 disables.
    /// Range [0, 1].
    pub min_p: f32,
    /// Locally typical sampling: keep the smallest set of tokens closest to the expected
    /// surprisal whose mass is ≥ `typical_p`; 1 disables. Range (0, 1].
    pub typical_p: f32,
    /// Repetition penalty (CTRL style): logits of tokens seen in the window are divided by it when
    /// positive and multiplied by it when negative; 1 disables. Must be > 0.
    pub repetition_penalty: f32,
    /// OpenAI presence penalty: subtracted once from the logit of every token seen in the window.
    pub presence_penalty: f32,
    /// OpenAI frequency penalty: subtracted once per occurrence in the window.
    pub frequency_penalty: f32,
    /// How many of the most recent tokens the penalties consider; 0 = all given.
    pub penalty_window: usize,
    /// Added to the logits of the given tokens before anything else (−∞ bans a token).
    pub logit_bias: Vec<(u32, f32)>,
    /// Seed of the random generator; `None` seeds from the operating system.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            typical_p: 1.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            penalty_window: DEFAULT_PENALTY_WINDOW,
            logit_bias: Vec::new(),
            seed: None,
        }
    }
}

/// Sampling settings where any field may be unset: one from the model's `generation_config.json`,
/// one from the user's request; [`SamplingParams::resolve`] merges them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SamplingOptions {
    /// `do_sample` as in `transformers`: `Some(false)` means greedy unless a temperature is given
    /// at the same or a higher level.
    pub do_sample: Option<bool>,
    /// See [`SamplingParams::temperature`].
    pub temperature: Option<f32>,
    /// See [`SamplingParams::top_k`].
    pub top_k: Option<usize>,
    /// See [`SamplingParams::top_p`].
    pub top_p: Option<f32>,
    /// See [`SamplingParams::min_p`].
    pub min_p: Option<f32>,
    /// See [`SamplingParams::typical_p`].
    pub typical_p: Option<f32>,
    /// See [`SamplingParams::repetition_penalty`].
    pub repetition_penalty: Option<f32>,
    /// See [`SamplingParams::presence_penalty`].
    pub presence_penalty: Option<f32>,
    /// See [`SamplingParams::frequency_penalty`].
    pub frequency_penalty: Option<f32>,
    /// See [`SamplingParams::penalty_window`].
    pub penalty_window: Option<usize>,
    /// See [`SamplingParams::logit_bias`].
    pub logit_bias: Option<Vec<(u32, f32)>>,
    /// See [`SamplingParams::seed`].
    pub seed: Option<u64>,
}

impl SamplingParams {
    /// Greedy decoding (the same as `Default`).
    pub fn greedy() -> SamplingParams {
        SamplingParams::default()
    }

    /// Whether this picks the argmax without drawing: temperature 0 (or so small that its
    /// inverse overflows), or `top_k` = 1.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || (1.0 / self.temperature).is_infinite() || self.top_k == 1
    }

    /// Merges the model's defaults with the user's settings; a user field wins over the model's,
    /// which wins over the neutral value.
    ///
    /// Temperature follows `transformers`' `do_sample`: the user's temperature if given; else
    /// greedy if the user says `do_sample = false`; else greedy if the model says
    /// `do_sample = false` and the user did not ask to sample; else the model's temperature,
    /// else 1.0 (the OpenAI default when nothing says otherwise).
    pub fn resolve(model: &SamplingOptions, user: &SamplingOptions) -> SamplingParams {
        let neutral = SamplingParams::default();
        let temperature = if let Some(t) = user.temperature {
            t
        } else if user.do_sample == Some(false)
            || (model.do_sample == Some(false) && user.do_sample != Some(true))
        {
            0.0
        } else {
            model.temperature.unwrap_or(1.0)
        };
        SamplingParams {
            temperature,
            top_k: user.top_k.or(model.top_k).unwrap_or(neutral.top_k),
            top_p: user.top_p.or(model.top_p).unwrap_or(neutral.top_p),
            min_p: user.min_p.or(model.min_p).unwrap_or(neutral.min_p),
            typical_p: user
                .typical_p
                .or(model.typical_p)
                .unwrap_or(neutral.typical_p),
            repetition_penalty: user
                .repetition_penalty
                .or(model.repetition_penalty)
                .unwrap_or(neutral.repetition_penalty),
            presence_penalty: user
                .presence_penalty
                .or(model.presence_penalty)
                .unwrap_or(neutral.presence_penalty),
            frequency_penalty: user
                .frequency_penalty
                .or(model.frequency_penalty)
                .unwrap_or(neutral.frequency_penalty),
            penalty_window: user
                .penalty_window
                .or(model.penalty_window)
                .unwrap_or(neutral.penalty_window),
            logit_bias: user
                .logit_bias
                .clone()
                .or_else(|| model.logit_bias.clone())
                .unwrap_or_default(),
            seed: user.seed.or(model.seed),
        }
    }

    /// Checks every parameter's range and that biased tokens exist in a vocabulary of this size.
    pub fn validate(&self, vocab_size: usize) -> Result<(), SamplingError> {
        fn invalid(name: &'static str, value: f32, expected: &'static str) -> SamplingError {
            SamplingError::InvalidParameter {
                name,
                value: value.to_string(),
                expected,
            }
        }
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(invalid(
                "temperature",
                self.temperature,
                "a finite number >= 0",
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(invalid("top_p", self.top_p, "0 < top_p <= 1"));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(invalid("min_p", self.min_p, "0 <= min_p <= 1"));
        }
        if !(self.typical_p > 0.0 && self.typical_p <= 1.0) {
            return Err(invalid("typical_p", self.typical_p, "0 < typical_p <= 1"));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(invalid(
                "repetition_penalty",
                self.repetition_penalty,
                "a finite number > 0",
            ));
        }
        if !self.presence_penalty.is_finite() {
            return Err(invalid(
                "presence_penalty",
                self.presence_penalty,
                "a finite number",
            ));
        }
        if !self.frequency_penalty.is_finite() {
            return Err(invalid(
                "frequency_penalty",
                self.frequency_penalty,
                "a finite number",
            ));
        }
        for &(token, bias) in &self.logit_bias {
            if token as usize >= vocab_size {
                return Err(SamplingError::BiasTokenOutOfRange { token, vocab_size });
            }
            if bias.is_nan() {
                return Err(invalid("logit_bias", bias, "a number (not NaN)"));
            }
        }
        Ok(())
    }
}

/// A token still in the running after the filters, with its adjusted logit and its normalised
/// probability.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Candidate {
    /// Token id.
    pub id: u32,
    /// Logit after bias and penalties (before temperature).
    pub logit: f32,
    /// Probability in the final distribution (the candidates' probabilities sum to 1).
    pub prob: f32,
    /// Order of the filter being applied (smaller = kept first): the filter's key as ordered
    /// bits in the high half, the id in the low half, so one integer comparison sorts by key
    /// with ties broken by lower id.
    order: u64,
}

/// A sampler for one sequence: parameters, random state and preallocated scratch.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    vocab_size: usize,
    seed: u64,
    rng: ChaCha8Rng,
    /// Logits after sanitising, bias and penalties.
    adjusted: Vec<f32>,
    /// Unnormalised probabilities `exp((logit - max) / temperature)` over the vocabulary.
    weights: Vec<f32>,
    /// Occurrences of each token in the penalty window; all zero between calls.
    counts: Vec<u32>,
    /// Candidate set being filtered; capacity = vocabulary size.
    candidates: Vec<Candidate>,
    /// Storage of the bounded heap used for small top-k.
    heap: Vec<u64>,
}

impl Sampler {
    /// A sampler for a vocabulary of `vocab_size` logits; validates the parameters.
    pub fn new(params: SamplingParams, vocab_size: usize) -> Result<Sampler, SamplingError> {
        params.validate(vocab_size)?;
        let seed = params.seed.unwrap_or_else(rand::random);
        Ok(Sampler {
            params,
            vocab_size,
            seed,
            rng: ChaCha8Rng::seed_from_u64(seed),
            adjusted: vec![0.0; vocab_size],
            weights: vec![0.0; vocab_size],
            counts: vec![0; vocab_size],
            candidates: Vec::with_capacity(vocab_size),
            heap: Vec::with_capacity(HEAP_TOP_K_LIMIT.min(vocab_size) + 1),
        })
    }

    /// The parameters in use.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The seed actually used (drawn from the OS when the parameters gave none), so a run can be
    /// reproduced.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Replaces the parameters and restarts the random sequence, keeping the buffers.
    pub fn reset(&mut self, params: SamplingParams) -> Result<(), SamplingError> {
        params.validate(self.vocab_size)?;
        self.seed = params.seed.unwrap_or_else(rand::random);
        self.rng = ChaCha8Rng::seed_from_u64(self.seed);
        self.params = params;
        Ok(())
    }

    /// Picks the next token from `logits` (one per vocabulary entry); `recent_tokens` are the
    /// tokens so far (prompt and/or output, as the caller decides), used by the penalties.
    pub fn sample(&mut self, logits: &[f32], recent_tokens: &[u32]) -> Result<u32, SamplingError> {
        self.check_length(logits)?;
        if self.params.is_greedy() {
            if self.params.logit_bias.is_empty() && !self.penalties_active() {
                // Nothing changes the logits: no need to copy them.
                return argmax(logits);
            }
            self.adjust_logits(logits, recent_tokens);
            return argmax(&self.adjusted);
        }
        self.adjust_logits(logits, recent_tokens);
        if self.only_temperature() {
            // No filter needs the candidates sorted or listed: draw straight from the weights.
            let (_, total) = self.compute_weights()?;
            let threshold = self.rng.random::<f64>() * total;
            let mut cumulative = 0.0;
            let mut last_positive = 0;
            for (id, &weight) in self.weights.iter().enumerate() {
                if weight > 0.0 {
                    cumulative += f64::from(weight);
                    last_positive = id;
                    if cumulative > threshold {
                        return Ok(id as u32);
                    }
                }
            }
            // Rounding can leave the threshold a hair above the sum.
            return Ok(last_positive as u32);
        }
        self.filter_candidates()?;
        let total: f64 = self.candidates.iter().map(|c| f64::from(c.prob)).sum();
        let threshold = self.rng.random::<f64>() * total;
        let mut cumulative = 0.0;
        for candidate in &self.candidates {
            cumulative += f64::from(candidate.prob);
            if cumulative > threshold {
                return Ok(candidate.id);
            }
        }
        Ok(self
            .candidates
            .last()
            .expect("filters keep one candidate")
            .id)
    }

    /// The final distribution `sample` would draw from (after every filter), without drawing;
    /// for greedy parameters, the argmax with probability 1. Order is unspecified.
    pub fn distribution(
        &mut self,
        logits: &[f32],
        recent_tokens: &[u32],
    ) -> Result<&[Candidate], SamplingError> {
        self.check_length(logits)?;
        self.adjust_logits(logits, recent_tokens);
        if self.params.is_greedy() {
            let id = argmax(&self.adjusted)?;
            self.candidates.clear();
            self.candidates.push(Candidate {
                id,
                logit: self.adjusted[id as usize],
                prob: 1.0,
                order: 0,
            });
        } else {
            self.filter_candidates()?;
            normalize(&mut self.candidates);
        }
        Ok(&self.candidates)
    }

    fn check_length(&self, logits: &[f32]) -> Result<(), SamplingError> {
        if logits.len() == self.vocab_size {
            Ok(())
        } else {
            Err(SamplingError::LogitsLength {
                expected: self.vocab_size,
                actual: logits.len(),
            })
        }
    }

    /// Whether each choice is the plain argmax of the model's logits (greedy, and no logit
    /// bias or penalty changes them), which the caller may leave to the backend.
    pub fn is_plain_greedy(&self) -> bool {
        self.params.is_greedy() && self.params.logit_bias.is_empty() && !self.penalties_active()
    }

    fn penalties_active(&self) -> bool {
        let p = &self.params;
        p.repetition_penalty != 1.0 || p.presence_penalty != 0.0 || p.frequency_penalty != 0.0
    }

    fn only_temperature(&self) -> bool {
        let p = &self.params;
        p.top_k == 0 && p.top_p >= 1.0 && p.typical_p >= 1.0 && p.min_p <= 0.0
    }

    /// Copies the logits into `adjusted` (NaN → −∞, +∞ → `f32::MAX`) and applies bias and
    /// penalties.
    fn adjust_logits(&mut self, logits: &[f32], recent_tokens: &[u32]) {
        for (dst, &src) in self.adjusted.iter_mut().zip(logits) {
            *dst = sanitize(src);
        }
        for &(token, bias) in &self.params.logit_bias {
            let logit = &mut self.adjusted[token as usize];
            *logit = sanitize(*logit + bias);
        }
        if self.penalties_active() {
            self.apply_penalties(recent_tokens);
        }
    }

    fn apply_penalties(&mut self, recent_tokens: &[u32]) {
        let p = &self.params;
        let window = match p.penalty_window {
            0 => recent_tokens,
            n => &recent_tokens[recent_tokens.len().saturating_sub(n)..],
        };
        let in_vocab = |t: &&u32| (**t as usize) < self.vocab_size;
        for &token in window.iter().filter(in_vocab) {
            self.counts[token as usize] += 1;
        }
        // Each distinct token is penalised once (with its count), then its count is reset, which
        // leaves `counts` all zero for the next call without touching the whole vocabulary.
        for &token in window.iter().filter(in_vocab) {
            let count = std::mem::take(&mut self.counts[token as usize]);
            if count == 0 {
                continue;
            }
            let logit = &mut self.adjusted[token as usize];
            if *logit == f32::NEG_INFINITY {
                continue;
            }
            if p.repetition_penalty != 1.0 {
                if *logit > 0.0 {
                    *logit /= p.repetition_penalty;
                } else {
                    *logit *= p.repetition_penalty;
                }
            }
            *logit -= p.presence_penalty + p.frequency_penalty * count as f32;
            *logit = sanitize(*logit);
        }
    }

    /// Fills `weights` with `exp((logit - max) / temperature)` over the whole vocabulary and
    /// returns the maximum logit and the weights' sum.
    fn compute_weights(&mut self) -> Result<(f32, f64), SamplingError> {
        let max_logit = max_value(&self.adjusted);
        if max_logit == f32::NEG_INFINITY {
            return Err(SamplingError::NoFiniteLogits);
        }
        let inv_temperature = 1.0 / self.params.temperature;
        for (weight, &logit) in self.weights.iter_mut().zip(&self.adjusted) {
            *weight = exp_nonpositive((logit - max_logit) * inv_temperature);
        }
        Ok((max_logit, sum(&self.weights)))
    }

    /// Fills `candidates` with the `k` best tokens by adjusted logit (ties: lower id).
    fn collect_top_k(&mut self, k: usize) {
        if k <= HEAP_TOP_K_LIMIT {
            // One pass with a bounded max-heap of order keys: most tokens are rejected by a
            // single comparison with the worst logit kept so far.
            let mut heap = BinaryHeap::from(std::mem::take(&mut self.heap));
            let mut worst_kept = f32::NEG_INFINITY;
            for (id, &logit) in self.adjusted.iter().enumerate() {
                // Ids come in increasing order, so an equal logit never beats a kept token.
                if logit == f32::NEG_INFINITY || (heap.len() == k && logit <= worst_kept) {
                    continue;
                }
                let order = order_key(-logit, id as u32);
                if heap.len() < k {
                    heap.push(order);
                } else if let Some(mut worst) = heap.peek_mut() {
                    *worst = order;
                }
                if heap.len() == k {
                    let worst_id = *heap.peek().expect("heap is full") as u32;
                    worst_kept = self.adjusted[worst_id as usize];
                }
            }
            let adjusted = &self.adjusted;
            self.candidates.extend(heap.drain().map(|order| {
                let id = order as u32;
                Candidate {
                    id,
                    logit: adjusted[id as usize],
                    prob: 0.0,
                    order,
                }
            }));
            self.heap = heap.into_vec();
        } else {
            self.candidates.extend(
                self.adjusted
                    .iter()
                    .enumerate()
                    .filter(|(_, logit)| **logit > f32::NEG_INFINITY)
                    .map(|(id, &logit)| Candidate {
                        id: id as u32,
                        logit,
                        prob: 0.0,
                        order: order_key(-logit, id as u32),
                    }),
            );
            if k < self.candidates.len() {
                self.candidates
                    .select_nth_unstable_by_key(k - 1, |c| c.order);
                self.candidates.truncate(k);
            }
        }
    }

    /// Fills `candidates` with the tokens that survive top-k, temperature, typical-p, top-p and
    /// min-p. Their probabilities are proportional to the final distribution (min-p does not
    /// renormalise; `sample` draws within their sum).
    fn filter_candidates(&mut self) -> Result<(), SamplingError> {
        let SamplingParams {
            top_k,
            top_p,
            min_p,
            typical_p,
            temperature,
            ..
        } = self.params;
        let inv_temperature = 1.0 / temperature;
        self.candidates.clear();
        let (max_logit, total_weight) = if top_k > 0 && top_k < self.vocab_size {
            // Top-k first; the softmax then runs over the k survivors only.
            self.collect_top_k(top_k);
            let max_logit = self
                .candidates
                .iter()
                .map(|c| c.logit)
                .fold(f32::NEG_INFINITY, f32::max);
            if max_logit == f32::NEG_INFINITY {
                return Err(SamplingError::NoFiniteLogits);
            }
            for c in &mut self.candidates {
                c.prob = exp_nonpositive((c.logit - max_logit) * inv_temperature);
            }
            self.candidates.retain(|c| c.prob > 0.0);
            let total: f64 = self.candidates.iter().map(|c| f64::from(c.prob)).sum();
            (max_logit, total)
        } else {
            let (max_logit, total) = self.compute_weights()?;
            // Leave out tokens no later filter can keep (weights are relative to the top token's
            // weight of 1): for top-p, any set of tokens each below (1 - top_p)/V of the mass
            // holds less than 1 - top_p, so lies in the cut tail; for min-p, anything below
            // min_p. Typical-p needs every token (it can drop the top one), so nothing then.
            // The 0.999 margin keeps borderline tokens for the exact checks below.
            let floor = if typical_p < 1.0 {
                0.0
            } else {
                let top_p_floor = if top_p < 1.0 {
                    (1.0 - f64::from(top_p)) * total / self.vocab_size as f64
                } else {
                    0.0
                };
                0.999 * top_p_floor.max(f64::from(min_p)) as f32
            };
            // Tokens whose weight underflowed to 0 could never be drawn: leave them out too.
            self.candidates.extend(
                self.weights
                    .iter()
                    .zip(&self.adjusted)
                    .enumerate()
                    .filter(|(_, (weight, _))| **weight > floor && **weight > 0.0)
                    .map(|(id, (&prob, &logit))| Candidate {
                        id: id as u32,
                        logit,
                        prob,
                        order: 0,
                    }),
            );
            (max_logit, total)
        };
        // Probabilities relative to all tokens, the ones left out by the floor included, so that
        // top-p's mass is measured against the whole distribution.
        let scale = (1.0 / total_weight) as f32;
        for c in &mut self.candidates {
            c.prob *= scale;
        }

        if typical_p < 1.0 {
            // Surprisal -ln p = ln(total) - (logit - max) / T: no logarithm per token.
            let ln_total = total_weight.ln();
            let surprisal =
                |c: &Candidate| ln_total - f64::from((c.logit - max_logit) * inv_temperature);
            let entropy: f64 = self
                .candidates
                .iter()
                .map(|c| f64::from(c.prob) * surprisal(c))
                .sum();
            for c in &mut self.candidates {
                c.order = order_key((surprisal(c) - entropy).abs() as f32, c.id);
            }
            let mass: f64 = self.candidates.iter().map(|c| f64::from(c.prob)).sum();
            retain_smallest_set_with_mass(&mut self.candidates, f64::from(typical_p) * mass);
            normalize(&mut self.candidates);
        }

        if top_p < 1.0 {
            for c in &mut self.candidates {
                c.order = order_key(-c.prob, c.id);
            }
            // The probabilities sum to 1 over the whole distribution here (left-out tokens
            // included), so the target is `top_p` itself.
            retain_smallest_set_with_mass(&mut self.candidates, f64::from(top_p));
        }
        normalize(&mut self.candidates);

        if min_p > 0.0 {
            let max_prob = self
                .candidates
                .iter()
                .map(|c| c.prob)
                .fold(0.0f32, f32::max);
            let threshold = min_p * max_prob;
            self.candidates.retain(|c| c.prob >= threshold);
        }
        if self.candidates.is_empty() {
            return Err(SamplingError::NoFiniteLogits);
        }
        Ok(())
    }
}

fn sanitize(logit: f32) -> f32 {
    // Written as selects so the copy loop vectorises.
    if logit.is_nan() {
        f32::NEG_INFINITY
    } else {
        logit.min(f32::MAX)
    }
}

/// Width of the independent accumulators in the reductions below, so they vectorise.
const LANES: usize = 16;

/// Index of the largest value, lowest index on ties; NaN never wins, +∞ does.
fn argmax(values: &[f32]) -> Result<u32, SamplingError> {
    trellis_backend::argmax(values).ok_or(SamplingError::NoFiniteLogits)
}

fn sum(values: &[f32]) -> f64 {
    let mut lanes = [0.0f64; LANES];
    let chunks = values.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += f64::from(v);
        }
    }
    lanes.iter().sum::<f64>() + tail.iter().map(|&v| f64::from(v)).sum::<f64>()
}

/// `e^x` for `x ≤ 0` (shifted logits), within about 1 ulp of `f32::exp`, and 0 below the
/// normal `f32` range. Written without calls or branches so the loop over the vocabulary can
/// vectorise (`f32::exp` calls libm once per token, which dominated the sampler's time).
fn exp_nonpositive(x: f32) -> f32 {
    // e^x < f32::MIN_POSITIVE below this: report 0 (such a token can never be drawn anyway).
    const LOWEST: f32 = -87.0;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer without a call.
    const ROUND: f32 = 12_582_912.0;
    // ln 2 split in two so that n·LN2_HI is exact (Cody–Waite reduction).
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 2²³ + 127: adding an integer n ≥ -127 puts n + 127 in the low mantissa bits.
    const EXPONENT_BIAS: f32 = 8_388_608.0 + 127.0;
    let underflow = x < LOWEST;
    let x = if underflow { LOWEST } else { x };
    // e^x = 2^n · e^r with n an integer and |r| ≤ ln(2)/2.
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // Taylor series of e^r to degree 7: the remainder is below 1e-8 relative.
    let poly = 1.0
        + r * (1.0
            + r * (1.0 / 2.0
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // Shifting the bits of (2²³ + 127 + n) left by 23 leaves exactly the exponent field of 2^n.
    let scale = f32::from_bits((n + EXPONENT_BIAS).to_bits() << 23);
    if underflow { 0.0 } else { scale * poly }
}

/// A sort key (`key` ascending, then `id` ascending) packed into one integer: the float's bits
/// mapped to an order-preserving unsigned integer in the high half, the id in the low half.
fn order_key(key: f32, id: u32) -> u64 {
    let bits = key.to_bits();
    let ordered = if bits >> 31 == 1 {
        !bits
    } else {
        bits | 0x8000_0000
    };
    (u64::from(ordered) << 32) | u64::from(id)
}

/// Scales the candidates' probabilities to sum to 1.
fn normalize(candidates: &mut [Candidate]) {
    let total: f64 = candidates.iter().map(|c| f64::from(c.prob)).sum();
    if total > 0.0 {
        let scale = (1.0 / total) as f32;
        for c in candidates {
            c.prob *= scale;
        }
    }
}

/// Below this many candidates the boundary search just sorts them.
const SORT_BELOW: usize = 64;

/// Largest `top_k` served by the bounded heap; larger ones use a partial selection.
const HEAP_TOP_K_LIMIT: usize = 1024;

/// Keeps the shortest prefix of the candidates in `order` whose probability mass reaches
/// `target` (the token that crosses it is kept; all are kept if it is never reached).
///
/// Nothing large is sorted: a weighted quickselect narrows down where the boundary lies. The
/// first probe takes the best `SORT_BELOW` candidates (enough for the peaked distributions of
/// most steps); later probes halve the remaining range. Each probe is one partial selection,
/// so the expected cost is linear in the number of candidates.
fn retain_smallest_set_with_mass(candidates: &mut Vec<Candidate>, target: f64) {
    // candidates[..lo] are kept (their mass is `kept` < target); candidates[hi..] are dropped;
    // the boundary lies in candidates[lo..hi].
    let (mut lo, mut hi) = (0, candidates.len());
    let mut kept = 0.0f64;
    let mut first_probe = true;
    while hi - lo > SORT_BELOW {
        let take = if first_probe {
            SORT_BELOW
        } else {
            (hi - lo) / 2
        };
        first_probe = false;
        let range = &mut candidates[lo..hi];
        range.select_nth_unstable_by_key(take - 1, |c| c.order);
        let best_mass: f64 = range[..take].iter().map(|c| f64::from(c.prob)).sum();
        if kept + best_mass >= target {
            hi = lo + take;
        } else {
            kept += best_mass;
            lo += take;
        }
    }
    candidates[lo..hi].sort_unstable_by_key(|c| c.order);
    for i in lo..hi {
        kept += f64::from(candidates[i].prob);
        if kept >= target {
            candidates.truncate(i + 1);
            return;
        }
    }
    // Rounding kept the mass just below the target: keep everything up to `hi`.
    candidates.truncate(hi);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            seed: Some(1234),
            ..SamplingParams::default()
        }
    }

    /// Logits whose softmax is exactly (up to rounding) the given probabilities.
    fn logits_of(probs: &[f64]) -> Vec<f32> {
        probs.iter().map(|p| p.ln() as f32).collect()
    }

    fn kept_ids(sampler: &mut Sampler, logits: &[f32], recent: &[u32]) -> Vec<u32> {
        let mut ids: Vec<u32> = sampler
            .distribution(logits, recent)
            .unwrap()
            .iter()
            .map(|c| c.id)
            .collect();
        ids.sort_unstable();
        ids
    }

    fn frequencies(sampler: &mut Sampler, logits: &[f32], draws: usize) -> Vec<f64> {
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..draws {
            counts[sampler.sample(logits, &[]).unwrap() as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / draws as f64).collect()
    }

    /// Pearson's chi-square statistic of observed frequencies against expected probabilities.
    fn chi_square(observed: &[f64], expected: &[f64], draws: usize) -> f64 {
        observed
            .iter()
            .zip(expected)
            .filter(|(_, e)| **e > 0.0)
            .map(|(o, e)| {
                let (o, e) = (o * draws as f64, e * draws as f64);
                (o - e) * (o - e) / e
            })
            .sum()
    }

    fn softmax(logits: &[f32], temperature: f64) -> Vec<f64> {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let e: Vec<f64> = logits
            .iter()
            .map(|&l| ((l as f64 - max) / temperature).exp())
            .collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|x| x / s).collect()
    }

    #[test]
    fn plain_greedy_only_when_nothing_changes_the_logits() {
        let plain = |p: SamplingParams| Sampler::new(p, 8).unwrap().is_plain_greedy();
        assert!(plain(SamplingParams::greedy()));
        assert!(plain(SamplingParams {
            top_k: 1,
            ..params(0.8)
        }));
        assert!(!plain(params(0.8)));
        assert!(!plain(SamplingParams {
            repetition_penalty: 1.1,
            ..SamplingParams::greedy()
        }));
        assert!(!plain(SamplingParams {
            logit_bias: vec![(3, 2.0)],
            ..SamplingParams::greedy()
        }));
    }

    #[test]
    fn greedy_picks_argmax_with_lowest_id_on_ties() {
        let mut sampler = Sampler::new(SamplingParams::greedy(), 5).unwrap();
        assert_eq!(sampler.sample(&[0.0, 3.0, 1.0, 3.0, -1.0], &[]).unwrap(), 1);
        assert_eq!(sampler.sample(&[5.0, 5.0, 5.0, 5.0, 5.0], &[]).unwrap(), 0);
        // top_k = 1 is greedy too, whatever the temperature.
        let mut sampler = Sampler::new(
            SamplingParams {
                top_k: 1,
                ..params(1.0)
            },
            3,
        )
        .unwrap();
        for _ in 0..20 {
            assert_eq!(sampler.sample(&[1.0, 1.5, 1.5], &[]).unwrap(), 1);
        }
    }

    #[test]
    fn nan_logits_are_never_chosen() {
        let logits = [f32::NAN, 0.5, f32::NAN, 0.1];
        let mut greedy = Sampler::new(SamplingParams::greedy(), 4).unwrap();
        assert_eq!(greedy.sample(&logits, &[]).unwrap(), 1);
        let mut sampler = Sampler::new(params(5.0), 4).unwrap();
        for _ in 0..500 {
            let token = sampler.sample(&logits, &[]).unwrap();
            assert!(token == 1 || token == 3);
        }
        let all_bad = [f32::NAN, f32::NEG_INFINITY, f32::NAN, f32::NAN];
        assert_eq!(
            greedy.sample(&all_bad, &[]),
            Err(SamplingError::NoFiniteLogits)
        );
        assert_eq!(
            sampler.sample(&all_bad, &[]),
            Err(SamplingError::NoFiniteLogits)
        );
        // +inf is the largest finite value: it wins greedy and dominates sampling.
        let with_inf = [0.0, f32::INFINITY, 1.0, f32::INFINITY];
        assert_eq!(greedy.sample(&with_inf, &[]).unwrap(), 1);
        for _ in 0..100 {
            let token = sampler.sample(&with_inf, &[]).unwrap();
            assert!(token == 1 || token == 3);
        }
    }

    #[test]
    fn same_seed_same_sequence() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(
                SamplingParams {
                    seed: Some(seed),
                    top_p: 0.9,
                    ..params(1.0)
                },
                100,
            )
            .unwrap();
            (0..200)
                .map(|_| s.sample(&logits, &[]).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        // `reset` restarts the same sequence.
        let mut s = Sampler::new(params(1.0), 100).unwrap();
        let first: Vec<u32> = (0..50).map(|_| s.sample(&logits, &[]).unwrap()).collect();
        s.reset(params(1.0)).unwrap();
        let second: Vec<u32> = (0..50).map(|_| s.sample(&logits, &[]).unwrap()).collect();
        assert_eq!(first, second);
        // Without a seed one is drawn and reported.
        let unseeded = Sampler::new(SamplingParams::default(), 10).unwrap();
        let replay = Sampler::new(
            SamplingParams {
                seed: Some(unseeded.seed()),
                ..SamplingParams::default()
            },
            10,
        )
        .unwrap();
        assert_eq!(replay.seed(), unseeded.seed());
    }

    #[test]
    fn empirical_frequencies_match_softmax() {
        let logits = [1.0f32, 0.0, 2.0, -1.0, 0.5, 1.5];
        let draws = 40_000;
        let mut sampler = Sampler::new(params(1.0), logits.len()).unwrap();
        let observed = frequencies(&mut sampler, &logits, draws);
        let expected = softmax(&logits, 1.0);
        // 5 degrees of freedom: P(chi2 > 25) ≈ 1.4e-4; with a fixed seed this cannot flake.
        let chi2 = chi_square(&observed, &expected, draws);
        assert!(
            chi2 < 25.0,
            "chi2 = {chi2}, observed {observed:?}, expected {expected:?}"
        );
        for (o, e) in observed.iter().zip(&expected) {
            let sigma = (e * (1.0 - e) / draws as f64).sqrt();
            assert!((o - e).abs() < 5.0 * sigma, "{o} vs {e}");
        }
    }

    #[test]
    fn temperature_sharpens_and_flattens() {
        let logits = [1.0f32, 0.0, 2.0, -1.0];
        for temperature in [0.5f32, 2.0] {
            let mut sampler = Sampler::new(params(temperature), 4).unwrap();
            let expected = softmax(&logits, temperature as f64);
            for c in sampler.distribution(&logits, &[]).unwrap() {
                assert!((c.prob as f64 - expected[c.id as usize]).abs() < 1e-6);
            }
            let draws = 20_000;
            let observed = frequencies(&mut sampler, &logits, draws);
            let chi2 = chi_square(&observed, &expected, draws);
            assert!(chi2 < 22.0, "T={temperature}: chi2 = {chi2}");
        }
        // Sharpening concentrates mass on the top token.
        let mut cold = Sampler::new(params(0.5), 4).unwrap();
        let mut warm = Sampler::new(params(2.0), 4).unwrap();
        let top = |s: &mut Sampler| {
            s.distribution(&logits, &[])
                .unwrap()
                .iter()
                .find(|c| c.id == 2)
                .unwrap()
                .prob
        };
        assert!(top(&mut cold) > 0.8 && top(&mut warm) < 0.5);
    }

    #[test]
    fn top_k_keeps_the_k_best() {
        let logits = [0.1f32, 3.0, 2.0, 0.2, 2.5, -4.0];
        let mut sampler = Sampler::new(
            SamplingParams {
                top_k: 3,
                ..params(1.0)
            },
            6,
        )
        .unwrap();
        assert_eq!(kept_ids(&mut sampler, &logits, &[]), [1, 2, 4]);
        let draws = 20_000;
        let observed = frequencies(&mut sampler, &logits, draws);
        let mut expected = softmax(&[3.0, 2.0, 2.5], 1.0);
        expected = vec![0.0, expected[0], expected[1], 0.0, expected[2], 0.0];
        assert_eq!(observed[0] + observed[3] + observed[5], 0.0);
        assert!(chi_square(&observed, &expected, draws) < 20.0);
        // Ties at the cut keep the lowest ids.
        let flat = [1.0f32; 6];
        assert_eq!(kept_ids(&mut sampler, &flat, &[]), [0, 1, 2]);
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        let logits = logits_of(&[0.1, 0.4, 0.2, 0.3]);
        let kept = |top_p: f32| {
            let mut s = Sampler::new(
                SamplingParams {
                    top_p,
                    ..params(1.0)
                },
                4,
            )
            .unwrap();
            kept_ids(&mut s, &logits, &[])
        };
        assert_eq!(kept(0.35), [1]);
        assert_eq!(kept(0.45), [1, 3]);
        assert_eq!(kept(0.65), [1, 3]);
        assert_eq!(kept(0.75), [1, 2, 3]);
        assert_eq!(kept(0.95), [0, 1, 2, 3]);

        // Renormalised draws over {1, 3}: 4/7 and 3/7.
        let mut s = Sampler::new(
            SamplingParams {
                top_p: 0.6,
                ..params(1.0)
            },
            4,
        )
        .unwrap();
        let draws = 20_000;
        let observed = frequencies(&mut s, &logits, draws);
        let expected = [0.0, 4.0 / 7.0, 0.0, 3.0 / 7.0];
        assert!(chi_square(&observed, &expected, draws) < 15.0);
        assert_eq!(observed[0] + observed[2], 0.0);
    }

    /// Reference: sort everything, keep the smallest prefix reaching the mass.
    fn reference_nucleus(probs: &[f64], mass: f64, key: impl Fn(usize) -> f64) -> Vec<u32> {
        let mut order: Vec<usize> = (0..probs.len()).collect();
        order.sort_by(|&a, &b| key(a).total_cmp(&key(b)).then(a.cmp(&b)));
        let mut cumulative = 0.0;
        let mut kept = Vec::new();
        for i in order {
            kept.push(i as u32);
            cumulative += probs[i];
            if cumulative >= mass {
                break;
            }
        }
        kept.sort_unstable();
        kept
    }

    #[test]
    fn top_p_over_a_large_flat_vocabulary_matches_a_full_sort() {
        // 5000 tokens with slowly decaying logits: the top 64 hold far less than p.
        let vocab = 5000;
        let logits: Vec<f32> = (0..vocab)
            .map(|i| -(((i * 7919) % vocab) as f32) / 2000.0)
            .collect();
        let probs = softmax(&logits, 1.0);
        for top_p in [0.05f32, 0.5, 0.9, 0.99] {
            let mut s = Sampler::new(
                SamplingParams {
                    top_p,
                    ..params(1.0)
                },
                vocab,
            )
            .unwrap();
            let kept = kept_ids(&mut s, &logits, &[]);
            let reference = reference_nucleus(&probs, top_p as f64, |i| -probs[i]);
            assert_eq!(kept, reference, "top_p {top_p}");
            if top_p >= 0.5 {
                assert!(kept.len() > 256);
            }
        }
    }

    /// Reference filter chain on a full sort, in f64: top-p then min-p over `probs`.
    fn reference_top_p_min_p(probs: &[f64], top_p: f64, min_p: f64) -> Vec<u32> {
        let nucleus = reference_nucleus(probs, top_p, |i| -probs[i]);
        let max = nucleus
            .iter()
            .map(|&i| probs[i as usize])
            .fold(0.0, f64::max);
        nucleus
            .into_iter()
            .filter(|&i| probs[i as usize] >= min_p * max)
            .collect()
    }

    /// A peaked 20000-token distribution: a few strong tokens over a broad noisy floor.
    fn peaked_logits(vocab: usize) -> Vec<f32> {
        (0..vocab)
            .map(|i| {
                let noise = ((i * 2654435761) % 10007) as f32 / 10007.0;
                if i % 997 == 0 {
                    8.0 + (i % 7) as f32 * 0.5
                } else {
                    noise * 6.0 - 3.0
                }
            })
            .collect()
    }

    #[test]
    fn large_vocabulary_filters_match_full_sort_references() {
        let vocab = 20_000;
        let logits = peaked_logits(vocab);
        for temperature in [0.7f32, 1.0, 1.5] {
            let probs = softmax(&logits, temperature as f64);
            for (top_p, min_p) in [
                (0.9f32, 0.0f32),
                (0.5, 0.0),
                (0.99, 0.0),
                (1.0, 0.05),
                (0.95, 0.02),
            ] {
                let mut s = Sampler::new(
                    SamplingParams {
                        top_p,
                        min_p,
                        ..params(temperature)
                    },
                    vocab,
                )
                .unwrap();
                assert_eq!(
                    kept_ids(&mut s, &logits, &[]),
                    reference_top_p_min_p(&probs, top_p as f64, min_p as f64),
                    "T {temperature} top_p {top_p} min_p {min_p}"
                );
            }
            let entropy: f64 = -probs.iter().map(|p| p * p.ln()).sum::<f64>();
            for typical_p in [0.3f32, 0.9] {
                let mut s = Sampler::new(
                    SamplingParams {
                        typical_p,
                        ..params(temperature)
                    },
                    vocab,
                )
                .unwrap();
                let reference = reference_nucleus(&probs, typical_p as f64, |i| {
                    (-probs[i].ln() - entropy).abs()
                });
                assert_eq!(
                    kept_ids(&mut s, &logits, &[]),
                    reference,
                    "T {temperature} typical_p {typical_p}"
                );
            }
        }
    }

    #[test]
    fn top_k_heap_and_selection_agree() {
        let vocab = 5000;
        // Many ties: only 50 distinct values.
        let logits: Vec<f32> = (0..vocab).map(|i| ((i * 31) % 50) as f32 * 0.1).collect();
        for top_k in [
            1usize,
            3,
            100,
            HEAP_TOP_K_LIMIT,
            HEAP_TOP_K_LIMIT + 1,
            4000,
            4999,
        ] {
            let mut s = Sampler::new(
                SamplingParams {
                    top_k,
                    temperature: 1.0,
                    seed: Some(3),
                    ..SamplingParams::default()
                },
                vocab,
            )
            .unwrap();
            let mut order: Vec<u32> = (0..vocab as u32).collect();
            order.sort_by(|&a, &b| {
                logits[b as usize]
                    .total_cmp(&logits[a as usize])
                    .then(a.cmp(&b))
            });
            let mut expected = order[..top_k].to_vec();
            expected.sort_unstable();
            if top_k == 1 {
                assert_eq!(s.sample(&logits, &[]).unwrap(), expected[0]);
            } else {
                assert_eq!(kept_ids(&mut s, &logits, &[]), expected, "top_k {top_k}");
            }
        }
    }

    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0.0f64;
        for i in 0..=200_000 {
            let x = -(i as f32) * 86.9 / 200_000.0;
            let exact = (x as f64).exp();
            worst = worst.max(((exp_nonpositive(x) as f64 - exact) / exact).abs());
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-100.0), 0.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn order_keys_sort_like_floats_then_ids() {
        let keys = [-3.5f32, -0.0, 0.0, 1e-30, 2.0, f32::MAX];
        for pair in keys.windows(2) {
            assert!(order_key(pair[0], 9) < order_key(pair[1], 0), "{pair:?}");
        }
        assert!(order_key(1.0, 3) < order_key(1.0, 4));
        assert_eq!(order_key(1.0, 77) as u32, 77);
    }

    #[test]
    fn typical_p_matches_a_full_sort_reference() {
        let probs = [0.5, 0.2, 0.12, 0.08, 0.05, 0.03, 0.02];
        let logits = logits_of(&probs);
        let entropy: f64 = -probs.iter().map(|p| p * p.ln()).sum::<f64>();
        for typical_p in [0.2f32, 0.4, 0.6, 0.8, 0.95] {
            let mut s = Sampler::new(
                SamplingParams {
                    typical_p,
                    ..params(1.0)
                },
                probs.len(),
            )
            .unwrap();
            let reference = reference_nucleus(&probs, typical_p as f64, |i| {
                (-probs[i].ln() - entropy).abs()
            });
            assert_eq!(
                kept_ids(&mut s, &logits, &[]),
                reference,
                "typical_p {typical_p}"
            );
        }
        // A small mass keeps only the most typical token (surprisal closest to the entropy).
        let mut s = Sampler::new(
            SamplingParams {
                typical_p: 0.1,
                ..params(1.0)
            },
            probs.len(),
        )
        .unwrap();
        let kept = kept_ids(&mut s, &logits, &[]);
        assert_eq!(kept.len(), 1);
        let most_typical = (0..probs.len())
            .min_by(|&a, &b| {
                (-probs[a].ln() - entropy)
                    .abs()
                    .total_cmp(&(-probs[b].ln() - entropy).abs())
            })
            .unwrap();
        assert_eq!(kept[0], most_typical as u32);
    }

    #[test]
    fn min_p_keeps_tokens_above_a_fraction_of_the_top() {
        let probs = [0.40, 0.20, 0.10, 0.19, 0.06, 0.05];
        let logits = logits_of(&probs);
        let mut s = Sampler::new(
            SamplingParams {
                min_p: 0.3,
                ..params(1.0)
            },
            probs.len(),
        )
        .unwrap();
        assert_eq!(kept_ids(&mut s, &logits, &[]), [0, 1, 3]);
        let draws = 20_000;
        let observed = frequencies(&mut s, &logits, draws);
        let expected = [0.40 / 0.79, 0.20 / 0.79, 0.0, 0.19 / 0.79, 0.0, 0.0];
        assert!(chi_square(&observed, &expected, draws) < 15.0);
        let mut s = Sampler::new(
            SamplingParams {
                min_p: 0.2,
                ..params(1.0)
            },
            probs.len(),
        )
        .unwrap();
        assert_eq!(kept_ids(&mut s, &logits, &[]), [0, 1, 2, 3]);
    }

    #[test]
    fn filters_apply_in_order() {
        // top-k 4 → {0,1,2,3}; temperature 1; top-p 0.8 over the renormalised four; min-p.
        let probs = [0.3, 0.25, 0.2, 0.15, 0.1];
        let logits = logits_of(&probs);
        let mut s = Sampler::new(
            SamplingParams {
                top_k: 4,
                top_p: 0.8,
                ..params(1.0)
            },
            5,
        )
        .unwrap();
        // Renormalised: 0.333, 0.278, 0.222, 0.167 → cumulative 0.333, 0.611, 0.833.
        assert_eq!(kept_ids(&mut s, &logits, &[]), [0, 1, 2]);
        let sum: f32 = s
            .distribution(&logits, &[])
            .unwrap()
            .iter()
            .map(|c| c.prob)
            .sum();
        assert!((sum - 1.0).abs() < 1e-6);
    }

    #[test]
    fn repetition_penalty_scales_only_seen_tokens() {
        let logits = [2.0f32, -2.0, 1.0, -1.0, 0.5];
        let mut s = Sampler::new(
            SamplingParams {
                repetition_penalty: 2.0,
                ..params(1.0)
            },
            5,
        )
        .unwrap();
        let adjusted = |s: &mut Sampler, recent: &[u32]| {
            let mut out = [0.0f32; 5];
            for c in s.distribution(&logits, recent).unwrap() {
                out[c.id as usize] = c.logit;
            }
            out
        };
        assert_eq!(
            adjusted(&mut s, &[0, 1, 1, 99]),
            [1.0, -4.0, 1.0, -1.0, 0.5]
        );
        // No history, no change; the same call again starts from clean counts.
        assert_eq!(adjusted(&mut s, &[]), logits);
        assert_eq!(adjusted(&mut s, &[0, 1, 1]), [1.0, -4.0, 1.0, -1.0, 0.5]);
        // Only the window counts.
        let mut s = Sampler::new(
            SamplingParams {
                repetition_penalty: 2.0,
                penalty_window: 2,
                ..params(1.0)
            },
            5,
        )
        .unwrap();
        assert_eq!(adjusted(&mut s, &[0, 1, 2, 3]), [2.0, -2.0, 0.5, -2.0, 0.5]);
    }

    #[test]
    fn presence_and_frequency_penalties_subtract() {
        let logits = [1.0f32, 1.0, 1.0, 1.0];
        let mut s = Sampler::new(
            SamplingParams {
                presence_penalty: 0.5,
                frequency_penalty: 0.25,
                penalty_window: 0,
                ..params(1.0)
            },
            4,
        )
        .unwrap();
        let mut out = [0.0f32; 4];
        for c in s.distribution(&logits, &[2, 0, 2, 2]).unwrap() {
            out[c.id as usize] = c.logit;
        }
        assert_eq!(out, [1.0 - 0.5 - 0.25, 1.0, 1.0 - 0.5 - 0.75, 1.0]);
    }

    #[test]
    fn logit_bias_shifts_and_bans() {
        let logits = [0.0f32, 0.0, 0.0, 0.0];
        let mut s = Sampler::new(
            SamplingParams {
                logit_bias: vec![(3, 100.0)],
                ..params(1.0)
            },
            4,
        )
        .unwrap();
        for _ in 0..100 {
            assert_eq!(s.sample(&logits, &[]).unwrap(), 3);
        }
        let mut s = Sampler::new(
            SamplingParams {
                logit_bias: vec![(0, f32::NEG_INFINITY), (1, f32::NEG_INFINITY)],
                ..params(1.0)
            },
            4,
        )
        .unwrap();
        assert_eq!(kept_ids(&mut s, &logits, &[]), [2, 3]);
        let mut greedy = Sampler::new(
            SamplingParams {
                logit_bias: vec![(0, -1.0)],
                ..SamplingParams::greedy()
            },
            4,
        )
        .unwrap();
        assert_eq!(greedy.sample(&logits, &[]).unwrap(), 1);
        assert!(matches!(
            Sampler::new(
                SamplingParams {
                    logit_bias: vec![(4, 1.0)],
                    ..params(1.0)
                },
                4
            ),
            Err(SamplingError::BiasTokenOutOfRange { token: 4, .. })
        ));
    }

    #[test]
    fn invalid_parameters_and_lengths_are_rejected() {
        let bad = [
            SamplingParams {
                temperature: -1.0,
                ..params(1.0)
            },
            SamplingParams {
                top_p: 0.0,
                ..params(1.0)
            },
            SamplingParams {
                min_p: 1.5,
                ..params(1.0)
            },
            SamplingParams {
                typical_p: f32::NAN,
                ..params(1.0)
            },
            SamplingParams {
                repetition_penalty: 0.0,
                ..params(1.0)
            },
        ];
        for p in bad {
            assert!(Sampler::new(p.clone(), 4).is_err(), "{p:?}");
        }
        let mut s = Sampler::new(params(1.0), 4).unwrap();
        assert_eq!(
            s.sample(&[0.0; 3], &[]),
            Err(SamplingError::LogitsLength {
                expected: 4,
                actual: 3
            })
        );
    }

    #[test]
    fn sampling_reuses_its_buffers() {
        let vocab = 4096;
        let logits: Vec<f32> = (0..vocab).map(|i| (i % 97) as f32 * 0.01).collect();
        let mut s = Sampler::new(
            SamplingParams {
                top_p: 0.9,
                typical_p: 0.95,
                min_p: 0.01,
                repetition_penalty: 1.1,
                ..params(0.8)
            },
            vocab,
        )
        .unwrap();
        let buffers = |s: &Sampler| {
            (
                s.candidates.as_ptr(),
                s.candidates.capacity(),
                s.adjusted.as_ptr(),
                s.counts.as_ptr(),
            )
        };
        let before = buffers(&s);
        let recent: Vec<u32> = (0..100).collect();
        for _ in 0..20 {
            s.sample(&logits, &recent).unwrap();
        }
        assert_eq!(buffers(&s), before);
        assert!(s.counts.iter().all(|&c| c == 0));
    }

    #[test]
    fn resolve_merges_model_and_user_settings() {
        let model = SamplingOptions {
            do_sample: Some(false),
            temperature: Some(0.6),
            top_p: Some(0.95),
            top_k: Some(40),
            ..SamplingOptions::default()
        };
        // The model says greedy; the user says nothing.
        let p = SamplingParams::resolve(&model, &SamplingOptions::default());
        assert_eq!(p.temperature, 0.0);
        assert_eq!((p.top_p, p.top_k), (0.95, 40));
        // The user asks to sample: the model's temperature applies.
        let user = SamplingOptions {
            do_sample: Some(true),
            top_k: Some(0),
            ..SamplingOptions::default()
        };
        let p = SamplingParams::resolve(&model, &user);
        assert_eq!((p.temperature, p.top_k), (0.6, 0));
        // A user temperature always wins.
        let user = SamplingOptions {
            temperature: Some(0.9),
            seed: Some(5),
            ..SamplingOptions::default()
        };
        let p = SamplingParams::resolve(&model, &user);
        assert_eq!((p.temperature, p.seed), (0.9, Some(5)));
        // Nothing anywhere: OpenAI's temperature 1 with neutral filters.
        let p = SamplingParams::resolve(&SamplingOptions::default(), &SamplingOptions::default());
        assert_eq!(
            p,
            SamplingParams {
                temperature: 1.0,
                ..SamplingParams::default()
            }
        );
    }
}

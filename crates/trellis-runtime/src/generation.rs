//! Text generation as a user sees it: the engine's token loop with sampling, stop rules and a
//! streamed, UTF-8-safe text. This is the streaming API every front end (CLI, server, bindings)
//! builds on.

use crate::engine::{Engine, EngineError, Finish, GenerationStats};
use crate::sampler::{Sampler, SamplingError, SamplingParams};
use crate::stop::{FinishReason, StopMatcher, StopRules, StopScan, StopTrigger};
use crate::tokenizer::{IncrementalDecoder, Tokenizer, TokenizerError};
use std::cell::RefCell;
use std::ops::ControlFlow;
use trellis_backend::Backend;

#[derive(Debug, thiserror::Error)]
pub enum GenerationError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

/// What to generate after a prompt.
#[derive(Clone, Debug)]
pub struct GenerationRequest {
    pub sampling: SamplingParams,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Strings that end the output when they appear (they are not part of it).
    pub stop: Vec<String>,
    /// Keep going through end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Leave special tokens out of the text (keep them when a parser needs its tags, e.g. GLM's
    /// `<think>` and `<tool_call>`).
    pub skip_special_tokens: bool,
}

impl Default for GenerationRequest {
    fn default() -> Self {
        GenerationRequest {
            sampling: SamplingParams::greedy(),
            max_tokens: 256,
            stop: Vec::new(),
            ignore_eos: false,
            skip_special_tokens: false,
        }
    }
}

/// One piece of the stream: a generated token with the text it completed (possibly empty
/// while a multi-byte character or a possible stop string is pending), or, with `token` None,
/// text released at the end.
#[derive(Clone, Copy, Debug)]
pub struct TokenEvent<'a> {
    pub token: Option<u32>,
    pub text: &'a str,
}

/// A finished generation.
#[derive(Clone, Debug)]
pub struct Completion {
    /// Generated tokens (an end-of-sequence token that stopped generation included).
    pub tokens: Vec<u32>,
    /// The streamed text, concatenated.
    pub text: String,
    pub finish_reason: FinishReason,
    /// What exactly stopped generation (`None` when the callback did).
    pub trigger: Option<StopTrigger>,
    pub stats: GenerationStats,
}

/// Everything about one generation that lives outside the model: its sampler, stop rules,
/// detokenizer and output so far. The single-sequence loop and the batch scheduler both drive
/// it: `choose` a token from logits, `accept` it, and `finish` when the model side stops.
pub struct SequenceState {
    sampler: Sampler,
    rules: StopRules,
    matcher: StopMatcher,
    decoder: IncrementalDecoder,
    /// Prompt and generated tokens: what the penalties look at.
    recent: Vec<u32>,
    prompt_len: usize,
    max_tokens: usize,
    text: String,
    trigger: Option<StopTrigger>,
}

/// What accepting a token produced.
#[derive(Debug)]
pub struct Accepted {
    /// Text safe to show now (possibly empty).
    pub text: String,
    /// Set when this token ended the generation.
    pub stop: Option<StopTrigger>,
}

impl SequenceState {
    /// State for generating after `prompt` with end-of-sequence ids `eos`.
    pub fn new(
        tokenizer: &Tokenizer,
        eos: &[u32],
        vocab_size: usize,
        prompt: &[u32],
        request: &GenerationRequest,
    ) -> Result<SequenceState, GenerationError> {
        let rules = StopRules::new(eos.iter().copied())
            .with_stop_strings(request.stop.iter().cloned())
            .with_ignore_eos(request.ignore_eos);
        // The decoder starts from the prompt's tail so the first token's leading space is right.
        let context = &prompt[prompt.len().saturating_sub(8)..];
        let mut recent = Vec::with_capacity(prompt.len() + request.max_tokens);
        recent.extend_from_slice(prompt);
        Ok(SequenceState {
            sampler: Sampler::new(request.sampling.clone(), vocab_size)?,
            matcher: rules.stop_matcher(),
            rules,
            decoder: IncrementalDecoder::with_context(
                tokenizer.clone(),
                request.skip_special_tokens,
                context,
            )?,
            recent,
            prompt_len: prompt.len(),
            max_tokens: request.max_tokens,
            text: String::new(),
            trigger: None,
        })
    }

    /// The next token from these logits.
    pub fn choose(&mut self, logits: &[f32]) -> Result<u32, GenerationError> {
        Ok(self.sampler.sample(logits, &self.recent)?)
    }

    /// Take a generated token: detokenize it, apply the stop rules, and say what to show.
    pub fn accept(&mut self, token: u32) -> Result<Accepted, GenerationError> {
        self.recent.push(token);
        if self.rules.is_eos(token) {
            return Ok(self.stop_with(String::new(), StopTrigger::EosToken(token)));
        }
        let delta = self.decoder.push(token)?;
        let (text, stop) = match self.matcher.push(&delta) {
            StopScan::Continue { text } => (text, None),
            StopScan::Stopped { text, stop_string } => {
                (text, Some(StopTrigger::StopString(stop_string)))
            }
        };
        if let Some(trigger) = stop {
            return Ok(self.stop_with(text, trigger));
        }
        self.text.push_str(&text);
        if self.generated() >= self.max_tokens {
            let mut rest = text;
            rest.push_str(&self.flush()?);
            // A stop string completed by the flush wins over the length limit.
            let trigger = self.trigger.clone().unwrap_or(StopTrigger::MaxTokens);
            return Ok(self.stop_with_shown(rest, trigger));
        }
        Ok(Accepted { text, stop: None })
    }

    fn stop_with(&mut self, text: String, trigger: StopTrigger) -> Accepted {
        self.text.push_str(&text);
        self.stop_with_shown(text, trigger)
    }

    fn stop_with_shown(&mut self, text: String, trigger: StopTrigger) -> Accepted {
        self.trigger = Some(trigger.clone());
        Accepted {
            text,
            stop: Some(trigger),
        }
    }

    /// Release what the detokenizer and the stop matcher still hold.
    fn flush(&mut self) -> Result<String, GenerationError> {
        let tail = self.decoder.finish()?;
        let mut rest = match self.matcher.push(&tail) {
            StopScan::Continue { text } => text,
            StopScan::Stopped { text, stop_string } => {
                self.trigger = Some(StopTrigger::StopString(stop_string));
                text
            }
        };
        if self.trigger.is_none() {
            rest.push_str(&self.matcher.finish());
        }
        self.text.push_str(&rest);
        Ok(rest)
    }

    /// The model side stopped (context full, cancelled, or the caller ended it) without a
    /// token-level trigger: flush held-back text and record `why`, if given.
    pub fn finish(&mut self, why: Option<StopTrigger>) -> Result<String, GenerationError> {
        if self.trigger.is_some() {
            return Ok(String::new());
        }
        let rest = self.flush()?;
        if self.trigger.is_none() {
            self.trigger = why;
        }
        Ok(rest)
    }

    /// Tokens generated so far (an EOS that ended generation included).
    pub fn generated(&self) -> usize {
        self.recent.len() - self.prompt_len
    }

    pub fn generated_tokens(&self) -> &[u32] {
        &self.recent[self.prompt_len..]
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn trigger(&self) -> Option<&StopTrigger> {
        self.trigger.as_ref()
    }

    pub fn finish_reason(&self) -> FinishReason {
        self.trigger
            .as_ref()
            .map_or(FinishReason::Stop, StopTrigger::finish_reason)
    }

    pub fn is_finished(&self) -> bool {
        self.trigger.is_some()
    }
}

/// Generate after `prompt`, calling `on_event` for every token as soon as it is sampled.
/// `on_event` may stop generation by returning `Break` (finish reason `Stop`, no trigger).
pub fn generate<B: Backend>(
    engine: &mut Engine<B>,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    request: &GenerationRequest,
    on_event: &mut dyn FnMut(TokenEvent<'_>) -> ControlFlow<()>,
) -> Result<Completion, GenerationError> {
    let vocab = engine.info().vocab_size;
    let eos = engine.eos_token_ids().to_vec();
    // Shared by the sampling and the token callbacks, which the loop holds at once.
    let state = RefCell::new(SequenceState::new(tokenizer, &eos, vocab, prompt, request)?);
    let failure: RefCell<Option<GenerationError>> = RefCell::new(None);
    let choose = |logits: &[f32]| match state.borrow_mut().choose(logits) {
        Ok(t) => t,
        Err(e) => {
            // Ends the loop at the next callback; the token is never emitted.
            failure.borrow_mut().get_or_insert(e);
            0
        }
    };
    let mut on_token = |token| {
        if failure.borrow().is_some() {
            return ControlFlow::Break(());
        }
        let accepted = match state.borrow_mut().accept(token) {
            Ok(a) => a,
            Err(e) => {
                *failure.borrow_mut() = Some(e);
                return ControlFlow::Break(());
            }
        };
        let flow = on_event(TokenEvent {
            token: Some(token),
            text: &accepted.text,
        });
        if accepted.stop.is_some() {
            return ControlFlow::Break(());
        }
        flow
    };
    // Plain greedy decoding (no bias or penalty on the logits) lets the backend choose: a GPU
    // then copies back one id per token, not the logits.
    let plain_greedy = state.borrow().sampler.is_plain_greedy();
    let stats = if plain_greedy {
        engine.generate_greedy_with(prompt, request.max_tokens, &mut on_token)
    } else {
        engine.generate_with(prompt, request.max_tokens, choose, &mut on_token)
    }?;
    if let Some(e) = failure.into_inner() {
        return Err(e);
    }
    let mut state = state.into_inner();
    let why = match stats.finish {
        Finish::MaxTokens => Some(StopTrigger::MaxTokens),
        Finish::ContextFull => Some(StopTrigger::ContextFull),
        Finish::Eos | Finish::Stopped => None,
    };
    let rest = state.finish(why)?;
    if !rest.is_empty() {
        let _ = on_event(TokenEvent {
            token: None,
            text: &rest,
        });
    }
    Ok(Completion {
        tokens: state.generated_tokens().to_vec(),
        text: state.text().to_string(),
        finish_reason: state.finish_reason(),
        trigger: state.trigger().cloned(),
        stats,
    })
}

//! Text generation as a user sees it: the engine's token loop with sampling, stop rules and a
//! streamed, UTF-8-safe text. This is the streaming API every front end (CLI, server, bindings)
//! builds on.

use crate::engine::{Engine, EngineError, Finish, GenerationStats};
use crate::sampler::{Sampler, SamplingError, SamplingParams};
use crate::stop::{FinishReason, StopRules, StopScan, StopTrigger};
use crate::tokenizer::{Tokenizer, TokenizerError};
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
    let mut sampler = Sampler::new(request.sampling.clone(), vocab)?;
    let rules = StopRules::new(engine.eos_token_ids().iter().copied())
        .with_stop_strings(request.stop.iter().cloned())
        .with_ignore_eos(request.ignore_eos);
    let mut matcher = rules.stop_matcher();
    // The decoder starts from the prompt's tail so that the first token's leading space is right.
    let context = &prompt[prompt.len().saturating_sub(8)..];
    let mut decoder = crate::tokenizer::IncrementalDecoder::with_context(
        tokenizer.clone(),
        request.skip_special_tokens,
        context,
    )?;

    // Tokens the penalties look at: the prompt and everything generated so far.
    // Shared by the sampling and the token callbacks, which the loop holds at once.
    let recent = std::cell::RefCell::new(Vec::with_capacity(prompt.len() + request.max_tokens));
    recent.borrow_mut().extend_from_slice(prompt);
    let failure: std::cell::RefCell<Option<GenerationError>> = std::cell::RefCell::new(None);
    let mut tokens = Vec::with_capacity(request.max_tokens);
    let mut text = String::new();
    let mut trigger = None;

    let stats = engine.generate_with(
        prompt,
        request.max_tokens,
        |logits| match sampler.sample(logits, &recent.borrow()) {
            Ok(t) => t,
            Err(e) => {
                // Ends the loop at the next callback; the token is never emitted.
                failure.borrow_mut().get_or_insert(e.into());
                0
            }
        },
        &mut |token| {
            if failure.borrow().is_some() {
                return ControlFlow::Break(());
            }
            tokens.push(token);
            recent.borrow_mut().push(token);
            if rules.is_eos(token) {
                trigger = Some(StopTrigger::EosToken(token));
                return ControlFlow::Break(());
            }
            let delta = match decoder.push(token) {
                Ok(d) => d,
                Err(e) => {
                    *failure.borrow_mut() = Some(e.into());
                    return ControlFlow::Break(());
                }
            };
            let (piece, stopped) = match matcher.push(&delta) {
                StopScan::Continue { text } => (text, None),
                StopScan::Stopped { text, stop_string } => (text, Some(stop_string)),
            };
            text.push_str(&piece);
            let flow = on_event(TokenEvent {
                token: Some(token),
                text: &piece,
            });
            if let Some(s) = stopped {
                trigger = Some(StopTrigger::StopString(s));
                return ControlFlow::Break(());
            }
            flow
        },
    )?;
    if let Some(e) = failure.into_inner() {
        return Err(e);
    }
    // Release what the decoder and the stop matcher still hold.
    if trigger.is_none() {
        let tail = decoder.finish()?;
        let mut rest = match matcher.push(&tail) {
            StopScan::Continue { text } => text,
            StopScan::Stopped { text, stop_string } => {
                trigger = Some(StopTrigger::StopString(stop_string));
                text
            }
        };
        if trigger.is_none() {
            rest.push_str(&matcher.finish());
        }
        if !rest.is_empty() {
            text.push_str(&rest);
            let _ = on_event(TokenEvent {
                token: None,
                text: &rest,
            });
        }
    }
    if trigger.is_none() {
        trigger = match stats.finish {
            Finish::MaxTokens => Some(StopTrigger::MaxTokens),
            Finish::ContextFull => Some(StopTrigger::ContextFull),
            Finish::Eos | Finish::Stopped => None,
        };
    }
    let finish_reason = trigger
        .as_ref()
        .map_or(FinishReason::Stop, StopTrigger::finish_reason);
    Ok(Completion {
        tokens,
        text,
        finish_reason,
        trigger,
        stats,
    })
}

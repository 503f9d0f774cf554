//! `POST /v1/completions`: a raw prompt (text or token ids) continued, whole or streamed.

use crate::chat::{ChunkMeta, resolve_sampling};
use crate::error::ApiError;
use crate::output::random_alphanumeric;
use crate::protocol::{
    CompletionRequest, TextChoice, TextCompletion, max_tokens, parse_sampled_body,
};
use crate::sse;
use crate::state::{AppState, Next, Sequence, unix_now};
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use std::sync::Arc;
use trellis_runtime::generation::GenerationRequest;
use trellis_runtime::stop::FinishReason;

/// OpenAI's default for `/v1/completions`.
const DEFAULT_MAX_TOKENS: usize = 16;

/// One prompt: text, or token ids used as they are.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

/// `prompt`: a string, a token-id list, or a list holding exactly one of those.
pub fn parse_prompt(prompt: &Value) -> Result<Prompt, ApiError> {
    let invalid = || {
        ApiError::invalid_param(
            "prompt",
            "`prompt` must be a string or a list of token ids.",
        )
    };
    let token = |v: &Value| v.as_u64().and_then(|t| u32::try_from(t).ok());
    match prompt {
        Value::String(s) => Ok(Prompt::Text(s.clone())),
        Value::Array(items) if items.is_empty() => {
            Err(ApiError::invalid_param("prompt", "`prompt` is empty."))
        }
        Value::Array(items) if items.iter().all(Value::is_number) => items
            .iter()
            .map(|v| token(v).ok_or_else(invalid))
            .collect::<Result<_, _>>()
            .map(Prompt::Tokens),
        Value::Array(items) if items.len() == 1 => match &items[0] {
            Value::String(_) | Value::Array(_) => parse_prompt(&items[0]),
            _ => Err(invalid()),
        },
        Value::Array(_) => Err(ApiError::unsupported(
            "prompt",
            "Only one prompt per request is supported; send the prompts as separate requests (they are batched).",
        )),
        _ => Err(invalid()),
    }
}

struct PreparedCompletion {
    prompt: Vec<u32>,
    generation: GenerationRequest,
    /// The prompt's text, sent before the completion with `echo`.
    echo: Option<String>,
    stream: bool,
    include_usage: bool,
}

pub async fn completions(
    State(app): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: CompletionRequest = parse_sampled_body(body, app.options.max_body_bytes)?;
    app.check_model(request.model.as_deref())?;
    let prepared = {
        let app = app.clone();
        tokio::task::spawn_blocking(move || prepare(&app, request))
            .await
            .map_err(|e| ApiError::internal(format!("Preparing the prompt failed: {e}")))??
    };
    let sequence = app.start(prepared.prompt, prepared.generation, "prompt")?;
    let meta = ChunkMeta {
        id: format!("cmpl-{}", random_alphanumeric(24)),
        created: unix_now(),
        model: app.model.name.clone(),
    };
    if prepared.stream {
        Ok(stream(
            sequence,
            meta,
            prepared.echo,
            prepared.include_usage,
        ))
    } else {
        complete(sequence, meta, prepared.echo).await
    }
}

fn prepare(app: &AppState, request: CompletionRequest) -> Result<PreparedCompletion, ApiError> {
    request.sampling.check_n()?;
    if request.best_of.is_some_and(|b| b > 1) {
        return Err(ApiError::unsupported(
            "best_of",
            "Only best_of=1 is supported.",
        ));
    }
    if request.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::unsupported(
            "suffix",
            "`suffix` (fill in the middle) is not supported.",
        ));
    }
    if request
        .logprobs
        .as_ref()
        .is_some_and(|l| !l.is_null() && l.as_u64() != Some(0))
    {
        return Err(ApiError::unsupported(
            "logprobs",
            "Log probabilities are not supported by this server.",
        ));
    }
    let tokenizer = &app.model.tokenizer;
    let skip_special_tokens = request.skip_special_tokens.unwrap_or(true);
    let (prompt, prompt_text) = match parse_prompt(&request.prompt)? {
        Prompt::Text(text) => {
            let ids = tokenizer.encode(&text, true).map_err(|e| {
                ApiError::invalid_param("prompt", format!("Tokenizing failed: {e}."))
            })?;
            (ids, text)
        }
        Prompt::Tokens(ids) => {
            let vocab = app.scheduler.info().vocab_size;
            if let Some(&id) = ids.iter().find(|&&t| t as usize >= vocab) {
                return Err(ApiError::invalid_param(
                    "prompt",
                    format!("Token id {id} is outside the vocabulary (0..{vocab})."),
                ));
            }
            let text = if request.echo == Some(true) {
                tokenizer
                    .decode(&ids, skip_special_tokens)
                    .map_err(|e| ApiError::invalid_param("prompt", format!("{e}.")))?
            } else {
                String::new()
            };
            (ids, text)
        }
    };
    if prompt.is_empty() {
        return Err(ApiError::invalid_param(
            "prompt",
            "The prompt is empty (no tokens).",
        ));
    }
    let room = app.ctx_size().saturating_sub(prompt.len());
    if room == 0 {
        return Err(app.context_error(prompt.len(), "prompt"));
    }
    let max_tokens = max_tokens(request.max_tokens, None)?
        .unwrap_or(DEFAULT_MAX_TOKENS)
        .min(room);
    let stream = request.stream.unwrap_or(false);
    Ok(PreparedCompletion {
        prompt,
        generation: GenerationRequest {
            sampling: resolve_sampling(app, &request.sampling)?,
            max_tokens,
            stop: request.sampling.stop_strings()?,
            ignore_eos: request.sampling.ignore_eos.unwrap_or(false),
            skip_special_tokens,
        },
        echo: (request.echo == Some(true)).then_some(prompt_text),
        stream,
        include_usage: stream
            && request
                .stream_options
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
    })
}

async fn complete(
    mut sequence: Sequence,
    meta: ChunkMeta,
    echo: Option<String>,
) -> Result<Response, ApiError> {
    let mut text = echo.unwrap_or_default();
    loop {
        match sequence.next().await {
            Next::Text(t) => text.push_str(&t),
            Next::Done {
                text: tail,
                finish_reason,
                usage,
            } => {
                text.push_str(&tail);
                return Ok(Json(TextCompletion {
                    id: meta.id,
                    object: "text_completion",
                    created: meta.created,
                    model: meta.model,
                    choices: vec![TextChoice {
                        text,
                        index: 0,
                        logprobs: None,
                        finish_reason: Some(finish_reason),
                    }],
                    usage: Some(Some(usage)),
                })
                .into_response());
            }
            Next::Failed(error) => return Err(error),
        }
    }
}

struct TextStream {
    sequence: Sequence,
    meta: ChunkMeta,
    /// Sent as the first chunk, then `None`.
    echo: Option<String>,
    include_usage: bool,
    finished: bool,
}

impl TextStream {
    fn chunk(&self, text: String, finish_reason: Option<FinishReason>) -> TextCompletion {
        TextCompletion {
            id: self.meta.id.clone(),
            object: "text_completion",
            created: self.meta.created,
            model: self.meta.model.clone(),
            choices: vec![TextChoice {
                text,
                index: 0,
                logprobs: None,
                finish_reason,
            }],
            usage: self.include_usage.then_some(None),
        }
    }

    async fn advance(&mut self) -> Vec<sse::Event> {
        if self.finished {
            return Vec::new();
        }
        if let Some(echo) = self.echo.take().filter(|e| !e.is_empty()) {
            return vec![sse::json_event(&self.chunk(echo, None))];
        }
        loop {
            match self.sequence.next().await {
                Next::Text(text) if text.is_empty() => {}
                Next::Text(text) => return vec![sse::json_event(&self.chunk(text, None))],
                Next::Done {
                    text,
                    finish_reason,
                    usage,
                } => {
                    self.finished = true;
                    let mut events = Vec::new();
                    if !text.is_empty() {
                        events.push(sse::json_event(&self.chunk(text, None)));
                    }
                    events.push(sse::json_event(
                        &self.chunk(String::new(), Some(finish_reason)),
                    ));
                    if self.include_usage {
                        events.push(sse::json_event(&TextCompletion {
                            choices: Vec::new(),
                            usage: Some(Some(usage)),
                            ..self.chunk(String::new(), None)
                        }));
                    }
                    events.push(sse::done_event());
                    return events;
                }
                Next::Failed(error) => {
                    self.finished = true;
                    return vec![sse::error_event(&error), sse::done_event()];
                }
            }
        }
    }
}

fn stream(
    sequence: Sequence,
    meta: ChunkMeta,
    echo: Option<String>,
    include_usage: bool,
) -> Response {
    let state = TextStream {
        sequence,
        meta,
        echo,
        include_usage,
        finished: false,
    };
    sse::response(state, |mut state| async move {
        let events = state.advance().await;
        (events, state)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn prompt_forms() {
        assert_eq!(
            parse_prompt(&json!("hi")).unwrap(),
            Prompt::Text("hi".into())
        );
        assert_eq!(
            parse_prompt(&json!(["hi"])).unwrap(),
            Prompt::Text("hi".into())
        );
        assert_eq!(
            parse_prompt(&json!([1, 2, 3])).unwrap(),
            Prompt::Tokens(vec![1, 2, 3])
        );
        assert_eq!(
            parse_prompt(&json!([[4, 5]])).unwrap(),
            Prompt::Tokens(vec![4, 5])
        );
        assert!(parse_prompt(&json!([])).is_err());
        assert!(parse_prompt(&json!(["a", "b"])).is_err());
        assert!(parse_prompt(&json!([1, -2])).is_err());
        assert!(parse_prompt(&json!([1.5])).is_err());
        assert!(parse_prompt(&json!({"text": "x"})).is_err());
        assert!(parse_prompt(&json!(null)).is_err());
    }
}

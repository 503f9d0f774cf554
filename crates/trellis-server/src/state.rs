//! What every handler shares: the model's tokenizer, template and defaults, the scheduler,
//! the server's options and its shutdown signals; and the bridge from a scheduler sequence
//! to an async handler.

use crate::error::ApiError;
use crate::metrics::HttpMetrics;
use crate::output::OutputFormat;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use trellis_runtime::chat_template::ChatTemplate;
use trellis_runtime::generation::GenerationRequest;
use trellis_runtime::sampler::SamplingOptions;
use trellis_runtime::scheduler::{SchedulerHandle, SequenceEvent, SubmitError, SubmitRequest};
use trellis_runtime::stop::{FinishReason, Usage};
use trellis_runtime::tokenizer::Tokenizer;

/// The served model, as requests see it.
pub struct ModelContext {
    /// The name clients use in `model` (and `/v1/models` lists).
    pub name: String,
    pub tokenizer: Tokenizer,
    /// `None` when the model ships no chat template (then only `/v1/completions` works).
    pub template: Option<ChatTemplate>,
    /// Sampling defaults (the model's `generation_config.json` under the server's flags);
    /// each request's own fields go over them.
    pub sampling_defaults: SamplingOptions,
    /// Most tokens a chat answer gets when the request does not say (default: the rest of
    /// the context).
    pub default_max_tokens: Option<usize>,
    pub format: OutputFormat,
}

/// Limits and behaviour of the server itself.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// When set, `/v1/*` requires `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Largest request body accepted (413 above).
    pub max_body_bytes: usize,
    /// After a shutdown signal, how long running requests may take to finish before they
    /// are cancelled.
    pub shutdown_grace: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            api_key: None,
            max_body_bytes: 10 * 1024 * 1024,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

pub struct AppState {
    pub model: ModelContext,
    pub scheduler: Arc<SchedulerHandle>,
    pub options: ServerOptions,
    pub http_metrics: HttpMetrics,
    /// Set when shutdown begins: no new connections or generations.
    pub draining: CancellationToken,
    /// Set when running requests must end now (grace period over, or a second signal).
    pub abort: CancellationToken,
    /// When the server started (Unix seconds), reported as the model's `created`.
    pub started: u64,
}

impl AppState {
    pub fn new(
        model: ModelContext,
        scheduler: SchedulerHandle,
        options: ServerOptions,
    ) -> Arc<AppState> {
        Arc::new(AppState {
            model,
            scheduler: Arc::new(scheduler),
            options,
            http_metrics: HttpMetrics::default(),
            draining: CancellationToken::new(),
            abort: CancellationToken::new(),
            started: unix_now(),
        })
    }

    /// Stop accepting work; running requests get the grace period to finish.
    pub fn begin_shutdown(&self) {
        self.draining.cancel();
    }

    /// End running requests now (they get an error and their sequences are cancelled).
    pub fn abort_requests(&self) {
        self.draining.cancel();
        self.abort.cancel();
    }

    /// 404 when the request names another model; no name means the served one.
    pub fn check_model(&self, requested: Option<&str>) -> Result<(), ApiError> {
        match requested {
            Some(name) if name != self.model.name => {
                Err(ApiError::model_not_found(name, &self.model.name))
            }
            _ => Ok(()),
        }
    }

    /// Per-sequence context length.
    pub fn ctx_size(&self) -> usize {
        self.scheduler.ctx_size()
    }

    /// The 400 for a prompt that leaves no room for an answer.
    pub fn context_error(&self, prompt_tokens: usize, param: &str) -> ApiError {
        ApiError::invalid_param(
            param,
            format!(
                "This model's maximum context length is {} tokens, but the prompt has {prompt_tokens} tokens (at least one token must be left for the completion).",
                self.ctx_size()
            ),
        )
        .with_code("context_length_exceeded")
    }

    /// Queue a generation; its events arrive through the returned [`Sequence`].
    pub fn start(
        &self,
        prompt: Vec<u32>,
        generation: GenerationRequest,
        param: &str,
    ) -> Result<Sequence, ApiError> {
        if self.draining.is_cancelled() {
            return Err(ApiError::unavailable("The server is shutting down."));
        }
        let (sender, events) = mpsc::unbounded_channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let prompt_len = prompt.len();
        self.scheduler
            .submit(SubmitRequest {
                prompt,
                generation,
                // Called on the scheduler thread; a closed receiver cancels the sequence.
                sink: Box::new(move |event| sender.send(event).is_ok()),
                cancel: cancel.clone(),
            })
            .map_err(|e| match e {
                SubmitError::QueueFull(n) => ApiError::queue_full(n),
                SubmitError::PromptTooLong { .. } => self.context_error(prompt_len, param),
                SubmitError::EmptyPrompt => {
                    ApiError::invalid_param(param, "The prompt is empty (no tokens).")
                }
                SubmitError::TokenOutOfRange { id, vocab } => ApiError::invalid_param(
                    param,
                    format!("Token id {id} is outside the vocabulary (0..{vocab})."),
                ),
                SubmitError::ShuttingDown => ApiError::unavailable("The server is shutting down."),
            })?;
        Ok(Sequence {
            events,
            cancel: CancelOnDrop(cancel),
            abort: self.abort.clone(),
        })
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Cancels the sequence when the handler or the response stream holding it is dropped — a
/// client that disconnects stops its generation at the scheduler's next step.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        // Harmless after the sequence ended: the scheduler no longer looks at it.
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A running generation, seen from a handler.
pub struct Sequence {
    events: mpsc::UnboundedReceiver<SequenceEvent>,
    cancel: CancelOnDrop,
    abort: CancellationToken,
}

/// What happened next in a generation.
#[derive(Debug)]
pub enum Next {
    /// More text (possibly empty).
    Text(String),
    /// The end; `text` is what was held back until then.
    Done {
        text: String,
        finish_reason: FinishReason,
        usage: Usage,
    },
    /// The generation failed or was cut short; nothing follows.
    Failed(ApiError),
}

impl Sequence {
    pub async fn next(&mut self) -> Next {
        tokio::select! {
            biased;
            _ = self.abort.cancelled() => {
                self.cancel.0.store(true, Ordering::SeqCst);
                Next::Failed(ApiError::unavailable(
                    "The server is shutting down; this request was cancelled.",
                ))
            }
            event = self.events.recv() => match event {
                Some(SequenceEvent::Token { text, .. }) => Next::Text(text),
                Some(SequenceEvent::Done { text, finish_reason, usage, .. }) => Next::Done {
                    text,
                    finish_reason,
                    usage,
                },
                Some(SequenceEvent::Failed(message)) => {
                    Next::Failed(ApiError::internal(format!("Generation failed: {message}")))
                }
                None => Next::Failed(ApiError::unavailable(
                    "The generation stopped: the engine is no longer running.",
                )),
            },
        }
    }
}

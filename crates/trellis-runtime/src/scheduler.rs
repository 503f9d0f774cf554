//! Continuous batching: many generations share one engine on its own thread. At every step
//! the scheduler decodes one token for each running sequence and adds one chunk of a waiting
//! prompt, in a single forward pass, so each weight is read once per step for the whole
//! batch. Sequences join and leave at step boundaries; the KV pool is shared in blocks.
//!
//! Front ends talk to it through a [`SchedulerHandle`]: `submit` a prompt with its generation
//! request and a sink that receives the stream; the sink returning `false` (its receiver is
//! gone) or the request's cancel flag cancels the sequence at the next step.

use crate::engine::{BLOCK_SIZE, Engine, EngineError};
use crate::generation::{GenerationError, GenerationRequest, SequenceState};
use crate::stop::{FinishReason, StopTrigger, Usage};
use crate::tokenizer::Tokenizer;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use trellis_backend::{Backend, Batch};
use trellis_models::ModelInfo;

/// What a sequence's sink receives.
#[derive(Clone, Debug)]
pub enum SequenceEvent {
    /// A generated token and the text it completed (possibly empty).
    Token { token: u32, text: String },
    /// The sequence ended normally; `text` is what was held back until the end.
    Done {
        text: String,
        finish_reason: FinishReason,
        trigger: Option<StopTrigger>,
        usage: Usage,
    },
    /// The sequence failed; nothing more follows.
    Failed(String),
}

/// Receives a sequence's events on the scheduler thread; returns `false` when nobody listens
/// any more (the sequence is then cancelled).
pub type EventSink = Box<dyn FnMut(SequenceEvent) -> bool + Send>;

/// One generation to run.
pub struct SubmitRequest {
    pub prompt: Vec<u32>,
    pub generation: GenerationRequest,
    pub sink: EventSink,
    /// Set to cancel the sequence (e.g. when the client disconnects).
    pub cancel: Arc<AtomicBool>,
}

/// Why a request was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the queue is full ({0} requests waiting); try again later")]
    QueueFull(usize),
    #[error(
        "the prompt has {prompt} tokens but the context holds {ctx_size} (prompt plus at least one generated token)"
    )]
    PromptTooLong { prompt: usize, ctx_size: usize },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("token id {id} is outside the vocabulary (0..{vocab})")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// Sizes of the scheduler.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Requests that may wait for a place in the batch (submitted, not yet running); more
    /// are refused with [`SubmitError::QueueFull`].
    pub max_queue: usize,
}

/// A latency histogram with fixed bucket bounds (seconds), for Prometheus.
pub struct Histogram {
    pub bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, seconds: f64) {
        let bucket = self
            .bounds
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(self.bounds.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Cumulative counts per bound (the last is +Inf), the sum in seconds and the count.
    pub fn snapshot(&self) -> (Vec<u64>, f64, u64) {
        let mut running = 0;
        let cumulative = self
            .counts
            .iter()
            .map(|c| {
                running += c.load(Ordering::Relaxed);
                running
            })
            .collect();
        (
            cumulative,
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
            self.count.load(Ordering::Relaxed),
        )
    }
}

const TTFT_BOUNDS: &[f64] = &[0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
const ITL_BOUNDS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

/// Counters the scheduler keeps up to date (read by `/metrics`).
pub struct SchedulerMetrics {
    pub requests_total: AtomicU64,
    pub requests_failed: AtomicU64,
    pub requests_cancelled: AtomicU64,
    pub prompt_tokens_total: AtomicU64,
    pub generated_tokens_total: AtomicU64,
    pub queue_depth: AtomicU64,
    pub running: AtomicU64,
    pub last_batch_size: AtomicU64,
    pub steps_total: AtomicU64,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
}

impl SchedulerMetrics {
    fn new() -> SchedulerMetrics {
        SchedulerMetrics {
            requests_total: AtomicU64::new(0),
            requests_failed: AtomicU64::new(0),
            requests_cancelled: AtomicU64::new(0),
            prompt_tokens_total: AtomicU64::new(0),
            generated_tokens_total: AtomicU64::new(0),
            queue_depth: AtomicU64::new(0),
            running: AtomicU64::new(0),
            last_batch_size: AtomicU64::new(0),
            steps_total: AtomicU64::new(0),
            time_to_first_token: Histogram::new(TTFT_BOUNDS),
            inter_token_latency: Histogram::new(ITL_BOUNDS),
        }
    }
}

enum Command {
    Submit(Box<SubmitRequest>, Instant),
    Shutdown,
}

/// The front end's side of a running scheduler.
pub struct SchedulerHandle {
    commands: SyncSender<Command>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    metrics: Arc<SchedulerMetrics>,
    info: ModelInfo,
    ctx_size: usize,
    max_queue: usize,
    shutting_down: AtomicBool,
}

impl SchedulerHandle {
    pub fn metrics(&self) -> &SchedulerMetrics {
        &self.metrics
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Per-sequence context length (prompt plus generated tokens).
    pub fn ctx_size(&self) -> usize {
        self.ctx_size
    }

    /// Queue a generation. Checked here so that a bad request fails at once.
    pub fn submit(&self, request: SubmitRequest) -> Result<(), SubmitError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(SubmitError::ShuttingDown);
        }
        if request.prompt.is_empty() {
            return Err(SubmitError::EmptyPrompt);
        }
        if request.prompt.len() >= self.ctx_size {
            return Err(SubmitError::PromptTooLong {
                prompt: request.prompt.len(),
                ctx_size: self.ctx_size,
            });
        }
        let vocab = self.info.vocab_size;
        if let Some(&id) = request.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(SubmitError::TokenOutOfRange { id, vocab });
        }
        // The thread moves submitted requests out of the channel into its own waiting list
        // at every step, so the channel's bound alone would not limit the queue: reserve a
        // place in the count of waiting requests first (atomically, against racing submits).
        let max_queue = self.max_queue.max(1) as u64;
        if self
            .metrics
            .queue_depth
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |d| {
                (d < max_queue).then_some(d + 1)
            })
            .is_err()
        {
            return Err(SubmitError::QueueFull(self.max_queue));
        }
        match self
            .commands
            .try_send(Command::Submit(Box::new(request), Instant::now()))
        {
            Ok(()) => {
                self.metrics.requests_total.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.metrics.queue_depth.fetch_sub(1, Ordering::SeqCst);
                match e {
                    TrySendError::Full(_) => Err(SubmitError::QueueFull(self.max_queue)),
                    TrySendError::Disconnected(_) => Err(SubmitError::ShuttingDown),
                }
            }
        }
    }

    /// Whether the scheduler thread is alive (false after a shutdown or if it died).
    pub fn is_running(&self) -> bool {
        !self.shutting_down.load(Ordering::SeqCst)
            && self
                .thread
                .lock()
                .expect("not poisoned")
                .as_ref()
                .is_some_and(|t| !t.is_finished())
    }

    /// Stop taking requests, let running and queued ones finish, and wait for the thread.
    pub fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        // A full queue still ends: the scheduler drains it, then sees the command.
        let _ = self.commands.send(Command::Shutdown);
        if let Some(t) = self.thread.lock().expect("not poisoned").take() {
            let _ = t.join();
        }
    }
}

impl Drop for SchedulerHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Start a scheduler thread over the engine `build` makes (built on that thread, so the
/// engine need not be `Send`). Returns once the engine is loaded, or with its load error.
pub fn spawn<B, F>(
    build: F,
    tokenizer: Tokenizer,
    config: SchedulerConfig,
) -> Result<SchedulerHandle, EngineError>
where
    B: Backend + 'static,
    F: FnOnce() -> Result<Engine<B>, EngineError> + Send + 'static,
{
    let (commands, receiver) = std::sync::mpsc::sync_channel(config.max_queue.max(1));
    let metrics = Arc::new(SchedulerMetrics::new());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread_metrics = metrics.clone();
    let thread = std::thread::Builder::new()
        .name("trellis-scheduler".into())
        .spawn(move || {
            let engine = match build() {
                Ok(e) => e,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok((engine.info().clone(), engine.ctx_size())));
            Scheduler::new(engine, tokenizer, thread_metrics).run(receiver);
        })
        .map_err(|e| EngineError::Invalid(format!("cannot start the scheduler thread: {e}")))?;
    match ready_rx.recv() {
        Ok(Ok((info, ctx_size))) => Ok(SchedulerHandle {
            commands,
            thread: Mutex::new(Some(thread)),
            metrics,
            info,
            ctx_size,
            max_queue: config.max_queue,
            shutting_down: AtomicBool::new(false),
        }),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(EngineError::Invalid(
            "the scheduler thread ended while loading".into(),
        )),
    }
}

/// A sequence in the batch.
struct Running {
    request: Box<SubmitRequest>,
    state: SequenceState,
    blocks: Vec<u32>,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    /// Tokens in the cache (prompt and generated).
    cached: usize,
    /// The last sampled token, to be decoded (put in the cache) by the next step.
    pending: Option<u32>,
    submitted: Instant,
    last_token: Option<Instant>,
}

impl Running {
    fn prefilling(&self) -> bool {
        self.prefilled < self.request.prompt.len()
    }
}

struct Scheduler<B: Backend> {
    engine: Engine<B>,
    tokenizer: Tokenizer,
    metrics: Arc<SchedulerMetrics>,
    free_blocks: Vec<u32>,
    waiting: VecDeque<(Box<SubmitRequest>, Instant)>,
    running: Vec<Running>,
    // Step buffers, reused.
    tokens: Vec<u32>,
    positions: Vec<u32>,
    sequence: Vec<u32>,
    tables: Vec<u32>,
    logit_rows: Vec<u32>,
    /// For each logit row, the index of its sequence in `running`.
    logit_owner: Vec<usize>,
    /// Sequences that ended in this step.
    ended: Vec<(usize, End)>,
    /// Why each sequence that ended with [`End::Failed`] in this step failed.
    failures: Vec<(usize, String)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    Cancelled,
    Stopped,
    ContextFull,
    /// Sampling or detokenizing this sequence's token failed; the message is in `failures`.
    Failed,
}

impl<B: Backend> Scheduler<B> {
    fn new(engine: Engine<B>, tokenizer: Tokenizer, metrics: Arc<SchedulerMetrics>) -> Self {
        let blocks = engine.num_blocks() as u32;
        let rows = engine.max_rows();
        Scheduler {
            free_blocks: (0..blocks).rev().collect(),
            tokens: Vec::with_capacity(rows),
            positions: Vec::with_capacity(rows),
            sequence: Vec::with_capacity(rows),
            tables: Vec::with_capacity(blocks as usize),
            logit_rows: Vec::with_capacity(rows),
            logit_owner: Vec::with_capacity(rows),
            ended: Vec::with_capacity(rows),
            failures: Vec::new(),
            engine,
            tokenizer,
            metrics,
            waiting: VecDeque::new(),
            running: Vec::new(),
        }
    }

    fn run(mut self, commands: Receiver<Command>) {
        let mut shutting_down = false;
        loop {
            // Wait for work when idle; otherwise take what arrived without waiting.
            if self.running.is_empty() && self.waiting.is_empty() {
                if shutting_down {
                    return;
                }
                match commands.recv() {
                    Ok(c) => shutting_down |= self.take(c),
                    Err(_) => return,
                }
            }
            while let Ok(c) = commands.try_recv() {
                shutting_down |= self.take(c);
            }
            self.drop_cancelled();
            self.admit();
            if self.running.is_empty() {
                continue;
            }
            if let Err(e) = self.step() {
                // A failed step leaves the cache of every running sequence undefined.
                let message = e.to_string();
                for mut r in self.running.drain(..) {
                    (r.request.sink)(SequenceEvent::Failed(message.clone()));
                    self.metrics.requests_failed.fetch_add(1, Ordering::Relaxed);
                    self.free_blocks.append(&mut r.blocks);
                }
                self.metrics.running.store(0, Ordering::Relaxed);
            }
        }
    }

    /// Returns true for a shutdown command.
    fn take(&mut self, command: Command) -> bool {
        match command {
            Command::Submit(request, at) => {
                self.waiting.push_back((request, at));
                false
            }
            Command::Shutdown => true,
        }
    }

    fn blocks_needed(&self, request: &SubmitRequest) -> usize {
        let tokens =
            (request.prompt.len() + request.generation.max_tokens).min(self.engine.ctx_size());
        tokens.div_ceil(BLOCK_SIZE)
    }

    /// Move waiting requests into the batch while places and blocks last (in arrival order,
    /// so a large request is not overtaken forever).
    fn admit(&mut self) {
        while self.running.len() < self.engine.max_batch() {
            let Some((request, _)) = self.waiting.front() else {
                break;
            };
            let needed = self.blocks_needed(request);
            if needed > self.free_blocks.len() {
                break;
            }
            let (request, submitted) = self.waiting.pop_front().expect("front exists");
            self.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
            if request.cancel.load(Ordering::Relaxed) {
                self.metrics
                    .requests_cancelled
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let state = SequenceState::new(
                &self.tokenizer,
                self.engine.eos_token_ids(),
                self.engine.info().vocab_size,
                &request.prompt,
                &request.generation,
            );
            let mut request = request;
            match state {
                Ok(state) => {
                    let at = self.free_blocks.len() - needed;
                    let blocks = self.free_blocks.split_off(at);
                    self.metrics
                        .prompt_tokens_total
                        .fetch_add(request.prompt.len() as u64, Ordering::Relaxed);
                    self.running.push(Running {
                        request,
                        state,
                        blocks,
                        prefilled: 0,
                        cached: 0,
                        pending: None,
                        submitted,
                        last_token: None,
                    });
                }
                Err(e) => {
                    (request.sink)(SequenceEvent::Failed(e.to_string()));
                    self.metrics.requests_failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        self.metrics
            .running
            .store(self.running.len() as u64, Ordering::Relaxed);
    }

    fn drop_cancelled(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].request.cancel.load(Ordering::Relaxed) {
                let r = self.running.swap_remove(i);
                self.release(r, true);
            } else {
                i += 1;
            }
        }
        let before = self.waiting.len();
        self.waiting
            .retain(|(r, _)| !r.cancel.load(Ordering::Relaxed));
        let dropped = (before - self.waiting.len()) as u64;
        self.metrics
            .queue_depth
            .fetch_sub(dropped, Ordering::Relaxed);
        self.metrics
            .requests_cancelled
            .fetch_add(dropped, Ordering::Relaxed);
    }

    fn release(&mut self, mut r: Running, cancelled: bool) {
        if cancelled {
            self.metrics
                .requests_cancelled
                .fetch_add(1, Ordering::Relaxed);
        }
        self.free_blocks.append(&mut r.blocks);
        self.metrics
            .running
            .store(self.running.len() as u64, Ordering::Relaxed);
    }

    /// One forward pass: a decode row for every sequence with a pending token, plus one chunk
    /// of the first sequence still prefilling.
    fn step(&mut self) -> Result<(), GenerationError> {
        self.tokens.clear();
        self.positions.clear();
        self.sequence.clear();
        self.tables.clear();
        self.logit_rows.clear();
        self.logit_owner.clear();
        let width = self
            .running
            .iter()
            .map(|r| r.blocks.len())
            .max()
            .unwrap_or(0);
        let mut slot = 0u32;
        for (i, r) in self.running.iter().enumerate() {
            let Some(token) = r.pending else { continue };
            self.logit_rows.push(self.tokens.len() as u32);
            self.logit_owner.push(i);
            self.tokens.push(token);
            self.positions.push(r.cached as u32);
            self.sequence.push(slot);
            push_table(&mut self.tables, &r.blocks, width);
            slot += 1;
        }
        let budget = self.engine.max_rows() - self.tokens.len();
        if let Some((i, r)) = self
            .running
            .iter()
            .enumerate()
            .find(|(_, r)| r.prefilling())
        {
            let take = (r.request.prompt.len() - r.prefilled).min(budget);
            if take > 0 {
                let start = self.tokens.len();
                self.tokens
                    .extend_from_slice(&r.request.prompt[r.prefilled..r.prefilled + take]);
                self.positions
                    .extend((r.prefilled..r.prefilled + take).map(|p| p as u32));
                self.sequence.extend(std::iter::repeat_n(slot, take));
                push_table(&mut self.tables, &r.blocks, width);
                if r.prefilled + take == r.request.prompt.len() {
                    self.logit_rows.push((start + take - 1) as u32);
                    self.logit_owner.push(i);
                }
            }
        }
        if self.tokens.is_empty() {
            return Ok(());
        }
        let vocab = self.engine.info().vocab_size;
        let ctx_size = self.engine.ctx_size();
        let batch = Batch {
            positions: &self.positions,
            sequence: &self.sequence,
            block_tables: &self.tables,
            blocks_per_sequence: width,
            block_size: BLOCK_SIZE,
        };
        let logits = self
            .engine
            .forward_batch(&self.tokens, &batch, &self.logit_rows)?;
        self.metrics.steps_total.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .last_batch_size
            .store(self.logit_rows.len() as u64, Ordering::Relaxed);

        // Bookkeeping of what this step put in the cache.
        for r in self.running.iter_mut() {
            if r.pending.take().is_some() {
                r.cached += 1;
            }
        }
        if let Some(r) = self.running.iter_mut().find(|r| r.prefilling()) {
            let take = (r.request.prompt.len() - r.prefilled).min(budget);
            r.prefilled += take;
            r.cached += take;
        }

        // Sample each row and hand the token to its sequence. A sequence whose sampling or
        // detokenizing fails ends alone: the others' caches are intact.
        self.ended.clear();
        self.failures.clear();
        for (row, &owner) in self.logit_owner.iter().enumerate() {
            let r = &mut self.running[owner];
            let chosen = r
                .state
                .choose(&logits[row * vocab..(row + 1) * vocab])
                .and_then(|token| Ok((token, r.state.accept(token)?)));
            let (token, accepted) = match chosen {
                Ok(chosen) => chosen,
                Err(e) => {
                    self.failures.push((owner, e.to_string()));
                    self.ended.push((owner, End::Failed));
                    continue;
                }
            };
            let now = Instant::now();
            match r.last_token {
                None => self
                    .metrics
                    .time_to_first_token
                    .observe(now.duration_since(r.submitted).as_secs_f64()),
                Some(t) => self
                    .metrics
                    .inter_token_latency
                    .observe(now.duration_since(t).as_secs_f64()),
            }
            r.last_token = Some(now);
            self.metrics
                .generated_tokens_total
                .fetch_add(1, Ordering::Relaxed);
            let listening = (r.request.sink)(SequenceEvent::Token {
                token,
                text: accepted.text,
            });
            if !listening {
                self.ended.push((owner, End::Cancelled));
            } else if accepted.stop.is_some() {
                self.ended.push((owner, End::Stopped));
            } else if r.cached >= ctx_size {
                // No slot left for this token: it was shown but cannot be decoded.
                self.ended.push((owner, End::ContextFull));
            } else {
                r.pending = Some(token);
            }
        }
        // Remove from the highest index down so that swap_remove keeps the others' indices.
        self.ended
            .sort_unstable_by_key(|&(i, _)| std::cmp::Reverse(i));
        for k in 0..self.ended.len() {
            let (i, end) = self.ended[k];
            let mut r = self.running.swap_remove(i);
            let cancelled = end == End::Cancelled;
            let failure = match end {
                End::Cancelled => None,
                End::Failed => Some(
                    self.failures
                        .iter()
                        .find(|(owner, _)| *owner == i)
                        .map_or_else(|| "generation failed".to_string(), |(_, m)| m.clone()),
                ),
                End::Stopped | End::ContextFull => {
                    let why = (end == End::ContextFull).then_some(StopTrigger::ContextFull);
                    match r.state.finish(why) {
                        Ok(tail) => {
                            let usage = Usage::new(r.request.prompt.len(), r.state.generated());
                            (r.request.sink)(SequenceEvent::Done {
                                text: tail,
                                finish_reason: r.state.finish_reason(),
                                trigger: r.state.trigger().cloned(),
                                usage,
                            });
                            None
                        }
                        Err(e) => Some(e.to_string()),
                    }
                }
            };
            if let Some(message) = failure {
                (r.request.sink)(SequenceEvent::Failed(message));
                self.metrics.requests_failed.fetch_add(1, Ordering::Relaxed);
            }
            self.release(r, cancelled);
        }
        Ok(())
    }
}

/// Append one sequence's block table, padded to `width` entries.
fn push_table(tables: &mut Vec<u32>, blocks: &[u32], width: usize) {
    tables.extend_from_slice(blocks);
    tables.extend(std::iter::repeat_n(0, width - blocks.len()));
}

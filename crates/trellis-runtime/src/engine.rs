//! The engine: a loaded model, its KV cache and one running sequence, with prefill, decode
//! and greedy generation. Every buffer a decode step touches is allocated here or in the model
//! at load; `step` allocates nothing.

use std::ops::ControlFlow;
use std::time::Instant;
use trellis_backend::{Backend, Batch, KvDtype, StepKey};
use trellis_format::ModelDir;
use trellis_models::{CausalLm, LoadOptions, ModelInfo, Progress};

/// Tokens per KV cache block.
pub const BLOCK_SIZE: usize = 16;
/// Context used when the config allows more and the caller does not ask: large enough for
/// real conversations, small enough that the cache of a big model fits beside its weights.
pub const DEFAULT_MAX_CONTEXT: usize = 32_768;
/// Tokens per prefill forward pass unless asked otherwise, as llama.cpp's micro-batch: larger
/// chunks share each decoded weight tile and each MLA key expansion among more tokens.
pub const DEFAULT_PREFILL_CHUNK: usize = 512;
/// Share of the backend's free memory (after the weights are loaded) that a default-sized KV
/// cache may take, leaving room for activations, the OS and other programs.
const DEFAULT_CACHE_MEMORY_SHARE: f64 = 0.5;
/// Smallest context a default-sized cache is cut to for lack of memory.
const MIN_DEFAULT_CONTEXT: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] trellis_models::ModelError),
    #[error(transparent)]
    Backend(#[from] trellis_backend::BackendError),
    #[error(transparent)]
    Format(#[from] trellis_format::FormatError),
    #[error(
        "the prompt needs {needed} tokens of context but only {available} of {ctx_size} are free (raise --ctx-size, or shorten the prompt)"
    )]
    ContextFull {
        needed: usize,
        available: usize,
        ctx_size: usize,
    },
    #[error("token id {id} is outside the vocabulary (0..{vocab})")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("{0}")]
    Invalid(String),
    #[error("the model produced no finite logit to choose a token from")]
    NoFiniteLogits,
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// Sizes chosen at load.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Context length in tokens; `None` = the model's maximum, capped at [`DEFAULT_MAX_CONTEXT`].
    pub ctx_size: Option<usize>,
    /// Tokens per prefill forward pass.
    pub prefill_chunk: usize,
    /// Compute logits for every prompt position (for `trellis logits`), not just the last.
    pub all_logits: bool,
    pub kv_dtype: KvDtype,
    /// Most sequences decoded together (the server's batch); the KV pool holds `ctx_size`
    /// tokens for each.
    pub max_batch: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            ctx_size: None,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            all_logits: false,
            kv_dtype: KvDtype::F16,
            max_batch: 1,
        }
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-sequence token was produced (it is not part of the output).
    Eos,
    /// `max_tokens` reached.
    MaxTokens,
    /// The context is full.
    ContextFull,
    /// The caller's callback asked to stop.
    Stopped,
}

/// Timings and counts of one generation.
#[derive(Clone, Debug)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    /// Prompt tokens actually computed (the rest were reused from the cache).
    pub prefilled_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    /// From the start of the call to the first generated token.
    pub time_to_first_token: f64,
    pub finish: Finish,
}

impl GenerationStats {
    /// OpenAI-style token counts.
    pub fn usage(&self) -> crate::stop::Usage {
        crate::stop::Usage::new(self.prompt_tokens, self.generated_tokens)
    }

    pub fn prefill_tok_s(&self) -> f64 {
        self.prefilled_tokens as f64 / self.prefill_seconds.max(1e-9)
    }

    /// Decode speed over the tokens after the first (whose logits came from the prefill).
    pub fn decode_tok_s(&self) -> f64 {
        self.generated_tokens.saturating_sub(1) as f64 / self.decode_seconds.max(1e-9)
    }
}

pub struct Engine<B: Backend> {
    backend: B,
    model: Box<dyn CausalLm<B>>,
    cache: B::KvCache,
    ctx_size: usize,
    kv_bytes_per_token: usize,
    prefill_chunk: usize,
    all_logits: bool,
    /// Blocks of the one running sequence of the single-sequence API: the first
    /// `ctx_size` tokens' worth of the pool, in order.
    block_table: Vec<u32>,
    max_rows: usize,
    max_batch: usize,
    num_blocks: usize,
    /// Tokens whose keys and values are in the cache, in order.
    history: Vec<u32>,
    positions: Vec<u32>,
    sequence: Vec<u32>,
    logit_rows: Vec<u32>,
    logits: Vec<f32>,
    eos: Vec<u32>,
}

impl<B: Backend + 'static> Engine<B> {
    /// Load the model in `dir` onto `backend`.
    pub fn load(
        dir: &ModelDir,
        backend: B,
        options: &EngineOptions,
        progress: Progress<'_>,
    ) -> Result<Engine<B>> {
        let common = dir.config.common();
        let requested = match options.ctx_size {
            Some(0) => return Err(EngineError::Invalid("--ctx-size must be at least 1".into())),
            Some(n) if n > common.max_position_embeddings => {
                return Err(EngineError::Invalid(format!(
                    "--ctx-size {n} exceeds the model's maximum context of {} tokens",
                    common.max_position_embeddings
                )));
            }
            other => other,
        };
        let chunk = options.prefill_chunk.clamp(
            1,
            requested
                .unwrap_or(usize::MAX)
                .min(common.max_position_embeddings)
                .max(1),
        );
        let max_batch = options.max_batch.max(1);
        // A step holds one prefill chunk beside the decode rows of the other sequences.
        let max_rows = chunk + max_batch - 1;
        let load = LoadOptions {
            max_rows,
            max_logit_rows: if options.all_logits {
                max_rows
            } else {
                max_batch
            },
        };
        let model = trellis_models::load(dir, &backend, &load, progress)?;
        let ctx_size = match requested {
            Some(n) => n,
            None => {
                // The config's maximum, capped, and cut further to what free memory holds.
                let per_token = model.kv_layout(1, 1, options.kv_dtype).bytes().max(1) as u64;
                let affordable = backend.free_memory().map_or(usize::MAX, |free| {
                    ((free as f64 * DEFAULT_CACHE_MEMORY_SHARE) as u64 / per_token) as usize
                        / max_batch
                });
                common
                    .max_position_embeddings
                    .min(DEFAULT_MAX_CONTEXT)
                    .min(affordable.max(MIN_DEFAULT_CONTEXT))
            }
        };
        let layout = model.kv_layout(ctx_size * max_batch, BLOCK_SIZE, options.kv_dtype);
        let cache = backend.alloc_kv_cache(&layout)?;
        let mut eos = dir.eos_token_ids();
        eos.sort_unstable();
        eos.dedup();
        let vocab = model.info().vocab_size;
        Ok(Engine {
            backend,
            model,
            cache,
            ctx_size,
            kv_bytes_per_token: layout.layers * layout.values_per_token * layout.dtype.size(),
            prefill_chunk: chunk,
            all_logits: options.all_logits,
            block_table: (0..ctx_size.div_ceil(BLOCK_SIZE) as u32).collect(),
            history: Vec::with_capacity(ctx_size),
            max_rows,
            max_batch,
            num_blocks: layout.num_blocks,
            positions: Vec::with_capacity(chunk),
            sequence: vec![0; chunk],
            logit_rows: Vec::with_capacity(chunk),
            logits: vec![0.0; vocab * load.max_logit_rows],
            eos,
        })
    }
}

impl<B: Backend> Engine<B> {
    pub fn info(&self) -> &ModelInfo {
        self.model.info()
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn ctx_size(&self) -> usize {
        self.ctx_size
    }

    /// KV-cache bytes one token occupies over all layers (read once per decoded token).
    pub fn kv_bytes_per_token(&self) -> usize {
        self.kv_bytes_per_token
    }

    /// Blocks of [`BLOCK_SIZE`] tokens in the KV pool.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Most token rows one forward pass takes.
    pub fn max_rows(&self) -> usize {
        self.max_rows
    }

    /// Most sequences decoded together.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// One forward pass over tokens of several sequences placed by `batch` (block tables
    /// owned by the caller, e.g. a scheduler with its own block allocator), returning the
    /// logits of `logit_rows`, `[logit_rows.len(), vocab]`. The single-sequence methods and
    /// this one must not be mixed on one engine: they would share blocks.
    pub fn forward_batch(
        &mut self,
        tokens: &[u32],
        batch: &Batch<'_>,
        logit_rows: &[u32],
    ) -> Result<&[f32]> {
        self.check_tokens(tokens)?;
        if tokens.len() > self.max_rows || logit_rows.len() > self.max_batch.max(1) {
            return Err(EngineError::Invalid(format!(
                "a step of {} rows with {} logit rows exceeds the engine's {} rows / {} sequences",
                tokens.len(),
                logit_rows.len(),
                self.max_rows,
                self.max_batch
            )));
        }
        let key = StepKey {
            tokens,
            batch,
            logit_rows,
        };
        let (model, cache, backend) = (&mut self.model, &mut self.cache, &self.backend);
        backend.run_step(&key, &mut || {
            model.forward(backend, tokens, batch, cache, logit_rows, None)
        })?;
        let len = logit_rows.len() * self.info().vocab_size;
        self.model
            .read_logits(&self.backend, &mut self.logits[..len]);
        Ok(&self.logits[..len])
    }

    /// End-of-sequence token ids (from config.json and generation_config.json).
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos
    }

    /// Tokens currently in the cache.
    pub fn history(&self) -> &[u32] {
        &self.history
    }

    /// Forget the running sequence (the cache is overwritten from position 0).
    pub fn reset(&mut self) {
        self.history.clear();
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        let vocab = self.info().vocab_size;
        match tokens.iter().find(|&&t| t as usize >= vocab) {
            Some(&id) => Err(EngineError::TokenOutOfRange { id, vocab }),
            None => Ok(()),
        }
    }

    /// Run `tokens` through the model after the current history, one chunk at a time.
    /// With `all_logits`, `on_logits` receives each chunk's logits (`[chunk_len, vocab]`);
    /// otherwise it receives only the last token's logits, once.
    pub fn extend(&mut self, tokens: &[u32], on_logits: impl FnMut(&[f32])) -> Result<()> {
        self.forward_chunks(tokens, true, on_logits)
    }

    /// [`Engine::extend`]; with `read_logits` false the logits stay where the backend computed
    /// them (for [`Engine::step_greedy`]) and `on_logits` is not called.
    fn forward_chunks(
        &mut self,
        tokens: &[u32],
        read_logits: bool,
        mut on_logits: impl FnMut(&[f32]),
    ) -> Result<()> {
        self.check_tokens(tokens)?;
        let available = self.ctx_size - self.history.len();
        if tokens.len() > available {
            return Err(EngineError::ContextFull {
                needed: self.history.len() + tokens.len(),
                available,
                ctx_size: self.ctx_size,
            });
        }
        let vocab = self.info().vocab_size;
        let chunks = tokens.len().div_ceil(self.prefill_chunk);
        for (c, chunk) in tokens.chunks(self.prefill_chunk).enumerate() {
            let start = self.history.len() as u32;
            self.positions.clear();
            self.positions.extend(start..start + chunk.len() as u32);
            self.logit_rows.clear();
            if self.all_logits {
                self.logit_rows.extend(0..chunk.len() as u32);
            } else if c + 1 == chunks {
                self.logit_rows.push(chunk.len() as u32 - 1);
            }
            let batch = Batch {
                positions: &self.positions,
                sequence: &self.sequence[..chunk.len()],
                block_tables: &self.block_table,
                blocks_per_sequence: self.block_table.len(),
                block_size: BLOCK_SIZE,
            };
            // One step of the backend (a device backend may replay a recording of it).
            let key = StepKey {
                tokens: chunk,
                batch: &batch,
                logit_rows: &self.logit_rows,
            };
            let (model, cache, backend) = (&mut self.model, &mut self.cache, &self.backend);
            backend.run_step(&key, &mut || {
                model.forward(backend, chunk, &batch, cache, key.logit_rows, None)
            })?;
            self.history.extend_from_slice(chunk);
            if read_logits && !self.logit_rows.is_empty() {
                let len = self.logit_rows.len() * vocab;
                self.model
                    .read_logits(&self.backend, &mut self.logits[..len]);
                on_logits(&self.logits[..len]);
            }
        }
        Ok(())
    }

    /// Append `tokens` to the sequence; returns the logits after the last one.
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<&[f32]> {
        if tokens.is_empty() {
            return Err(EngineError::Invalid(
                "cannot prefill an empty prompt".into(),
            ));
        }
        self.extend(tokens, |_| {})?;
        let vocab = self.info().vocab_size;
        let rows = if self.all_logits {
            (tokens.len() - 1) % self.prefill_chunk + 1
        } else {
            1
        };
        Ok(&self.logits[(rows - 1) * vocab..rows * vocab])
    }

    /// Logits at every position of `tokens`, run from an empty cache: `[len, vocab]`.
    /// Needs an engine loaded with `all_logits`.
    pub fn logits_all(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        if !self.all_logits {
            return Err(EngineError::Invalid(
                "engine was loaded without all_logits".into(),
            ));
        }
        self.reset();
        let mut out = Vec::with_capacity(tokens.len() * self.info().vocab_size);
        self.extend(tokens, |chunk| out.extend_from_slice(chunk))?;
        Ok(out)
    }

    /// Decode one token after the history; returns its logits. Allocates nothing.
    pub fn step(&mut self, token: u32) -> Result<&[f32]> {
        self.extend(std::slice::from_ref(&token), |_| {})?;
        let vocab = self.info().vocab_size;
        Ok(&self.logits[..vocab])
    }

    /// Append one token and return the greedy choice after it ([`argmax`] of its logits),
    /// chosen by the backend where the logits are: a GPU copies back one id instead of the
    /// vocabulary's logits and the host does not scan them (≈ 0.25 ms a token on the H200).
    pub fn step_greedy(&mut self, token: u32) -> Result<u32> {
        self.forward_chunks(std::slice::from_ref(&token), false, |_| {})?;
        let mut id = [NO_CHOICE];
        if self.model.greedy_tokens(&self.backend, &mut id) {
            return (id[0] != NO_CHOICE)
                .then_some(id[0])
                .ok_or(EngineError::NoFiniteLogits);
        }
        let vocab = self.info().vocab_size;
        self.model
            .read_logits(&self.backend, &mut self.logits[..vocab]);
        argmax(&self.logits[..vocab]).ok_or(EngineError::NoFiniteLogits)
    }

    /// Make the cache hold exactly `prompt` up to the point where it can be reused: keep the
    /// longest common prefix of the history and `prompt` (at least one token is always
    /// recomputed so that fresh logits exist), prefill the rest. Returns the logits after the
    /// prompt and how many tokens were computed.
    pub fn prefill_reusing(&mut self, prompt: &[u32]) -> Result<(&[f32], usize)> {
        if prompt.is_empty() {
            return Err(EngineError::Invalid(
                "cannot prefill an empty prompt".into(),
            ));
        }
        let common = self
            .history
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count()
            .min(prompt.len() - 1);
        self.history.truncate(common);
        let computed = prompt.len() - common;
        let vocab = self.info().vocab_size;
        let rows = if self.all_logits {
            (computed - 1) % self.prefill_chunk + 1
        } else {
            1
        };
        self.extend(&prompt[common..], |_| {})?;
        Ok((&self.logits[(rows - 1) * vocab..rows * vocab], computed))
    }

    /// Greedy generation after `prompt` (reusing what the cache already holds of it), until an
    /// end-of-sequence token (not passed on), `max_tokens` or a full context. `on_token` sees
    /// each generated token as soon as it is chosen and may stop generation.
    pub fn generate_greedy(
        &mut self,
        prompt: &[u32],
        max_tokens: usize,
        mut on_token: impl FnMut(u32) -> ControlFlow<()>,
    ) -> Result<GenerationStats> {
        let eos = std::mem::take(&mut self.eos);
        let mut hit_eos = false;
        let result = self.generate_greedy_with(prompt, max_tokens, &mut |token| {
            if eos.contains(&token) {
                hit_eos = true;
                return ControlFlow::Break(());
            }
            on_token(token)
        });
        self.eos = eos;
        let mut stats = result?;
        if hit_eos {
            stats.finish = Finish::Eos;
        }
        Ok(stats)
    }

    /// The generation loop: prefill `prompt` (reusing the cached prefix), then repeatedly
    /// `choose` a token from the logits, hand it to `on_token`, and decode it — until
    /// `on_token` breaks, `max_tokens` tokens were produced, or the context is full.
    /// End-of-sequence handling is the caller's (`on_token` breaks on it).
    pub fn generate_with(
        &mut self,
        prompt: &[u32],
        max_tokens: usize,
        mut choose: impl FnMut(&[f32]) -> u32,
        on_token: &mut dyn FnMut(u32) -> ControlFlow<()>,
    ) -> Result<GenerationStats> {
        let (mut stats, next) = self.prefill_for_generation(prompt, &mut |l| Ok(choose(l)))?;
        self.decode_loop(&mut stats, next, max_tokens, Some(&mut choose), on_token)?;
        Ok(stats)
    }

    /// [`Engine::generate_with`] choosing greedily, each decode step's choice made by the
    /// backend ([`Engine::step_greedy`]). End-of-sequence handling is the caller's.
    pub fn generate_greedy_with(
        &mut self,
        prompt: &[u32],
        max_tokens: usize,
        on_token: &mut dyn FnMut(u32) -> ControlFlow<()>,
    ) -> Result<GenerationStats> {
        let (mut stats, next) = self.prefill_for_generation(prompt, &mut |l| {
            argmax(l).ok_or(EngineError::NoFiniteLogits)
        })?;
        self.decode_loop(&mut stats, next, max_tokens, None, on_token)?;
        Ok(stats)
    }

    /// Prefill `prompt` (reusing the cached prefix) and `choose` the first token: the stats of
    /// a generation so far, and that token.
    fn prefill_for_generation(
        &mut self,
        prompt: &[u32],
        choose: &mut dyn FnMut(&[f32]) -> Result<u32>,
    ) -> Result<(GenerationStats, u32)> {
        let start = Instant::now();
        let (logits, prefilled) = self.prefill_reusing(prompt)?;
        let first = choose(logits)?;
        let prefill_seconds = start.elapsed().as_secs_f64();
        let stats = GenerationStats {
            prompt_tokens: prompt.len(),
            prefilled_tokens: prefilled,
            generated_tokens: 0,
            prefill_seconds,
            decode_seconds: 0.0,
            time_to_first_token: prefill_seconds,
            finish: Finish::MaxTokens,
        };
        Ok((stats, first))
    }

    /// Hand `next` to `on_token` and decode it, choosing each following token with `choose`
    /// from the logits (or greedily on the backend when `None`), until `on_token` breaks,
    /// `max_tokens` tokens were produced, or the context is full.
    fn decode_loop(
        &mut self,
        stats: &mut GenerationStats,
        mut next: u32,
        max_tokens: usize,
        mut choose: Option<&mut ChooseToken<'_>>,
        on_token: &mut dyn FnMut(u32) -> ControlFlow<()>,
    ) -> Result<()> {
        let decode_start = Instant::now();
        while stats.generated_tokens < max_tokens {
            stats.generated_tokens += 1;
            if on_token(next).is_break() {
                stats.finish = Finish::Stopped;
                break;
            }
            if stats.generated_tokens == max_tokens {
                break;
            }
            if self.history.len() >= self.ctx_size {
                stats.finish = Finish::ContextFull;
                break;
            }
            next = match choose.as_mut() {
                Some(choose) => choose(self.step(next)?),
                None => self.step_greedy(next)?,
            };
        }
        stats.decode_seconds = decode_start.elapsed().as_secs_f64();
        Ok(())
    }
}

use trellis_backend::{NO_CHOICE, argmax};

/// A caller's choice of the next token from the logits (a sampler).
type ChooseToken<'c> = dyn FnMut(&[f32]) -> u32 + 'c;

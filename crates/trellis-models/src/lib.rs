//! Model architectures, each written top to bottom like the math, in the backend's fused ops.
//!
//! A model owns its uploaded weights and a workspace of activation buffers sized at load for
//! the largest number of rows a forward pass will see, so a forward pass allocates nothing.
//! Models never see files beyond the [`ModelDir`] they load from, nor HTTP or sampling.

mod blocks;
pub mod gemma3;
pub mod glm4_moe_lite;
pub mod llama;
pub mod rope;
pub mod synth;

use trellis_backend::{Backend, BackendError, Batch, KvCacheLayout, KvDtype};
use trellis_format::{FormatError, ModelConfig, ModelDir};

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// What the runtime needs to know about a loaded model.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub max_position_embeddings: usize,
    /// Values stored per token per layer in the KV cache.
    pub kv_values_per_token: usize,
    /// Bytes of weights read by one decode step at batch 1 (for roofline figures).
    pub bytes_per_token: u64,
}

/// Sizes fixed at load: buffers are allocated for these and never grown.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Most token rows in one forward pass (prefill chunk, or decode batch).
    pub max_rows: usize,
    /// Most rows whose logits one forward pass computes.
    pub max_logit_rows: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            max_rows: 256,
            max_logit_rows: 1,
        }
    }
}

/// Intermediate values a caller may observe during a forward pass (tests, debugging).
pub enum Tap<'a> {
    /// Residual stream after decoder layer `layer`, `[rows, hidden]`.
    Hidden { layer: usize, values: &'a [f32] },
    /// After the final norm, `[rows, hidden]`.
    FinalNorm { values: &'a [f32] },
    /// Experts chosen in MoE layer `layer`: `[rows, top_k]` ids and weights.
    Routing {
        layer: usize,
        ids: &'a [u32],
        weights: &'a [f32],
    },
}

/// A forward-pass observer; reading values off the backend costs a copy, so only pass one
/// when the values are wanted.
pub type Observer<'o> = Option<&'o mut dyn FnMut(Tap<'_>)>;

/// A decoder-only language model on backend `B`.
pub trait CausalLm<B: Backend> {
    fn info(&self) -> &ModelInfo;

    /// Run `tokens` (one row each, placed by `batch`) through the model, writing their keys
    /// and values into `cache`, and compute logits for the rows listed in `logit_rows`
    /// (indices into `tokens`, at most `max_logit_rows`), readable with [`CausalLm::read_logits`].
    fn forward(
        &mut self,
        backend: &B,
        tokens: &[u32],
        batch: &Batch<'_>,
        cache: &mut B::KvCache,
        logit_rows: &[u32],
        observer: Observer<'_>,
    ) -> Result<()>;

    /// Logits of the rows requested in the last forward pass, `[logit_rows.len(), vocab]`.
    fn read_logits(&self, backend: &B, dst: &mut [f32]);

    /// A cache layout for `token_slots` tokens in blocks of `block_size`.
    fn kv_layout(&self, token_slots: usize, block_size: usize, dtype: KvDtype) -> KvCacheLayout {
        let info = self.info();
        KvCacheLayout {
            layers: info.num_layers,
            values_per_token: info.kv_values_per_token,
            block_size,
            num_blocks: token_slots.div_ceil(block_size),
            dtype,
        }
    }
}

/// Load progress: (units done, units total, what is loading).
pub type Progress<'p> = &'p mut dyn FnMut(usize, usize, &str);

/// Load the architecture the directory's config names.
pub fn load<B: Backend + 'static>(
    dir: &ModelDir,
    backend: &B,
    options: &LoadOptions,
    progress: Progress<'_>,
) -> Result<Box<dyn CausalLm<B>>> {
    match &dir.config {
        ModelConfig::MlaMoe(cfg) => Ok(Box::new(glm4_moe_lite::Glm4MoeLite::load(
            dir, cfg, backend, options, progress,
        )?)),
        ModelConfig::Llama(cfg) => Ok(Box::new(llama::Llama::load(
            dir, cfg, backend, options, progress,
        )?)),
        ModelConfig::Qwen3Moe(cfg) => Ok(Box::new(llama::Llama::load_qwen3_moe(
            dir, cfg, backend, options, progress,
        )?)),
        ModelConfig::Gemma3(cfg) => Ok(Box::new(gemma3::Gemma3::load(
            dir, cfg, backend, options, progress,
        )?)),
    }
}

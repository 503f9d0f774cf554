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
use trellis_format::{FormatError, ModelConfig, ModelDir, TensorStore};

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

    /// The greedy token ([`trellis_backend::argmax`]) of each of the first `dst.len()` logit
    /// rows of the last forward pass, chosen by the backend where the logits are (a GPU then
    /// copies back one id, not the vocabulary's logits). `false` if this model's logits need a
    /// host-side transform first: the caller then reads them with `read_logits`.
    fn greedy_tokens(&self, _backend: &B, _dst: &mut [u32]) -> bool {
        false
    }

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

/// A model run one decoder layer at a time, for tools that stream activations through layers
/// they load, replace and observe one by one (the quantizer runs its calibration set through
/// the already-quantized prefix this way). It holds the embeddings, the final norm and a
/// workspace for `max_rows` rows, and at most one decoder layer, which keeps its keys and
/// values in layer 0 of the cache it is given (a one-layer layout from
/// [`Layerwise::layer_kv_layout`]). Hidden states cross the interface on the host, `[rows, hidden]`.
///
/// The layer code is the one [`CausalLm::forward`] runs: each family has one `Layer::load`
/// and one `Layer::forward`, shared by both.
pub trait Layerwise<B: Backend> {
    fn info(&self) -> &ModelInfo;

    /// `hidden = embed(tokens)`, scaled as the model's forward pass scales it.
    fn embed(&mut self, b: &B, tokens: &[u32], hidden: &mut [f32]) -> Result<()>;

    /// Load decoder layer `layer` from `store` (dense or EXL3 tensors under the model's own
    /// names), replacing the layer loaded before.
    fn load_layer(&mut self, b: &B, store: &TensorStore, layer: usize) -> Result<()>;

    /// `hidden ← layer(hidden)` for the tokens of `batch`, writing their keys and values into
    /// layer 0 of `cache`.
    fn forward_layer(
        &mut self,
        b: &B,
        hidden: &mut [f32],
        batch: &Batch<'_>,
        cache: &mut B::KvCache,
    ) -> Result<()>;

    /// `out = final_norm(hidden)`: the input of the output head.
    fn final_norm(&mut self, b: &B, hidden: &[f32], out: &mut [f32]) -> Result<()>;

    /// A one-layer cache layout for `token_slots` tokens.
    fn layer_kv_layout(&self, token_slots: usize, block_size: usize) -> KvCacheLayout {
        KvCacheLayout {
            layers: 1,
            values_per_token: self.info().kv_values_per_token,
            block_size,
            num_blocks: token_slots.div_ceil(block_size),
            dtype: KvDtype::F32,
        }
    }
}

/// A layerwise model of the architecture the directory's config names, with no layer loaded.
pub fn load_layerwise<B: Backend + 'static>(
    dir: &ModelDir,
    backend: &B,
    options: &LoadOptions,
) -> Result<Box<dyn Layerwise<B>>> {
    match &dir.config {
        ModelConfig::MlaMoe(_) => Ok(Box::new(glm4_moe_lite::Glm4MoeLite::load_layerwise(
            dir, backend, options,
        )?)),
        ModelConfig::Llama(_) | ModelConfig::Qwen3Moe(_) => Ok(Box::new(
            llama::Llama::load_layerwise(dir, backend, options)?,
        )),
        ModelConfig::Gemma3(_) => Ok(Box::new(gemma3::Gemma3::load_layerwise(
            dir, backend, options,
        )?)),
    }
}

pub(crate) fn check_layer_index(layer: usize, layers: usize) -> Result<()> {
    if layer >= layers {
        return Err(ModelError::Invalid(format!(
            "layer {layer} does not exist (the model has {layers})"
        )));
    }
    Ok(())
}

pub(crate) fn no_layer_loaded() -> ModelError {
    ModelError::Invalid("no decoder layer is loaded (call load_layer first)".into())
}

/// Check a layerwise call's row count and host buffer against the workspace.
pub(crate) fn check_layerwise_rows(
    rows: usize,
    values: usize,
    hidden: usize,
    max_rows: usize,
) -> Result<()> {
    if rows == 0 || rows > max_rows || values != rows * hidden {
        return Err(ModelError::Invalid(format!(
            "layerwise call with {rows} rows and {values} values (width {hidden}, at most \
             {max_rows} rows)"
        )));
    }
    Ok(())
}

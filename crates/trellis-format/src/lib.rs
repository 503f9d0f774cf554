//! Model directories as trellis reads them.
//!
//! * [`ModelDir`]: `config.json` → a typed [`ModelConfig`] per architecture family, the EXL3
//!   [`QuantizationConfig`], the [`GenerationDefaults`] of `generation_config.json`, and the
//!   tensors;
//! * [`TensorStore`]: single or sharded safetensors files, memory-mapped, every header
//!   validated at open; [`TensorView`]s borrow from the map;
//! * [`TensorStore::linear`]: a linear layer as [`LinearWeights`] — an EXL3 trellis group
//!   (built as a [`trellis_codec::TrellisLinear`]) or a dense weight — with dtypes and shapes
//!   checked;
//! * [`summarize`]: the [`ModelSummary`] behind `trellis inspect`.
//!
//! Nothing here knows about backends, model math, HTTP or the CLI. Every error is a
//! [`FormatError`] whose message names the file, tensor or field and what was expected.

pub mod config;
mod dtype;
mod error;
pub mod generation;
pub mod gguf;
mod json;
pub mod linear;
mod model_dir;
pub mod quant;
pub mod store;
pub mod summary;
pub mod writer;

pub use config::{
    Architecture, CommonConfig, Gemma3Config, LayerAttention, LlamaConfig, LlamaFamily,
    MlaMoeConfig, ModelConfig, Qwen3MoeConfig, RopeConfig, RopeScaling, ScoringFunc, SpecialTokens,
    TopkMethod,
};
pub use dtype::DType;
pub use error::{FormatError, Result};
pub use generation::GenerationDefaults;
pub use gguf::{GgmlType, GgufError, GgufFile, GgufTensorInfo, GgufValue, import_gguf};
pub use linear::{EXL3_PAD, LinearWeights, TrellisShape, expand_sign_bits, pad_to_exl3};
pub use model_dir::ModelDir;
pub use quant::{Calibration, ModuleStorage, QuantizationConfig, StoredTensor};
pub use store::{TensorStore, TensorView};
pub use summary::{ModelSummary, TensorKind, TensorSummary, logical_linear_shape, summarize};
pub use writer::{TensorFill, TensorSource, write_json, write_safetensors, write_safetensors_file};

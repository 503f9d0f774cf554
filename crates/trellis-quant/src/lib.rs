//! The EXL3 quantizer: Hugging Face weights in, an EXL3 model directory out, on the CPU (the
//! Viterbi tile search may run on a device: [`Search`]).
//!
//! * [`convert::quantize_model`]: the whole conversion, one decoder layer at a time, with
//!   calibration activations streamed through the already-quantized prefix, per-layer
//!   checkpoints and resume;
//! * [`capture`]: the backend wrapper that records `xᵀx` of the inputs of chosen linears (and
//!   routes every calibration token to every expert while recording);
//! * [`hessian`], [`linalg`]: Hessian accumulation (f64), damping, Cholesky and the 16×16
//!   block LDL;
//! * [`quantize`]: regularisation (signs, channel scales, Hadamards), the global scale search
//!   and LDLQ with the Viterbi tile encoder;
//! * [`alloc`]: per-tensor bit widths for a fractional target;
//! * [`plan`]: which linears each architecture quantizes and which tensors stay dense;
//! * [`calibration`]: the built-in calibration text.
//!
//! The algorithm follows ExLlamaV3's (`exl3-format.md` §9); departures are noted where made.

pub mod alloc;
pub mod calibration;
pub mod capture;
pub mod convert;
pub mod hessian;
mod kernels;
pub mod linalg;
pub mod plan;
pub mod quantize;

pub use convert::{
    Calibration, Event, Overwrite, QuantizeOptions, Summary, TensorSummary, quantize_model,
    work_dir_of,
};
pub use quantize::{DenseLinear, LinearReport, LinearSettings, OutScales, QuantizedLinear, Search};

use std::path::PathBuf;

/// Why a conversion failed.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error(transparent)]
    Format(#[from] trellis_format::FormatError),
    #[error(transparent)]
    Model(#[from] trellis_models::ModelError),
    #[error(transparent)]
    Backend(#[from] trellis_backend::BackendError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {}: {message}", path.display())]
    Write { path: PathBuf, message: String },
    #[error(
        "{} is already quantized (it has a quantization_config or .trellis tensors); quantize \
         the original Hugging Face weights instead",
        .0.display()
    )]
    AlreadyQuantized(PathBuf),
    #[error(
        "output directory {} already exists; pass --force to replace it (or --resume to \
         continue an interrupted run into it)",
        .0.display()
    )]
    OutputExists(PathBuf),
    #[error("{} is already a complete conversion; nothing to resume", .0.display())]
    AlreadyComplete(PathBuf),
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("calibration: {0}")]
    Calibration(String),
    #[error("{0}")]
    Options(String),
    #[error("cannot resume: {0}")]
    Resume(String),
    #[error("the tile search on {device} failed: {message}")]
    Search { device: String, message: String },
}

pub type Result<T, E = QuantError> = std::result::Result<T, E>;

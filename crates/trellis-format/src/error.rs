//! The one error type of this crate. Every message names the file, tensor or field at fault
//! and says what was expected, so that a user can act on it without a debugger.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = FormatError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error(
        "{}: no weights found (expected model.safetensors, model.safetensors.index.json with its \
         shards, or *.safetensors files)",
        dir.display()
    )]
    NoWeights { dir: PathBuf },

    #[error("{}: shard `{shard}` is listed but {}", index.display(), problem)]
    Shard {
        index: PathBuf,
        shard: String,
        problem: String,
    },

    #[error("{}: {message}", index.display())]
    BadIndex { index: PathBuf, message: String },

    /// A safetensors file whose header or layout is invalid (truncated, bad JSON, bad offsets).
    #[error("{}: not a valid safetensors file: {message}", file.display())]
    Safetensors { file: PathBuf, message: String },

    #[error("{}: tensor `{tensor}` has dtype {dtype}, which trellis does not support", file.display())]
    UnsupportedDtype {
        file: PathBuf,
        tensor: String,
        dtype: String,
    },

    #[error("tensor `{tensor}` is stored twice: in {} and in {}", first.display(), second.display())]
    DuplicateTensor {
        tensor: String,
        first: PathBuf,
        second: PathBuf,
    },

    #[error("missing tensor `{tensor}` in {}", dir.display())]
    MissingTensor { tensor: String, dir: PathBuf },

    #[error("missing tensor `{tensor}` (or its legacy form `{legacy}`) in {}", dir.display())]
    MissingScale {
        tensor: String,
        legacy: String,
        dir: PathBuf,
    },

    #[error(
        "missing tensor for linear `{prefix}` in {}: neither `{prefix}.weight` (dense) nor \
         `{prefix}.trellis` (EXL3) exists",
        dir.display()
    )]
    MissingLinear { prefix: String, dir: PathBuf },

    /// A tensor exists but its dtype, shape or content is not what its role requires.
    #[error("{}: tensor `{tensor}`: expected {expected}, got {got}", file.display())]
    TensorMismatch {
        file: PathBuf,
        tensor: String,
        expected: String,
        got: String,
    },

    #[error(
        "{}: tensor `{tensor}`: last dimension {last_dim} is not 16·K words for a supported bit \
         width K (1..8, 1.5, 2.5, 3.5; i.e. 16, 24, 32, 40, 48, 56, 64, 80, 96, 112 or 128)",
        file.display()
    )]
    BitWidthOutOfRange {
        file: PathBuf,
        tensor: String,
        last_dim: usize,
    },

    #[error(
        "{}: linear `{prefix}` has both `{prefix}.mcg` and `{prefix}.mul1` codebook markers; \
         expected at most one",
        file.display()
    )]
    ConflictingCodebooks { file: PathBuf, prefix: String },

    #[error(
        "{}: linear `{prefix}` has a `{prefix}.scale` tensor; EXL3 no longer uses it and such \
         files are not supported",
        file.display()
    )]
    ScaleTensor { file: PathBuf, prefix: String },

    #[error("{}: linear `{prefix}`: {source}", file.display())]
    LinearShape {
        file: PathBuf,
        prefix: String,
        #[source]
        source: trellis_codec::LinearShapeError,
    },

    /// A configuration field is missing or has the wrong type/value.
    #[error("{file}: field `{field}` {problem}")]
    Config {
        file: String,
        field: String,
        problem: String,
    },

    #[error("{file}: unsupported architecture {found}; supported: {supported}")]
    UnknownArchitecture {
        file: String,
        found: String,
        supported: String,
    },

    #[error("{file}: unsupported quantization method `{method}` (only \"exl3\" is supported)")]
    UnsupportedQuantization { file: String, method: String },

    #[error("{file}: unknown codebook `{name}` (expected mul1, mcg or 3inst)")]
    UnknownCodebook { file: String, name: String },
}

impl FormatError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> FormatError {
        FormatError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn config(
        file: &str,
        field: impl Into<String>,
        problem: impl Into<String>,
    ) -> FormatError {
        FormatError::Config {
            file: file.to_string(),
            field: field.into(),
            problem: problem.into(),
        }
    }
}

//! GGUF files (llama.cpp's format, versions 2 and 3): the header, metadata of every value
//! type, tensor infos, the memory-mapped tensor data, and dequantization of the common ggml
//! types to f32 — what `trellis import` needs to turn a GGUF model into a Hugging Face
//! directory ([`import`]).
//!
//! Opening validates the whole header (every count against the bytes that remain, every
//! tensor's type, shape, alignment and byte range against the file), so later reads cannot
//! go out of bounds and corrupt files fail with an error naming the byte offset, key or
//! tensor instead of a panic or an absurd allocation.
//!
//! Shapes: GGUF stores ggml's `ne` dimensions, innermost (contiguous) first;
//! [`GgufTensorInfo::dims`] keeps that order and [`GgufTensorInfo::shape`] gives the
//! PyTorch order (reversed). The bytes of a tensor are row-major in the PyTorch shape either
//! way, so no transposition is ever needed.

mod dequant;
mod ggml_type;
pub mod import;
mod parse;
mod value;
pub mod writer;

pub use dequant::{DequantError, dequantize};
pub use ggml_type::GgmlType;
pub use import::{ImportDtype, ImportOptions, ImportReport, import_from, import_gguf};
pub use parse::{ALIGNMENT_KEY, DEFAULT_ALIGNMENT, MAX_DIMS};
pub use value::{GgufArray, GgufValue, GgufValueType};
pub use writer::GgufWriter;

use memmap2::Mmap;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Result alias of this module.
pub type Result<T, E = GgufError> = std::result::Result<T, E>;

/// Everything that can go wrong reading or importing a GGUF file; each message names the
/// file and the byte offset, metadata key or tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The header's structure is invalid (bad magic or version, truncated, absurd counts).
    #[error("{}: at byte {offset}: {message}", file.display())]
    Parse {
        file: PathBuf,
        offset: u64,
        message: String,
    },

    /// A metadata value is missing or has the wrong type or value.
    #[error("{}: metadata `{key}`: {problem}", file.display())]
    Metadata {
        file: PathBuf,
        key: String,
        problem: String,
    },

    #[error("{}: tensor `{tensor}`: {problem}", file.display())]
    Tensor {
        file: PathBuf,
        tensor: String,
        problem: String,
    },

    /// The file is valid but uses something import cannot translate.
    #[error("{}: {what}", file.display())]
    Unsupported { file: PathBuf, what: String },

    /// Writing the Hugging Face directory failed.
    #[error(transparent)]
    Format(#[from] crate::FormatError),
}

/// One tensor as the header describes it.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    pub ggml_type: GgmlType,
    /// ggml `ne` order: innermost (contiguous) dimension first.
    pub dims: Vec<u64>,
    /// Byte offset inside the data section.
    pub offset: u64,
    /// Bytes of data.
    pub byte_len: u64,
}

impl GgufTensorInfo {
    /// The PyTorch / Hugging Face shape: `dims` reversed. Every dimension fits in usize
    /// because the tensor's bytes fit in the file.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }
}

/// The bytes of a file: memory-mapped, or owned (files built in memory, tests).
enum Storage {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Storage {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Storage::Mapped(map) => map,
            Storage::Owned(bytes) => bytes,
        }
    }
}

/// An opened, validated GGUF file.
pub struct GgufFile {
    path: PathBuf,
    storage: Storage,
    version: u32,
    metadata: Vec<(String, GgufValue)>,
    metadata_index: HashMap<String, usize>,
    tensors: Vec<GgufTensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .finish()
    }
}

impl GgufFile {
    /// Memory-map and validate a GGUF file.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only and trellis never writes model files while reading
        // them; as with every mmap-based loader, a file truncated by another process while
        // mapped is outside what this program can defend against.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        GgufFile::from_storage(path.to_path_buf(), Storage::Mapped(map))
    }

    /// Validate a GGUF file held in memory; `label` names it in errors.
    pub fn from_bytes(label: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<GgufFile> {
        GgufFile::from_storage(label.into(), Storage::Owned(bytes))
    }

    fn from_storage(path: PathBuf, storage: Storage) -> Result<GgufFile> {
        let header = parse::parse_header(&storage, &path)?;
        let metadata_index = header
            .metadata
            .iter()
            .enumerate()
            .map(|(i, (k, _))| (k.clone(), i))
            .collect();
        let tensor_index = header
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(GgufFile {
            path,
            storage,
            version: header.version,
            metadata: header.metadata,
            metadata_index,
            tensors: header.tensors,
            tensor_index,
            alignment: header.alignment,
            data_offset: header.data_offset,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// 2 or 3.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Alignment of the data section and tensor offsets (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute byte offset where tensor data begins.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// Every metadata pair in file order.
    pub fn metadata(&self) -> impl Iterator<Item = (&str, &GgufValue)> {
        self.metadata.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(GgufValue::as_str)
    }

    /// An error about metadata `key`.
    pub fn metadata_error(&self, key: &str, problem: impl Into<String>) -> GgufError {
        GgufError::Metadata {
            file: self.path.clone(),
            key: key.to_string(),
            problem: problem.into(),
        }
    }

    fn typed<'a, T>(
        &'a self,
        key: &str,
        expected: &str,
        read: impl Fn(&'a GgufValue) -> Option<T>,
    ) -> Result<Option<T>> {
        match self.get(key) {
            None => Ok(None),
            Some(value) => read(value).map(Some).ok_or_else(|| {
                self.metadata_error(
                    key,
                    format!("expected {expected}, got {}", value.describe()),
                )
            }),
        }
    }

    /// An unsigned integer of any width; absent → `None`, wrong type → error.
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        self.typed(key, "a non-negative integer", GgufValue::as_u64)
    }

    /// A number of any type as f64.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.typed(key, "a number", GgufValue::as_f64)
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.typed(key, "a bool", GgufValue::as_bool)
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        self.typed(key, "a string", GgufValue::as_str)
    }

    pub fn opt_array(&self, key: &str) -> Result<Option<&GgufArray>> {
        self.typed(key, "an array", GgufValue::as_array)
    }

    /// A required unsigned integer.
    pub fn req_u64(&self, key: &str) -> Result<u64> {
        self.opt_u64(key)?
            .ok_or_else(|| self.metadata_error(key, "missing"))
    }

    /// A required string.
    pub fn req_str(&self, key: &str) -> Result<&str> {
        self.opt_str(key)?
            .ok_or_else(|| self.metadata_error(key, "missing"))
    }

    /// Tensor infos in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw bytes of a tensor (validated to lie inside the file at open).
    pub fn tensor_bytes(&self, info: &GgufTensorInfo) -> &[u8] {
        let start = (self.data_offset + info.offset) as usize;
        &self.storage[start..start + info.byte_len as usize]
    }

    /// A tensor by name, dequantized to f32 in PyTorch row-major order.
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        let info = self.tensor(name).ok_or_else(|| GgufError::Tensor {
            file: self.path.clone(),
            tensor: name.to_string(),
            problem: "not in the file".into(),
        })?;
        self.dequantize(info)
    }

    /// Dequantize one tensor to f32.
    pub fn dequantize(&self, info: &GgufTensorInfo) -> Result<Vec<f32>> {
        let mut out = vec![0f32; info.numel()];
        dequantize(info.ggml_type, self.tensor_bytes(info), &mut out).map_err(|e| {
            GgufError::Tensor {
                file: self.path.clone(),
                tensor: info.name.clone(),
                problem: e.to_string(),
            }
        })?;
        Ok(out)
    }
}

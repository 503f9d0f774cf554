//! Writing model directories: safetensors files, sharded with an index when large, whose
//! tensor data is produced one tensor at a time (so a writer never holds a whole model).

use crate::dtype::DType;
use crate::error::{FormatError, Result};
use crate::store::INDEX_FILE;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Produces a tensor's little-endian bytes when the writer reaches it.
pub type TensorFill = Box<dyn Fn() -> Vec<u8> + Send + Sync>;

/// One tensor to write: name, type, shape and how to make its bytes.
pub struct TensorSource {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub fill: TensorFill,
}

impl TensorSource {
    pub fn new(
        name: impl Into<String>,
        dtype: DType,
        shape: Vec<usize>,
        fill: TensorFill,
    ) -> TensorSource {
        TensorSource {
            name: name.into(),
            dtype,
            shape,
            fill,
        }
    }

    /// A tensor whose bytes already exist.
    pub fn from_bytes(
        name: impl Into<String>,
        dtype: DType,
        shape: Vec<usize>,
        bytes: Vec<u8>,
    ) -> TensorSource {
        let bytes = std::sync::Arc::new(bytes);
        TensorSource::new(name, dtype, shape, Box::new(move || bytes.as_ref().clone()))
    }

    pub fn byte_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size_of()
    }
}

/// Adapter to the `safetensors` serializer: data is produced on demand and checked against
/// the declared size, and every produced tensor is reported to `progress`.
struct LazyView<'a, 'p> {
    source: &'a TensorSource,
    dtype: safetensors::Dtype,
    progress: &'a std::cell::RefCell<&'p mut dyn FnMut(usize)>,
}

impl safetensors::View for LazyView<'_, '_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.source.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let bytes = (self.source.fill)();
        assert_eq!(
            bytes.len(),
            self.source.byte_len(),
            "tensor {} produced the wrong number of bytes",
            self.source.name
        );
        (self.progress.borrow_mut())(bytes.len());
        Cow::Owned(bytes)
    }

    fn data_len(&self) -> usize {
        self.source.byte_len()
    }
}

/// Write `tensors` into `dir` as `model.safetensors`, or, when their total exceeds
/// `max_shard_bytes`, as `model-0000i-of-0000N.safetensors` shards plus an index.
/// `progress` receives the byte count of each tensor as it is written. Returns the files.
pub fn write_safetensors(
    dir: &Path,
    tensors: &[TensorSource],
    max_shard_bytes: u64,
    metadata: Option<HashMap<String, String>>,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<PathBuf>> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source: std::io::Error| FormatError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    // Shards in the given order, each at most max_shard_bytes unless one tensor alone is larger.
    let mut shards: Vec<Vec<&TensorSource>> = vec![Vec::new()];
    let mut shard_bytes = 0u64;
    for t in tensors {
        let len = t.byte_len() as u64;
        if shard_bytes > 0 && shard_bytes + len > max_shard_bytes {
            shards.push(Vec::new());
            shard_bytes = 0;
        }
        shards.last_mut().expect("one shard").push(t);
        shard_bytes += len;
    }
    let total = shards.len();
    let progress = std::cell::RefCell::new(progress);
    let progress = &progress;
    let mut files = Vec::with_capacity(total);
    let mut weight_map = BTreeMap::new();
    for (i, shard) in shards.iter().enumerate() {
        let name = if total == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, total)
        };
        let path = dir.join(&name);
        let views: Vec<(String, LazyView<'_, '_>)> = shard
            .iter()
            .map(move |t| {
                (
                    t.name.clone(),
                    LazyView {
                        source: t,
                        dtype: t.dtype.to_safetensors(),
                        progress,
                    },
                )
            })
            .collect();
        for t in shard {
            weight_map.insert(t.name.clone(), name.clone());
        }
        safetensors::serialize_to_file(views, metadata.clone(), &path).map_err(|e| {
            FormatError::Safetensors {
                file: path.clone(),
                message: format!("write failed: {e}"),
            }
        })?;
        files.push(path);
    }
    if total > 1 {
        let total_size: usize = tensors.iter().map(TensorSource::byte_len).sum();
        let index = serde_json::json!({
            "metadata": { "total_size": total_size },
            "weight_map": weight_map,
        });
        let path = dir.join(INDEX_FILE);
        let text = serde_json::to_string_pretty(&index).expect("index serializes");
        std::fs::write(&path, text).map_err(io(&path))?;
        files.push(path);
    }
    Ok(files)
}

/// Write `tensors` into one safetensors file at `path`.
pub fn write_safetensors_file(path: &Path, tensors: &[TensorSource]) -> Result<()> {
    let progress: &mut dyn FnMut(usize) = &mut |_| {};
    let progress = std::cell::RefCell::new(progress);
    let views: Vec<(String, LazyView<'_, '_>)> = tensors
        .iter()
        .map(|t| {
            let view = LazyView {
                source: t,
                dtype: t.dtype.to_safetensors(),
                progress: &progress,
            };
            (t.name.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).map_err(|e| FormatError::Safetensors {
        file: path.to_path_buf(),
        message: format!("write failed: {e}"),
    })
}

/// Write a JSON value to `path`, pretty-printed.
pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON values serialize");
    std::fs::write(path, text + "\n").map_err(|source| FormatError::Io {
        path: path.to_path_buf(),
        source,
    })
}

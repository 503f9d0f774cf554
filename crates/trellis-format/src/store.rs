//! Safetensors files of one model, memory-mapped: opening single or sharded directories,
//! validating every header up front, and typed views of individual tensors.
//!
//! Opening reads only the headers; tensor data stays on disk until something touches it.
//! Views borrow from the map whenever the data is suitably aligned for the element type
//! (safetensors offsets usually are), and fall back to an owned copy otherwise.

use crate::dtype::{DType, describe_dtypes, describe_shape};
use crate::error::{FormatError, Result};
use half::{bf16, f16};
use memmap2::Mmap;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// File name of a single-file model.
pub const SINGLE_FILE: &str = "model.safetensors";
/// File name of the shard index of a sharded model.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Length of the little-endian u64 that precedes the JSON header.
const HEADER_LEN_BYTES: usize = 8;

/// A borrowed view of one stored tensor.
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: &'a [usize],
    /// The raw little-endian data.
    pub bytes: &'a [u8],
    /// The file the tensor lives in (for error messages).
    pub file: &'a Path,
}

impl<'a> TensorView<'a> {
    /// Number of elements (1 for a 0-dim tensor). Cannot overflow: the header check at
    /// open proved that `numel · size_of` fits in the file.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Check dtype and shape; the error names the file and tensor and shows both.
    pub fn check(&self, dtypes: &[DType], shape: &[usize]) -> Result<()> {
        let dtype_ok = dtypes.is_empty() || dtypes.contains(&self.dtype);
        if dtype_ok && self.shape == shape {
            return Ok(());
        }
        Err(self.mismatch(format!(
            "dtype {} and shape {}",
            describe_dtypes(dtypes),
            describe_shape(shape)
        )))
    }

    /// Check the dtype only.
    pub fn check_dtype(&self, dtypes: &[DType]) -> Result<()> {
        if dtypes.contains(&self.dtype) {
            return Ok(());
        }
        Err(self.mismatch(format!("dtype {}", describe_dtypes(dtypes))))
    }

    /// An error saying this tensor is not `expected`, showing its actual dtype and shape.
    pub fn mismatch(&self, expected: impl Into<String>) -> FormatError {
        FormatError::TensorMismatch {
            file: self.file.to_path_buf(),
            tensor: self.name.to_string(),
            expected: expected.into(),
            got: format!("{} {}", self.dtype, describe_shape(self.shape)),
        }
    }

    /// Any of F32 / F16 / BF16, widened exactly to f32.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        match self.dtype {
            DType::F32 => Ok(self.as_f32()?.into_owned()),
            DType::F16 => Ok(self.as_f16()?.iter().map(|v| v.to_f32()).collect()),
            DType::BF16 => Ok(self.as_bf16()?.iter().map(|v| v.to_f32()).collect()),
            _ => Err(self.mismatch("dtype F32, F16 or BF16")),
        }
    }

    /// F32 data; borrowed when aligned, copied otherwise.
    pub fn as_f32(&self) -> Result<Cow<'a, [f32]>> {
        self.check_dtype(&[DType::F32])?;
        Ok(cast_or_copy(self.bytes, |b| {
            f32::from_le_bytes([b[0], b[1], b[2], b[3]])
        }))
    }

    /// F16 data; borrowed when aligned, copied otherwise.
    pub fn as_f16(&self) -> Result<Cow<'a, [f16]>> {
        self.check_dtype(&[DType::F16])?;
        Ok(cast_or_copy(self.bytes, |b| {
            f16::from_le_bytes([b[0], b[1]])
        }))
    }

    /// BF16 data; borrowed when aligned, copied otherwise.
    pub fn as_bf16(&self) -> Result<Cow<'a, [bf16]>> {
        self.check_dtype(&[DType::BF16])?;
        Ok(cast_or_copy(self.bytes, |b| {
            bf16::from_le_bytes([b[0], b[1]])
        }))
    }

    /// I16 (or U16) data reinterpreted as unsigned 16-bit words: the form trellis
    /// bitstreams and legacy sign bits are read in.
    pub fn as_u16_words(&self) -> Result<Cow<'a, [u16]>> {
        self.check_dtype(&[DType::I16, DType::U16])?;
        Ok(cast_or_copy(self.bytes, |b| {
            u16::from_le_bytes([b[0], b[1]])
        }))
    }

    /// Any integer or bool tensor widened to i64 (U64 values above i64::MAX are an error).
    pub fn to_i64(&self) -> Result<Vec<i64>> {
        let b = self.bytes;
        let out = match self.dtype {
            DType::Bool | DType::U8 => b.iter().map(|&v| i64::from(v)).collect(),
            DType::I8 => b.iter().map(|&v| i64::from(v as i8)).collect(),
            DType::I16 => words::<2>(b)
                .map(|w| i64::from(i16::from_le_bytes(w)))
                .collect(),
            DType::U16 => words::<2>(b)
                .map(|w| i64::from(u16::from_le_bytes(w)))
                .collect(),
            DType::I32 => words::<4>(b)
                .map(|w| i64::from(i32::from_le_bytes(w)))
                .collect(),
            DType::U32 => words::<4>(b)
                .map(|w| i64::from(u32::from_le_bytes(w)))
                .collect(),
            DType::I64 => words::<8>(b).map(i64::from_le_bytes).collect(),
            DType::U64 => {
                let mut out = Vec::with_capacity(b.len() / 8);
                for w in words::<8>(b) {
                    let v = u64::from_le_bytes(w);
                    out.push(
                        i64::try_from(v)
                            .map_err(|_| self.mismatch("integer values that fit in i64"))?,
                    );
                }
                out
            }
            _ => return Err(self.mismatch("an integer dtype")),
        };
        Ok(out)
    }
}

/// Fixed-size little-endian chunks of a byte slice.
fn words<const N: usize>(bytes: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
    bytes.chunks_exact(N).map(|c| {
        let mut w = [0u8; N];
        w.copy_from_slice(c);
        w
    })
}

/// Reinterpret little-endian bytes as `T` without copying when the host is little-endian and
/// the slice is aligned for `T`; decode element by element otherwise.
fn cast_or_copy<'a, T: bytemuck::Pod>(
    bytes: &'a [u8],
    decode: impl Fn(&[u8]) -> T,
) -> Cow<'a, [T]> {
    if cfg!(target_endian = "little")
        && let Ok(slice) = bytemuck::try_cast_slice::<u8, T>(bytes)
    {
        return Cow::Borrowed(slice);
    }
    Cow::Owned(
        bytes
            .chunks_exact(std::mem::size_of::<T>())
            .map(decode)
            .collect(),
    )
}

/// One memory-mapped safetensors file.
struct Shard {
    path: PathBuf,
    map: Mmap,
}

/// Where one tensor lives.
struct Entry {
    shard: usize,
    dtype: DType,
    shape: Vec<usize>,
    /// Byte range within the shard's map.
    range: Range<usize>,
}

/// All safetensors files of a model directory, memory-mapped, with every header validated.
pub struct TensorStore {
    dir: PathBuf,
    shards: Vec<Shard>,
    entries: BTreeMap<String, Entry>,
}

impl std::fmt::Debug for TensorStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorStore")
            .field("dir", &self.dir)
            .field("files", &self.files())
            .field("tensors", &self.entries.len())
            .finish()
    }
}

impl TensorStore {
    /// Open the weights of a model directory, choosing in this order:
    /// `model.safetensors.index.json` with the shards it names; `model.safetensors`; every
    /// `*.safetensors` file in the directory (sorted by name). A path to a single
    /// `.safetensors` file opens just that file.
    pub fn open(dir: &Path) -> Result<TensorStore> {
        let meta = std::fs::metadata(dir).map_err(|e| FormatError::io(dir, e))?;
        if meta.is_file() {
            return TensorStore::from_files(dir.to_path_buf(), &[dir.to_path_buf()]);
        }
        let index = dir.join(INDEX_FILE);
        if index.is_file() {
            return TensorStore::open_indexed(dir, &index);
        }
        let single = dir.join(SINGLE_FILE);
        if single.is_file() {
            return TensorStore::from_files(dir.to_path_buf(), &[single]);
        }
        let mut files = Vec::new();
        let listing = std::fs::read_dir(dir).map_err(|e| FormatError::io(dir, e))?;
        for item in listing {
            let item = item.map_err(|e| FormatError::io(dir, e))?;
            let path = item.path();
            if path.extension().is_some_and(|x| x == "safetensors") && path.is_file() {
                files.push(path);
            }
        }
        if files.is_empty() {
            return Err(FormatError::NoWeights {
                dir: dir.to_path_buf(),
            });
        }
        files.sort();
        TensorStore::from_files(dir.to_path_buf(), &files)
    }

    /// Open the shards an index names, and check that the index agrees with them.
    fn open_indexed(dir: &Path, index: &Path) -> Result<TensorStore> {
        let text = std::fs::read_to_string(index).map_err(|e| FormatError::io(index, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| FormatError::Json {
                path: index.to_path_buf(),
                source,
            })?;
        let bad = |message: String| FormatError::BadIndex {
            index: index.to_path_buf(),
            message,
        };
        let weight_map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| {
                bad("expected an object `weight_map` (tensor name → shard file)".into())
            })?;
        let mut listed: BTreeMap<&str, &str> = BTreeMap::new();
        for (tensor, shard) in weight_map {
            let shard = shard.as_str().ok_or_else(|| {
                bad(format!(
                    "weight_map[`{tensor}`]: expected a shard file name, got {shard}"
                ))
            })?;
            listed.insert(tensor, shard);
        }
        let mut shard_names: Vec<&str> = listed.values().copied().collect();
        shard_names.sort_unstable();
        shard_names.dedup();
        let mut files = Vec::with_capacity(shard_names.len());
        for name in &shard_names {
            // Shards must be plain files next to the index; anything else is either a
            // corrupt index or an attempt to read outside the model directory.
            let plain = Path::new(name)
                .file_name()
                .is_some_and(|f| f == std::ffi::OsStr::new(name));
            if !plain || *name == ".." || *name == "." {
                return Err(FormatError::Shard {
                    index: index.to_path_buf(),
                    shard: name.to_string(),
                    problem: "is not a plain file name in the model directory".into(),
                });
            }
            let path = dir.join(name);
            if !path.is_file() {
                return Err(FormatError::Shard {
                    index: index.to_path_buf(),
                    shard: name.to_string(),
                    problem: format!("{} does not exist", path.display()),
                });
            }
            files.push(path);
        }
        if files.is_empty() {
            return Err(bad("`weight_map` lists no tensors".into()));
        }
        let store = TensorStore::from_files(dir.to_path_buf(), &files)?;
        for (tensor, shard) in listed {
            match store.entries.get(tensor) {
                Some(entry)
                    if store.shards[entry.shard].path.file_name()
                        == Some(std::ffi::OsStr::new(shard)) => {}
                Some(entry) => {
                    return Err(bad(format!(
                        "weight_map puts tensor `{tensor}` in `{shard}`, but it is stored in {}",
                        store.shards[entry.shard].path.display()
                    )));
                }
                None => {
                    return Err(FormatError::Shard {
                        index: index.to_path_buf(),
                        shard: shard.to_string(),
                        problem: format!(
                            "does not contain tensor `{tensor}` that the index puts there"
                        ),
                    });
                }
            }
        }
        Ok(store)
    }

    /// Map and validate the given files; a tensor name may occur only once across them.
    fn from_files(dir: PathBuf, files: &[PathBuf]) -> Result<TensorStore> {
        let mut shards = Vec::with_capacity(files.len());
        let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
        for path in files {
            let shard_index = shards.len();
            let (shard, tensors) = open_shard(path)?;
            for (name, dtype, shape, range) in tensors {
                if let Some(previous) = entries.get(&name) {
                    return Err(FormatError::DuplicateTensor {
                        tensor: name,
                        first: shards_path(&shards, previous.shard, &shard),
                        second: shard.path.clone(),
                    });
                }
                entries.insert(
                    name,
                    Entry {
                        shard: shard_index,
                        dtype,
                        shape,
                        range,
                    },
                );
            }
            shards.push(shard);
        }
        Ok(TensorStore {
            dir,
            shards,
            entries,
        })
    }

    /// The directory (or single file) this store was opened from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The safetensors files, in the order they were opened.
    pub fn files(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path.as_path()).collect()
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// A tensor by name; the error names the tensor and the directory.
    pub fn get(&self, name: &str) -> Result<TensorView<'_>> {
        self.try_get(name)
            .ok_or_else(|| FormatError::MissingTensor {
                tensor: name.to_string(),
                dir: self.dir.clone(),
            })
    }

    /// A tensor by name, or `None` when absent.
    pub fn try_get(&self, name: &str) -> Option<TensorView<'_>> {
        let (name, entry) = self.entries.get_key_value(name)?;
        let shard = &self.shards[entry.shard];
        Some(TensorView {
            name,
            dtype: entry.dtype,
            shape: &entry.shape,
            bytes: &shard.map[entry.range.clone()],
            file: &shard.path,
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Drop the pages of every shard that this process has touched from its resident set.
    ///
    /// A loader that copies weights into its own memory calls this after each layer, so that
    /// resident memory stays near one copy of the model instead of the copy plus the map.
    /// Views stay valid: the next access reads the file again. Errors are ignored, as the only
    /// effect is on memory accounting.
    pub fn release_mapped_pages(&self) {
        #[cfg(unix)]
        for shard in &self.shards {
            // SAFETY: the map is read-only and file-backed; MADV_DONTNEED only discards this
            // process's page mappings, which the kernel refills from the unchanged file on the
            // next access, so every live view keeps reading the same bytes.
            let _ = unsafe {
                shard
                    .map
                    .unchecked_advise(memmap2::UncheckedAdvice::DontNeed)
            };
        }
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// A tensor whose dtype is one of `dtypes` and whose shape is exactly `shape`.
    pub fn expect(&self, name: &str, dtypes: &[DType], shape: &[usize]) -> Result<TensorView<'_>> {
        let view = self.get(name)?;
        view.check(dtypes, shape)?;
        Ok(view)
    }

    /// Like [`TensorStore::expect`], but `None` when the tensor is absent.
    pub fn expect_optional(
        &self,
        name: &str,
        dtypes: &[DType],
        shape: &[usize],
    ) -> Result<Option<TensorView<'_>>> {
        match self.try_get(name) {
            Some(view) => view.check(dtypes, shape).map(|()| Some(view)),
            None => Ok(None),
        }
    }

    /// Sum of the sizes of all safetensors files.
    pub fn total_file_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.map.len() as u64).sum()
    }
}

/// Path of an already-opened shard, or of the one being opened (for duplicate reports).
fn shards_path(shards: &[Shard], index: usize, current: &Shard) -> PathBuf {
    shards
        .get(index)
        .map_or_else(|| current.path.clone(), |s| s.path.clone())
}

type ShardTensor = (String, DType, Vec<usize>, Range<usize>);

/// Map one file and validate its header with the safetensors crate, translating its errors
/// into messages that name the offending tensor.
fn open_shard(path: &Path) -> Result<(Shard, Vec<ShardTensor>)> {
    let invalid = |message: String| FormatError::Safetensors {
        file: path.to_path_buf(),
        message,
    };
    let file = File::open(path).map_err(|e| FormatError::io(path, e))?;
    let file_len = file.metadata().map_err(|e| FormatError::io(path, e))?.len();
    if file_len < HEADER_LEN_BYTES as u64 {
        return Err(invalid(format!(
            "file is {file_len} bytes, shorter than the 8-byte header length field (truncated?)"
        )));
    }
    // SAFETY: the map is read-only and private to this process. Like every mmap-based model
    // loader we rely on the file not being truncated or rewritten while it is open; model
    // files are written once and then only read.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| FormatError::io(path, e))?;
    let bytes: &[u8] = &map;
    if bytes.len() < HEADER_LEN_BYTES {
        // The file shrank between the size check and the mapping.
        return Err(invalid(format!(
            "file is {} bytes, shorter than the 8-byte header length field (truncated?)",
            bytes.len()
        )));
    }
    let mut len_field = [0u8; HEADER_LEN_BYTES];
    len_field.copy_from_slice(&bytes[..HEADER_LEN_BYTES]);
    let header_len = u64::from_le_bytes(len_field);
    let after_len_field = (bytes.len() - HEADER_LEN_BYTES) as u64;
    if header_len > after_len_field {
        return Err(invalid(format!(
            "header length field says {header_len} bytes, but only {after_len_field} bytes follow \
             it (truncated file or corrupt header length)"
        )));
    }
    // header_len ≤ file length, so it fits in usize.
    let header_end = HEADER_LEN_BYTES + header_len as usize;
    let (_, metadata) = safetensors::SafeTensors::read_metadata(bytes).map_err(|err| {
        invalid(describe_header_error(
            &err,
            &bytes[HEADER_LEN_BYTES..header_end],
            bytes.len() - header_end,
        ))
    })?;
    let mut tensors = Vec::with_capacity(metadata.tensors().len());
    for (name, info) in metadata.tensors() {
        let dtype =
            DType::from_safetensors(info.dtype).ok_or_else(|| FormatError::UnsupportedDtype {
                file: path.to_path_buf(),
                tensor: name.clone(),
                dtype: info.dtype.to_string(),
            })?;
        let (start, end) = info.data_offsets;
        let range = header_end + start..header_end + end;
        tensors.push((name, dtype, info.shape.clone(), range));
    }
    drop(file);
    Ok((
        Shard {
            path: path.to_path_buf(),
            map,
        },
        tensors,
    ))
}

/// Turn a safetensors validation error into a message naming the tensor at fault. The crate's
/// own errors often do not say which tensor or by how much; the header JSON does.
fn describe_header_error(
    err: &safetensors::SafeTensorError,
    header: &[u8],
    data_len: usize,
) -> String {
    use safetensors::SafeTensorError as E;
    let parsed: Option<serde_json::Map<String, serde_json::Value>> =
        serde_json::from_slice(header).ok();
    let tensors = parsed.as_ref().map(header_tensors).unwrap_or_default();
    match err {
        E::InvalidHeader(e) => format!("header is not valid UTF-8 ({e})"),
        E::InvalidHeaderStart => "header does not start with `{`".into(),
        E::InvalidHeaderDeserialization(e) | E::JsonError(e) => {
            format!("header is not valid safetensors JSON ({e})")
        }
        E::HeaderTooLarge => format!(
            "header length {} exceeds the safetensors limit of 100,000,000 bytes",
            header.len()
        ),
        E::HeaderTooSmall | E::InvalidHeaderLength => {
            "header length field is invalid (truncated file?)".into()
        }
        E::InvalidOffset(name) => {
            let offsets = tensors
                .iter()
                .find(|t| &t.name == name)
                .map(|t| format!(" [{}, {}]", t.start, t.end))
                .unwrap_or_default();
            format!(
                "tensor `{name}`: data offsets{offsets} overlap another tensor, leave a gap, or \
                 end before they start (tensors must tile the data section contiguously)"
            )
        }
        E::TensorInvalidInfo | E::ValidationOverflow | E::MisalignedSlice => {
            match tensors
                .iter()
                .find(|t| t.needed_bytes != Some(t.end.wrapping_sub(t.start)))
            {
                Some(t) => match t.needed_bytes {
                    Some(needed) => format!(
                        "tensor `{}`: dtype {} with shape {} needs {needed} bytes, but its data \
                         offsets [{}, {}] span {} bytes",
                        t.name,
                        t.dtype,
                        describe_shape(&t.shape),
                        t.start,
                        t.end,
                        t.end.wrapping_sub(t.start)
                    ),
                    None => format!(
                        "tensor `{}`: dtype {} with shape {} has a size that overflows or is not \
                         a whole number of bytes",
                        t.name,
                        t.dtype,
                        describe_shape(&t.shape)
                    ),
                },
                None => format!("invalid tensor info in header ({err})"),
            }
        }
        E::MetadataIncompleteBuffer => {
            let described = tensors.iter().map(|t| t.end).max().unwrap_or(0);
            if described > data_len {
                let culprit = tensors
                    .iter()
                    .filter(|t| t.end > data_len)
                    .min_by_key(|t| t.start)
                    .map(|t| format!("; tensor `{}` ends at offset {}", t.name, t.end))
                    .unwrap_or_default();
                format!(
                    "truncated: the header describes {described} bytes of tensor data but only \
                     {data_len} bytes follow the header{culprit}"
                )
            } else {
                format!(
                    "the header describes {described} bytes of tensor data but {data_len} bytes \
                     follow the header (trailing bytes or a missing tensor entry)"
                )
            }
        }
        other => other.to_string(),
    }
}

/// What the raw header JSON says about one tensor, for error messages.
struct HeaderTensor {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    start: usize,
    end: usize,
    /// Bytes implied by dtype and shape; `None` on overflow or an unknown/sub-byte dtype.
    needed_bytes: Option<usize>,
}

fn header_tensors(map: &serde_json::Map<String, serde_json::Value>) -> Vec<HeaderTensor> {
    let mut out = Vec::new();
    for (name, info) in map {
        if name == "__metadata__" {
            continue;
        }
        let Ok(info) = serde_json::from_value::<safetensors::tensor::TensorInfo>(info.clone())
        else {
            continue;
        };
        let needed_bytes = DType::from_safetensors(info.dtype).and_then(|d| {
            info.shape
                .iter()
                .try_fold(d.size_of(), |acc, &dim| acc.checked_mul(dim))
        });
        out.push(HeaderTensor {
            name: name.clone(),
            dtype: info.dtype.to_string(),
            shape: info.shape,
            start: info.data_offsets.0,
            end: info.data_offsets.1,
            needed_bytes,
        });
    }
    out
}

//! Parsing a GGUF header: magic, version, metadata and tensor infos, every read bounds-checked
//! and every count checked against the bytes that remain before anything is allocated for it.

use super::value::{GgufArray, GgufValue, GgufValueType};
use super::{GgmlType, GgufError, GgufTensorInfo, Result};
use std::collections::HashMap;
use std::path::Path;

/// "GGUF" as the first four bytes of a file.
pub(crate) const MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the data section and of tensor offsets when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Metadata key that overrides [`DEFAULT_ALIGNMENT`].
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// ggml tensors have at most four dimensions.
pub const MAX_DIMS: usize = 4;
/// Arrays of arrays are legal but unused in practice; a bound keeps recursion shallow on
/// hostile input.
const MAX_ARRAY_DEPTH: usize = 8;
/// Bytes of the smallest possible tensor info: name length, dim count, type, offset.
const MIN_TENSOR_INFO_LEN: u64 = 8 + 4 + 4 + 8;
/// Bytes of the smallest possible key-value pair: key length, value type, a one-byte value.
const MIN_KV_LEN: u64 = 8 + 4 + 1;

/// Everything a header says, with positions resolved against the file length.
pub(crate) struct Header {
    pub version: u32,
    pub metadata: Vec<(String, GgufValue)>,
    pub tensors: Vec<GgufTensorInfo>,
    pub alignment: u64,
    /// Absolute byte offset of the data section.
    pub data_offset: u64,
}

/// A bounds-checked reader over the file bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    file: &'a Path,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn error(&self, at: usize, message: impl Into<String>) -> GgufError {
        GgufError::Parse {
            file: self.file.to_path_buf(),
            offset: at as u64,
            message: message.into(),
        }
    }

    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.error(
                self.pos,
                format!(
                    "truncated: {} needs {n} bytes, only {} remain",
                    what(),
                    self.remaining()
                ),
            ));
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.bytes[start..self.pos])
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let bytes = self.take(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        self.array::<4>(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        self.array::<8>(what).map(u64::from_le_bytes)
    }

    /// A one-byte bool; like ggml, any nonzero byte is true.
    fn bool(&mut self, what: &dyn Fn() -> String) -> Result<bool> {
        Ok(self.array::<1>(what)?[0] != 0)
    }

    /// A u64 length followed by that many bytes of UTF-8.
    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let at = self.pos;
        let len = self.u64(&|| format!("the length of {}", what()))?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|e| self.error(at, format!("{} is not valid UTF-8 ({e})", what())))
    }

    /// Reject `count` items of at least `min_len` bytes each when the rest of the file is
    /// too short to hold them, so that no absurd count reaches an allocation.
    fn check_count(&self, count: u64, min_len: u64, what: &str) -> Result<usize> {
        let needed = count.checked_mul(min_len);
        match needed {
            Some(needed) if needed <= self.remaining() => Ok(count as usize),
            _ => Err(self.error(
                self.pos,
                format!(
                    "{what}: count {count} cannot fit in the {} bytes that remain (corrupt count \
                     or truncated file)",
                    self.remaining()
                ),
            )),
        }
    }

    fn value_type(&mut self, what: &dyn Fn() -> String) -> Result<GgufValueType> {
        let at = self.pos;
        let id = self.u32(&|| format!("the value type of {}", what()))?;
        GgufValueType::from_id(id).ok_or_else(|| {
            self.error(
                at,
                format!("{}: unknown value type {id} (expected 0..=12)", what()),
            )
        })
    }

    fn value(
        &mut self,
        ty: GgufValueType,
        depth: usize,
        what: &dyn Fn() -> String,
    ) -> Result<GgufValue> {
        Ok(match ty {
            GgufValueType::U8 => GgufValue::U8(self.array::<1>(what)?[0]),
            GgufValueType::I8 => GgufValue::I8(self.array::<1>(what)?[0] as i8),
            GgufValueType::U16 => GgufValue::U16(u16::from_le_bytes(self.array(what)?)),
            GgufValueType::I16 => GgufValue::I16(i16::from_le_bytes(self.array(what)?)),
            GgufValueType::U32 => GgufValue::U32(self.u32(what)?),
            GgufValueType::I32 => GgufValue::I32(i32::from_le_bytes(self.array(what)?)),
            GgufValueType::F32 => GgufValue::F32(f32::from_le_bytes(self.array(what)?)),
            GgufValueType::U64 => GgufValue::U64(self.u64(what)?),
            GgufValueType::I64 => GgufValue::I64(i64::from_le_bytes(self.array(what)?)),
            GgufValueType::F64 => GgufValue::F64(f64::from_le_bytes(self.array(what)?)),
            GgufValueType::Bool => GgufValue::Bool(self.bool(what)?),
            GgufValueType::String => GgufValue::String(self.string(what)?),
            GgufValueType::Array => GgufValue::Array(self.array_value(depth, what)?),
        })
    }

    fn array_value(&mut self, depth: usize, what: &dyn Fn() -> String) -> Result<GgufArray> {
        if depth >= MAX_ARRAY_DEPTH {
            return Err(self.error(
                self.pos,
                format!(
                    "{}: arrays nested deeper than {MAX_ARRAY_DEPTH} levels",
                    what()
                ),
            ));
        }
        let item_type = self.value_type(&|| format!("the element type of {}", what()))?;
        let count = self.u64(&|| format!("the element count of {}", what()))?;
        let count = self.check_count(count, item_type.min_encoded_len(), &what())?;
        type Read<'c, T> = fn(&mut Cursor<'c>, &dyn Fn() -> String) -> Result<T>;
        fn items<'c, T>(
            c: &mut Cursor<'c>,
            count: usize,
            what: &dyn Fn() -> String,
            read: Read<'c, T>,
        ) -> Result<Vec<T>> {
            let mut out = Vec::with_capacity(count);
            for i in 0..count {
                out.push(read(c, &|| format!("{}[{i}]", what()))?);
            }
            Ok(out)
        }
        Ok(match item_type {
            GgufValueType::U8 => GgufArray::U8(self.take(count as u64, what)?.to_vec()),
            GgufValueType::I8 => GgufArray::I8(
                self.take(count as u64, what)?
                    .iter()
                    .map(|&b| b as i8)
                    .collect(),
            ),
            GgufValueType::U16 => GgufArray::U16(items(self, count, what, |c, w| {
                Ok(u16::from_le_bytes(c.array(w)?))
            })?),
            GgufValueType::I16 => GgufArray::I16(items(self, count, what, |c, w| {
                Ok(i16::from_le_bytes(c.array(w)?))
            })?),
            GgufValueType::U32 => GgufArray::U32(items(self, count, what, |c, w| c.u32(w))?),
            GgufValueType::I32 => GgufArray::I32(items(self, count, what, |c, w| {
                Ok(i32::from_le_bytes(c.array(w)?))
            })?),
            GgufValueType::F32 => GgufArray::F32(items(self, count, what, |c, w| {
                Ok(f32::from_le_bytes(c.array(w)?))
            })?),
            GgufValueType::U64 => GgufArray::U64(items(self, count, what, |c, w| c.u64(w))?),
            GgufValueType::I64 => GgufArray::I64(items(self, count, what, |c, w| {
                Ok(i64::from_le_bytes(c.array(w)?))
            })?),
            GgufValueType::F64 => GgufArray::F64(items(self, count, what, |c, w| {
                Ok(f64::from_le_bytes(c.array(w)?))
            })?),
            GgufValueType::Bool => GgufArray::Bool(items(self, count, what, |c, w| c.bool(w))?),
            GgufValueType::String => {
                GgufArray::String(items(self, count, what, |c, w| c.string(w))?)
            }
            GgufValueType::Array => {
                let mut out = Vec::with_capacity(count);
                for i in 0..count {
                    out.push(self.array_value(depth + 1, &|| format!("{}[{i}]", what()))?);
                }
                GgufArray::Array(out)
            }
        })
    }
}

/// Parse the header of `bytes` (the whole file). `file` names the file in errors.
pub(crate) fn parse_header(bytes: &[u8], file: &Path) -> Result<Header> {
    let mut c = Cursor {
        bytes,
        pos: 0,
        file,
    };
    let magic = c.array::<4>(&|| "the magic number".into())?;
    if magic != MAGIC {
        return Err(c.error(
            0,
            format!(
                "not a GGUF file: starts with {:?}, expected \"GGUF\"",
                String::from_utf8_lossy(&magic)
            ),
        ));
    }
    let version = c.u32(&|| "the version".into())?;
    match version {
        2 | 3 => {}
        1 => {
            return Err(c.error(
                4,
                "GGUF version 1 (32-bit counts, 2023) is not supported; re-convert the model \
                 with a current llama.cpp",
            ));
        }
        v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
            return Err(c.error(
                4,
                format!(
                    "big-endian GGUF (version {} byte-swapped) is not supported",
                    v.swap_bytes()
                ),
            ));
        }
        v => {
            return Err(c.error(4, format!("unsupported GGUF version {v} (expected 2 or 3)")));
        }
    }
    let tensor_count = c.u64(&|| "the tensor count".into())?;
    let kv_count = c.u64(&|| "the metadata count".into())?;
    let kv_count = c.check_count(kv_count, MIN_KV_LEN, "metadata count")?;
    let mut metadata: Vec<(String, GgufValue)> = Vec::with_capacity(kv_count);
    let mut seen: HashMap<String, usize> = HashMap::with_capacity(kv_count);
    for i in 0..kv_count {
        let at = c.pos;
        let key = c.string(&|| format!("metadata key #{i}"))?;
        let what = || format!("metadata `{key}`");
        let ty = c.value_type(&what)?;
        let value = c.value(ty, 0, &what)?;
        if seen.insert(key.clone(), i).is_some() {
            return Err(c.error(at, format!("metadata key `{key}` appears twice")));
        }
        metadata.push((key, value));
    }
    let alignment = match metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
        None => DEFAULT_ALIGNMENT,
        Some((_, value)) => match value.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 30 => a,
            _ => {
                return Err(GgufError::Metadata {
                    file: file.to_path_buf(),
                    key: ALIGNMENT_KEY.into(),
                    problem: format!(
                        "expected a power of two up to 2^30, got {}",
                        value.describe()
                    ),
                });
            }
        },
    };

    let tensor_count = c.check_count(tensor_count, MIN_TENSOR_INFO_LEN, "tensor count")?;
    let mut tensors: Vec<GgufTensorInfo> = Vec::with_capacity(tensor_count);
    let mut names: HashMap<String, usize> = HashMap::with_capacity(tensor_count);
    for i in 0..tensor_count {
        let at = c.pos;
        let name = c.string(&|| format!("the name of tensor #{i}"))?;
        let what = || format!("tensor `{name}`");
        let n_dims = c.u32(&|| format!("the dimension count of {}", what()))?;
        if n_dims == 0 || n_dims as usize > MAX_DIMS {
            return Err(c.error(
                at,
                format!("{}: {n_dims} dimensions (expected 1..={MAX_DIMS})", what()),
            ));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            dims.push(c.u64(&|| format!("dimension {d} of {}", what()))?);
        }
        let type_at = c.pos;
        let type_id = c.u32(&|| format!("the type of {}", what()))?;
        let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| {
            c.error(
                type_at,
                format!(
                    "{}: unknown ggml type id {type_id} (known: {})",
                    what(),
                    known_types()
                ),
            )
        })?;
        let offset = c.u64(&|| format!("the data offset of {}", what()))?;
        let elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| {
                c.error(
                    at,
                    format!("{}: dimensions {dims:?} overflow the element count", what()),
                )
            })?;
        if !dims[0].is_multiple_of(ggml_type.block_len() as u64) {
            return Err(c.error(
                at,
                format!(
                    "{}: first dimension {} is not a multiple of the {ggml_type} block length {}",
                    what(),
                    dims[0],
                    ggml_type.block_len()
                ),
            ));
        }
        let byte_len = ggml_type.byte_len(elements).ok_or_else(|| {
            c.error(
                at,
                format!(
                    "{}: size of {elements} {ggml_type} values overflows",
                    what()
                ),
            )
        })?;
        if !offset.is_multiple_of(alignment) {
            return Err(c.error(
                at,
                format!(
                    "{}: data offset {offset} is not a multiple of the alignment {alignment}",
                    what()
                ),
            ));
        }
        if names.insert(name.clone(), i).is_some() {
            return Err(c.error(at, format!("tensor name `{name}` appears twice")));
        }
        tensors.push(GgufTensorInfo {
            name,
            ggml_type,
            dims,
            offset,
            byte_len,
        });
    }
    let header_end = c.pos as u64;
    let data_offset = header_end.div_ceil(alignment) * alignment;
    let file_len = bytes.len() as u64;
    for t in &tensors {
        let end = data_offset
            .checked_add(t.offset)
            .and_then(|start| start.checked_add(t.byte_len));
        match end {
            Some(end) if end <= file_len => {}
            _ => {
                return Err(GgufError::Tensor {
                    file: file.to_path_buf(),
                    tensor: t.name.clone(),
                    problem: format!(
                        "data [{}, +{}) of the data section (which starts at byte {data_offset}) \
                         runs past the end of the file ({file_len} bytes): truncated file or \
                         corrupt offset",
                        t.offset, t.byte_len
                    ),
                });
            }
        }
    }
    Ok(Header {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
    })
}

fn known_types() -> String {
    let names: Vec<&str> = GgmlType::ALL.iter().map(|t| t.name()).collect();
    names.join(", ")
}

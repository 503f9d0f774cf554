//! Writing GGUF files (version 3, little-endian): used by tests to build small models and
//! deliberately odd files, and by anything that needs to hand a model back to llama.cpp.

use super::parse::{ALIGNMENT_KEY, DEFAULT_ALIGNMENT, MAGIC};
use super::{GgmlType, GgufArray, GgufError, GgufValue, Result};
use std::path::Path;

/// A GGUF file under construction: metadata in insertion order, then tensors laid out in
/// insertion order, each padded to the alignment.
#[derive(Clone, Debug)]
pub struct GgufWriter {
    alignment: u64,
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<PendingTensor>,
}

#[derive(Clone, Debug)]
struct PendingTensor {
    name: String,
    ggml_type: GgmlType,
    /// ggml order (innermost first).
    dims: Vec<u64>,
    bytes: Vec<u8>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        GgufWriter::new()
    }
}

impl GgufWriter {
    pub fn new() -> GgufWriter {
        GgufWriter {
            alignment: DEFAULT_ALIGNMENT,
            metadata: Vec::new(),
            tensors: Vec::new(),
        }
    }

    /// Use `alignment` (a power of two) for the data section; written as `general.alignment`
    /// unless it is the default.
    pub fn set_alignment(&mut self, alignment: u64) -> &mut Self {
        assert!(
            alignment.is_power_of_two(),
            "GGUF alignment must be a power of two, got {alignment}"
        );
        self.alignment = alignment;
        self.metadata.retain(|(k, _)| k != ALIGNMENT_KEY);
        if alignment != DEFAULT_ALIGNMENT {
            self.metadata
                .push((ALIGNMENT_KEY.into(), GgufValue::U32(alignment as u32)));
        }
        self
    }

    /// Add (or replace) a metadata value.
    pub fn set(&mut self, key: &str, value: impl Into<GgufValue>) -> &mut Self {
        let value = value.into();
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key.to_string(), value)),
        }
        self
    }

    /// Add a tensor of PyTorch `shape` whose raw ggml-encoded bytes are `bytes`.
    pub fn add_tensor(
        &mut self,
        name: &str,
        ggml_type: GgmlType,
        shape: &[usize],
        bytes: Vec<u8>,
    ) -> Result<&mut Self> {
        let bad = |problem: String| GgufError::Tensor {
            file: "(GGUF being written)".into(),
            tensor: name.to_string(),
            problem,
        };
        if shape.is_empty() || shape.len() > super::MAX_DIMS {
            return Err(bad(format!("{} dimensions (expected 1..=4)", shape.len())));
        }
        let elements: u64 = shape.iter().map(|&d| d as u64).product();
        let expected = ggml_type.byte_len(elements);
        if expected != Some(bytes.len() as u64) {
            return Err(bad(format!(
                "{elements} {ggml_type} values need {expected:?} bytes, got {}",
                bytes.len()
            )));
        }
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(bad("added twice".into()));
        }
        self.tensors.push(PendingTensor {
            name: name.to_string(),
            ggml_type,
            dims: shape.iter().rev().map(|&d| d as u64).collect(),
            bytes,
        });
        Ok(self)
    }

    /// Add an F32 tensor.
    pub fn add_f32(&mut self, name: &str, shape: &[usize], values: &[f32]) -> Result<&mut Self> {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.add_tensor(name, GgmlType::F32, shape, bytes)
    }

    /// The whole file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_string(&mut out, key);
            out.extend_from_slice(&value.value_type().id().to_le_bytes());
            put_value(&mut out, value);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            put_string(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ggml_type.id().to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + t.bytes.len() as u64).next_multiple_of(self.alignment);
        }
        let data_start = (out.len() as u64).next_multiple_of(self.alignment);
        out.resize(data_start as usize, 0);
        for (t, offset) in self.tensors.iter().zip(offsets) {
            out.resize((data_start + offset) as usize, 0);
            out.extend_from_slice(&t.bytes);
        }
        out
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.to_bytes()).map_err(|source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, value: &GgufValue) {
    match value {
        GgufValue::U8(v) => out.push(*v),
        GgufValue::I8(v) => out.push(*v as u8),
        GgufValue::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::Bool(v) => out.push(u8::from(*v)),
        GgufValue::String(s) => put_string(out, s),
        GgufValue::Array(a) => put_array(out, a),
    }
}

fn put_array(out: &mut Vec<u8>, array: &GgufArray) {
    out.extend_from_slice(&array.element_type().id().to_le_bytes());
    out.extend_from_slice(&(array.len() as u64).to_le_bytes());
    fn each<T>(out: &mut Vec<u8>, items: &[T], put: impl Fn(&mut Vec<u8>, &T)) {
        for item in items {
            put(out, item);
        }
    }
    match array {
        GgufArray::U8(v) => out.extend_from_slice(v),
        GgufArray::I8(v) => each(out, v, |o, x| o.push(*x as u8)),
        GgufArray::U16(v) => each(out, v, |o, x| o.extend_from_slice(&x.to_le_bytes())),
        GgufArray::I16(v) => each(out, v, |o, x| o.extend_from_slice(&x.to_le_bytes())),
        GgufArray::U32(v) => each(out, v, |o, x| o.extend_from_slice(&x.to_le_bytes())),
        GgufArray::I32(v) => each(out, v, |o, x| o.extend_from_slice(&x.to_le_bytes())),
        GgufArray::F32(v) => each(out, v, |o, x| o.extend_from_slice(&x.to_le_bytes())),
        GgufArray::U64(v) => each(out, v, |o, x| o.extend_from_slice(&x.to_le_bytes())),
        GgufArray::I64(v) => each(out, v, |o, x| o.extend_from_slice(&x.to_le_bytes())),
        GgufArray::F64(v) => each(out, v, |o, x| o.extend_from_slice(&x.to_le_bytes())),
        GgufArray::Bool(v) => each(out, v, |o, x| o.push(u8::from(*x))),
        GgufArray::String(v) => each(out, v, |o, x| put_string(o, x)),
        GgufArray::Array(v) => each(out, v, put_array),
    }
}

macro_rules! value_from {
    ($($t:ty => $variant:ident),* $(,)?) => {
        $(impl From<$t> for GgufValue {
            fn from(v: $t) -> GgufValue {
                GgufValue::$variant(v)
            }
        })*
    };
}

value_from!(u8 => U8, i8 => I8, u16 => U16, i16 => I16, u32 => U32, i32 => I32, f32 => F32,
    bool => Bool, String => String, GgufArray => Array, u64 => U64, i64 => I64, f64 => F64);

impl From<&str> for GgufValue {
    fn from(v: &str) -> GgufValue {
        GgufValue::String(v.to_string())
    }
}

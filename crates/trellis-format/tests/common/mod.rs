//! Helpers shared by the integration tests: copying fixture tensors, writing safetensors
//! files and small model directories.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use trellis_format::{DType, TensorStore};
use trellis_testutil::fixture;

/// An owned tensor, ready to be written.
#[derive(Clone, Debug)]
pub struct OwnedTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl OwnedTensor {
    pub fn new(name: &str, dtype: DType, shape: &[usize], data: Vec<u8>) -> OwnedTensor {
        OwnedTensor {
            name: name.to_string(),
            dtype,
            shape: shape.to_vec(),
            data,
        }
    }

    /// A tensor of zeros.
    pub fn zeros(name: &str, dtype: DType, shape: &[usize]) -> OwnedTensor {
        let n: usize = shape.iter().product();
        OwnedTensor::new(name, dtype, shape, vec![0; n * dtype.size_of()])
    }
}

/// Path of an EXL3 fixture model directory.
pub fn exl3_dir(name: &str) -> PathBuf {
    fixture(&format!("exl3/{name}"))
}

/// Every tensor of a store whose name passes `keep`, copied.
pub fn copy_tensors(store: &TensorStore, keep: impl Fn(&str) -> bool) -> Vec<OwnedTensor> {
    store
        .names()
        .filter(|n| keep(n))
        .map(|n| {
            let v = store.get(n).unwrap();
            OwnedTensor::new(n, v.dtype, v.shape, v.bytes.to_vec())
        })
        .collect()
}

/// Serialise tensors with the safetensors crate.
pub fn serialize(tensors: &[OwnedTensor]) -> Vec<u8> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|t| {
            let view = safetensors::tensor::TensorView::new(
                t.dtype.to_safetensors(),
                t.shape.clone(),
                &t.data,
            )
            .unwrap();
            (t.name.clone(), view)
        })
        .collect();
    safetensors::serialize(views, None).unwrap()
}

pub fn write_safetensors(path: &Path, tensors: &[OwnedTensor]) {
    std::fs::write(path, serialize(tensors)).unwrap();
}

/// A fresh temporary directory.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("trellis-format-test-")
        .tempdir()
        .unwrap()
}

/// A temp model directory holding the fixture's JSON files and the given tensors as
/// `model.safetensors`.
pub fn model_dir_with(source: &Path, tensors: &[OwnedTensor]) -> tempfile::TempDir {
    let dir = temp_dir();
    copy_json_files(source, dir.path());
    write_safetensors(&dir.path().join("model.safetensors"), tensors);
    dir
}

pub fn copy_json_files(source: &Path, dest: &Path) {
    for entry in std::fs::read_dir(source).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            std::fs::copy(&path, dest.join(path.file_name().unwrap())).unwrap();
        }
    }
}

/// The error message of a result that must be an error.
pub fn err_msg<T>(result: trellis_format::Result<T>) -> String {
    match result {
        Ok(_) => panic!("expected an error"),
        Err(e) => {
            // Shown with --nocapture, to read the messages users will see.
            eprintln!("error message: {e}");
            e.to_string()
        }
    }
}

/// Read a JSON file.
pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

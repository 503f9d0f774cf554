//! Test support shared by the workspace's crates: where the fixtures live, reading reference
//! tensors from safetensors files, and the comparison metrics the fixture README defines.
//!
//! Fixtures are found at `<workspace root>/../shared/fixtures`, or wherever
//! `TRELLIS_FIXTURES` points. A missing fixture directory is a test failure, never a skip.

use half::{bf16, f16};
use rand::Rng;
use rand::rngs::StdRng;
use safetensors::{Dtype, SafeTensors};
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use trellis_codec::{BitWidth, Codebook, TrellisLinear};

/// Environment variable that overrides the fixture directory.
pub const FIXTURES_ENV: &str = "TRELLIS_FIXTURES";

/// The workspace root (two levels above this crate's manifest).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .and_then(Path::parent)
        .expect("crate lives at <root>/crates/<name>")
        .to_path_buf()
}

/// The fixture directory; panics with instructions when it does not exist.
pub fn fixtures_dir() -> PathBuf {
    let dir = match std::env::var_os(FIXTURES_ENV) {
        Some(d) => PathBuf::from(d),
        None => workspace_root().join("../shared/fixtures"),
    };
    assert!(
        dir.join("README.md").is_file(),
        "test fixtures not found at {} (set {FIXTURES_ENV} to the shared fixtures directory)",
        dir.display()
    );
    dir
}

/// A fixture file or directory by relative path; panics when absent.
pub fn fixture(rel: &str) -> PathBuf {
    let p = fixtures_dir().join(rel);
    assert!(p.exists(), "fixture {} is missing", p.display());
    p
}

/// A fixture committed with the project (`<workspace root>/tests/fixtures/<rel>`), made by
/// `scripts/make_reference_models.py`; panics when absent.
pub fn repo_fixture(rel: &str) -> PathBuf {
    let p = workspace_root().join("tests/fixtures").join(rel);
    assert!(p.exists(), "project fixture {} is missing", p.display());
    p
}

/// The EXL3 model directories in the fixtures.
pub const EXL3_MODELS: [&str; 5] = [
    "glm4-moe-lite-tiny-4.0bpw",
    "glm4-moe-lite-tiny-2.5bpw",
    "glm4-moe-lite-tiny-3.0bpw-mcg",
    "llama-tiny-4.0bpw",
    "qwen3-tiny-3.0bpw",
];

/// A safetensors file read fully into memory, with typed accessors.
pub struct TensorFile {
    bytes: Vec<u8>,
    path: PathBuf,
}

/// A tensor converted to a plain vector, with its shape.
#[derive(Clone, Debug)]
pub struct Tensor<T> {
    pub shape: Vec<usize>,
    pub data: Vec<T>,
}

impl TensorFile {
    pub fn open(path: impl AsRef<Path>) -> TensorFile {
        let path = path.as_ref().to_path_buf();
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        TensorFile { bytes, path }
    }

    fn view(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes)
            .unwrap_or_else(|e| panic!("{}: {e}", self.path.display()))
    }

    pub fn names(&self) -> Vec<String> {
        let mut n: Vec<String> = self
            .view()
            .names()
            .into_iter()
            .map(str::to_string)
            .collect();
        n.sort();
        n
    }

    pub fn has(&self, name: &str) -> bool {
        self.view().tensor(name).is_ok()
    }

    fn raw(&self, name: &str) -> (Dtype, Vec<usize>, Vec<u8>) {
        let v = self.view();
        let t = v
            .tensor(name)
            .unwrap_or_else(|e| panic!("{}: tensor {name}: {e}", self.path.display()));
        (t.dtype(), t.shape().to_vec(), t.data().to_vec())
    }

    /// Any float tensor widened to f32.
    pub fn f32(&self, name: &str) -> Tensor<f32> {
        let (dtype, shape, data) = self.raw(name);
        let data = match dtype {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => panic!("{name}: {other:?} is not a float tensor"),
        };
        Tensor { shape, data }
    }

    /// An fp16 tensor as raw bit patterns (for bit-exact comparisons).
    pub fn f16_bits(&self, name: &str) -> Tensor<u16> {
        let (dtype, shape, data) = self.raw(name);
        assert_eq!(dtype, Dtype::F16, "{name} is not fp16");
        let data = data
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        Tensor { shape, data }
    }

    /// An integer tensor (i64, i32 or i16) widened to i64.
    pub fn i64(&self, name: &str) -> Tensor<i64> {
        let (dtype, shape, data) = self.raw(name);
        let data = match dtype {
            Dtype::I64 => data
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            Dtype::I32 => data
                .chunks_exact(4)
                .map(|b| i64::from(i32::from_le_bytes(b.try_into().unwrap())))
                .collect(),
            Dtype::I16 => data
                .chunks_exact(2)
                .map(|b| i64::from(i16::from_le_bytes(b.try_into().unwrap())))
                .collect(),
            other => panic!("{name}: {other:?} is not an integer tensor"),
        };
        Tensor { shape, data }
    }
}

/// ‖a − b‖ / ‖b‖; NaN anywhere yields infinity so that it never passes a bound.
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let mut num = 0.0f64;
    let mut den = 0.0f64;
    for (&x, &y) in a.iter().zip(b) {
        if !x.is_finite() || !y.is_finite() {
            return f64::INFINITY;
        }
        num += (f64::from(x) - f64::from(y)).powi(2);
        den += f64::from(y).powi(2);
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// max|a − b| / max|b|; NaN anywhere yields infinity.
pub fn max_abs_rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let mut diff = 0.0f64;
    let mut scale = 0.0f64;
    for (&x, &y) in a.iter().zip(b) {
        if !x.is_finite() || !y.is_finite() {
            return f64::INFINITY;
        }
        diff = diff.max((f64::from(x) - f64::from(y)).abs());
        scale = scale.max(f64::from(y).abs());
    }
    diff / scale.max(f64::MIN_POSITIVE)
}

/// Index of the largest value (lowest index on ties).
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// Difference between the largest and second-largest value.
pub fn top2_margin(v: &[f32]) -> f32 {
    let mut top = f32::NEG_INFINITY;
    let mut second = f32::NEG_INFINITY;
    for &x in v {
        if x > top {
            second = top;
            top = x;
        } else if x > second {
            second = x;
        }
    }
    top - second
}

/// A deterministic value in [-1, 1) for test inputs: a multiplicative hash of the index and a
/// salt, so that tests need no random-number generator and fail the same way every run.
pub fn noise(i: usize, salt: usize) -> f32 {
    let x = (i.wrapping_mul(2_654_435_761) ^ salt.wrapping_mul(40_503)) % 10_007;
    x as f32 / 5_003.5 - 1.0
}

/// A random trellis linear: random words (every bit pattern is a valid walk), random signed
/// scales (suh ≈ 0.05, svh ≈ 1, bias ≈ 0.5 in magnitude), optional bias.
pub fn random_trellis(
    rng: &mut StdRng,
    in_features: usize,
    out_features: usize,
    bits: BitWidth,
    codebook: Codebook,
    bias: bool,
) -> TrellisLinear<'static> {
    let k = in_features.next_multiple_of(128);
    let n = out_features.next_multiple_of(128);
    let words: Vec<u16> = (0..(k / 16) * (n / 16) * bits.tile_words())
        .map(|_| rng.random())
        .collect();
    let scale = |rng: &mut StdRng, len: usize, s: f32| -> Vec<f16> {
        (0..len)
            .map(|_| {
                let sign = if rng.random::<bool>() { 1.0 } else { -1.0 };
                f16::from_f32(sign * s * rng.random_range(0.5f32..1.5))
            })
            .collect()
    };
    let suh = scale(rng, k, 0.05);
    let svh = scale(rng, n, 1.0);
    let bias = bias.then(|| scale(rng, n, 0.5));
    TrellisLinear::new(
        Cow::Owned(words),
        Cow::Owned(suh),
        Cow::Owned(svh),
        bias.map(Cow::Owned),
        bits,
        codebook,
        in_features,
        out_features,
    )
    .expect("consistent random trellis")
}

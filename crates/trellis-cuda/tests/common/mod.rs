//! Helpers shared by the GPU tests: one backend of each kind per process, random weights, and
//! comparisons that never let a NaN pass.
#![allow(dead_code)]

use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::sync::OnceLock;
use trellis_backend::Backend;
use trellis_backend::cpu::CpuBackend;
use trellis_cuda::{CudaBackend, CudaBuffer};
use trellis_format::{DType, TensorView};
use trellis_testutil::{max_abs_rel, rel_l2};

pub fn gpu() -> &'static CudaBackend {
    static GPU: OnceLock<CudaBackend> = OnceLock::new();
    GPU.get_or_init(|| {
        let b = CudaBackend::new(0).expect("CUDA device 0 (these tests need an NVIDIA GPU)");
        eprintln!(
            "GPU: {} (sm_{}{}, {} SMs)",
            b.device_name(),
            b.compute_capability().0,
            b.compute_capability().1,
            b.multiprocessors()
        );
        b
    })
}

/// A second GPU backend that decodes every trellis linear into dense f16 at upload
/// (`--dequantize all`).
pub fn gpu_dequantized() -> &'static CudaBackend {
    static GPU: OnceLock<CudaBackend> = OnceLock::new();
    GPU.get_or_init(|| {
        let mut b = CudaBackend::new(0).expect("CUDA device 0 (these tests need an NVIDIA GPU)");
        b.set_dequantize(trellis_cuda::DequantizeSet::ALL);
        b
    })
}

pub fn cpu() -> &'static CpuBackend {
    static CPU: OnceLock<CpuBackend> = OnceLock::new();
    CPU.get_or_init(CpuBackend::new)
}

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

pub fn uniform(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

/// Errors of `got` against `want`: (max|diff| / max|want|, ‖diff‖ / ‖want‖); NaN gives ∞.
pub fn errors(got: &[f32], want: &[f32]) -> (f64, f64) {
    (max_abs_rel(got, want), rel_l2(got, want))
}

/// Assert both errors are within `bound`, printing them for the log.
pub fn check(what: &str, got: &[f32], want: &[f32], bound: f64) -> f64 {
    let (max_rel, l2) = errors(got, want);
    eprintln!("{what}: max rel {max_rel:.2e}, rel L2 {l2:.2e}");
    assert!(
        max_rel <= bound && l2 <= bound,
        "{what}: max rel {max_rel:.3e}, rel L2 {l2:.3e} above {bound:.1e}"
    );
    max_rel
}

/// A GPU buffer holding `values`, with `spare` extra values poisoned with NaN.
pub fn gpu_buffer(values: &[f32], spare: usize) -> CudaBuffer {
    let g = gpu();
    let mut b = g.alloc(values.len() + spare).unwrap();
    g.fill(&mut b, f32::NAN, values.len() + spare);
    g.write(&mut b, values);
    b
}

/// A GPU buffer of `len` NaNs: any element an op fails to write stays NaN and fails `check`.
pub fn poisoned(len: usize) -> CudaBuffer {
    let g = gpu();
    let mut b = g.alloc(len).unwrap();
    g.fill(&mut b, f32::NAN, len);
    b
}

pub fn read_gpu(b: &CudaBuffer, len: usize) -> Vec<f32> {
    let mut v = vec![0.0; len];
    gpu().read(b, &mut v);
    v
}

/// Raw little-endian bytes of `values` stored as `dtype` (F32, F16 or BF16).
pub fn float_bytes(values: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F16 => values
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect(),
        DType::BF16 => values
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect(),
        other => panic!("{other:?} is not a float type"),
    }
}

pub fn view<'a>(
    name: &'a str,
    dtype: DType,
    shape: &'a [usize],
    bytes: &'a [u8],
) -> TensorView<'a> {
    TensorView {
        name,
        dtype,
        shape,
        bytes,
        file: Path::new("<test>"),
    }
}

//! Host-side checks that need no GPU: the kernel sources compile under NVRTC (when the NVRTC
//! library can be loaded), and creating a backend without a GPU is an error, not a panic.

use trellis_cuda::{CudaBackend, compile_kernels};

/// Needs only libnvrtc (no driver, no GPU): `LD_LIBRARY_PATH=<cuda>/lib64 cargo test -p
/// trellis-cuda --test kernels -- --ignored`.
#[test]
#[ignore = "needs the NVRTC library"]
fn kernels_compile_with_nvrtc() {
    for arch in ["compute_90", "compute_80"] {
        // SAFETY of the probe is handled inside; a missing library is reported, not skipped.
        let ptx = compile_kernels(arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
        assert!(
            ptx.contains(".entry trellis_matmul_tm1"),
            "{arch}: kernel missing from PTX"
        );
        assert!(
            ptx.contains(".entry moe_route"),
            "{arch}: kernel missing from PTX"
        );
    }
}

/// On a machine without a driver or GPU this must be an `Err` (checked in CI); on a GPU
/// machine it must open device 0.
#[test]
fn creating_a_backend_never_panics() {
    match CudaBackend::new(0) {
        Ok(b) => eprintln!("CUDA device 0: {}", b.device_name()),
        Err(e) => eprintln!("no CUDA backend: {e}"),
    }
    assert!(
        CudaBackend::new(1 << 20).is_err(),
        "a nonexistent device must be an error"
    );
}

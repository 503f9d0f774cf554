//! Host-side checks that need no GPU: the kernel sources compile under NVRTC (when the NVRTC
//! library can be loaded), and creating a backend without a GPU is an error, not a panic.

use trellis_cuda::{
    CudaBackend, CudaTileSearch, compile_kernels, compile_kernels_with, kernel_names,
};

/// Needs only libnvrtc (no driver, no GPU): `LD_LIBRARY_PATH=<cuda>/lib64 cargo test -p
/// trellis-cuda --test kernels -- --ignored`.
#[test]
#[ignore = "needs the NVRTC library"]
fn kernels_compile_with_nvrtc() {
    for arch in ["compute_90", "compute_80"] {
        // SAFETY of the probe is handled inside; a missing library is reported, not skipped.
        let ptx = compile_kernels(arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
        // Every kernel the backend loads must be an entry of the module: a source edit that
        // loses one still compiles, and would otherwise only fail on a GPU.
        let names = kernel_names();
        assert!(names.len() > 40, "{} kernel names", names.len());
        for name in names {
            assert!(
                ptx.contains(&format!(".entry {name}(")),
                "{arch}: kernel {name} missing from PTX"
            );
        }
    }
    // The launch timeline (TRELLIS_CUDA_TRACE) is compiled in only on request: it must compile
    // too, and define the ring the host reads.
    let traced = compile_kernels_with("compute_90", true).unwrap_or_else(|e| panic!("{e}"));
    assert!(traced.contains("trellis_trace_next") && traced.contains("globaltimer"));
    let plain = compile_kernels("compute_90").unwrap_or_else(|e| panic!("{e}"));
    assert!(!plain.contains("globaltimer"));
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
    assert!(
        CudaTileSearch::new(1 << 20).is_err(),
        "a tile search on a nonexistent device must be an error"
    );
}

//! The device: one context, one stream, and the kernels compiled from the embedded sources.
//!
//! Kernels are CUDA C without `#include`s, compiled by NVRTC for the device's architecture when
//! the backend is created. The PTX is cached on disk (keyed by a hash of the source, the options
//! and the NVRTC version) and in the process, so only the first start pays for compilation.

use crate::trace::{LaunchTrace, TRACE_ENV};
use cudarc::driver::result as driver_result;
use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DeviceRepr, DriverError};
use cudarc::nvrtc::{CompileOptions, Ptx};
use std::collections::HashMap;
use std::ffi::c_void;
use std::marker::PhantomData;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use trellis_backend::BackendError;

/// The kernel sources, concatenated in this order into one NVRTC program.
const SOURCES: [(&str, &str); 7] = [
    ("common.cu", include_str!("../kernels/common.cu")),
    ("elementwise.cu", include_str!("../kernels/elementwise.cu")),
    ("trellis.cu", include_str!("../kernels/trellis.cu")),
    ("dense.cu", include_str!("../kernels/dense.cu")),
    ("attention.cu", include_str!("../kernels/attention.cu")),
    ("moe.cu", include_str!("../kernels/moe.cu")),
    ("viterbi.cu", include_str!("../kernels/viterbi.cu")),
];

/// Row tile heights the matmul kernels are instantiated for (`…_tm{N}`).
pub(crate) const TILE_ROWS: [usize; 5] = [1, 2, 4, 8, 16];

/// Most dynamic shared memory of the tensor-core trellis kernel: words of K = 8 (16 KiB) and
/// the staged inputs (34 KiB).
pub(crate) const MMA_LINEAR_SHARED_BYTES: usize = 64 << 10;

/// Dynamic shared memory of the routing kernel (gate rows and the router input).
pub(crate) const ROUTE_SHARED_BYTES: usize = 96 << 10;

/// Env var: synchronise after every launch and name the kernel that failed (debugging).
pub const SYNC_ENV: &str = "TRELLIS_CUDA_SYNC";
/// Env var: run trellis linears as three launches (input transform, product, output
/// transform) instead of the single fused launch (for comparison and as a fallback).
pub const UNFUSED_ENV: &str = "TRELLIS_CUDA_UNFUSED_LINEAR";
/// Env var: time every launch with events (synchronising after each) and keep per-kernel
/// totals, readable with `CudaBackend::kernel_profile` (slows everything down; for analysis).
pub const PROFILE_ENV: &str = "TRELLIS_CUDA_PROFILE";
/// Env var: how many waves of blocks the split-k tensor-core trellis linears aim for (default
/// 2; SIMT launches take the split of least modelled time, `split_reduction` in `linear.rs`).
pub const SPLIT_WAVES_ENV: &str = "TRELLIS_CUDA_SPLIT_WAVES";
/// Env var: `0` turns off recording decode steps as CUDA graphs (each op then launches its
/// kernels directly).
pub const GRAPH_ENV: &str = "TRELLIS_CUDA_GRAPH";
/// Env var: `0` turns off the tensor-core kernels (trellis GEMM for tall row tiles, MLA
/// decode), leaving the SIMT kernels.
pub const MMA_ENV: &str = "TRELLIS_CUDA_MMA";
/// Env var: `0` keeps the SIMT trellis kernels for row tiles of up to 16 rows (decode) instead
/// of the 16-row tensor-core kernel (for comparison).
pub const MMA16_ENV: &str = "TRELLIS_CUDA_MMA16";
/// Env var: `0` runs one-row trellis launches with the block-wide staging of
/// `trellis_linear_tm1` instead of the per-warp pipelines of `trellis_row_tm1` (for comparison).
pub const ROW_PIPE_ENV: &str = "TRELLIS_CUDA_ROW_PIPE";
/// Env var: `0` turns off programmatic dependent launch (each kernel then starts only after
/// its predecessor has completed; see `pdl_entry` in `kernels/common.cu`).
pub const PDL_ENV: &str = "TRELLIS_CUDA_PDL";
/// Env var: least 32-position tiles per context split of the tensor-core MLA decode (default:
/// one while the unabsorb can combine the splits itself, else two), for measuring.
pub const MLA_MIN_TILES_ENV: &str = "TRELLIS_CUDA_MLA_MIN_TILES";
/// Waves of blocks a split-k tensor-core trellis launch aims for by default. Measured on the
/// H200 when every trellis launch used it (full GLM, 3.0 bpw, one call, waves 2 / 3 / 4 / 6 /
/// 8): decode after 512 tokens 153.1 / 152.4 / 152.0 / 151.0 / 147.0 tok/s, prefill of 512
/// tokens 1,802 / 1,755 / 1,698 / 1,651 / 1,592 tok/s.
const DEFAULT_SPLIT_WAVES: usize = 2;
/// Env var: where compiled kernels are cached (default `$XDG_CACHE_HOME` or `~/.cache`,
/// `/trellis/kernels`); `TRELLIS_HOME` moves it to `$TRELLIS_HOME/kernels`.
pub const KERNEL_CACHE_ENV: &str = "TRELLIS_KERNEL_CACHE";

pub(crate) fn cuda_error(what: impl std::fmt::Display) -> BackendError {
    BackendError::Unsupported {
        backend: "cuda",
        what: what.to_string(),
    }
}

/// The whole program text handed to NVRTC.
pub fn kernel_source() -> String {
    let mut src = String::new();
    for (name, text) in SOURCES {
        src.push_str(&format!("// ---- {name} ----\n"));
        src.push_str(text);
        src.push('\n');
    }
    src
}

/// 64-bit FNV-1a: a stable hash for cache file names (std's hasher may change between releases).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os(KERNEL_CACHE_ENV) {
        return Some(PathBuf::from(dir));
    }
    if let Some(home) = std::env::var_os("TRELLIS_HOME") {
        return Some(PathBuf::from(home).join("kernels"));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("trellis").join("kernels"))
}

fn nvrtc_version() -> (i32, i32) {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: nvrtcVersion only writes the two integers it is given.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    (major, minor)
}

/// Compile the kernels for `arch` (e.g. `compute_90`), or take them from a cache.
pub fn compile_kernels(arch: &str) -> Result<String, BackendError> {
    compile_kernels_with(arch, false)
}

/// [`compile_kernels`], with the launch timeline compiled in when `trace` (see
/// [`crate::TRACE_ENV`]).
pub fn compile_kernels_with(arch: &str, trace: bool) -> Result<String, BackendError> {
    static COMPILED: OnceLock<Mutex<HashMap<String, String>>> = OnceLock::new();
    let memo = COMPILED.get_or_init(|| Mutex::new(HashMap::new()));
    let memo_key = format!("{arch}{}", if trace { " traced" } else { "" });
    if let Some(ptx) = memo.lock().expect("kernel memo").get(&memo_key) {
        return Ok(ptx.clone());
    }
    let source = kernel_source();
    let mut options = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "-lineinfo".to_string(),
    ];
    if trace {
        options.push("-DTRELLIS_TRACE".to_string());
    }
    let (major, minor) = nvrtc_version();
    let key = fnv1a(&[
        source.as_bytes(),
        options.join(" ").as_bytes(),
        format!("nvrtc {major}.{minor}").as_bytes(),
    ]);
    let path = cache_dir().map(|d| d.join(format!("{key:016x}.ptx")));
    if let Some(text) = path.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) {
        memo.lock()
            .expect("kernel memo")
            .insert(memo_key, text.clone());
        return Ok(text);
    }
    let opts = CompileOptions {
        options,
        name: Some("trellis.cu".to_string()),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(&source, opts).map_err(|e| match e {
        cudarc::nvrtc::CompileError::CompileError { log, .. } => cuda_error(format!(
            "NVRTC could not compile the kernels:\n{}",
            log.to_string_lossy()
        )),
        other => cuda_error(format!("NVRTC: {other}")),
    })?;
    let text = ptx.to_src();
    if let Some(path) = path {
        // A failed cache write only costs a recompilation next time.
        if let Some(dir) = path.parent()
            && std::fs::create_dir_all(dir).is_ok()
        {
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            if std::fs::write(&tmp, &text).is_ok() {
                let _ = std::fs::rename(&tmp, &path);
            }
        }
    }
    memo.lock()
        .expect("kernel memo")
        .insert(memo_key, text.clone());
    Ok(text)
}

/// A loaded kernel and its name (for error messages).
pub(crate) struct Kernel {
    pub name: &'static str,
    pub func: CudaFunction,
}

/// Every kernel of the module: `$name` is one kernel; each `$tiled` is compiled once per row-tile
/// height in [`TILE_ROWS`] (`<name>_tm<rows>`).
macro_rules! kernel_table {
    ($($name:ident),* $(,)?; tiled: $($tiled:ident),* $(,)?) => {
        /// Every kernel of the module, by name.
        pub(crate) struct Kernels {
            $(pub $name: Kernel,)*
            $(pub $tiled: Vec<Kernel>,)*
        }

        /// The name of every kernel [`Kernels`] loads, so that a test can find each one in
        /// the compiled module without a GPU.
        pub fn kernel_names() -> Vec<String> {
            let mut names: Vec<String> = vec![$(stringify!($name).to_string()),*];
            for prefix in [$(stringify!($tiled)),*] {
                names.extend(TILE_ROWS.iter().map(|tm| format!("{prefix}_tm{tm}")));
            }
            names
        }

        impl Kernels {
            fn load(module: &Arc<CudaModule>) -> Result<Kernels, DriverError> {
                let tiled = |prefix: &'static str| -> Result<Vec<Kernel>, DriverError> {
                    TILE_ROWS
                        .iter()
                        .map(|tm| {
                            let name: &'static str =
                                Box::leak(format!("{prefix}_tm{tm}").into_boxed_str());
                            Ok(Kernel { name, func: module.load_function(name)? })
                        })
                        .collect()
                };
                Ok(Kernels {
                    $($name: Kernel {
                        name: stringify!($name),
                        func: module.load_function(stringify!($name))?,
                    },)*
                    $($tiled: tiled(stringify!($tiled))?,)*
                })
            }
        }
    };
}

kernel_table!(
    embed_f32,
    embed_f16,
    embed_bf16,
    rms_norm,
    add_inplace,
    silu_mul,
    gelu_tanh_mul,
    copy_rows,
    argmax_rows,
    rope,
    fill_f32,
    trellis_prep,
    trellis_finish,
    kv_append_f32,
    kv_append_f16,
    gqa_attention_f32,
    gqa_attention_f16,
    mla_append_f32,
    mla_append_f16,
    mla_absorb_q_append_wide_f16,
    mla_absorb_q_f32,
    mla_absorb_q_f16,
    mla_absorb_q_bf16,
    mla_unabsorb_f32,
    mla_unabsorb_f16,
    mla_unabsorb_bf16,
    mla_absorb_q_wide_f32,
    mla_absorb_q_wide_f16,
    mla_absorb_q_wide_bf16,
    mla_unabsorb_wide_f32,
    mla_unabsorb_wide_f16,
    mla_unabsorb_wide_bf16,
    mla_attend_f32,
    mla_attend_f16,
    mla_decode_f32,
    mla_decode_f16,
    mla_decode_mma,
    mla_combine,
    trellis_mma_tm16,
    trellis_mma_tm64,
    trellis_row_tm1,
    moe_route,
    moe_plan,
    moe_combine,
    viterbi_tiles;
    tiled: trellis_matmul,
    trellis_linear,
    dense_matmul_f32,
    dense_matmul_f16,
    dense_matmul_bf16,
);

/// Values a kernel parameter may take by value: copied into an 8-byte slot.
pub(crate) trait ScalarArg: Copy {}
impl ScalarArg for u64 {}
impl ScalarArg for i32 {}
impl ScalarArg for u32 {}
impl ScalarArg for f32 {}

const MAX_ARGS: usize = 24;

/// Kernel arguments without heap allocation: scalars are copied into slots, structs are
/// borrowed for the lifetime `'a` (until the launch).
pub(crate) struct Args<'a> {
    slots: [u64; MAX_ARGS],
    borrowed: [*const c_void; MAX_ARGS],
    count: usize,
    _borrow: PhantomData<&'a ()>,
}

impl<'a> Args<'a> {
    pub fn new() -> Args<'a> {
        Args {
            slots: [0; MAX_ARGS],
            borrowed: [std::ptr::null(); MAX_ARGS],
            count: 0,
            _borrow: PhantomData,
        }
    }

    /// A device pointer (0 for a null pointer) or another scalar.
    pub fn arg<T: ScalarArg>(&mut self, value: T) -> &mut Self {
        assert!(self.count < MAX_ARGS, "too many kernel arguments");
        const { assert!(std::mem::size_of::<T>() <= 8) };
        let mut slot = 0u64;
        // SAFETY: T is a plain value of at most 8 bytes (checked above), copied into the low
        // bytes of the slot, where the kernel reads a parameter of T's size (little endian).
        unsafe {
            std::ptr::copy_nonoverlapping(
                (&value as *const T).cast::<u8>(),
                (&mut slot as *mut u64).cast::<u8>(),
                std::mem::size_of::<T>(),
            );
        }
        self.slots[self.count] = slot;
        self.borrowed[self.count] = std::ptr::null();
        self.count += 1;
        self
    }

    /// A struct parameter passed by value to the kernel (read at launch).
    pub fn arg_struct<T: DeviceRepr>(&mut self, value: &'a T) -> &mut Self {
        assert!(self.count < MAX_ARGS, "too many kernel arguments");
        self.borrowed[self.count] = (value as *const T).cast();
        self.count += 1;
        self
    }
}

/// Whether the stream is being recorded into a graph, or a recorded step is being replayed (its
/// ops then enqueue nothing: the graph does the work).
#[derive(Default)]
pub(crate) struct CaptureState {
    capturing: AtomicBool,
    broken: AtomicBool,
    replaying: AtomicBool,
}

impl CaptureState {
    pub fn is_capturing(&self) -> bool {
        self.capturing.load(Ordering::Acquire)
    }

    /// Something that cannot be recorded (an allocation) was asked for during a recording.
    pub fn mark_broken(&self) {
        self.broken.store(true, Ordering::Release);
    }

    pub fn take_broken(&self) -> bool {
        self.broken.swap(false, Ordering::AcqRel)
    }

    pub fn set_capturing(&self, on: bool) {
        self.capturing.store(on, Ordering::Release);
    }

    pub fn is_replaying(&self) -> bool {
        self.replaying.load(Ordering::Acquire)
    }

    pub fn set_replaying(&self, on: bool) {
        self.replaying.store(on, Ordering::Release);
    }
}

/// Launch geometry.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Grid {
    pub blocks: (u32, u32, u32),
    pub threads: u32,
    pub shared_bytes: u32,
}

impl Grid {
    pub fn new(blocks: (usize, usize, usize), threads: u32) -> Grid {
        let dim = |v: usize| u32::try_from(v.max(1)).expect("grid dimension fits u32");
        Grid {
            blocks: (dim(blocks.0), dim(blocks.1), dim(blocks.2)),
            threads,
            shared_bytes: 0,
        }
    }

    pub fn shared(mut self, bytes: usize) -> Grid {
        self.shared_bytes = u32::try_from(bytes).expect("shared memory size");
        self
    }
}

/// `cuLaunchKernelEx` with programmatic stream serialization allowed: the kernel may be
/// scheduled before its predecessor in the stream completes (it waits on entry).
///
/// # Safety
/// As for `cuLaunchKernel`: `params` holds one pointer per kernel parameter, to values of the
/// kernel's parameter types, and the kernel was compiled with `pdl_entry` at its start.
unsafe fn launch_programmatic(
    function: cudarc::driver::sys::CUfunction,
    grid: Grid,
    stream: cudarc::driver::sys::CUstream,
    params: &mut [*mut c_void],
) -> Result<(), DriverError> {
    use cudarc::driver::sys::{
        CUlaunchAttribute, CUlaunchAttributeID, CUlaunchAttributeValue, CUlaunchConfig,
    };
    let mut attribute = CUlaunchAttribute {
        id: CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
        pad: [0; 4],
        value: CUlaunchAttributeValue {
            programmaticStreamSerializationAllowed: 1,
        },
    };
    let config = CUlaunchConfig {
        gridDimX: grid.blocks.0,
        gridDimY: grid.blocks.1,
        gridDimZ: grid.blocks.2,
        blockDimX: grid.threads,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: grid.shared_bytes,
        hStream: stream,
        attrs: &mut attribute,
        numAttrs: 1,
    };
    // SAFETY: `config` and `attribute` outlive the call, which copies them; the caller
    // vouches for `function` and `params`.
    unsafe {
        cudarc::driver::sys::cuLaunchKernelEx(
            &config,
            function,
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
        .result()
    }
}

/// Context, stream and kernels of one GPU.
pub(crate) struct Device {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub kernels: Kernels,
    pub sm_count: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    /// Most dynamic shared memory one block may use (bytes).
    pub max_shared_bytes: usize,
    /// Trellis linears as three launches (see [`UNFUSED_ENV`]).
    pub unfused_linear: bool,
    /// Waves of blocks that split reductions aim for (see [`SPLIT_WAVES_ENV`]).
    pub split_waves: usize,
    sync_each_launch: bool,
    /// Per-kernel (launches, device µs) when profiling (see [`PROFILE_ENV`]).
    pub profile: Option<Mutex<HashMap<&'static str, (usize, f64)>>>,
    /// Device memory held by this backend's allocations.
    pub memory: Arc<crate::memory::MemoryCounter>,
    /// Graph recording / replay state of the stream.
    pub capture: CaptureState,
    /// Decode steps may be recorded as graphs (see [`GRAPH_ENV`]; never while profiling or
    /// synchronising after each launch).
    pub graphs: bool,
    /// Tensor-core kernels may be used (see [`MMA_ENV`]; needs compute capability 8.0+).
    pub mma: bool,
    /// Trellis row tiles of up to 16 rows use the 16-row tensor-core kernel (see [`MMA16_ENV`]).
    pub mma16: bool,
    /// One-row trellis launches use `trellis_row_tm1` (see [`ROW_PIPE_ENV`]).
    pub row_pipe: bool,
    /// Kernels are launched with programmatic stream serialization (see [`PDL_ENV`]; needs
    /// compute capability 9.0+, where every kernel waits for its predecessors on entry).
    pdl: bool,
    /// The launch timeline, when recorded (see [`crate::TRACE_ENV`]).
    pub trace: Option<LaunchTrace>,
    /// Least tiles per MLA decode split, when set (see [`MLA_MIN_TILES_ENV`]).
    pub mla_min_tiles: Option<usize>,
}

impl Device {
    pub fn open(ordinal: usize) -> Result<Device, BackendError> {
        // SAFETY: only tries to open the driver and NVRTC libraries by name.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(cuda_error(
                "no CUDA driver library (libcuda.so) was found: is an NVIDIA driver installed?",
            ));
        }
        // SAFETY: as above.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(cuda_error(
                "the NVRTC library (libnvrtc.so) was not found: add CUDA's lib64 directory to LD_LIBRARY_PATH",
            ));
        }
        let count = CudaContext::device_count()
            .map_err(|e| cuda_error(format!("no usable CUDA device: {e}")))?;
        if ordinal >= usize::try_from(count).unwrap_or(0) {
            return Err(cuda_error(format!(
                "CUDA device {ordinal} requested but {count} present"
            )));
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| cuda_error(format!("creating a context on device {ordinal}: {e}")))?;
        // SAFETY: every allocation, copy and launch of this backend goes to its one stream, so
        // stream order alone keeps accesses ordered; cudarc's cross-stream events are not needed.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| cuda_error(format!("creating a stream: {e}")))?;
        let compute_capability = ctx
            .compute_capability()
            .map_err(|e| cuda_error(format!("compute capability: {e}")))?;
        let sm_count = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| cuda_error(format!("multiprocessor count: {e}")))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".to_string());
        let arch = format!("compute_{}{}", compute_capability.0, compute_capability.1);
        let traced = std::env::var_os(TRACE_ENV).is_some_and(|v| v != "0");
        let ptx = compile_kernels_with(&arch, traced)?;
        let module = ctx
            .load_module(Ptx::from_src(ptx))
            .map_err(|e| cuda_error(format!("loading the compiled kernels: {e}")))?;
        let kernels = Kernels::load(&module)
            .map_err(|e| cuda_error(format!("finding a kernel in the module: {e}")))?;
        // Kernels whose shared memory grows with the model's shapes may use all the device
        // allows a block (the default limit is 48 KiB).
        let max_shared = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(|e| cuda_error(format!("shared memory limit: {e}")))?;
        kernels
            .moe_route
            .func
            .set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                ROUTE_SHARED_BYTES as i32,
            )
            .map_err(|e| cuda_error(format!("raising moe_route's shared memory: {e}")))?;
        kernels
            .trellis_mma_tm64
            .func
            .set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                MMA_LINEAR_SHARED_BYTES as i32,
            )
            .map_err(|e| cuda_error(format!("raising trellis_mma_tm64's shared memory: {e}")))?;
        for k in [
            &kernels.mla_decode_f32,
            &kernels.mla_decode_f16,
            &kernels.mla_decode_mma,
            &kernels.trellis_row_tm1,
            &kernels.viterbi_tiles,
        ] {
            // What the block may add to its static shared memory (a traced build has some).
            let fixed = k
                .func
                .get_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
                .map_err(|e| cuda_error(format!("{}'s shared memory: {e}", k.name)))?;
            k.func
                .set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    max_shared - fixed,
                )
                .map_err(|e| cuda_error(format!("raising {}'s shared memory: {e}", k.name)))?;
        }
        // Three blocks of the per-warp pipelined one-row linear need up to ~125 KiB of an SM's
        // shared memory: ask for the largest carveout so that the L1's share does not cap its
        // occupancy.
        kernels
            .trellis_row_tm1
            .func
            .set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
                100,
            )
            .map_err(|e| cuda_error(format!("trellis_row_tm1's shared memory carveout: {e}")))?;
        let sync_each_launch = std::env::var_os(SYNC_ENV).is_some_and(|v| v != "0");
        let profile = std::env::var_os(PROFILE_ENV)
            .is_some_and(|v| v != "0")
            .then(|| Mutex::new(HashMap::new()));
        let mma = compute_capability.0 >= 8 && std::env::var_os(MMA_ENV).is_none_or(|v| v != "0");
        let graphs = !sync_each_launch
            && profile.is_none()
            && std::env::var_os(GRAPH_ENV).is_none_or(|v| v != "0");
        Ok(Device {
            ctx,
            stream,
            kernels,
            sm_count: usize::try_from(sm_count).unwrap_or(1).max(1),
            name,
            compute_capability,
            max_shared_bytes: usize::try_from(max_shared).unwrap_or(48 << 10),
            unfused_linear: std::env::var_os(UNFUSED_ENV).is_some_and(|v| v != "0"),
            split_waves: std::env::var(SPLIT_WAVES_ENV)
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|&w| w > 0)
                .unwrap_or(DEFAULT_SPLIT_WAVES),
            sync_each_launch,
            memory: Arc::default(),
            profile,
            capture: CaptureState::default(),
            graphs,
            mma,
            mma16: mma && std::env::var_os(MMA16_ENV).is_none_or(|v| v != "0"),
            // `cp.async` needs compute capability 8.0.
            row_pipe: compute_capability.0 >= 8
                && std::env::var_os(ROW_PIPE_ENV).is_none_or(|v| v != "0"),
            pdl: compute_capability.0 >= 9
                && !sync_each_launch
                && std::env::var_os(PDL_ENV).is_none_or(|v| v != "0"),
            trace: traced.then(|| LaunchTrace::new(module)),
            mla_min_tiles: std::env::var(MLA_MIN_TILES_ENV)
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|&t| t > 0),
        })
    }

    /// Enqueue `kernel` on the stream. A failed launch is a bug in this crate (bad geometry or
    /// arguments) or a lost device; ops have no error channel, so it panics with the kernel name.
    pub fn launch(&self, kernel: &Kernel, grid: Grid, args: &mut Args<'_>) {
        if let Some(trace) = &self.trace {
            trace.launch(kernel.name, grid.blocks);
        }
        if self.capture.is_replaying() {
            return;
        }
        let mut params = [std::ptr::null_mut::<c_void>(); MAX_ARGS];
        for (i, param) in params.iter_mut().enumerate().take(args.count) {
            *param = if args.borrowed[i].is_null() {
                (&mut args.slots[i] as *mut u64).cast()
            } else {
                args.borrowed[i].cast_mut()
            };
        }
        let timing = self.profile.as_ref().map(|_| {
            let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
            let start = self.ctx.new_event(flags).expect("profiling event");
            let end = self.ctx.new_event(flags).expect("profiling event");
            start.record(&self.stream).expect("profiling event");
            (start, end)
        });
        let result = self.ctx.bind_to_thread().and_then(|()| {
            // SAFETY: `params` points at one value per kernel parameter, in the order and with
            // the types the kernel source declares (each call site mirrors its kernel's
            // signature); the values outlive this call, which copies them. Device pointers
            // among them refer to live allocations of this context, used in stream order.
            unsafe {
                if self.pdl {
                    launch_programmatic(
                        kernel.func.cu_function(),
                        grid,
                        self.stream.cu_stream(),
                        &mut params[..args.count],
                    )
                } else {
                    driver_result::launch_kernel(
                        kernel.func.cu_function(),
                        grid.blocks,
                        (grid.threads, 1, 1),
                        grid.shared_bytes,
                        self.stream.cu_stream(),
                        &mut params[..args.count],
                    )
                }
            }
        });
        if let Err(e) = result {
            panic!("CUDA launch of {} failed: {e}", kernel.name);
        }
        if self.sync_each_launch
            && let Err(e) = self.stream.synchronize()
        {
            panic!("CUDA kernel {} failed: {e}", kernel.name);
        }
        if let (Some(profile), Some((start, end))) = (&self.profile, timing) {
            end.record(&self.stream).expect("profiling event");
            let ms = start.elapsed_ms(&end).expect("profiling event");
            let mut totals = profile.lock().expect("profile");
            let entry = totals.entry(kernel.name).or_insert((0, 0.0));
            entry.0 += 1;
            entry.1 += f64::from(ms) * 1000.0;
        }
    }

    /// Wait for all enqueued work; an error here is an earlier kernel's fault.
    pub fn synchronize(&self) {
        if let Err(e) = self.stream.synchronize() {
            panic!("CUDA error in an earlier kernel: {e} (set {SYNC_ENV}=1 to find which)");
        }
    }

    /// Blocks for a grid-stride loop over `n` elements with `threads` per block.
    pub fn stride_blocks(&self, n: usize, threads: usize) -> usize {
        n.div_ceil(threads).clamp(1, self.sm_count * 16)
    }
}

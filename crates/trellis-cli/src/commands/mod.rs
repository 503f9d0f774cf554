//! One module per subcommand; each has clap `Args` and a `run`.

pub mod bench;
pub mod chat;
pub mod demo;
pub mod dequant;
pub mod generate;
pub mod import;
pub mod inspect;
pub mod kld;
pub mod logits;
pub mod perplexity;
pub mod quantize;
pub mod serve;
pub mod synth;
pub mod template;

use anyhow::Context;
use std::path::Path;
use trellis_format::ModelDir;

/// Open a model directory with the path in the error.
pub fn open_model(path: &Path) -> anyhow::Result<ModelDir> {
    ModelDir::open(path).with_context(|| format!("cannot open model directory {}", path.display()))
}

use std::time::Instant;
use trellis_backend::cpu::CpuBackend;
use trellis_backend::{Backend, KvDtype};
use trellis_runtime::engine::{DEFAULT_PREFILL_CHUNK, Engine, EngineOptions};

/// Where a model runs.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda,
    /// CUDA when this build has it and a GPU answers, else the CPU.
    Auto,
}

/// Options shared by every command that runs a model.
#[derive(clap::Args, Clone, Debug)]
pub struct RunOptions {
    /// Where to run the model.
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
    /// CPU threads (default: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Context length in tokens (default: the model's maximum, at most 32768, cut to what
    /// free memory holds).
    #[arg(long)]
    pub ctx_size: Option<usize>,
    /// Keep the KV cache in f32 instead of f16 (twice the memory, exact attention inputs).
    #[arg(long)]
    pub kv_f32: bool,
    /// Tokens per prefill forward pass.
    #[arg(long, default_value_t = DEFAULT_PREFILL_CHUNK)]
    pub prefill_chunk: usize,
    /// GPU only: decode these EXL3 linears into dense f16 weights at load — `all`, or a
    /// comma-separated list of `attn`, `experts`, `mlp` (dense MLPs and shared experts),
    /// `head`. Plain f16 products for 2–6× the memory of those weights.
    #[arg(long, value_name = "GROUPS")]
    pub dequantize: Option<String>,
    /// CPU only: hold MLA's `kv_b_proj` (GLM-4.7-Flash; other models have none) in int8 with
    /// per-row and per-channel scales instead of the file's f16: half its memory and of the
    /// bytes each decoded token reads from it, for logits that move by about 1 % of their
    /// size. With `--device auto` it picks the CPU.
    #[arg(long)]
    pub kv_b_int8: bool,
}

/// Work to do with a loaded engine, whichever backend it runs on.
pub trait EngineTask {
    type Output;
    fn run<B: Backend + 'static>(
        self,
        engine: Engine<B>,
        load_seconds: f64,
    ) -> anyhow::Result<Self::Output>;
}

/// Size rayon's global pool once per process: commands that load two models (`kld`) or
/// quantize and then run (`demo`) reach this more than once, and the pool cannot be rebuilt.
pub fn init_threads(threads: usize) -> anyhow::Result<()> {
    static DONE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    if DONE.get().is_some() {
        return Ok(());
    }
    // Commands load and run the model on this thread.
    trellis_backend::cpu::set_threads(threads, trellis_backend::cpu::OpsThread::This)?;
    let _ = DONE.set(());
    Ok(())
}

/// Load `dir` on the device `run` asks for, with a progress bar, and hand the engine to
/// `task`. The load time counts from `opened` (when the directory was opened).
pub fn with_engine<T: EngineTask>(
    dir: &ModelDir,
    opened: Instant,
    run: &RunOptions,
    all_logits: bool,
    task: T,
) -> anyhow::Result<T::Output> {
    init_threads(run.threads)?;
    let options = EngineOptions {
        ctx_size: run.ctx_size,
        prefill_chunk: run.prefill_chunk,
        all_logits,
        kv_dtype: if run.kv_f32 {
            KvDtype::F32
        } else {
            KvDtype::F16
        },
        max_batch: 1,
    };
    let device = check_device_options(run.device, run.dequantize.as_deref(), run.kv_b_int8)?;
    match device {
        Device::Cpu => task.run(
            load(dir, cpu_backend(run.kv_b_int8), &options)?,
            opened.elapsed().as_secs_f64(),
        ),
        Device::Cuda => {
            let backend = cuda_backend(run.dequantize.as_deref())?;
            task.run(
                load(dir, backend, &options)?,
                opened.elapsed().as_secs_f64(),
            )
        }
        Device::Auto => match cuda_backend(run.dequantize.as_deref()) {
            Ok(backend) => task.run(
                load(dir, backend, &options)?,
                opened.elapsed().as_secs_f64(),
            ),
            // `--dequantize` only means something on the GPU: its errors are the user's.
            Err(e) if run.dequantize.is_some() => Err(e),
            Err(_) => task.run(
                load(dir, cpu_backend(run.kv_b_int8), &options)?,
                opened.elapsed().as_secs_f64(),
            ),
        },
    }
}

/// The device to run on after the device options: `--dequantize` is a GPU option and
/// `--kv-b-int8` a CPU one, so asking for either on the other device is an error, and
/// `--kv-b-int8` makes `--device auto` the CPU.
pub fn check_device_options(
    device: Device,
    dequantize: Option<&str>,
    kv_b_int8: bool,
) -> anyhow::Result<Device> {
    if kv_b_int8 && dequantize.is_some() {
        anyhow::bail!(
            "--kv-b-int8 (a CPU option) and --dequantize (a GPU option) exclude each other"
        );
    }
    if dequantize.is_some() && device == Device::Cpu {
        anyhow::bail!(
            "--dequantize needs --device cuda (the CPU backend decodes trellis weights inside its products)"
        );
    }
    if !kv_b_int8 {
        return Ok(device);
    }
    if device == Device::Cuda {
        anyhow::bail!(
            "--kv-b-int8 needs the CPU (the GPU backend keeps kv_b_proj in the file's precision)"
        );
    }
    Ok(Device::Cpu)
}

/// The CPU backend, with `kv_b_proj` in int8 when asked.
pub fn cpu_backend(kv_b_int8: bool) -> CpuBackend {
    let mut backend = CpuBackend::new();
    backend.set_kv_b_int8(kv_b_int8);
    backend
}

#[cfg(feature = "cuda")]
fn cuda_backend(dequantize: Option<&str>) -> anyhow::Result<trellis_cuda::CudaBackend> {
    let set = match dequantize {
        Some(spec) => trellis_cuda::DequantizeSet::parse(spec).map_err(anyhow::Error::msg)?,
        None => trellis_cuda::DequantizeSet::NONE,
    };
    let mut backend =
        trellis_cuda::CudaBackend::new(0).context("cannot use the GPU (--device cuda)")?;
    backend.set_dequantize(set);
    Ok(backend)
}

/// A stand-in that never constructs, so builds without CUDA share the dispatch above.
#[cfg(not(feature = "cuda"))]
fn cuda_backend(_dequantize: Option<&str>) -> anyhow::Result<CpuBackend> {
    anyhow::bail!("this trellis was built without CUDA (rebuild with `--features cuda`)")
}

fn load<B: Backend + 'static>(
    dir: &ModelDir,
    backend: B,
    options: &EngineOptions,
) -> anyhow::Result<Engine<B>> {
    let bar = crate::progress::bar(0, "loading");
    let engine = Engine::load(dir, backend, options, &mut |done, total, what| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        bar.set_message(what.to_string());
    })
    .with_context(|| format!("cannot load {}", dir.path.display()))?;
    bar.finish_and_clear();
    Ok(engine)
}

/// Peak resident memory of this process (VmHWM), in bytes; `None` where /proc is absent.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

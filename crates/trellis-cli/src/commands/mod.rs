//! One module per subcommand; each has clap `Args` and a `run`.

pub mod dequant;
pub mod generate;
pub mod inspect;
pub mod logits;
pub mod synth;

use anyhow::Context;
use std::path::Path;
use trellis_format::ModelDir;

/// Open a model directory with the path in the error.
pub fn open_model(path: &Path) -> anyhow::Result<ModelDir> {
    ModelDir::open(path).with_context(|| format!("cannot open model directory {}", path.display()))
}

use std::time::Instant;
use trellis_backend::KvDtype;
use trellis_backend::cpu::CpuBackend;
use trellis_runtime::engine::{Engine, EngineOptions};

/// Options shared by every command that runs a model.
#[derive(clap::Args, Clone, Debug)]
pub struct RunOptions {
    /// CPU threads (default: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Context length in tokens (default: the model's maximum, at most 32768).
    #[arg(long)]
    pub ctx_size: Option<usize>,
    /// Keep the KV cache in f32 instead of f16 (twice the memory, exact attention inputs).
    #[arg(long)]
    pub kv_f32: bool,
    /// Tokens per prefill forward pass.
    #[arg(long, default_value_t = 256)]
    pub prefill_chunk: usize,
}

/// Load an opened model for running on the CPU, with a progress bar; returns the engine and
/// the load time counted from `opened` (when the directory was opened).
pub fn load_engine(
    dir: &ModelDir,
    opened: Instant,
    run: &RunOptions,
    all_logits: bool,
) -> anyhow::Result<(Engine<CpuBackend>, f64)> {
    trellis_backend::cpu::set_threads(run.threads)?;
    let options = EngineOptions {
        ctx_size: run.ctx_size,
        prefill_chunk: run.prefill_chunk,
        all_logits,
        kv_dtype: if run.kv_f32 {
            KvDtype::F32
        } else {
            KvDtype::F16
        },
    };
    let bar = crate::progress::bar(0, "loading");
    let engine = Engine::load(
        dir,
        CpuBackend::new(),
        &options,
        &mut |done, total, what| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            bar.set_message(what.to_string());
        },
    )
    .with_context(|| format!("cannot load {}", dir.path.display()))?;
    bar.finish_and_clear();
    Ok((engine, opened.elapsed().as_secs_f64()))
}

/// Peak resident memory of this process (VmHWM), in bytes; `None` where /proc is absent.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

use anyhow::{Context, bail};
use indicatif::ProgressBar;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use trellis_codec::Codebook;
use trellis_codec::encode::{Effort, TileSearch};
use trellis_quant::{
    Calibration, Event, OutScales, Overwrite, QuantError, QuantizeOptions, Search, Summary,
    quantize_model,
};
use trellis_runtime::tokenizer::Tokenizer;

#[derive(clap::Args)]
#[command(after_long_help = "\
What is quantized: every linear of the decoder layers (attention, MLP, experts and shared \
experts) at --bits on average, and lm_head at --head-bits (a tied head gets its own quantized \
copy). The MoE router, the norms, the embeddings and MLA's kv_b_proj stay dense, as \
ExLlamaV3 keeps them: the router and kv_b_proj in fp16, the rest as stored.

How: calibration tokens run through the model one decoder layer at a time, through the \
already-quantized layers before it; each linear's input Hessian (shared by linears with the \
same input; every expert sees every token) drives LDLQ with the Viterbi trellis encoder \
(ExLlamaV3's algorithm). Memory holds one layer, its Hessians and the calibration activations.

Output: <out> is written as <out>.partial and renamed when complete; each finished layer is \
checkpointed there, so an interrupted run continues with --resume.

Where: the calibration forward passes, Hessians and LDL factors run on the CPU, on all cores \
(--threads). The Viterbi search of the tiles, where most of the time goes, runs there too or, \
with --device cuda, on the GPU. The GPU always runs the exact search (the walks of --effort \
exact on the CPU, so the same output bytes), and linears that share a Hessian then run LDLQ \
side by side so that each search call fills the GPU.")]
pub struct Args {
    /// Hugging Face model directory (config.json, safetensors, tokenizer.json).
    model: PathBuf,
    /// Output directory (must not exist unless --resume or --force).
    #[arg(long)]
    out: PathBuf,
    /// Target bits per weight of the decoder's linears, e.g. 2.5 … 8; fractional targets mix
    /// per-tensor widths (half-integer widths with mul1).
    #[arg(long)]
    bits: f64,
    /// Bits of lm_head (16 keeps it dense).
    #[arg(long, default_value_t = 6.0)]
    head_bits: f64,
    /// Trellis codebook.
    #[arg(long, value_enum, default_value_t = CodebookArg::Mul1)]
    codebook: CodebookArg,
    /// Calibration text (UTF-8); default: the built-in mix of prose, code and other languages.
    #[arg(long)]
    calibration: Option<PathBuf>,
    /// Calibration rows (sequences).
    #[arg(long, default_value_t = DEFAULT_CALIBRATION_ROWS)]
    calibration_rows: usize,
    /// Tokens per calibration row.
    #[arg(long, default_value_t = DEFAULT_CALIBRATION_COLS)]
    calibration_cols: usize,
    /// Fold output-channel scales into svh: auto (ExLlamaV3's rule), always or never.
    #[arg(long, value_enum, default_value_t = OutScalesArg::Auto)]
    out_scales: OutScalesArg,
    /// Viterbi search on the CPU: fast (the same search in 16-bit fixed point where the CPU
    /// has AVX-512BW and K ≤ 4, 2–4× faster there, else in tagged f32; squared error within
    /// 0.5 % of exact's) or exact (f32 costs throughout, identical output on every machine).
    /// The GPU search (--device cuda) is always exact.
    #[arg(long, value_enum, default_value_t = EffortArg::Fast)]
    effort: EffortArg,
    /// Seed of the random sign flips.
    #[arg(long, default_value_t = QuantizeOptions::default().seed)]
    seed: u64,
    /// Largest output shard in MiB.
    #[arg(long, default_value_t = 8192)]
    shard_size_mb: u64,
    /// Continue an interrupted run from its checkpoint in <out>.partial.
    #[arg(long, conflicts_with = "force")]
    resume: bool,
    /// Replace an existing output and discard any interrupted run.
    #[arg(long)]
    force: bool,
    /// Where the Viterbi search runs: cpu, cuda (the GPU's exact search), or auto (the GPU
    /// when one is usable, else the CPU).
    #[arg(long, value_enum, default_value_t = super::Device::Cpu)]
    device: super::Device,
    /// CPU threads (default: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum CodebookArg {
    Mul1,
    Mcg,
    #[value(name = "3inst")]
    Inst3,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum EffortArg {
    Fast,
    Exact,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum OutScalesArg {
    Auto,
    Always,
    Never,
}

/// The tile search `--device` and `--effort` ask for.
fn tile_search(device: super::Device, effort: EffortArg) -> anyhow::Result<Search> {
    let cpu = Search::Cpu(match effort {
        EffortArg::Fast => Effort::Fast,
        EffortArg::Exact => Effort::Exact,
    });
    Ok(match device {
        super::Device::Cpu => cpu,
        super::Device::Cuda => Search::Device(gpu_tile_search()?),
        super::Device::Auto => gpu_tile_search().map(Search::Device).unwrap_or(cpu),
    })
}

#[cfg(feature = "cuda")]
fn gpu_tile_search() -> anyhow::Result<Arc<dyn TileSearch>> {
    let search = trellis_cuda::CudaTileSearch::new(0)
        .context("cannot use the GPU for the tile search (--device cuda)")?;
    Ok(Arc::new(search))
}

#[cfg(not(feature = "cuda"))]
fn gpu_tile_search() -> anyhow::Result<Arc<dyn TileSearch>> {
    bail!("--device cuda: this trellis was built without CUDA (rebuild with `--features cuda`)")
}

/// The default calibration set: 64 sequences of 1024 tokens.
pub const DEFAULT_CALIBRATION_ROWS: usize = 64;
pub const DEFAULT_CALIBRATION_COLS: usize = 1024;

pub fn run(args: Args) -> anyhow::Result<()> {
    super::init_threads(args.threads)?;
    if !(args.bits.is_finite() && args.bits > 0.0) {
        bail!(
            "--bits {}: expected a positive number of bits per weight",
            args.bits
        );
    }
    let options = QuantizeOptions {
        bits: args.bits,
        head_bits: args.head_bits,
        codebook: match args.codebook {
            CodebookArg::Mul1 => Codebook::Mul1,
            CodebookArg::Mcg => Codebook::Mcg,
            CodebookArg::Inst3 => Codebook::Inst3,
        },
        out_scales: match args.out_scales {
            OutScalesArg::Auto => OutScales::Auto,
            OutScalesArg::Always => OutScales::Always,
            OutScalesArg::Never => OutScales::Never,
        },
        seed: args.seed,
        max_shard_bytes: args.shard_size_mb.max(1) << 20,
        search: tile_search(args.device, args.effort)?,
    };
    let overwrite = if args.force {
        Overwrite::Force
    } else if args.resume {
        Overwrite::Resume
    } else {
        Overwrite::Refuse
    };
    let job = Job {
        model: &args.model,
        out: &args.out,
        calibration: args.calibration.as_deref(),
        calibration_rows: args.calibration_rows,
        calibration_cols: args.calibration_cols,
        options,
        overwrite,
    };
    let started = Instant::now();
    let Some(summary) = quantize_with_progress(&job)? else {
        eprintln!(
            "{} is already complete; nothing to resume",
            args.out.display()
        );
        return Ok(());
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "{}",
            summary_line(&summary, started.elapsed().as_secs_f64())
        );
    }
    Ok(())
}

/// One quantization run, as `trellis quantize` and `trellis demo` describe it.
pub struct Job<'a> {
    pub model: &'a Path,
    pub out: &'a Path,
    /// Calibration text file; `None` is the built-in text.
    pub calibration: Option<&'a Path>,
    pub calibration_rows: usize,
    pub calibration_cols: usize,
    pub options: QuantizeOptions,
    pub overwrite: Overwrite,
}

/// One line on what was written.
pub fn summary_line(summary: &Summary, seconds: f64) -> String {
    let proxies: Vec<f64> = summary
        .tensors
        .iter()
        .filter_map(|t| t.proxy_error)
        .collect();
    let mean = proxies.iter().sum::<f64>() / proxies.len().max(1) as f64;
    format!(
        "wrote {}: {:.3} bpw (head {}), {} linears, mean proxy error {mean:.5}, {seconds:.1} s",
        summary.output.display(),
        summary.average_bits,
        summary.head_bits,
        summary.tensors.len(),
    )
}

/// Run `job` with a progress bar per layer and a line per tensor on stderr. `None`: resuming
/// found the output already complete.
pub fn quantize_with_progress(job: &Job<'_>) -> anyhow::Result<Option<Summary>> {
    let text = match job.calibration {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read calibration text {}", path.display()))?,
        None => trellis_quant::calibration::DEFAULT_TEXT.to_string(),
    };
    let tokenizer = Tokenizer::from_model_dir(job.model)
        .with_context(|| format!("cannot load the tokenizer of {}", job.model.display()))?;
    let tokens = tokenizer.encode(&text, false)?;
    let source_name = job.calibration.map_or_else(
        || "the built-in calibration text".to_string(),
        |p| p.display().to_string(),
    );
    let vocab = super::open_model(job.model)?.config.common().vocab_size;
    let calibration =
        Calibration::mixed(&tokens, job.calibration_rows, job.calibration_cols, vocab)
            .with_context(|| format!("calibration from {source_name}"))?;
    let head_bits = job.options.head_bits;

    let mut bar: Option<ProgressBar> = None;
    let mut on_event = |event: Event<'_>| match event {
        Event::Planned {
            layers,
            linears,
            average_bits,
            resumed_at,
        } => {
            eprintln!(
                "quantizing {} → {}: {layers} layers, {linears} linears at {average_bits:.3} bpw \
                 (head {}), {} calibration rows × {} tokens",
                job.model.display(),
                job.out.display(),
                if head_bits >= 16.0 {
                    "dense".to_string()
                } else {
                    format!("{head_bits} bits")
                },
                job.calibration_rows,
                job.calibration_cols,
            );
            let search = match &job.options.search {
                Search::Cpu(Effort::Fast) => "the CPU, fast effort".to_string(),
                Search::Cpu(Effort::Exact) => "the CPU, exact".to_string(),
                Search::Device(device) => format!("{}, exact", device.name()),
            };
            eprintln!("tile search on {search}");
            if resumed_at > 0 {
                eprintln!("resuming after layer {}", resumed_at - 1);
            }
        }
        Event::LayerStart {
            layer,
            layers,
            tiles,
        } => {
            let label = if layer == layers {
                "head".to_string()
            } else {
                format!("layer {layer}/{layers}")
            };
            let b = crate::progress::bar(tiles as u64, &label);
            bar = Some(b);
        }
        Event::Stage { what, .. } => {
            if let Some(b) = &bar {
                b.set_message(what.to_string());
            }
        }
        Event::Tensor {
            name,
            bits,
            tiles,
            report,
            ..
        } => {
            let proxy = report
                .proxy_error
                .map_or_else(|| "-".to_string(), |p| format!("{p:.5}"));
            let line = format!(
                "  {name:<56} K={bits:<3} proxy {proxy:<9} scale {:.3}{}{}",
                report.global_scale,
                if report.out_scales {
                    ""
                } else {
                    " (no out scales)"
                },
                if report.fallback {
                    " (no Hessian: tile by tile)"
                } else {
                    ""
                },
            );
            match &bar {
                // A hidden bar (stderr not a terminal) would swallow the line.
                Some(b) if !b.is_hidden() => {
                    b.println(line);
                    b.inc(tiles as u64);
                    b.set_message("quantizing");
                }
                Some(b) => {
                    eprintln!("{line}");
                    b.inc(tiles as u64);
                }
                None => eprintln!("{line}"),
            }
        }
        Event::LayerDone { layer, seconds } => {
            if let Some(b) = bar.take() {
                b.finish_and_clear();
            }
            eprintln!("layer {layer} done in {seconds:.1} s");
        }
        Event::Writing => {
            if let Some(b) = bar.take() {
                b.finish_and_clear();
            }
            eprintln!("writing {}", job.out.display());
        }
    };
    match quantize_model(
        job.model,
        job.out,
        &calibration,
        &job.options,
        job.overwrite,
        &mut on_event,
    ) {
        Ok(summary) => Ok(Some(summary)),
        Err(QuantError::AlreadyComplete(_)) => Ok(None),
        Err(e) => Err(e).context("quantization failed"),
    }
}

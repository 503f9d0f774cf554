use anyhow::bail;
use serde::Serialize;
use std::path::PathBuf;
use trellis_backend::Backend;
use trellis_runtime::bench::{BenchOptions, BenchRun, median};
use trellis_runtime::engine::Engine;

#[derive(clap::Args)]
pub struct Args {
    /// Model directory.
    model: PathBuf,
    /// Random prompt length.
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Tokens to decode after the prompt.
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    /// Concurrent sequences (only 1 so far).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Measured runs (after one short warm-up); figures are medians.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Print the report as JSON (the default prints JSON too; this flag keeps scripts explicit).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    run: super::RunOptions,
}

#[derive(Serialize)]
pub struct Report {
    model: String,
    architecture: String,
    device: &'static str,
    /// `--dequantize` groups (GPU), when given: their weights are dense f16, and
    /// `weight_bytes_per_token` counts them so.
    #[serde(skip_serializing_if = "Option::is_none")]
    dequantize: Option<String>,
    /// `--kv-b-int8` (CPU): MLA's `kv_b_proj` held in int8, counted so in the bytes a token.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    kv_b_int8: bool,
    threads: usize,
    features: Vec<&'static str>,
    /// The CPU kernels' instruction-set level (`TRELLIS_CPU_ISA` can lower it); on the CPU
    /// device it decides speed and whether mul1 products are exact.
    cpu_isa: &'static str,
    prompt_tokens: usize,
    gen_tokens: usize,
    batch: usize,
    repeat: usize,
    prefill_tok_s: f64,
    decode_tok_s: f64,
    ttft_ms: f64,
    load_seconds: f64,
    peak_rss_bytes: Option<u64>,
    peak_device_bytes: Option<u64>,
    /// Weights read per decoded token plus the KV cache at the mean decode position.
    bytes_per_token: u64,
    weight_bytes_per_token: u64,
    bandwidth_bytes_per_s: Option<f64>,
    roofline_fraction: Option<f64>,
    runs: Vec<BenchRun>,
}

/// Build features, for telling reports apart.
fn features() -> Vec<&'static str> {
    let mut f = vec![if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }];
    if cfg!(feature = "cuda") {
        f.push("cuda");
    }
    f
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.batch != 1 {
        bail!(
            "--batch {}: batched decoding is not available yet (use 1)",
            args.batch
        );
    }
    if args.prompt_tokens == 0 || args.gen_tokens < 2 || args.repeat == 0 {
        bail!("--prompt-tokens must be ≥ 1, --gen-tokens ≥ 2 and --repeat ≥ 1");
    }
    let opened = std::time::Instant::now();
    let dir = super::open_model(&args.model)?;
    let mut run = args.run.clone();
    let needed = args.prompt_tokens + args.gen_tokens;
    run.ctx_size = Some(run.ctx_size.unwrap_or(needed).max(needed));
    let task = BenchTask { args };
    let report = super::with_engine(&dir, opened, &run, false, task)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

struct BenchTask {
    args: Args,
}

impl super::EngineTask for BenchTask {
    type Output = Report;

    fn run<B: Backend + 'static>(
        self,
        mut engine: Engine<B>,
        load_seconds: f64,
    ) -> anyhow::Result<Report> {
        let args = self.args;
        let options = BenchOptions {
            prompt_tokens: args.prompt_tokens,
            gen_tokens: args.gen_tokens,
            repeat: args.repeat,
            seed: 0,
        };
        let runs = trellis_runtime::bench::run(&mut engine, &options)?;
        // Before the bandwidth probe, whose buffer would count otherwise.
        let peak_rss_bytes = super::peak_rss_bytes();
        let bandwidth = engine.backend().measure_read_bandwidth();
        let weight_bytes = engine.info().bytes_per_token;
        let prefill = median(runs.iter().map(|r| r.prefill_tok_s).collect());
        let decode = median(runs.iter().map(|r| r.decode_tok_s).collect());
        let mean_context = args.prompt_tokens + args.gen_tokens / 2;
        let bytes_per_token = weight_bytes + (engine.kv_bytes_per_token() * mean_context) as u64;
        Ok(Report {
            model: args.model.display().to_string(),
            architecture: engine.info().architecture.clone(),
            device: engine.backend().name(),
            dequantize: args.run.dequantize.clone(),
            kv_b_int8: args.run.kv_b_int8,
            threads: trellis_backend::cpu::CpuBackend::new().threads(),
            features: features(),
            cpu_isa: trellis_backend::cpu::trellis_kernels::Isa::selected().name(),
            prompt_tokens: args.prompt_tokens,
            gen_tokens: args.gen_tokens,
            batch: args.batch,
            repeat: args.repeat,
            prefill_tok_s: prefill,
            decode_tok_s: decode,
            ttft_ms: median(runs.iter().map(|r| r.ttft_ms).collect()),
            load_seconds,
            peak_rss_bytes,
            peak_device_bytes: engine.backend().peak_memory(),
            bytes_per_token,
            weight_bytes_per_token: weight_bytes,
            bandwidth_bytes_per_s: bandwidth,
            roofline_fraction: bandwidth.map(|bw| bytes_per_token as f64 * decode / bw),
            runs,
        })
    }
}

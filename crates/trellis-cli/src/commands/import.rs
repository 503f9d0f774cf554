use anyhow::Context;
use std::path::PathBuf;
use trellis_format::gguf::{ImportDtype, ImportOptions, import_gguf};

#[derive(clap::Args)]
pub struct Args {
    /// The GGUF file (gemma3, llama, qwen2 or qwen3; F32/F16/BF16, Q4_0..Q8_0 and Q2_K..Q6_K
    /// tensors).
    gguf: PathBuf,
    /// Output directory (created): config.json, tokenizer files and safetensors weights.
    #[arg(long)]
    out: PathBuf,
    /// Element type of the written weights: bf16 (half the size) or f32 (exact).
    #[arg(long, value_parser = ["bf16", "f32"], default_value = "bf16")]
    dtype: String,
    /// Largest safetensors shard, in GiB.
    #[arg(long, default_value_t = 5.0)]
    shard_gib: f64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if !args.shard_gib.is_finite() || args.shard_gib <= 0.0 {
        anyhow::bail!("--shard-gib {}: expected a positive size", args.shard_gib);
    }
    let options = ImportOptions {
        dtype: if args.dtype == "f32" {
            ImportDtype::F32
        } else {
            ImportDtype::BF16
        },
        max_shard_bytes: (args.shard_gib * (1u64 << 30) as f64) as u64,
    };
    let bar = crate::progress::bytes_bar(0, "writing");
    let report = import_gguf(&args.gguf, &args.out, &options, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })
    .with_context(|| format!("cannot import {}", args.gguf.display()))?;
    bar.finish_and_clear();
    for note in &report.notes {
        eprintln!("note: {note}");
    }
    let types: Vec<String> = report
        .source_types
        .iter()
        .map(|(ty, n)| format!("{n} {ty}"))
        .collect();
    eprintln!(
        "wrote {} ({}, {} tensors from {}, {:.1}M parameters, {})",
        args.out.display(),
        report.architecture,
        report.tensors,
        types.join(" + "),
        report.parameters as f64 / 1e6,
        args.dtype
    );
    Ok(())
}

use anyhow::bail;
use std::path::PathBuf;
use trellis_codec::{BitWidth, Codebook};
use trellis_models::synth::{Preset, SynthOptions, synthesize};

#[derive(clap::Args)]
pub struct Args {
    /// Architecture to synthesize: glm4_moe_lite (GLM-4.7-Flash).
    arch: String,
    /// full: the real model's shapes; tiny: a toy of the same structure.
    #[arg(long, value_parser = ["full", "tiny"], default_value = "full")]
    preset: String,
    /// Bits per weight of the quantized linears (1..8, or 1.5/2.5/3.5 with mul1).
    #[arg(long, default_value_t = 4.0)]
    bits: f64,
    /// Bits per weight of lm_head.
    #[arg(long, default_value_t = 6.0)]
    head_bits: f64,
    /// Codebook: mul1, mcg or 3inst.
    #[arg(long, default_value = "mul1")]
    codebook: String,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output directory (created).
    #[arg(long)]
    out: PathBuf,
}

fn width(bits: f64, flag: &str) -> anyhow::Result<BitWidth> {
    match BitWidth::from_f64(bits) {
        Some(w) => Ok(w),
        None => bail!("{flag} {bits}: expected 1..8 or 1.5, 2.5, 3.5"),
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let Some(codebook) = Codebook::from_name(&args.codebook) else {
        bail!("--codebook {}: expected mul1, mcg or 3inst", args.codebook);
    };
    let options = SynthOptions {
        preset: if args.preset == "tiny" {
            Preset::Tiny
        } else {
            Preset::Full
        },
        bits: width(args.bits, "--bits")?,
        head_bits: width(args.head_bits, "--head-bits")?,
        codebook,
        seed: args.seed,
    };
    let bar = crate::progress::bytes_bar(0, "writing");
    synthesize(&args.arch, &options, &args.out, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    eprintln!(
        "wrote {} ({} preset, {} bpw, {})",
        args.out.display(),
        args.preset,
        options.bits,
        codebook.name()
    );
    Ok(())
}

use anyhow::Context;
use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;
use trellis_runtime::tokenizer::Tokenizer;

#[derive(clap::Args)]
pub struct Args {
    /// Model directory.
    model: PathBuf,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy (the only mode until sampling lands).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[command(flatten)]
    run: super::RunOptions,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.temperature != 0.0 {
        anyhow::bail!(
            "--temperature {}: only greedy decoding (0) is available so far",
            args.temperature
        );
    }
    let tokenizer = Tokenizer::from_model_dir(&args.model)?;
    let (mut engine, load_seconds) = super::load_engine(&args.model, &args.run, false)?;
    let prompt = tokenizer.encode(&args.prompt, true)?;
    let mut decoder = tokenizer.incremental_decoder(false);
    let mut stdout = std::io::stdout().lock();
    let mut write_error = None;
    let stats = engine.generate_greedy(&prompt, args.max_tokens, |token| {
        let delta = match decoder.push(token) {
            Ok(d) => d,
            Err(e) => {
                write_error = Some(std::io::Error::other(e.to_string()));
                return ControlFlow::Break(());
            }
        };
        match stdout
            .write_all(delta.as_bytes())
            .and_then(|_| stdout.flush())
        {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                write_error = Some(e);
                ControlFlow::Break(())
            }
        }
    })?;
    if let Some(e) = write_error {
        return Err(e).context("streaming the output");
    }
    let tail = decoder.finish()?;
    writeln!(stdout, "{tail}")?;
    eprintln!(
        "load {load_seconds:.2} s | prompt {} tokens | prefill {:.1} tok/s | decode {:.2} tok/s ({} tokens) | ttft {:.0} ms | peak rss {:.2} GiB | finish {:?}",
        stats.prompt_tokens,
        stats.prefill_tok_s(),
        stats.decode_tok_s(),
        stats.generated_tokens,
        stats.time_to_first_token * 1e3,
        super::peak_rss_bytes().unwrap_or(0) as f64 / (1u64 << 30) as f64,
        stats.finish,
    );
    Ok(())
}

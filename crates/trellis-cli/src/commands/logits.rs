use anyhow::{Context, bail};
use std::path::PathBuf;
use trellis_format::{DType, TensorSource, write_safetensors_file};

#[derive(clap::Args)]
pub struct Args {
    /// Model directory.
    model: PathBuf,
    /// Comma-separated token ids, e.g. `1,2,3`.
    #[arg(long, value_delimiter = ',', required = true)]
    tokens: Vec<String>,
    /// Output safetensors file with the f32 tensor `logits` [n_tokens, vocab].
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    run: super::RunOptions,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut tokens = Vec::with_capacity(args.tokens.len());
    for t in &args.tokens {
        let t = t.trim();
        match t.parse::<u32>() {
            Ok(id) => tokens.push(id),
            Err(_) => bail!(
                "--tokens: `{t}` is not a token id (expected non-negative integers separated by commas)"
            ),
        }
    }
    let dir = super::open_model(&args.model)?;
    let (mut engine, _) = super::load_engine(&dir, std::time::Instant::now(), &args.run, true)?;
    let logits = engine.logits_all(&tokens)?;
    let vocab = engine.info().vocab_size;
    let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    let tensor = TensorSource::from_bytes("logits", DType::F32, vec![tokens.len(), vocab], bytes);
    write_safetensors_file(&args.out, &[tensor])
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    eprintln!(
        "wrote logits f32 [{}, {vocab}] to {}",
        tokens.len(),
        args.out.display()
    );
    Ok(())
}

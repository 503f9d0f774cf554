use anyhow::{Context, bail};
use std::path::PathBuf;
use trellis_format::{DType, TensorSource, write_safetensors_file};
use trellis_runtime::engine::Engine;

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
    let opened = std::time::Instant::now();
    let dir = super::open_model(&args.model)?;
    let task = LogitsTask {
        tokens,
        out: args.out,
    };
    super::with_engine(&dir, opened, &args.run, true, task)
}

struct LogitsTask {
    tokens: Vec<u32>,
    out: PathBuf,
}

impl super::EngineTask for LogitsTask {
    type Output = ();

    fn run<B: trellis_backend::Backend + 'static>(
        self,
        mut engine: Engine<B>,
        _load: f64,
    ) -> anyhow::Result<()> {
        let logits = engine.logits_all(&self.tokens)?;
        let vocab = engine.info().vocab_size;
        let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
        let tensor =
            TensorSource::from_bytes("logits", DType::F32, vec![self.tokens.len(), vocab], bytes);
        write_safetensors_file(&self.out, &[tensor])
            .with_context(|| format!("cannot write {}", self.out.display()))?;
        eprintln!(
            "wrote logits f32 [{}, {vocab}] to {}",
            self.tokens.len(),
            self.out.display()
        );
        Ok(())
    }
}

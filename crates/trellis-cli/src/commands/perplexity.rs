use anyhow::{Context, bail};
use std::path::PathBuf;
use trellis_runtime::engine::Engine;
use trellis_runtime::tokenizer::Tokenizer;

#[derive(clap::Args)]
pub struct Args {
    /// Model directory.
    model: PathBuf,
    /// UTF-8 text file to score.
    #[arg(long)]
    text: PathBuf,
    /// Tokens per window; the second half of each window is scored (as llama.cpp's perplexity).
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Score at most this many windows (0 = all).
    #[arg(long, default_value_t = 0)]
    max_windows: usize,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    run: super::RunOptions,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let opened = std::time::Instant::now();
    let text = std::fs::read_to_string(&args.text)
        .with_context(|| format!("cannot read {}", args.text.display()))?;
    let dir = super::open_model(&args.model)?;
    let tokenizer = Tokenizer::from_model_dir(&args.model)?;
    // Encoded without special tokens; each window's first token becomes BOS when the model
    // has one (as llama.cpp does).
    let mut tokens = tokenizer.encode(&text, false)?;
    let bos = dir.config.common().bos_token_id;
    if args.max_windows > 0 {
        tokens.truncate(args.max_windows * args.ctx);
    }
    if tokens.len() < args.ctx {
        bail!(
            "{} has {} tokens, fewer than one window of --ctx {}",
            args.text.display(),
            tokens.len(),
            args.ctx
        );
    }
    let mut run = args.run.clone();
    run.ctx_size = Some(run.ctx_size.unwrap_or(args.ctx).max(args.ctx));
    let task = PerplexityTask {
        tokens,
        bos,
        ctx: args.ctx,
        json: args.json,
    };
    super::with_engine(&dir, opened, &run, true, task)
}

struct PerplexityTask {
    tokens: Vec<u32>,
    bos: Option<u32>,
    ctx: usize,
    json: bool,
}

impl super::EngineTask for PerplexityTask {
    type Output = ();

    fn run<B: trellis_backend::Backend + 'static>(
        self,
        mut engine: Engine<B>,
        _load: f64,
    ) -> anyhow::Result<()> {
        let bar = crate::progress::bar(0, "scoring");
        let report = trellis_runtime::perplexity::perplexity(
            &mut engine,
            &self.tokens,
            self.ctx,
            self.bos,
            |done, total, ppl| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
                bar.set_message(format!("ppl {ppl:.3}"));
            },
        )?;
        bar.finish_and_clear();
        if self.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            println!(
                "perplexity {:.4} over {} tokens ({} windows of {}, {:.1} s)",
                report.perplexity, report.scored_tokens, report.windows, report.ctx, report.seconds
            );
        }
        Ok(())
    }
}

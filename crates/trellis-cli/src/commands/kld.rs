use anyhow::{Context, bail};
use std::path::PathBuf;
use trellis_backend::argmax;
use trellis_runtime::engine::Engine;

#[derive(clap::Args)]
pub struct Args {
    /// Model to evaluate (e.g. a quantized directory).
    model: PathBuf,
    /// Reference model (e.g. the original Hugging Face directory).
    #[arg(long)]
    reference: PathBuf,
    /// File of token ids separated by whitespace and/or commas.
    #[arg(long)]
    tokens_file: PathBuf,
    /// Tokens per window; each window is evaluated from an empty cache and every position of
    /// it is scored.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    run: super::RunOptions,
}

/// KL divergence statistics of a model against a reference, per position.
#[derive(Clone, Debug, serde::Serialize)]
pub struct KldReport {
    pub positions: usize,
    pub windows: usize,
    /// Mean over positions of KL(reference ‖ model) in nats.
    pub kld_mean: f64,
    pub kld_median: f64,
    pub kld_p90: f64,
    pub kld_p99: f64,
    pub kld_max: f64,
    /// Fraction of positions where both argmaxes agree.
    pub top1_agreement: f64,
    /// Mean over positions of the reference's and the model's log-probability of the next
    /// token, where there is one (perplexity-style; in nats).
    pub reference_nll: f64,
    pub model_nll: f64,
}

/// Parse token ids separated by whitespace and/or commas.
pub fn parse_token_ids(text: &str) -> anyhow::Result<Vec<u32>> {
    text.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<u32>().with_context(|| {
                format!("`{t}` is not a token id (expected non-negative integers)")
            })
        })
        .collect()
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.tokens_file)
        .with_context(|| format!("cannot read {}", args.tokens_file.display()))?;
    let tokens =
        parse_token_ids(&text).with_context(|| format!("in {}", args.tokens_file.display()))?;
    if tokens.len() < 2 {
        bail!(
            "{} holds fewer than two token ids",
            args.tokens_file.display()
        );
    }
    if args.ctx < 2 {
        bail!("--ctx {}: windows need at least two tokens", args.ctx);
    }
    let mut run = args.run.clone();
    run.ctx_size = Some(run.ctx_size.unwrap_or(args.ctx).max(args.ctx));
    let windows: Vec<Vec<u32>> = tokens.chunks(args.ctx).map(<[u32]>::to_vec).collect();

    // The reference runs as the file holds it: `--kv-b-int8` is part of the model under test
    // (with the same directory as both, the KL is what the option costs).
    let reference_run = super::RunOptions {
        kv_b_int8: false,
        ..run.clone()
    };
    let opened = std::time::Instant::now();
    let reference = super::open_model(&args.reference)?;
    let reference_logits = super::with_engine(
        &reference,
        opened,
        &reference_run,
        true,
        LogitsTask {
            windows: windows.clone(),
        },
    )
    .with_context(|| format!("reference {}", args.reference.display()))?;
    drop(reference);
    let opened = std::time::Instant::now();
    let model = super::open_model(&args.model)?;
    let model_logits = super::with_engine(
        &model,
        opened,
        &run,
        true,
        LogitsTask {
            windows: windows.clone(),
        },
    )
    .with_context(|| format!("model {}", args.model.display()))?;

    let report = compare(&windows, &reference_logits, &model_logits)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "KL divergence over {} positions ({} windows): mean {:.6}, median {:.6}, p90 {:.6}, \
             p99 {:.6}, max {:.6}; top-1 agreement {:.2} %; next-token NLL reference {:.4}, \
             model {:.4}",
            report.positions,
            report.windows,
            report.kld_mean,
            report.kld_median,
            report.kld_p90,
            report.kld_p99,
            report.kld_max,
            100.0 * report.top1_agreement,
            report.reference_nll,
            report.model_nll,
        );
    }
    Ok(())
}

/// Logits of every position of every window, concatenated.
struct LogitsTask {
    windows: Vec<Vec<u32>>,
}

impl super::EngineTask for LogitsTask {
    type Output = Vec<Vec<f32>>;

    fn run<B: trellis_backend::Backend + 'static>(
        self,
        mut engine: Engine<B>,
        _load: f64,
    ) -> anyhow::Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(self.windows.len());
        for w in &self.windows {
            engine.reset();
            out.push(engine.logits_all(w)?);
        }
        Ok(out)
    }
}

/// `log_softmax` in f64.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
    let log_z = max + sum.ln();
    row.iter().map(|&v| v as f64 - log_z).collect()
}

/// Per-position KL(reference ‖ model) and agreement.
pub fn compare(
    windows: &[Vec<u32>],
    reference: &[Vec<f32>],
    model: &[Vec<f32>],
) -> anyhow::Result<KldReport> {
    let mut klds = Vec::new();
    let (mut agree, mut ref_nll, mut model_nll, mut scored) = (0usize, 0.0f64, 0.0f64, 0usize);
    for ((w, r), m) in windows.iter().zip(reference).zip(model) {
        if r.len() != m.len() || r.len() % w.len() != 0 {
            bail!("the two models return logits of different sizes (vocabularies differ?)");
        }
        let vocab = r.len() / w.len();
        for (i, (rr, mr)) in r.chunks_exact(vocab).zip(m.chunks_exact(vocab)).enumerate() {
            let (lr, lm) = (log_softmax(rr), log_softmax(mr));
            let kl: f64 = lr.iter().zip(&lm).map(|(&a, &b)| a.exp() * (a - b)).sum();
            klds.push(kl.max(0.0));
            // Top-1 agreement by the engine's own greedy rule.
            if argmax(rr) == argmax(mr) {
                agree += 1;
            }
            if let Some(&next) = w.get(i + 1) {
                ref_nll -= lr[next as usize];
                model_nll -= lm[next as usize];
                scored += 1;
            }
        }
    }
    let n = klds.len();
    let mean = klds.iter().sum::<f64>() / n as f64;
    let mut sorted = klds.clone();
    sorted.sort_by(f64::total_cmp);
    let quantile = |q: f64| sorted[((n - 1) as f64 * q).round() as usize];
    Ok(KldReport {
        positions: n,
        windows: windows.len(),
        kld_mean: mean,
        kld_median: quantile(0.5),
        kld_p90: quantile(0.9),
        kld_p99: quantile(0.99),
        kld_max: sorted[n - 1],
        top1_agreement: agree as f64 / n as f64,
        reference_nll: ref_nll / scored.max(1) as f64,
        model_nll: model_nll / scored.max(1) as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_ids_parse_with_commas_and_whitespace() {
        assert_eq!(parse_token_ids("1, 2,3\n4\t5 ,").unwrap(), [1, 2, 3, 4, 5]);
        assert!(parse_token_ids("1 x 2").is_err());
    }

    #[test]
    fn identical_logits_have_zero_divergence() {
        let windows = vec![vec![0u32, 1, 2]];
        let logits = vec![vec![0.5f32, 1.0, -1.0, 2.0, 0.0, 0.1, 3.0, 0.0, 0.0]];
        let r = compare(&windows, &logits, &logits).unwrap();
        assert!(r.kld_mean.abs() < 1e-12);
        assert_eq!(r.top1_agreement, 1.0);
        let other = vec![vec![0.5f32, 1.0, -1.0, 0.0, 2.0, 0.1, 3.0, 0.0, 0.0]];
        let r = compare(&windows, &logits, &other).unwrap();
        assert!(r.kld_mean > 0.0);
        assert!((r.top1_agreement - 2.0 / 3.0).abs() < 1e-12);
    }
}

use anyhow::{Context, bail};
use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;
use trellis_runtime::chat_template::ChatTemplate;
use trellis_runtime::engine::Engine;
use trellis_runtime::generation::{GenerationRequest, TokenEvent, generate};
use trellis_runtime::sampler::{SamplingOptions, SamplingParams};
use trellis_runtime::tokenizer::Tokenizer;

#[derive(clap::Args)]
pub struct Args {
    /// Model directory.
    pub(crate) model: PathBuf,
    /// The prompt text (with --chat: the user message).
    #[arg(long)]
    pub(crate) prompt: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    pub(crate) max_tokens: usize,
    #[command(flatten)]
    pub(crate) sampling: SamplingArgs,
    /// Stop when this string appears (repeatable; the string is not printed).
    #[arg(long)]
    pub(crate) stop: Vec<String>,
    /// Keep generating through end-of-sequence tokens.
    #[arg(long)]
    pub(crate) ignore_eos: bool,
    /// Apply the model's chat template to the prompt (as one user message).
    #[arg(long)]
    pub(crate) chat: bool,
    /// System message (with --chat).
    #[arg(long, requires = "chat")]
    pub(crate) system: Option<String>,
    /// Ask a thinking model to answer without reasoning first (template kwarg enable_thinking=false).
    #[arg(long, requires = "chat")]
    pub(crate) no_think: bool,
    /// Leave special tokens (e.g. `<think>`) out of the printed text.
    #[arg(long)]
    pub(crate) skip_special: bool,
    /// Print the prompt before the generated text (without --chat).
    #[arg(long, conflicts_with = "chat")]
    pub(crate) echo_prompt: bool,
    #[command(flatten)]
    pub(crate) run: super::RunOptions,
}

/// Sampling flags; anything not given comes from the model's generation_config.json.
#[derive(clap::Args, Clone, Debug)]
pub struct SamplingArgs {
    /// Temperature; 0 is greedy.
    #[arg(long)]
    temperature: Option<f32>,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long)]
    top_k: Option<usize>,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass.
    #[arg(long)]
    top_p: Option<f32>,
    /// Drop tokens less likely than this fraction of the most likely one.
    #[arg(long)]
    min_p: Option<f32>,
    /// Locally typical sampling mass.
    #[arg(long)]
    typical_p: Option<f32>,
    /// Repetition penalty over the last --penalty-window tokens (1 = off).
    #[arg(long)]
    repeat_penalty: Option<f32>,
    /// OpenAI-style presence penalty.
    #[arg(long)]
    presence_penalty: Option<f32>,
    /// OpenAI-style frequency penalty.
    #[arg(long)]
    frequency_penalty: Option<f32>,
    /// Tokens the penalties look back over (0 = all).
    #[arg(long)]
    penalty_window: Option<usize>,
    /// Seed for reproducible sampling.
    #[arg(long)]
    seed: Option<u64>,
}

impl SamplingArgs {
    /// These flags, with `temperature`, `top_p` and `repeat_penalty` filled in where unset.
    pub fn or_defaults(self, temperature: f32, top_p: f32, repeat_penalty: f32) -> SamplingArgs {
        SamplingArgs {
            temperature: self.temperature.or(Some(temperature)),
            top_p: self.top_p.or(Some(top_p)),
            repeat_penalty: self.repeat_penalty.or(Some(repeat_penalty)),
            ..self
        }
    }

    /// The user's flags over the model's defaults.
    pub fn resolve(&self, model: &trellis_format::GenerationDefaults) -> SamplingParams {
        SamplingParams::resolve(&model_sampling_options(model), &self.options())
    }

    /// The flags given, unset ones left unset.
    pub fn options(&self) -> SamplingOptions {
        SamplingOptions {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            typical_p: self.typical_p,
            repetition_penalty: self.repeat_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            penalty_window: self.penalty_window,
            seed: self.seed,
            ..SamplingOptions::default()
        }
    }
}

/// The sampling settings of a model's generation_config.json.
pub fn model_sampling_options(model: &trellis_format::GenerationDefaults) -> SamplingOptions {
    SamplingOptions {
        do_sample: model.do_sample,
        temperature: model.temperature.map(|v| v as f32),
        top_k: model.top_k,
        top_p: model.top_p.map(|v| v as f32),
        min_p: model.min_p.map(|v| v as f32),
        repetition_penalty: model.repetition_penalty.map(|v| v as f32),
        ..SamplingOptions::default()
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let opened = std::time::Instant::now();
    let dir = super::open_model(&args.model)?;
    let tokenizer = Tokenizer::from_model_dir(&args.model)?;
    let prompt_text = if args.chat {
        let Some(template) = ChatTemplate::from_model_dir(&args.model)? else {
            bail!(
                "{} has no chat template (tokenizer_config.json `chat_template` or chat_template.jinja); drop --chat",
                args.model.display()
            );
        };
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(serde_json::json!({"role": "system", "content": system}));
        }
        messages.push(serde_json::json!({"role": "user", "content": args.prompt}));
        let mut kwargs = serde_json::Map::new();
        if args.no_think {
            kwargs.insert("enable_thinking".into(), false.into());
        }
        template.render(&messages, None, true, &kwargs)?
    } else {
        args.prompt.clone()
    };
    // A chat template writes its own special tokens; plain prompts get the tokenizer's.
    let prompt = tokenizer.encode(&prompt_text, !args.chat)?;
    let request = GenerationRequest {
        sampling: args.sampling.resolve(&dir.generation),
        max_tokens: args.max_tokens,
        stop: args.stop.clone(),
        ignore_eos: args.ignore_eos,
        skip_special_tokens: args.skip_special,
    };
    let task = GenerateTask {
        tokenizer,
        prompt,
        request,
        echo: args.echo_prompt.then(|| args.prompt.clone()),
    };
    super::with_engine(&dir, opened, &args.run, false, task)
}

struct GenerateTask {
    tokenizer: Tokenizer,
    prompt: Vec<u32>,
    request: GenerationRequest,
    /// Printed before the generated text.
    echo: Option<String>,
}

impl super::EngineTask for GenerateTask {
    type Output = ();

    fn run<B: trellis_backend::Backend + 'static>(
        self,
        mut engine: Engine<B>,
        load_seconds: f64,
    ) -> anyhow::Result<()> {
        let mut stdout = std::io::stdout().lock();
        if let Some(prompt) = &self.echo {
            write!(stdout, "{prompt}")?;
            stdout.flush()?;
        }
        let mut write_error = None;
        let completion = generate(
            &mut engine,
            &self.tokenizer,
            &self.prompt,
            &self.request,
            &mut |event: TokenEvent<'_>| match stdout
                .write_all(event.text.as_bytes())
                .and_then(|_| stdout.flush())
            {
                Ok(()) => ControlFlow::Continue(()),
                Err(e) => {
                    write_error = Some(e);
                    ControlFlow::Break(())
                }
            },
        )?;
        if let Some(e) = write_error {
            return Err(e).context("writing to stdout");
        }
        writeln!(stdout)?;
        let stats = &completion.stats;
        let memory = match engine.backend().peak_memory() {
            Some(device) => format!(
                "peak device memory {:.2} GiB",
                device as f64 / (1u64 << 30) as f64
            ),
            None => format!(
                "peak rss {:.2} GiB",
                super::peak_rss_bytes().unwrap_or(0) as f64 / (1u64 << 30) as f64
            ),
        };
        eprintln!(
            "{} | load {load_seconds:.2} s | prompt {} tokens ({} computed) | prefill {:.1} tok/s | decode {:.2} tok/s ({} tokens) | ttft {:.0} ms | {memory} | finish {}",
            engine.backend().name(),
            stats.prompt_tokens,
            stats.prefilled_tokens,
            stats.prefill_tok_s(),
            stats.decode_tok_s(),
            stats.generated_tokens,
            stats.time_to_first_token * 1e3,
            serde_json::to_string(&completion.finish_reason)?.trim_matches('"'),
        );
        Ok(())
    }
}

//! `trellis serve`: the model behind an OpenAI-compatible HTTP API, with concurrent requests
//! batched by the scheduler. SIGINT/SIGTERM stop accepting and let running requests finish
//! (for `--shutdown-grace` seconds; a second signal cancels them at once).

use super::generate::{SamplingArgs, model_sampling_options};
use super::{Device, RunOptions};
use anyhow::Context;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use trellis_backend::cpu::OpsThread;
use trellis_backend::{Backend, KvDtype};
use trellis_format::ModelDir;
use trellis_runtime::chat_template::ChatTemplate;
use trellis_runtime::engine::{Engine, EngineError, EngineOptions};
use trellis_runtime::sampler::SamplingOptions;
use trellis_runtime::scheduler::{self, SchedulerConfig, SchedulerHandle};
use trellis_runtime::tokenizer::Tokenizer;
use trellis_server::{AppState, ModelContext, OutputFormat, ServerOptions};

/// Environment variable read for the API key when `--api-key` is not given.
const API_KEY_ENV: &str = "TRELLIS_API_KEY";

#[derive(clap::Args)]
pub struct Args {
    /// Model directory.
    model: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0 picks a free one; the address is printed on stdout).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require this key (`Authorization: Bearer KEY`) on the /v1 endpoints
    /// [default: the TRELLIS_API_KEY environment variable, when set].
    #[arg(long)]
    api_key: Option<String>,
    /// The model name clients send (default: the model directory's name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Most sequences generated together in one batch.
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// Most requests waiting for a place in the batch; more are refused with 429.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Largest request body in bytes; larger ones are refused with 413.
    #[arg(long, default_value_t = 10 * 1024 * 1024)]
    max_body_bytes: usize,
    /// Seconds running requests get to finish after SIGINT/SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 30)]
    shutdown_grace: u64,
    /// Sampling defaults for requests that do not set them (over generation_config.json).
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    run: RunOptions,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let dir = super::open_model(&args.model)?;
    let tokenizer = Tokenizer::from_model_dir(&args.model)?;
    let template = ChatTemplate::from_model_dir(&args.model)?;
    let name = match &args.served_model_name {
        Some(name) => name.clone(),
        None => model_dir_name(&args.model),
    };
    let api_key = args
        .api_key
        .clone()
        .or_else(|| std::env::var(API_KEY_ENV).ok())
        .filter(|k| !k.is_empty());
    let model = ModelContext {
        name: name.clone(),
        tokenizer: tokenizer.clone(),
        format: OutputFormat::detect(template.as_ref()),
        template,
        sampling_defaults: server_defaults(
            model_sampling_options(&dir.generation),
            args.sampling.options(),
        ),
        default_max_tokens: dir.generation.max_new_tokens,
    };
    // The engine runs on the scheduler's thread, not this one.
    trellis_backend::cpu::set_threads(args.run.threads, OpsThread::Other)?;
    let engine_options = EngineOptions {
        ctx_size: args.run.ctx_size,
        prefill_chunk: args.run.prefill_chunk,
        all_logits: false,
        kv_dtype: if args.run.kv_f32 {
            KvDtype::F32
        } else {
            KvDtype::F16
        },
        max_batch: args.max_batch.max(1),
    };
    let config = SchedulerConfig {
        max_queue: args.max_queue.max(1),
    };
    let (scheduler, device) = spawn_scheduler(
        &args.model,
        args.run.device,
        args.run.dequantize.clone(),
        args.run.kv_b_int8,
        engine_options,
        tokenizer,
        config,
    )?;
    let ctx_size = scheduler.ctx_size();
    let options = ServerOptions {
        api_key,
        max_body_bytes: args.max_body_bytes,
        shutdown_grace: Duration::from_secs(args.shutdown_grace),
    };
    let app = AppState::new(model, scheduler, options);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("trellis-http")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
        let address = listener.local_addr()?;
        // One line on stdout that scripts can wait for.
        println!(
            "trellis serve: {name} on http://{address} ({device}, batch {}, context {ctx_size} tokens)",
            args.max_batch.max(1)
        );
        std::io::stdout().flush()?;
        tokio::spawn(watch_signals(app.clone()));
        trellis_server::serve(listener, app)
            .await
            .context("the server failed")?;
        eprintln!("trellis serve: stopped");
        Ok(())
    })
}

/// The directory's last component, e.g. `glm4-moe-lite-tiny-4.0bpw`.
fn model_dir_name(path: &Path) -> String {
    path.canonicalize()
        .ok()
        .as_deref()
        .unwrap_or(path)
        .file_name()
        .map_or_else(|| "model".to_string(), |n| n.to_string_lossy().into_owned())
}

/// The server's flags over the model's defaults, field by field. A temperature flag also
/// overrides the model's `do_sample = false` (which would otherwise make requests greedy).
fn server_defaults(model: SamplingOptions, flags: SamplingOptions) -> SamplingOptions {
    SamplingOptions {
        do_sample: if flags.temperature.is_some() {
            None
        } else {
            flags.do_sample.or(model.do_sample)
        },
        temperature: flags.temperature.or(model.temperature),
        top_k: flags.top_k.or(model.top_k),
        top_p: flags.top_p.or(model.top_p),
        min_p: flags.min_p.or(model.min_p),
        typical_p: flags.typical_p.or(model.typical_p),
        repetition_penalty: flags.repetition_penalty.or(model.repetition_penalty),
        presence_penalty: flags.presence_penalty.or(model.presence_penalty),
        frequency_penalty: flags.frequency_penalty.or(model.frequency_penalty),
        penalty_window: flags.penalty_window.or(model.penalty_window),
        logit_bias: flags.logit_bias.or(model.logit_bias),
        seed: flags.seed.or(model.seed),
    }
}

/// First SIGINT/SIGTERM: drain. Second: cancel what still runs.
async fn watch_signals(app: Arc<AppState>) {
    wait_for_signal().await;
    eprintln!(
        "trellis serve: shutting down; running requests get {} s to finish (signal again to cancel them)",
        app.options.shutdown_grace.as_secs()
    );
    app.begin_shutdown();
    wait_for_signal().await;
    eprintln!("trellis serve: cancelling running requests");
    app.abort_requests();
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Start the scheduler with the engine loaded on `device`, on the scheduler's own thread.
fn spawn_scheduler(
    path: &Path,
    device: Device,
    dequantize: Option<String>,
    kv_b_int8: bool,
    options: EngineOptions,
    tokenizer: Tokenizer,
    config: SchedulerConfig,
) -> anyhow::Result<(SchedulerHandle, &'static str)> {
    let on_cpu = |path: &Path, options, tokenizer, config| {
        let make = move || Ok(super::cpu_backend(kv_b_int8));
        spawn_on(path, make, options, tokenizer, config).map(|s| (s, "cpu"))
    };
    let device = super::check_device_options(device, dequantize.as_deref(), kv_b_int8)?;
    let gpu_spec = dequantize.clone();
    let on_gpu = |path: &Path, options, tokenizer, config| {
        let make = move || super::cuda_backend(gpu_spec.as_deref());
        spawn_on(path, make, options, tokenizer, config).map(|s| (s, "cuda"))
    };
    match device {
        Device::Cpu => on_cpu(path, options, tokenizer, config),
        Device::Cuda => on_gpu(path, options, tokenizer, config),
        // Probed here (and dropped) so that the engine's thread knows which backend to build;
        // with `--dequantize` the GPU is required.
        Device::Auto => match super::cuda_backend(dequantize.as_deref()) {
            Ok(_) => on_gpu(path, options, tokenizer, config),
            Err(e) if dequantize.is_some() => Err(e),
            Err(_) => on_cpu(path, options, tokenizer, config),
        },
    }
}

fn spawn_on<B: Backend + 'static>(
    path: &Path,
    make_backend: impl FnOnce() -> anyhow::Result<B> + Send + 'static,
    options: EngineOptions,
    tokenizer: Tokenizer,
    config: SchedulerConfig,
) -> anyhow::Result<SchedulerHandle> {
    let bar = crate::progress::bar(0, "loading");
    let thread_bar = bar.clone();
    let thread_path = path.to_path_buf();
    let handle = scheduler::spawn(
        move || {
            let dir = ModelDir::open(&thread_path)?;
            let backend = make_backend().map_err(|e| EngineError::Invalid(format!("{e:#}")))?;
            Engine::load(&dir, backend, &options, &mut |done, total, what| {
                thread_bar.set_length(total as u64);
                thread_bar.set_position(done as u64);
                thread_bar.set_message(what.to_string());
            })
        },
        tokenizer,
        config,
    )
    .with_context(|| format!("cannot load {}", path.display()))?;
    bar.finish_and_clear();
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_model_and_its_do_sample() {
        let model = SamplingOptions {
            do_sample: Some(false),
            top_p: Some(0.9),
            ..SamplingOptions::default()
        };
        let flags = SamplingOptions {
            temperature: Some(0.7),
            ..SamplingOptions::default()
        };
        let merged = server_defaults(model.clone(), flags);
        assert_eq!(merged.temperature, Some(0.7));
        assert_eq!(merged.do_sample, None);
        assert_eq!(merged.top_p, Some(0.9));
        // Without a temperature flag the model's do_sample stays.
        let merged = server_defaults(model, SamplingOptions::default());
        assert_eq!(merged.do_sample, Some(false));
    }
}

//! `trellis`: run, inspect and make trellis-quantized (EXL3) language models.

mod commands;
mod progress;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "trellis",
    version,
    about = "Run, inspect and make trellis-quantized (EXL3) language models",
    long_about = "Run, inspect and make trellis-quantized (EXL3) language models.\n\n\
                  A model is a directory with config.json, safetensors weights (EXL3 or dense \
                  bf16/f16/f32) and tokenizer.json, as written by ExLlamaV3 or `trellis synth`."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Download Gemma 3 270M, quantize it to EXL3 and generate with it (cached after the
    /// first run).
    Demo(commands::demo::Args),
    /// Show a model's architecture, parameters, bits per weight and tensors.
    Inspect(commands::inspect::Args),
    /// Write the dense reconstructed weight of one linear layer to a safetensors file.
    Dequant(commands::dequant::Args),
    /// Run token ids through the model and save the logits of every position.
    Logits(commands::logits::Args),
    /// Generate text from a prompt, streaming it to stdout.
    Generate(commands::generate::Args),
    /// Chat with a model in the terminal (multi-turn, streaming, reasoning shown dimmed).
    Chat(commands::chat::Args),
    /// Render a chat template for given messages and print the prompt exactly.
    Template(commands::template::Args),
    /// Perplexity of a model on a text file (llama.cpp's method: windows of --ctx tokens,
    /// the second half of each scored).
    Perplexity(commands::perplexity::Args),
    /// Convert a GGUF model (llama.cpp) into a Hugging Face directory trellis can run.
    Import(commands::import::Args),
    /// Measure prefill and decode speed, time to first token, memory and the roofline fraction.
    Bench(commands::bench::Args),
    /// Serve the model over an OpenAI-compatible HTTP API, batching concurrent requests.
    Serve(commands::serve::Args),
    /// Quantize a Hugging Face model to EXL3 (calibration, LDLQ, Viterbi-encoded tiles).
    Quantize(commands::quantize::Args),
    /// Compare a model's next-token distributions with a reference model's (KL divergence).
    Kld(commands::kld::Args),
    /// Write a synthetic model with a real architecture's shapes and random trellis weights.
    Synth(commands::synth::Args),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(a) => commands::demo::run(a),
        Command::Inspect(a) => commands::inspect::run(a),
        Command::Dequant(a) => commands::dequant::run(a),
        Command::Logits(a) => commands::logits::run(a),
        Command::Generate(a) => commands::generate::run(a),
        Command::Synth(a) => commands::synth::run(a),
        Command::Bench(a) => commands::bench::run(a),
        Command::Chat(a) => commands::chat::run(a),
        Command::Perplexity(a) => commands::perplexity::run(a),
        Command::Import(a) => commands::import::run(a),
        Command::Quantize(a) => commands::quantize::run(a),
        Command::Kld(a) => commands::kld::run(a),
        Command::Template(a) => commands::template::run(a),
        Command::Serve(a) => commands::serve::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

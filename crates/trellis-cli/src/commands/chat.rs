//! Interactive multi-turn chat: the conversation stays in the KV cache between turns, so each
//! turn prefills only what is new.

use anyhow::bail;
use serde_json::{Value, json};
use std::io::{BufRead, IsTerminal, Write};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use trellis_runtime::chat_template::ChatTemplate;
use trellis_runtime::engine::Engine;
use trellis_runtime::generation::{GenerationRequest, generate};
use trellis_runtime::glm_output::{GlmEvent, GlmOutputParser};
use trellis_runtime::tokenizer::Tokenizer;

#[derive(clap::Args)]
pub struct Args {
    /// Model directory.
    model: PathBuf,
    /// System message for the conversation (also settable with /system).
    #[arg(long)]
    system: Option<String>,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 1024)]
    max_tokens: usize,
    /// Do not show the model's reasoning (it is shown dimmed by default).
    #[arg(long)]
    hide_reasoning: bool,
    /// Ask a thinking model to answer without reasoning first.
    #[arg(long)]
    no_think: bool,
    #[command(flatten)]
    sampling: super::generate::SamplingArgs,
    #[command(flatten)]
    run: super::RunOptions,
}

const HELP: &str =
    "commands: /reset (new conversation), /system <text> (set the system message and reset), /exit";

pub fn run(args: Args) -> anyhow::Result<()> {
    let opened = std::time::Instant::now();
    let dir = super::open_model(&args.model)?;
    let Some(template) = ChatTemplate::from_model_dir(&args.model)? else {
        bail!(
            "{} has no chat template; use `trellis generate` instead",
            args.model.display()
        );
    };
    let tokenizer = Tokenizer::from_model_dir(&args.model)?;
    let request = GenerationRequest {
        sampling: args.sampling.resolve(&dir.generation),
        max_tokens: args.max_tokens,
        stop: Vec::new(),
        ignore_eos: false,
        // The reasoning and tool-call tags are special tokens the parser needs.
        skip_special_tokens: false,
    };
    let task = ChatTask {
        template,
        tokenizer,
        request,
        system: args.system.clone(),
        hide_reasoning: args.hide_reasoning,
        no_think: args.no_think,
    };
    super::with_engine(&dir, opened, &args.run, false, task)
}

struct ChatTask {
    template: ChatTemplate,
    tokenizer: Tokenizer,
    request: GenerationRequest,
    system: Option<String>,
    hide_reasoning: bool,
    no_think: bool,
}

/// Terminal styling, off when the output is not a terminal.
struct Style {
    dim: &'static str,
    reset: &'static str,
}

impl super::EngineTask for ChatTask {
    type Output = ();

    fn run<B: trellis_backend::Backend + 'static>(
        self,
        mut engine: Engine<B>,
        load_seconds: f64,
    ) -> anyhow::Result<()> {
        let interactive = std::io::stdin().is_terminal();
        let style = if std::io::stdout().is_terminal() {
            Style {
                dim: "\x1b[2m",
                reset: "\x1b[0m",
            }
        } else {
            Style { dim: "", reset: "" }
        };
        // Ctrl-C while answering stops the answer; at the prompt it quits.
        let generating = Arc::new(AtomicBool::new(false));
        let interrupted = Arc::new(AtomicBool::new(false));
        {
            let (generating, interrupted) = (generating.clone(), interrupted.clone());
            ctrlc::set_handler(move || {
                if generating.load(Ordering::SeqCst) {
                    interrupted.store(true, Ordering::SeqCst);
                } else {
                    eprintln!();
                    std::process::exit(130);
                }
            })?;
        }
        if interactive {
            eprintln!(
                "loaded in {load_seconds:.1} s on {}; {HELP}",
                engine.backend().name()
            );
        }
        let mut system = self.system.clone();
        let mut messages: Vec<Value> = Vec::new();
        let mut kwargs = serde_json::Map::new();
        if self.no_think {
            kwargs.insert("enable_thinking".into(), false.into());
        }
        let stdin = std::io::stdin();
        let mut lines = stdin.lock().lines();
        loop {
            if interactive {
                eprint!("> ");
                std::io::stderr().flush()?;
            }
            let Some(line) = lines.next() else { break };
            let line = line?;
            let input = line.trim();
            if input.is_empty() {
                continue;
            }
            match input
                .split_once(' ')
                .map_or((input, ""), |(c, rest)| (c, rest.trim()))
            {
                ("/exit" | "/quit", _) => break,
                ("/reset", _) => {
                    messages.clear();
                    engine.reset();
                    eprintln!("(conversation reset)");
                    continue;
                }
                ("/system", text) => {
                    system = (!text.is_empty()).then(|| text.to_string());
                    messages.clear();
                    engine.reset();
                    eprintln!("(system message set; conversation reset)");
                    continue;
                }
                ("/help", _) => {
                    eprintln!("{HELP}");
                    continue;
                }
                (cmd, _) if cmd.starts_with('/') && cmd.len() > 1 && !cmd[1..].contains('/') => {
                    eprintln!("unknown command {cmd}; {HELP}");
                    continue;
                }
                _ => {}
            }
            messages.push(json!({"role": "user", "content": input}));
            let mut conversation = Vec::with_capacity(messages.len() + 1);
            if let Some(s) = &system {
                conversation.push(json!({"role": "system", "content": s}));
            }
            conversation.extend(messages.iter().cloned());
            let prompt_text = self.template.render(&conversation, None, true, &kwargs)?;
            let prompt = self.tokenizer.encode(&prompt_text, false)?;

            let mut parser = GlmOutputParser::for_prompt(&prompt_text);
            let (mut reasoning, mut content) = (String::new(), String::new());
            let mut in_reasoning = false;
            let mut out = std::io::stdout().lock();
            let mut show =
                |events: Vec<GlmEvent>, out: &mut std::io::StdoutLock<'_>| -> std::io::Result<()> {
                    for event in events {
                        match event {
                            GlmEvent::Reasoning(text) => {
                                reasoning.push_str(&text);
                                if !self.hide_reasoning {
                                    if !in_reasoning {
                                        write!(out, "{}", style.dim)?;
                                        in_reasoning = true;
                                    }
                                    write!(out, "{text}")?;
                                }
                            }
                            GlmEvent::Content(text) => {
                                if in_reasoning {
                                    write!(out, "{}\n\n", style.reset)?;
                                    in_reasoning = false;
                                }
                                content.push_str(&text);
                                write!(out, "{text}")?;
                            }
                            GlmEvent::ToolCall(call) => {
                                let line =
                                    format!("[tool call] {}({})", call.name, call.arguments_json());
                                content.push_str(&line);
                                writeln!(out, "{line}")?;
                            }
                        }
                    }
                    out.flush()
                };
            interrupted.store(false, Ordering::SeqCst);
            generating.store(true, Ordering::SeqCst);
            let result = generate(
                &mut engine,
                &self.tokenizer,
                &prompt,
                &self.request,
                &mut |event| {
                    if show(parser.push(event.text), &mut out).is_err()
                        || interrupted.load(Ordering::SeqCst)
                    {
                        return ControlFlow::Break(());
                    }
                    ControlFlow::Continue(())
                },
            );
            generating.store(false, Ordering::SeqCst);
            let completion = result?;
            show(parser.finish(), &mut out)?;
            if in_reasoning {
                write!(out, "{}", style.reset)?;
            }
            writeln!(out)?;
            out.flush()?;
            drop(out);
            let stats = &completion.stats;
            {
                eprintln!(
                    "{}({} new prompt tokens, ttft {:.0} ms, {:.1} tok/s, {} tokens{}){}",
                    style.dim,
                    stats.prefilled_tokens,
                    stats.time_to_first_token * 1e3,
                    stats.decode_tok_s(),
                    stats.generated_tokens,
                    if interrupted.load(Ordering::SeqCst) {
                        ", stopped"
                    } else {
                        ""
                    },
                    style.reset,
                );
            }
            let mut reply = json!({"role": "assistant", "content": content});
            if !reasoning.is_empty() {
                reply["reasoning_content"] = Value::String(reasoning);
            }
            messages.push(reply);
        }
        Ok(())
    }
}

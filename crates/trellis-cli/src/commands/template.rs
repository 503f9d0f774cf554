use anyhow::{Context, bail};
use std::io::Write;
use std::path::PathBuf;
use trellis_runtime::chat_template::ChatTemplate;

#[derive(clap::Args)]
pub struct Args {
    /// Model directory.
    model: PathBuf,
    /// JSON file with the messages (an array of {role, content, ...} objects).
    #[arg(long)]
    messages: PathBuf,
    /// JSON file with the tools (an array of OpenAI-style tool definitions).
    #[arg(long)]
    tools: Option<PathBuf>,
    /// Do not append the assistant turn's opening.
    #[arg(long)]
    no_generation_prompt: bool,
    /// Extra template variables as a JSON object, e.g. '{"enable_thinking": false}'.
    #[arg(long)]
    kwargs: Option<String>,
}

fn read_json(path: &PathBuf, what: &str) -> anyhow::Result<serde_json::Value> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {what} file {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let Some(template) = ChatTemplate::from_model_dir(&args.model)? else {
        bail!(
            "{} has no chat template (tokenizer_config.json `chat_template` or chat_template.jinja)",
            args.model.display()
        );
    };
    let serde_json::Value::Array(messages) = read_json(&args.messages, "messages")? else {
        bail!(
            "{}: expected a JSON array of messages",
            args.messages.display()
        );
    };
    let tools = match &args.tools {
        Some(path) => match read_json(path, "tools")? {
            serde_json::Value::Array(t) => Some(t),
            _ => bail!("{}: expected a JSON array of tools", path.display()),
        },
        None => None,
    };
    let kwargs = match &args.kwargs {
        Some(text) => match serde_json::from_str(text).context("--kwargs is not valid JSON")? {
            serde_json::Value::Object(map) => map,
            _ => bail!("--kwargs must be a JSON object"),
        },
        None => serde_json::Map::new(),
    };
    let rendered = template.render(
        &messages,
        tools.as_deref(),
        !args.no_generation_prompt,
        &kwargs,
    )?;
    // Exactly the rendered prompt: no newline added.
    let mut out = std::io::stdout().lock();
    out.write_all(rendered.as_bytes())?;
    out.flush()?;
    Ok(())
}

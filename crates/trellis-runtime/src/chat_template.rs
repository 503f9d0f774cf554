//! Jinja chat templates rendered the way Hugging Face `transformers` renders them.
//!
//! `transformers` compiles chat templates with Jinja2's sandboxed environment, `trim_blocks` and
//! `lstrip_blocks` on, the `loopcontrols` extension (`{% break %}`, `{% continue %}`), its own
//! `{% generation %}` tag, a `tojson` filter that is Python's `json.dumps` (no HTML escaping,
//! `ensure_ascii=False` by default, keyword arguments `indent`, `separators`, `sort_keys`), and the
//! globals `raise_exception(message)` and `strftime_now(format)`. Templates also call Python string
//! and dict methods (`.strip()`, `.split()`, `.items()`, `.get()`, …). This module reproduces that
//! environment with `minijinja` and `minijinja-contrib`'s Python compatibility layer, so the same
//! template text renders byte for byte the same prompt (which matters for exact tokens and prefix
//! caching).
//!
//! Values are printed as Python prints them (`None`, `True`, `False`, `['a', 1]`, `1e+20`), since
//! that is what a Jinja2 render of the same template shows.

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, Value};
use serde_json::{Map, Value as JsonValue};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// File name of a stand-alone chat template in a model directory (preferred when present).
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";
/// File name of the tokenizer configuration that may carry `chat_template` and special tokens.
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
/// Name of the template used when no other is asked for.
pub const DEFAULT_TEMPLATE_NAME: &str = "default";
/// Name of the template `transformers` prefers when tools are passed and the model ships one.
pub const TOOL_USE_TEMPLATE_NAME: &str = "tool_use";

/// Special-token fields of `tokenizer_config.json` exposed to templates as variables.
const SPECIAL_TOKEN_FIELDS: [&str; 4] = ["bos_token", "eos_token", "pad_token", "unk_token"];

/// Errors from loading or rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    /// A model-directory file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file that failed.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// `tokenizer_config.json` is not valid JSON.
    #[error("{path} is not valid JSON: {source}")]
    Json {
        /// The file that failed.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
    /// A field has an unexpected shape (e.g. `chat_template` neither a string nor a list).
    #[error("{path}: field `{field}`: {message}")]
    Field {
        /// The file holding the field.
        path: PathBuf,
        /// The field name.
        field: String,
        /// What was expected.
        message: String,
    },
    /// A template failed to compile.
    #[error("chat template `{template}` does not compile (line {}): {message}", line_text(*.line))]
    Syntax {
        /// Template name (`default`, `tool_use`, …).
        template: String,
        /// 1-based line of the error in the template source, when known.
        line: Option<usize>,
        /// The template engine's message.
        message: String,
    },
    /// Rendering failed, including through `raise_exception(message)` in the template.
    #[error("chat template `{template}` failed to render (line {}): {message}", line_text(*.line))]
    Render {
        /// Template name.
        template: String,
        /// 1-based line of the error in the template source, when known.
        line: Option<usize>,
        /// The template engine's message (the text passed to `raise_exception` included).
        message: String,
    },
    /// A named template was asked for that the model does not ship.
    #[error("no chat template named `{name}` (available: {available})")]
    UnknownTemplate {
        /// The requested name.
        name: String,
        /// Comma-separated names that exist.
        available: String,
    },
}

fn line_text(line: Option<usize>) -> String {
    line.map_or_else(|| "unknown".to_string(), |l| l.to_string())
}

/// Result alias for this module.
pub type Result<T, E = ChatTemplateError> = std::result::Result<T, E>;

/// One model's chat template(s) together with the special-token strings templates refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Template names in the order the model lists them; `default` is always among them.
    names: Vec<String>,
    /// Original (unpreprocessed) source text per name, aligned with `names`.
    sources: Vec<String>,
    /// `bos_token`, `eos_token`, … as strings, passed to every render.
    special_tokens: Map<String, JsonValue>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("names", &self.names)
            .field("special_tokens", &self.special_tokens)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Loads the chat template of a Hugging Face model directory.
    ///
    /// `chat_template.jinja` wins when present; otherwise `tokenizer_config.json` → `chat_template`
    /// (a string, or a list of `{name, template}` entries). Special tokens (`bos_token`,
    /// `eos_token`, `pad_token`, `unk_token`; strings or `{content: …}` objects) come from
    /// `tokenizer_config.json`. Returns `Ok(None)` when the model ships no template.
    pub fn from_model_dir(dir: &Path) -> Result<Option<ChatTemplate>> {
        let config_path = dir.join(TOKENIZER_CONFIG_FILE);
        let config = if config_path.is_file() {
            let text = read_to_string(&config_path)?;
            let json: JsonValue =
                serde_json::from_str(&text).map_err(|source| ChatTemplateError::Json {
                    path: config_path.clone(),
                    source,
                })?;
            Some(json)
        } else {
            None
        };

        let jinja_path = dir.join(CHAT_TEMPLATE_FILE);
        let templates: Vec<(String, String)> = if jinja_path.is_file() {
            vec![(
                DEFAULT_TEMPLATE_NAME.to_string(),
                read_to_string(&jinja_path)?,
            )]
        } else {
            match config.as_ref().and_then(|c| c.get("chat_template")) {
                None | Some(JsonValue::Null) => return Ok(None),
                Some(value) => templates_from_config_field(value, &config_path)?,
            }
        };

        let mut special_tokens = Map::new();
        if let Some(JsonValue::Object(config)) = &config {
            for field in SPECIAL_TOKEN_FIELDS {
                if let Some(token) = special_token_string(config.get(field)) {
                    special_tokens.insert(field.to_string(), JsonValue::String(token));
                }
            }
        }
        let mut template = ChatTemplate::from_named_sources(templates)?;
        template.special_tokens = special_tokens;
        Ok(Some(template))
    }

    /// Builds a template from one source text (registered as `default`), without special tokens.
    pub fn from_source(source: &str) -> Result<ChatTemplate> {
        ChatTemplate::from_named_sources(vec![(
            DEFAULT_TEMPLATE_NAME.to_string(),
            source.to_string(),
        )])
    }

    /// Builds a template set from `(name, source)` pairs; one must be named `default` unless
    /// there is exactly one, which then becomes the default.
    pub fn from_named_sources(mut templates: Vec<(String, String)>) -> Result<ChatTemplate> {
        if templates.len() == 1 && templates[0].0 != DEFAULT_TEMPLATE_NAME {
            templates[0].0 = DEFAULT_TEMPLATE_NAME.to_string();
        }
        if !templates.iter().any(|(n, _)| n == DEFAULT_TEMPLATE_NAME) {
            return Err(ChatTemplateError::UnknownTemplate {
                name: DEFAULT_TEMPLATE_NAME.to_string(),
                available: join_names(templates.iter().map(|(n, _)| n.as_str())),
            });
        }
        let mut env = new_environment();
        let mut names = Vec::with_capacity(templates.len());
        let mut sources = Vec::with_capacity(templates.len());
        for (name, source) in templates {
            env.add_template_owned(name.clone(), replace_generation_tags(&source))
                .map_err(|e| ChatTemplateError::Syntax {
                    template: name.clone(),
                    line: e.line(),
                    message: error_message(&e),
                })?;
            names.push(name);
            sources.push(source);
        }
        Ok(ChatTemplate {
            env,
            names,
            sources,
            special_tokens: Map::new(),
        })
    }

    /// Sets (or with `None` removes) a special-token variable such as `bos_token`.
    pub fn set_special_token(&mut self, field: &str, token: Option<&str>) {
        match token {
            Some(t) => {
                self.special_tokens
                    .insert(field.to_string(), JsonValue::String(t.to_string()));
            }
            None => {
                self.special_tokens.remove(field);
            }
        }
    }

    /// The special-token variables passed to every render (`bos_token`, `eos_token`, …).
    pub fn special_tokens(&self) -> &Map<String, JsonValue> {
        &self.special_tokens
    }

    /// Names of the templates this model ships (`default` first unless the model ordered otherwise).
    pub fn template_names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(String::as_str)
    }

    /// The source text of a named template as the model ships it.
    pub fn source(&self, name: &str) -> Option<&str> {
        let index = self.names.iter().position(|n| n == name)?;
        Some(&self.sources[index])
    }

    /// Renders a conversation into a prompt string, with `transformers`' template choice: the
    /// `tool_use` template when `tools` is given and the model has one, else `default`.
    ///
    /// `messages` are OpenAI/HF-style message objects (`role`, `content`, optional
    /// `reasoning_content`, `tool_calls`, …), passed to the template unchanged. `extra_kwargs` are
    /// additional template variables (e.g. `enable_thinking`, `clear_thinking`); they override
    /// special-token variables but not `messages`, `tools` or `add_generation_prompt`.
    pub fn render(
        &self,
        messages: &[JsonValue],
        tools: Option<&[JsonValue]>,
        add_generation_prompt: bool,
        extra_kwargs: &Map<String, JsonValue>,
    ) -> Result<String> {
        let name = if tools.is_some() && self.names.iter().any(|n| n == TOOL_USE_TEMPLATE_NAME) {
            TOOL_USE_TEMPLATE_NAME
        } else {
            DEFAULT_TEMPLATE_NAME
        };
        self.render_named(name, messages, tools, add_generation_prompt, extra_kwargs)
    }

    /// Like [`ChatTemplate::render`], with an explicitly named template.
    pub fn render_named(
        &self,
        name: &str,
        messages: &[JsonValue],
        tools: Option<&[JsonValue]>,
        add_generation_prompt: bool,
        extra_kwargs: &Map<String, JsonValue>,
    ) -> Result<String> {
        let template =
            self.env
                .get_template(name)
                .map_err(|_| ChatTemplateError::UnknownTemplate {
                    name: name.to_string(),
                    available: join_names(self.template_names()),
                })?;
        let mut context = self.special_tokens.clone();
        for (key, value) in extra_kwargs {
            context.insert(key.clone(), value.clone());
        }
        context.insert("messages".into(), JsonValue::Array(messages.to_vec()));
        context.insert(
            "tools".into(),
            tools.map_or(JsonValue::Null, |t| JsonValue::Array(t.to_vec())),
        );
        context.insert(
            "add_generation_prompt".into(),
            JsonValue::Bool(add_generation_prompt),
        );
        let context = Value::from(minijinja::value::Serde(JsonValue::Object(context)));
        template
            .render(context)
            .map_err(|e| ChatTemplateError::Render {
                template: name.to_string(),
                line: e.line(),
                message: error_message(&e),
            })
    }
}

fn join_names<'a>(names: impl Iterator<Item = &'a str>) -> String {
    names.collect::<Vec<_>>().join(", ")
}

fn read_to_string(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| ChatTemplateError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// `chat_template` in `tokenizer_config.json`: a string, or `[{name, template}, …]`.
fn templates_from_config_field(value: &JsonValue, path: &Path) -> Result<Vec<(String, String)>> {
    let field_error = |message: String| ChatTemplateError::Field {
        path: path.to_path_buf(),
        field: "chat_template".into(),
        message,
    };
    match value {
        JsonValue::String(s) => Ok(vec![(DEFAULT_TEMPLATE_NAME.to_string(), s.clone())]),
        JsonValue::Array(entries) => entries
            .iter()
            .enumerate()
            .map(|(i, entry)| {
                let name = entry.get("name").and_then(JsonValue::as_str);
                let template = entry.get("template").and_then(JsonValue::as_str);
                match (name, template) {
                    (Some(n), Some(t)) => Ok((n.to_string(), t.to_string())),
                    _ => Err(field_error(format!(
                        "entry {i} is not an object with string `name` and `template`"
                    ))),
                }
            })
            .collect(),
        other => Err(field_error(format!(
            "expected a string or a list of {{name, template}} objects, got {other}"
        ))),
    }
}

/// A special token in `tokenizer_config.json`: a string or an `AddedToken` object with `content`.
fn special_token_string(value: Option<&JsonValue>) -> Option<String> {
    match value? {
        JsonValue::String(s) => Some(s.clone()),
        JsonValue::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// The engine's message with its location; the name and line are reported separately too.
fn error_message(error: &Error) -> String {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(s) = source {
        let _ = write!(message, ": {s}");
        source = s.source();
    }
    message
}

/// An environment configured like `transformers`' `ImmutableSandboxedEnvironment`.
fn new_environment() -> Environment<'static> {
    let mut env = Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .keep_trailing_newline(false)
        .build()
        .expect("default delimiters are valid");
    env.set_syntax(syntax);
    // Prompts are plain text: never HTML-escape, whatever the template name looks like.
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_formatter(python_formatter);
    env.add_filter("tojson", tojson_filter);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env
}

/// `raise_exception(message)`: the template's way of rejecting its input.
fn raise_exception(message: String) -> std::result::Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: the local time formatted with C `strftime` directives.
fn strftime_now(format: String) -> std::result::Result<Value, Error> {
    let mut out = String::new();
    // `write!` reports an invalid directive as an error where `to_string` would panic.
    write!(out, "{}", chrono::Local::now().format(&format)).map_err(|_| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: invalid format string {format:?}"),
        )
    })?;
    Ok(Value::from(out))
}

/// Prints values as Python's `str()` does, which is what Jinja2 shows for `{{ value }}`.
fn python_formatter(
    out: &mut minijinja::Output,
    _state: &mut minijinja::State,
    value: &Value,
) -> std::result::Result<(), Error> {
    let text = match value.kind() {
        ValueKind::Undefined => return Ok(()),
        ValueKind::String => {
            return out
                .write_str(value.as_str().unwrap_or_default())
                .map_err(Error::from);
        }
        ValueKind::None | ValueKind::Bool | ValueKind::Number | ValueKind::Seq | ValueKind::Map => {
            let mut text = String::new();
            python_repr(value, &mut text)?;
            text
        }
        _ => value.to_string(),
    };
    out.write_str(&text).map_err(Error::from)
}

/// Python's `repr()` of a value (used inside containers and for non-string scalars).
fn python_repr(value: &Value, out: &mut String) -> std::result::Result<(), Error> {
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number => push_number(value, out, false)?,
        ValueKind::String => push_python_string_repr(value.as_str().unwrap_or_default(), out),
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            for (i, item) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                python_repr(&item, out)?;
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            for (i, key) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                python_repr(&key, out)?;
                out.push_str(": ");
                python_repr(&value.get_item(&key)?, out)?;
            }
            out.push('}');
        }
        _ => {
            let _ = write!(out, "{value}");
        }
    }
    Ok(())
}

fn push_python_string_repr(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// Writes a number as Python does: integers plainly, floats with `repr(float)` (or the JSON
/// spellings `NaN`/`Infinity` when `json` is set, as `json.dumps` writes them).
fn push_number(value: &Value, out: &mut String, json: bool) -> std::result::Result<(), Error> {
    if value.is_integer() {
        let _ = write!(out, "{value}");
        return Ok(());
    }
    let f = f64::try_from(value.clone())?;
    if f.is_nan() {
        out.push_str(if json { "NaN" } else { "nan" });
    } else if f.is_infinite() {
        let name = if json { "Infinity" } else { "inf" };
        if f < 0.0 {
            out.push('-');
        }
        out.push_str(name);
    } else {
        out.push_str(&python_float_repr(f));
    }
    Ok(())
}

/// Python's `repr(float)`: shortest round-trip digits, positional for exponents in [-4, 16),
/// scientific (`1e+16`, `1.5e-05`) otherwise, and always a `.0` on integral positional values.
pub(crate) fn python_float_repr(f: f64) -> String {
    // Rust's `{:e}` already gives the shortest round-trip digits, e.g. "-1.2345e-5".
    let sci = format!("{f:e}");
    let (mantissa, exponent) = sci.split_once('e').expect("{:e} always has an exponent");
    let exponent: i32 = exponent.parse().expect("{:e} writes an integer exponent");
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let mut out = String::from(sign);
    if (-4..16).contains(&exponent) {
        if exponent < 0 {
            out.push_str("0.");
            out.extend(std::iter::repeat_n('0', (-exponent - 1) as usize));
            out.push_str(&digits);
        } else {
            let integer_len = exponent as usize + 1;
            if digits.len() <= integer_len {
                out.push_str(&digits);
                out.extend(std::iter::repeat_n('0', integer_len - digits.len()));
                out.push_str(".0");
            } else {
                out.push_str(&digits[..integer_len]);
                out.push('.');
                out.push_str(&digits[integer_len..]);
            }
        }
    } else {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let exp_sign = if exponent < 0 { '-' } else { '+' };
        let _ = write!(out, "e{exp_sign}{:02}", exponent.abs());
    }
    out
}

/// Options of Python's `json.dumps` that HF's `tojson` filter forwards.
struct JsonDumpOptions {
    ensure_ascii: bool,
    indent: Option<String>,
    item_separator: String,
    key_separator: String,
    sort_keys: bool,
}

/// `tojson` as HF defines it: `json.dumps(x, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)`, output not escaped.
fn tojson_filter(
    value: &Value,
    indent: Option<Value>,
    kwargs: Kwargs,
) -> std::result::Result<Value, Error> {
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        Some(v) => Some(v),
        None => indent,
    };
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) if v.kind() == ValueKind::String => Some(v.as_str().unwrap_or_default().into()),
        Some(v) => {
            let n = i64::try_from(v.clone()).map_err(|_| {
                Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: indent must be an integer or a string, got {v}"),
                )
            })?;
            Some(" ".repeat(n.max(0) as usize))
        }
    };
    let (item_separator, key_separator) = match kwargs.get::<Option<Value>>("separators")? {
        Some(v) if !v.is_none() => {
            let parts: Vec<String> = v
                .try_iter()?
                .map(|p| p.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .filter(|p: &Vec<String>| p.len() == 2)
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be a pair of strings",
                    )
                })?;
            (parts[0].clone(), parts[1].clone())
        }
        // Python's defaults: ", " without indent, "," with it (no trailing spaces).
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    kwargs.assert_all_used()?;
    let options = JsonDumpOptions {
        ensure_ascii,
        indent,
        item_separator,
        key_separator,
        sort_keys,
    };
    let mut out = String::new();
    write_json(value, &options, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

fn write_json(
    value: &Value,
    options: &JsonDumpOptions,
    depth: usize,
    out: &mut String,
) -> std::result::Result<(), Error> {
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => push_number(value, out, true)?,
        ValueKind::String => write_json_string(
            value.as_str().unwrap_or_default(),
            options.ensure_ascii,
            out,
        ),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_json_container(('[', ']'), items.len(), options, depth, out, |i, out| {
                write_json(&items[i], options, depth + 1, out)
            })?;
        }
        ValueKind::Map => {
            let mut entries: Vec<(String, Value)> = value
                .try_iter()?
                .map(|key| {
                    let item = value.get_item(&key)?;
                    Ok((json_key(&key)?, item))
                })
                .collect::<std::result::Result<_, Error>>()?;
            if options.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            write_json_container(('{', '}'), entries.len(), options, depth, out, |i, out| {
                write_json_string(&entries[i].0, options.ensure_ascii, out);
                out.push_str(&options.key_separator);
                write_json(&entries[i].1, options, depth + 1, out)
            })?;
        }
        kind => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: a value of type {kind} is not JSON serializable"),
            ));
        }
    }
    Ok(())
}

/// A map key as `json.dumps` writes it: strings as is, numbers/booleans/None converted.
fn json_key(key: &Value) -> std::result::Result<String, Error> {
    match key.kind() {
        ValueKind::String => Ok(key.as_str().unwrap_or_default().to_string()),
        ValueKind::None => Ok("null".into()),
        ValueKind::Bool => Ok(if key.is_true() { "true" } else { "false" }.into()),
        ValueKind::Number => {
            let mut s = String::new();
            push_number(key, &mut s, true)?;
            Ok(s)
        }
        kind => Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson: keys must be str, int, float, bool or None, not {kind}"),
        )),
    }
}

fn write_json_container(
    (open, close): (char, char),
    len: usize,
    options: &JsonDumpOptions,
    depth: usize,
    out: &mut String,
    mut write_item: impl FnMut(usize, &mut String) -> std::result::Result<(), Error>,
) -> std::result::Result<(), Error> {
    out.push(open);
    if len == 0 {
        out.push(close);
        return Ok(());
    }
    for i in 0..len {
        if i > 0 {
            out.push_str(&options.item_separator);
        }
        if let Some(indent) = &options.indent {
            out.push('\n');
            for _ in 0..=depth {
                out.push_str(indent);
            }
        }
        write_item(i, out)?;
    }
    if let Some(indent) = &options.indent {
        out.push('\n');
        for _ in 0..depth {
            out.push_str(indent);
        }
    }
    out.push(close);
    Ok(())
}

/// A JSON string literal with Python's escapes (lower-case hex; surrogate pairs when ASCII-only).
fn write_json_string(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && !c.is_ascii() => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Rewrites HF's `{% generation %}…{% endgeneration %}` (which marks assistant text for training
/// masks and renders its body unchanged) into `{% if true %}…{% endif %}`, keeping the tags'
/// whitespace-control markers so trimming behaves exactly as with the original tags.
fn replace_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        match rewrite_generation_tag(tag) {
            Some((replacement, consumed)) => {
                out.push_str(&replacement);
                rest = &tag[consumed..];
            }
            None => {
                out.push_str("{%");
                rest = &tag[2..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// If `tag` starts with a `generation`/`endgeneration` block tag, its replacement and length.
fn rewrite_generation_tag(tag: &str) -> Option<(String, usize)> {
    let after_open = &tag[2..];
    let (open_marker, body) = match after_open.chars().next() {
        Some(c @ ('-' | '+')) => (c.to_string(), &after_open[1..]),
        _ => (String::new(), after_open),
    };
    let trimmed = body.trim_start();
    let (keyword, after_keyword) = if let Some(r) = trimmed.strip_prefix("endgeneration") {
        ("endif", r)
    } else if let Some(r) = trimmed.strip_prefix("generation") {
        ("if true", r)
    } else {
        return None;
    };
    let after_space = after_keyword.trim_start();
    if after_space.len() == after_keyword.len() && !after_keyword.starts_with(['-', '+', '%']) {
        // The keyword continues (e.g. `generation_prompt`): not this tag.
        return None;
    }
    let (close_marker, after_marker) = match after_space.chars().next() {
        Some(c @ ('-' | '+')) => (c.to_string(), &after_space[1..]),
        _ => (String::new(), after_space),
    };
    let after_close = after_marker.strip_prefix("%}")?;
    let consumed = tag.len() - after_close.len();
    Some((
        format!("{{%{open_marker} {keyword} {close_marker}%}}"),
        consumed,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(source: &str, context: JsonValue) -> String {
        let template = ChatTemplate::from_source(source).unwrap();
        let messages: Vec<JsonValue> = context["messages"].as_array().cloned().unwrap_or_default();
        let extra = context.as_object().cloned().unwrap_or_default();
        template.render(&messages, None, false, &extra).unwrap()
    }

    #[test]
    fn float_repr_matches_python() {
        let cases = [
            (1.0, "1.0"),
            (0.5, "0.5"),
            (-2.25, "-2.25"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (1.5e-5, "1.5e-05"),
            (0.0001, "0.0001"),
            (0.1, "0.1"),
            (123.456, "123.456"),
            (1.5e300, "1.5e+300"),
            (0.0, "0.0"),
        ];
        for (f, expected) in cases {
            assert_eq!(python_float_repr(f), expected, "{f}");
        }
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let ctx = json!({"x": {"b": [1, 2.5, true, null], "a": "é\"\n"}});
        assert_eq!(
            render("{{ x | tojson }}", ctx.clone()),
            r#"{"b": [1, 2.5, true, null], "a": "é\"\n"}"#
        );
        assert_eq!(
            render(
                "{{ x | tojson(ensure_ascii=True, sort_keys=True) }}",
                ctx.clone()
            ),
            r#"{"a": "\u00e9\"\n", "b": [1, 2.5, true, null]}"#
        );
        assert_eq!(
            render("{{ x | tojson(indent=2) }}", ctx.clone()),
            "{\n  \"b\": [\n    1,\n    2.5,\n    true,\n    null\n  ],\n  \"a\": \"é\\\"\\n\"\n}"
        );
        assert_eq!(
            render("{{ x | tojson(separators=(',', ':')) }}", ctx.clone()),
            r#"{"b":[1,2.5,true,null],"a":"é\"\n"}"#
        );
        assert_eq!(render("{{ '<&>' | tojson }}", json!({})), r#""<&>""#);
        assert_eq!(
            render("{{ '🙂' | tojson(ensure_ascii=True) }}", json!({})),
            r#""\ud83d\ude42""#
        );
        assert_eq!(render("{{ [] | tojson(indent=2) }}", json!({})), "[]");
    }

    #[test]
    fn values_print_like_python() {
        let ctx = json!({"n": null, "t": true, "l": ["a", 1, false], "d": {"k": "it's"}});
        assert_eq!(
            render("{{ n }}|{{ t }}|{{ l }}|{{ d }}|{{ undefined_name }}", ctx),
            r#"None|True|['a', 1, False]|{'k': "it's"}|"#
        );
    }

    #[test]
    fn python_methods_and_loop_controls_work() {
        let ctx = json!({"s": "  a,b,c  ", "d": {"x": 1, "y": 2}});
        assert_eq!(
            render(
                "{{ s.strip().split(',') | join('-') }}|{% for k, v in d.items() %}{% if k == 'y' %}{% break %}{% endif %}{{ k }}={{ v }}{% endfor %}|{{ d.get('z', 'none') }}|{{ s.strip().startswith('a') }}",
                ctx
            ),
            "a-b-c|x=1|none|True"
        );
    }

    #[test]
    fn raise_exception_reports_message_and_line() {
        let template =
            ChatTemplate::from_source("ok\n{{ raise_exception('roles must alternate') }}").unwrap();
        let err = template.render(&[], None, false, &Map::new()).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("roles must alternate"), "{text}");
        assert!(
            matches!(err, ChatTemplateError::Render { line: Some(2), .. }),
            "{err:?}"
        );
    }

    #[test]
    fn syntax_errors_name_the_template() {
        let err = ChatTemplate::from_source("{% if %}").unwrap_err();
        assert!(matches!(err, ChatTemplateError::Syntax { .. }), "{err:?}");
    }

    #[test]
    fn generation_tag_renders_its_body() {
        let source = "A\n{%- generation -%}\n  B  \n{%- endgeneration %}\nC";
        assert_eq!(render(source, json!({})), "ABC");
        assert_eq!(
            replace_generation_tags("{% generation %}x{%+ endgeneration -%}{% generation_x %}"),
            "{% if true %}x{%+ endif -%}{% generation_x %}"
        );
    }

    #[test]
    fn strftime_now_formats_the_date() {
        let out = render("{{ strftime_now('%Y') }}", json!({}));
        assert_eq!(out.len(), 4);
        assert!(out.chars().all(|c| c.is_ascii_digit()));
    }

    #[test]
    fn named_templates_prefer_tool_use_when_tools_are_given() {
        let template = ChatTemplate::from_named_sources(vec![
            ("default".into(), "plain".into()),
            ("tool_use".into(), "tools={{ tools | length }}".into()),
        ])
        .unwrap();
        let tools = [json!({"type": "function"})];
        assert_eq!(
            template.render(&[], None, false, &Map::new()).unwrap(),
            "plain"
        );
        assert_eq!(
            template
                .render(&[], Some(&tools), false, &Map::new())
                .unwrap(),
            "tools=1"
        );
        assert!(
            template
                .render_named("missing", &[], None, false, &Map::new())
                .is_err()
        );
    }
}

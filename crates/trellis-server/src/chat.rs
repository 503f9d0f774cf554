//! `POST /v1/chat/completions`: messages through the model's chat template, the answer split
//! into reasoning, content and tool calls, whole or streamed.

use crate::error::ApiError;
use crate::output::{ChatOutput, ChatPiece, MessageBuilder, OutputFormat, random_alphanumeric};
use crate::protocol::{
    ChatChoice, ChatChunk, ChatChunkChoice, ChatCompletion, ChatDeltaBody, ChatRequest, max_tokens,
    parse_sampled_body,
};
use crate::sse;
use crate::state::{AppState, Next, Sequence, unix_now};
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};
use std::sync::Arc;
use trellis_runtime::generation::GenerationRequest;
use trellis_runtime::glm_output::{GlmOutputParser, THINK_END, TOOL_CALL_START};
use trellis_runtime::sampler::{SamplingError, SamplingParams};
use trellis_runtime::stop::FinishReason;

/// A chat request checked and turned into tokens, ready to run.
pub struct PreparedChat {
    pub prompt: Vec<u32>,
    pub generation: GenerationRequest,
    pub output: ChatOutput,
    pub stream: bool,
    pub include_usage: bool,
}

/// What `tool_choice` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
enum ToolChoice {
    /// The model decides (the default).
    Auto,
    /// No tools: they are left out of the prompt.
    None,
    /// Some tool must be called.
    Required,
    /// This tool must be called.
    Function(String),
}

pub async fn chat_completions(
    State(app): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: ChatRequest = parse_sampled_body(body, app.options.max_body_bytes)?;
    app.check_model(request.model.as_deref())?;
    // Rendering and tokenizing a long conversation is CPU work: keep it off the I/O threads.
    let prepared = {
        let app = app.clone();
        tokio::task::spawn_blocking(move || prepare(&app, request))
            .await
            .map_err(|e| ApiError::internal(format!("Preparing the prompt failed: {e}")))??
    };
    let sequence = app.start(prepared.prompt, prepared.generation, "messages")?;
    let meta = ChunkMeta {
        id: format!("chatcmpl-{}", random_alphanumeric(24)),
        created: unix_now(),
        model: app.model.name.clone(),
    };
    if prepared.stream {
        Ok(stream(
            sequence,
            prepared.output,
            meta,
            prepared.include_usage,
        ))
    } else {
        complete(sequence, prepared.output, meta).await
    }
}

/// Checks the request and renders its prompt.
pub fn prepare(app: &AppState, request: ChatRequest) -> Result<PreparedChat, ApiError> {
    let model = &app.model;
    request.sampling.check_n()?;
    if request.logprobs == Some(true) || request.top_logprobs.is_some_and(|n| n > 0) {
        return Err(ApiError::unsupported(
            "logprobs",
            "Log probabilities are not supported by this server.",
        ));
    }
    check_response_format(request.response_format.as_ref())?;
    let Some(template) = &model.template else {
        return Err(ApiError::invalid_request(format!(
            "The model `{}` has no chat template; use /v1/completions with a plain prompt.",
            model.name
        )));
    };
    let messages = normalize_messages(request.messages)?;
    let tools = request.tools.unwrap_or_default();
    check_tools(&tools)?;
    let choice = tool_choice(request.tool_choice.as_ref(), &tools)?;
    let kwargs = request.chat_template_kwargs.unwrap_or_default();
    let template_tools = (!tools.is_empty() && choice != ToolChoice::None).then_some(&tools[..]);
    let rendered = template
        .render(&messages, template_tools, true, &kwargs)
        .map_err(|e| {
            ApiError::invalid_param("messages", format!("The chat template failed: {e}."))
        })?;

    // A forced call is started in the prompt itself; the model writes its arguments.
    let mut forced = String::new();
    if matches!(choice, ToolChoice::Required | ToolChoice::Function(_)) {
        if model.format != OutputFormat::Glm {
            return Err(ApiError::unsupported(
                "tool_choice",
                "`tool_choice` \"required\" or a named function is only supported for models with GLM-style tool calls; use \"auto\".",
            ));
        }
        if GlmOutputParser::for_prompt(&rendered).in_reasoning() {
            forced.push_str(THINK_END);
        }
        forced.push_str(TOOL_CALL_START);
        if let ToolChoice::Function(name) = &choice {
            forced.push_str(name);
        }
    }
    let prompt_text = format!("{rendered}{forced}");
    let prompt = model
        .tokenizer
        .encode(&prompt_text, false)
        .map_err(|e| ApiError::invalid_param("messages", format!("Tokenizing failed: {e}.")))?;
    let room = app.ctx_size().saturating_sub(prompt.len());
    if room == 0 {
        return Err(app.context_error(prompt.len(), "messages"));
    }
    let requested = max_tokens(request.max_tokens, request.max_completion_tokens)?;
    // More than the context holds is cut to what it holds (finish_reason "length").
    let max_tokens = requested
        .or(model.default_max_tokens)
        .unwrap_or(room)
        .min(room);
    let generation = GenerationRequest {
        sampling: resolve_sampling(app, &request.sampling)?,
        max_tokens,
        stop: request.sampling.stop_strings()?,
        ignore_eos: request.sampling.ignore_eos.unwrap_or(false),
        skip_special_tokens: !model.format.keeps_special_tokens(),
    };
    let output = ChatOutput::new(
        model.format,
        &rendered,
        &tools,
        choice != ToolChoice::None,
        &forced,
    );
    let stream = request.stream.unwrap_or(false);
    Ok(PreparedChat {
        prompt,
        generation,
        output,
        stream,
        include_usage: stream
            && request
                .stream_options
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
    })
}

/// The request's sampling fields over the server's defaults, checked.
pub fn resolve_sampling(
    app: &AppState,
    fields: &crate::protocol::SamplingFields,
) -> Result<SamplingParams, ApiError> {
    let params = SamplingParams::resolve(&app.model.sampling_defaults, &fields.options()?);
    params
        .validate(app.scheduler.info().vocab_size)
        .map_err(|e| {
            let param = match &e {
                SamplingError::InvalidParameter { name, .. } => *name,
                SamplingError::BiasTokenOutOfRange { .. } => "logit_bias",
                _ => "temperature",
            };
            ApiError::invalid_param(param, format!("{e}."))
        })?;
    Ok(params)
}

/// `response_format`: plain text and `json_object` are accepted; `json_object` is not enforced
/// (there is no constrained decoding yet: the messages must ask for JSON, as OpenAI also
/// requires). Schemas are refused rather than silently ignored.
fn check_response_format(format: Option<&Value>) -> Result<(), ApiError> {
    let Some(format) = format else { return Ok(()) };
    if format.is_null() {
        return Ok(());
    }
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(()),
        Some("json_object") => {
            tracing::debug!("response_format json_object accepted without constrained decoding");
            Ok(())
        }
        Some("json_schema") => Err(ApiError::unsupported(
            "response_format",
            "`response_format` json_schema is not supported (no constrained decoding); use json_object and describe the schema in the messages.",
        )),
        _ => Err(ApiError::invalid_param(
            "response_format",
            "`response_format.type` must be \"text\", \"json_object\" or \"json_schema\".",
        )),
    }
}

const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// Checks the messages and puts them in the shape chat templates expect: `developer` as
/// `system`, missing content as "", tool-call arguments as objects (OpenAI sends them as JSON
/// strings), a tool result's content parts joined into one string.
pub fn normalize_messages(messages: Vec<Value>) -> Result<Vec<Value>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "`messages` must contain at least one message.",
        ));
    }
    messages
        .into_iter()
        .enumerate()
        .map(|(i, message)| {
            let at = format!("messages[{i}]");
            let Value::Object(mut message) = message else {
                return Err(ApiError::invalid_param(
                    &at,
                    format!("`{at}` must be an object."),
                ));
            };
            let role = match message.get("role").and_then(Value::as_str) {
                Some(role) if ROLES.contains(&role) => role.to_string(),
                Some(role) => {
                    return Err(ApiError::invalid_param(
                        &format!("{at}.role"),
                        format!(
                            "`{at}.role` is {role:?}; expected one of {}.",
                            ROLES.join(", ")
                        ),
                    ));
                }
                None => {
                    return Err(ApiError::invalid_param(
                        &format!("{at}.role"),
                        format!("`{at}.role` must be a string."),
                    ));
                }
            };
            if role == "developer" {
                message.insert("role".into(), "system".into());
            }
            let content = normalize_content(message.remove("content"), &at, role == "tool")?;
            message.insert("content".into(), content);
            if let Some(calls) = message.get_mut("tool_calls") {
                normalize_tool_calls(calls, &at)?;
            }
            Ok(Value::Object(message))
        })
        .collect()
}

fn normalize_content(content: Option<Value>, at: &str, join: bool) -> Result<Value, ApiError> {
    let param = format!("{at}.content");
    match content {
        None | Some(Value::Null) => Ok(Value::String(String::new())),
        Some(Value::String(s)) => Ok(Value::String(s)),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, part) in parts.iter().enumerate() {
                match part {
                    Value::String(s) => text.push_str(s),
                    Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("text") => {
                        let Some(t) = o.get("text").and_then(Value::as_str) else {
                            return Err(ApiError::invalid_param(
                                &param,
                                format!("`{param}[{j}].text` must be a string."),
                            ));
                        };
                        text.push_str(t);
                    }
                    Value::Object(o) => {
                        let kind = o.get("type").and_then(Value::as_str).unwrap_or("?");
                        return Err(ApiError::unsupported(
                            &param,
                            format!(
                                "`{param}[{j}]` has type {kind:?}; this model takes text only."
                            ),
                        ));
                    }
                    _ => {
                        return Err(ApiError::invalid_param(
                            &param,
                            format!("`{param}[{j}]` must be a string or a content part object."),
                        ));
                    }
                }
            }
            // Templates accept part lists; a tool result's parts are one result, so join them.
            Ok(if join {
                Value::String(text)
            } else {
                Value::Array(parts)
            })
        }
        Some(_) => Err(ApiError::invalid_param(
            &param,
            format!("`{param}` must be a string, a list of content parts, or null."),
        )),
    }
}

fn normalize_tool_calls(calls: &mut Value, at: &str) -> Result<(), ApiError> {
    let param = format!("{at}.tool_calls");
    let Value::Array(calls) = calls else {
        return Err(ApiError::invalid_param(
            &param,
            format!("`{param}` must be a list."),
        ));
    };
    for (j, call) in calls.iter_mut().enumerate() {
        let here = format!("{param}[{j}]");
        let function = call
            .get_mut("function")
            .and_then(Value::as_object_mut)
            .ok_or_else(|| {
                ApiError::invalid_param(&here, format!("`{here}.function` must be an object."))
            })?;
        if !function.get("name").is_some_and(Value::is_string) {
            return Err(ApiError::invalid_param(
                &here,
                format!("`{here}.function.name` must be a string."),
            ));
        }
        let arguments = match function.remove("arguments") {
            None | Some(Value::Null) => Value::Object(Map::new()),
            Some(Value::String(s)) if s.trim().is_empty() => Value::Object(Map::new()),
            Some(Value::String(s)) => match serde_json::from_str::<Value>(&s) {
                Ok(v @ Value::Object(_)) => v,
                _ => {
                    return Err(ApiError::invalid_param(
                        &here,
                        format!("`{here}.function.arguments` must be a JSON object (as a string)."),
                    ));
                }
            },
            Some(v @ Value::Object(_)) => v,
            Some(_) => {
                return Err(ApiError::invalid_param(
                    &here,
                    format!("`{here}.function.arguments` must be a JSON object."),
                ));
            }
        };
        function.insert("arguments".into(), arguments);
    }
    Ok(())
}

/// Tools must be functions with names.
fn check_tools(tools: &[Value]) -> Result<(), ApiError> {
    for (i, tool) in tools.iter().enumerate() {
        let param = format!("tools[{i}]");
        let kind = tool
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("function");
        if kind != "function" {
            return Err(ApiError::unsupported(
                &param,
                format!("`{param}.type` is {kind:?}; only \"function\" tools are supported."),
            ));
        }
        let name = tool.pointer("/function/name").and_then(Value::as_str);
        if name.is_none_or(str::is_empty) {
            return Err(ApiError::invalid_param(
                &param,
                format!("`{param}.function.name` must be a non-empty string."),
            ));
        }
    }
    Ok(())
}

fn tool_choice(choice: Option<&Value>, tools: &[Value]) -> Result<ToolChoice, ApiError> {
    let invalid = || {
        ApiError::invalid_param(
            "tool_choice",
            "`tool_choice` must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": …}}.",
        )
    };
    let choice = match choice {
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" => ToolChoice::Required,
            _ => return Err(invalid()),
        },
        Some(Value::Object(o)) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(invalid)?;
            let known = tools
                .iter()
                .any(|t| t.pointer("/function/name").and_then(Value::as_str) == Some(name));
            if !known {
                return Err(ApiError::invalid_param(
                    "tool_choice",
                    format!("`tool_choice` names the function {name:?}, which is not in `tools`."),
                ));
            }
            ToolChoice::Function(name.to_string())
        }
        Some(_) => return Err(invalid()),
    };
    if choice == ToolChoice::Required && tools.is_empty() {
        return Err(ApiError::invalid_param(
            "tool_choice",
            "`tool_choice` \"required\" needs `tools`.",
        ));
    }
    Ok(choice)
}

/// Identity shared by every chunk of one response.
pub struct ChunkMeta {
    pub id: String,
    pub created: u64,
    pub model: String,
}

async fn complete(
    mut sequence: Sequence,
    mut output: ChatOutput,
    meta: ChunkMeta,
) -> Result<Response, ApiError> {
    let mut message = MessageBuilder::default();
    loop {
        match sequence.next().await {
            Next::Text(text) => output.push(&text).into_iter().for_each(|p| message.push(p)),
            Next::Done {
                text,
                finish_reason,
                usage,
            } => {
                let pieces = output.push(&text).into_iter().chain(output.finish());
                pieces.for_each(|p| message.push(p));
                let completion = ChatCompletion {
                    id: meta.id,
                    object: "chat.completion",
                    created: meta.created,
                    model: meta.model,
                    choices: vec![ChatChoice {
                        index: 0,
                        message: message.build(),
                        logprobs: None,
                        finish_reason: output.finish_reason(finish_reason),
                    }],
                    usage,
                };
                return Ok(Json(completion).into_response());
            }
            Next::Failed(error) => return Err(error),
        }
    }
}

/// Where a chat stream is.
enum Phase {
    Start,
    Running,
    Finished,
}

struct ChatStream {
    sequence: Sequence,
    output: ChatOutput,
    meta: ChunkMeta,
    include_usage: bool,
    phase: Phase,
}

impl ChatStream {
    fn chunk(&self, delta: ChatDeltaBody, finish_reason: Option<FinishReason>) -> ChatChunk {
        ChatChunk {
            id: self.meta.id.clone(),
            object: "chat.completion.chunk",
            created: self.meta.created,
            model: self.meta.model.clone(),
            choices: vec![ChatChunkChoice {
                index: 0,
                delta,
                logprobs: None,
                finish_reason,
            }],
            usage: self.include_usage.then_some(None),
        }
    }

    fn piece_events(&self, pieces: Vec<ChatPiece>) -> Vec<sse::Event> {
        pieces
            .into_iter()
            .map(|piece| {
                let delta = match piece {
                    ChatPiece::Reasoning(text) => ChatDeltaBody {
                        reasoning_content: Some(text),
                        ..ChatDeltaBody::default()
                    },
                    ChatPiece::Content(text) => ChatDeltaBody {
                        content: Some(text),
                        ..ChatDeltaBody::default()
                    },
                    ChatPiece::ToolCall(call) => ChatDeltaBody {
                        tool_calls: Some(vec![call]),
                        ..ChatDeltaBody::default()
                    },
                };
                sse::json_event(&self.chunk(delta, None))
            })
            .collect()
    }

    /// The next events to send; empty at the end.
    async fn advance(&mut self) -> Vec<sse::Event> {
        match self.phase {
            Phase::Start => {
                self.phase = Phase::Running;
                let role = ChatDeltaBody {
                    role: Some("assistant"),
                    content: Some(String::new()),
                    ..ChatDeltaBody::default()
                };
                vec![sse::json_event(&self.chunk(role, None))]
            }
            Phase::Running => loop {
                match self.sequence.next().await {
                    Next::Text(text) => {
                        let pieces = self.output.push(&text);
                        let events = self.piece_events(pieces);
                        if !events.is_empty() {
                            return events;
                        }
                    }
                    Next::Done {
                        text,
                        finish_reason,
                        usage,
                    } => {
                        self.phase = Phase::Finished;
                        let mut pieces = self.output.push(&text);
                        pieces.extend(self.output.finish());
                        let mut events = self.piece_events(pieces);
                        let reason = self.output.finish_reason(finish_reason);
                        events.push(sse::json_event(
                            &self.chunk(ChatDeltaBody::default(), Some(reason)),
                        ));
                        if self.include_usage {
                            events.push(sse::json_event(&ChatChunk {
                                choices: Vec::new(),
                                usage: Some(Some(usage)),
                                ..self.chunk(ChatDeltaBody::default(), None)
                            }));
                        }
                        events.push(sse::done_event());
                        return events;
                    }
                    Next::Failed(error) => {
                        self.phase = Phase::Finished;
                        return vec![sse::error_event(&error), sse::done_event()];
                    }
                }
            },
            Phase::Finished => Vec::new(),
        }
    }
}

fn stream(
    sequence: Sequence,
    output: ChatOutput,
    meta: ChunkMeta,
    include_usage: bool,
) -> Response {
    let state = ChatStream {
        sequence,
        output,
        meta,
        include_usage,
        phase: Phase::Start,
    };
    sse::response(state, |mut state| async move {
        let events = state.advance().await;
        (events, state)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn messages_are_normalized_for_templates() {
        let messages = normalize_messages(vec![
            json!({"role": "developer", "content": "Be brief."}),
            json!({"role": "user", "content": [{"type": "text", "text": "Hi"}]}),
            json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "f", "arguments": "{\"x\": 1}"}}]}),
            json!({"role": "tool", "tool_call_id": "call_1",
                   "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}),
        ])
        .unwrap();
        assert_eq!(messages[0]["role"], "system");
        assert_eq!(messages[1]["content"][0]["text"], "Hi");
        assert_eq!(messages[2]["content"], "");
        assert_eq!(
            messages[2]["tool_calls"][0]["function"]["arguments"],
            json!({"x": 1})
        );
        assert_eq!(messages[3]["content"], "ab");
    }

    #[test]
    fn bad_messages_name_the_field() {
        let param = |messages: Vec<Value>| normalize_messages(messages).unwrap_err().param;
        assert_eq!(param(vec![]).as_deref(), Some("messages"));
        assert_eq!(param(vec![json!("hi")]).as_deref(), Some("messages[0]"));
        assert_eq!(
            param(vec![json!({"role": "robot", "content": "x"})]).as_deref(),
            Some("messages[0].role")
        );
        assert_eq!(
            param(vec![json!({"role": "user", "content": 5})]).as_deref(),
            Some("messages[0].content")
        );
        assert_eq!(
            param(vec![
                json!({"role": "user", "content": [{"type": "image_url", "image_url": {}}]})
            ])
            .as_deref(),
            Some("messages[0].content")
        );
        let bad_arguments = json!({"role": "assistant", "tool_calls": [
            {"function": {"name": "f", "arguments": "not json"}}]});
        assert_eq!(
            param(vec![bad_arguments]).as_deref(),
            Some("messages[0].tool_calls[0]")
        );
    }

    #[test]
    fn tool_choice_forms() {
        let tools = [json!({"type": "function", "function": {"name": "f"}})];
        assert_eq!(tool_choice(None, &tools).unwrap(), ToolChoice::Auto);
        assert_eq!(
            tool_choice(Some(&json!("none")), &tools).unwrap(),
            ToolChoice::None
        );
        assert_eq!(
            tool_choice(Some(&json!("required")), &tools).unwrap(),
            ToolChoice::Required
        );
        assert_eq!(
            tool_choice(
                Some(&json!({"type": "function", "function": {"name": "f"}})),
                &tools
            )
            .unwrap(),
            ToolChoice::Function("f".into())
        );
        assert!(
            tool_choice(
                Some(&json!({"type": "function", "function": {"name": "g"}})),
                &tools
            )
            .is_err()
        );
        assert!(tool_choice(Some(&json!("required")), &[]).is_err());
        assert!(tool_choice(Some(&json!("sometimes")), &tools).is_err());
        assert!(check_tools(&[json!({"type": "retrieval"})]).is_err());
        assert!(check_tools(&[json!({"type": "function", "function": {}})]).is_err());
    }

    #[test]
    fn response_formats() {
        assert!(check_response_format(None).is_ok());
        assert!(check_response_format(Some(&json!({"type": "text"}))).is_ok());
        assert!(check_response_format(Some(&json!({"type": "json_object"}))).is_ok());
        let e = check_response_format(Some(&json!({"type": "json_schema"}))).unwrap_err();
        assert_eq!(e.code, Some("unsupported_parameter"));
        assert!(check_response_format(Some(&json!({"type": "yaml"}))).is_err());
    }
}

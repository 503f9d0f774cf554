//! From generated text to what a chat answer holds: reasoning, content and tool calls.
//!
//! GLM-style models write `reasoning</think>answer<tool_call>…</tool_call>` with their tags as
//! special tokens (the text is decoded with them kept); [`GlmOutputParser`] splits it and this
//! module turns its events into OpenAI pieces. Other models' text is all content.
//!
//! Streaming shape: reasoning and content go out as `reasoning_content` / `content` deltas as
//! soon as the parser releases them; a tool call goes out whole, as one `tool_calls` delta
//! carrying its index, id, name and complete arguments, when its closing tag arrives (the
//! parser only parses a call once it is complete, so partial arguments are never sent).

use crate::protocol::{ChatMessage, FunctionCall, ToolCall, ToolCallDelta};
use rand::Rng;
use serde_json::Value;
use trellis_runtime::chat_template::ChatTemplate;
use trellis_runtime::glm_output::{
    ARG_KEY_END, ARG_KEY_START, ARG_VALUE_END, ARG_VALUE_START, GlmEvent, GlmOutputParser,
    TOOL_CALL_END, TOOL_CALL_START, ToolCall as ParsedToolCall,
};
use trellis_runtime::stop::FinishReason;

/// How a model writes its answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    /// GLM-4.5/4.7: `<think>` reasoning and `<tool_call>name<arg_key>…` calls.
    Glm,
    /// Plain text: everything is content; special tokens are left out.
    Plain,
}

impl OutputFormat {
    /// GLM when the chat template writes GLM's tool-call argument tags.
    pub fn detect(template: Option<&ChatTemplate>) -> OutputFormat {
        let glm = template
            .and_then(|t| t.source(trellis_runtime::chat_template::DEFAULT_TEMPLATE_NAME))
            .is_some_and(|source| source.contains(ARG_KEY_START) && source.contains("</think>"));
        if glm {
            OutputFormat::Glm
        } else {
            OutputFormat::Plain
        }
    }

    /// Whether decoding must keep special tokens (the parser needs the tags).
    pub fn keeps_special_tokens(self) -> bool {
        self == OutputFormat::Glm
    }
}

/// One piece of a chat answer, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum ChatPiece {
    Reasoning(String),
    Content(String),
    ToolCall(ToolCallDelta),
}

/// Turns generated text into chat pieces, incrementally.
pub struct ChatOutput {
    parser: Option<GlmOutputParser>,
    /// With `tool_choice: "none"`, calls the model writes anyway are returned as text.
    parse_tool_calls: bool,
    tool_calls: u32,
}

impl ChatOutput {
    /// Output following `prompt` (the rendered prompt text, any forced prefix included) in
    /// `format`; `tools` are the request's tool definitions (their schemas keep string
    /// arguments raw); `forced` is text appended to the prompt that the answer continues
    /// (e.g. `</think><tool_call>name` for a forced call), fed to the parser first.
    pub fn new(
        format: OutputFormat,
        prompt: &str,
        tools: &[Value],
        parse_tool_calls: bool,
        forced: &str,
    ) -> ChatOutput {
        let parser = (format == OutputFormat::Glm).then(|| {
            let mut parser = GlmOutputParser::for_prompt(prompt).with_tools(tools);
            // Forced text ends inside a tool call, so it produces no events of its own.
            let events = parser.push(forced);
            debug_assert!(events.is_empty() || forced.is_empty());
            parser
        });
        ChatOutput {
            parser,
            parse_tool_calls,
            tool_calls: 0,
        }
    }

    /// Feeds a text delta.
    pub fn push(&mut self, text: &str) -> Vec<ChatPiece> {
        if text.is_empty() {
            return Vec::new();
        }
        match &mut self.parser {
            Some(parser) => {
                let events = parser.push(text);
                self.map_events(events)
            }
            None => vec![ChatPiece::Content(text.to_string())],
        }
    }

    /// Ends the output: what the parser held back.
    pub fn finish(&mut self) -> Vec<ChatPiece> {
        match &mut self.parser {
            Some(parser) => {
                let events = parser.finish();
                self.map_events(events)
            }
            None => Vec::new(),
        }
    }

    /// Parser events as chat pieces; tool calls get their index and a fresh id.
    pub fn map_events(&mut self, events: Vec<GlmEvent>) -> Vec<ChatPiece> {
        events
            .into_iter()
            .filter_map(|event| match event {
                GlmEvent::Reasoning(text) if !text.is_empty() => Some(ChatPiece::Reasoning(text)),
                GlmEvent::Content(text) if !text.is_empty() => Some(ChatPiece::Content(text)),
                GlmEvent::Reasoning(_) | GlmEvent::Content(_) => None,
                GlmEvent::ToolCall(call) if !self.parse_tool_calls => {
                    Some(ChatPiece::Content(raw_tool_call(&call)))
                }
                GlmEvent::ToolCall(call) => {
                    let index = self.tool_calls;
                    self.tool_calls += 1;
                    Some(ChatPiece::ToolCall(ToolCallDelta {
                        index,
                        id: tool_call_id(),
                        kind: "function",
                        function: FunctionCall {
                            arguments: call.arguments_json(),
                            name: call.name,
                        },
                    }))
                }
            })
            .collect()
    }

    /// Tool calls returned so far.
    pub fn tool_call_count(&self) -> u32 {
        self.tool_calls
    }

    /// The finish reason to report: `tool_calls` when the answer called tools and ended on
    /// its own (not cut by the length limit).
    pub fn finish_reason(&self, generation: FinishReason) -> FinishReason {
        if self.tool_calls > 0 && generation == FinishReason::Stop {
            FinishReason::ToolCalls
        } else {
            generation
        }
    }
}

/// GLM's own text for a call (what `tool_choice: "none"` returns instead of a parsed call).
fn raw_tool_call(call: &ParsedToolCall) -> String {
    let mut text = format!("{TOOL_CALL_START}{}", call.name);
    for (key, value) in &call.arguments {
        let value = match value {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        text.push_str(&format!(
            "{ARG_KEY_START}{key}{ARG_KEY_END}{ARG_VALUE_START}{value}{ARG_VALUE_END}"
        ));
    }
    text.push_str(TOOL_CALL_END);
    text
}

/// `call_` and 24 random letters and digits, like OpenAI's ids.
pub fn tool_call_id() -> String {
    format!("call_{}", random_alphanumeric(24))
}

pub fn random_alphanumeric(len: usize) -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
        .collect()
}

/// Collects pieces into a whole message (non-streaming responses).
#[derive(Clone, Debug, Default)]
pub struct MessageBuilder {
    reasoning: String,
    content: String,
    tool_calls: Vec<ToolCall>,
}

impl MessageBuilder {
    pub fn push(&mut self, piece: ChatPiece) {
        match piece {
            ChatPiece::Reasoning(text) => self.reasoning.push_str(&text),
            ChatPiece::Content(text) => self.content.push_str(&text),
            ChatPiece::ToolCall(call) => self.tool_calls.push(ToolCall {
                id: call.id,
                kind: call.kind,
                function: call.function,
            }),
        }
    }

    /// The assistant message: content `null` when there is none but tool calls, reasoning
    /// only when the model reasoned.
    pub fn build(self) -> ChatMessage {
        let content = if self.content.is_empty() && !self.tool_calls.is_empty() {
            None
        } else {
            Some(self.content)
        };
        ChatMessage {
            role: "assistant",
            content,
            reasoning_content: (!self.reasoning.is_empty()).then_some(self.reasoning),
            tool_calls: self.tool_calls,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn call(name: &str, arguments: Value) -> ParsedToolCall {
        let Value::Object(arguments) = arguments else {
            panic!("arguments are an object")
        };
        ParsedToolCall {
            name: name.into(),
            arguments,
        }
    }

    fn glm(prompt: &str) -> ChatOutput {
        ChatOutput::new(OutputFormat::Glm, prompt, &[], true, "")
    }

    #[test]
    fn synthetic_events_map_to_openai_pieces() {
        let mut output = glm("<|assistant|><think>");
        let pieces = output.map_events(vec![
            GlmEvent::Reasoning("need the weather".into()),
            GlmEvent::Content(String::new()),
            GlmEvent::Content("Checking.".into()),
            GlmEvent::ToolCall(call("get_weather", json!({"city": "Paris", "days": 2}))),
            GlmEvent::ToolCall(call("get_time", json!({}))),
        ]);
        assert_eq!(pieces.len(), 4, "empty text is dropped: {pieces:?}");
        assert_eq!(pieces[0], ChatPiece::Reasoning("need the weather".into()));
        assert_eq!(pieces[1], ChatPiece::Content("Checking.".into()));
        let ChatPiece::ToolCall(first) = &pieces[2] else {
            panic!("{pieces:?}")
        };
        assert_eq!(first.index, 0);
        assert_eq!(first.kind, "function");
        assert_eq!(first.function.name, "get_weather");
        assert_eq!(
            serde_json::from_str::<Value>(&first.function.arguments).unwrap(),
            json!({"city": "Paris", "days": 2})
        );
        assert!(first.id.starts_with("call_") && first.id.len() == 29);
        let ChatPiece::ToolCall(second) = &pieces[3] else {
            panic!("{pieces:?}")
        };
        assert_eq!(second.index, 1);
        assert_eq!(second.function.arguments, "{}");
        assert_ne!(first.id, second.id);
        assert_eq!(output.tool_call_count(), 2);
        assert_eq!(
            output.finish_reason(FinishReason::Stop),
            FinishReason::ToolCalls
        );
        assert_eq!(
            output.finish_reason(FinishReason::Length),
            FinishReason::Length
        );
    }

    #[test]
    fn tool_calls_become_text_when_tools_are_off() {
        let mut output = ChatOutput::new(OutputFormat::Glm, "<think>", &[], false, "");
        let pieces = output.map_events(vec![GlmEvent::ToolCall(call(
            "f",
            json!({"a": "x", "b": 1}),
        ))]);
        assert_eq!(
            pieces,
            [ChatPiece::Content(
                "<tool_call>f<arg_key>a</arg_key><arg_value>x</arg_value><arg_key>b</arg_key><arg_value>1</arg_value></tool_call>"
                    .into()
            )]
        );
        assert_eq!(output.finish_reason(FinishReason::Stop), FinishReason::Stop);
    }

    #[test]
    fn streamed_text_is_split_and_built_into_a_message() {
        let tools = [
            json!({"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}),
        ];
        let mut output = ChatOutput::new(OutputFormat::Glm, "x<think>", &tools, true, "");
        let mut message = MessageBuilder::default();
        for delta in [
            "Let me ",
            "check.</th",
            "ink>Sure",
            "<tool_call>get_weather<arg_key>city</arg_key>",
            "<arg_value>12345</arg_value></tool_call>",
        ] {
            for piece in output.push(delta) {
                message.push(piece);
            }
        }
        for piece in output.finish() {
            message.push(piece);
        }
        let message = message.build();
        assert_eq!(message.reasoning_content.as_deref(), Some("Let me check."));
        assert_eq!(message.content.as_deref(), Some("Sure"));
        assert_eq!(message.tool_calls.len(), 1);
        // The schema says `city` is a string: kept raw, not read as a number.
        assert_eq!(
            message.tool_calls[0].function.arguments,
            r#"{"city":"12345"}"#
        );
    }

    #[test]
    fn forced_tool_call_prefix_is_continued() {
        let mut output = ChatOutput::new(
            OutputFormat::Glm,
            "<|assistant|><think>",
            &[],
            true,
            "</think><tool_call>get_time",
        );
        let mut pieces = output.push("</tool_call>");
        pieces.extend(output.finish());
        assert_eq!(pieces.len(), 1);
        let ChatPiece::ToolCall(call) = &pieces[0] else {
            panic!("{pieces:?}")
        };
        assert_eq!(call.function.name, "get_time");
        assert_eq!(call.function.arguments, "{}");
    }

    #[test]
    fn only_tool_calls_give_null_content() {
        let mut message = MessageBuilder::default();
        message.push(ChatPiece::ToolCall(ToolCallDelta {
            index: 0,
            id: "call_1".into(),
            kind: "function",
            function: FunctionCall {
                name: "f".into(),
                arguments: "{}".into(),
            },
        }));
        let built = message.build();
        assert_eq!(built.content, None);
        let json = serde_json::to_value(&built).unwrap();
        assert_eq!(json["content"], Value::Null);
        assert!(json.get("reasoning_content").is_none());
        assert_eq!(json["tool_calls"][0]["type"], "function");
        // Plain answers have content and no tool_calls field.
        let plain = MessageBuilder::default().build();
        assert_eq!(plain.content.as_deref(), Some(""));
    }

    #[test]
    fn plain_output_is_all_content() {
        let mut output = ChatOutput::new(OutputFormat::Plain, "x<think>", &[], true, "");
        assert_eq!(
            output.push("<think>hi"),
            [ChatPiece::Content("<think>hi".into())]
        );
        assert!(output.finish().is_empty());
    }
}

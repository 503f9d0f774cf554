//! Parsing GLM-4.7-Flash output into reasoning, answer text and tool calls, incrementally.
//!
//! The model writes `reasoning</think>answer`, optionally followed by tool calls in the GLM-4.7
//! format `<tool_call>name<arg_key>k</arg_key><arg_value>v</arg_value>…</tool_call>` (GLM-4.5 put
//! newlines between the parts; those are tolerated). With thinking on (the default) the prompt
//! already ends with `<think>`, so the output starts inside the reasoning; with
//! `enable_thinking=false` the prompt ends with `</think>` and the output is answer text only. A
//! `<think>` at the very start of the output is accepted in either case.
//!
//! The parser is fed text deltas from a detokenizer that keeps special tokens (the tags are
//! special tokens of the GLM vocabulary). Deltas may cut tags anywhere: text that could be the
//! start of a tag (e.g. a trailing `</th`) is held back until the next delta decides it, and
//! released by [`GlmOutputParser::finish`].
//!
//! Whitespace: leading whitespace (spaces, tabs, newlines) is dropped at the start of the
//! reasoning, right after `</think>` and right after each `</tool_call>`, mirroring the chat
//! template, which strips both parts when a conversation is rendered back (and GLM-4.5's newlines
//! between tool calls). Everything else is kept verbatim, including whitespace before `</think>`
//! or `<tool_call>` (trimming it would need holding back every trailing space while streaming).
//!
//! Tool-call arguments: a value is kept as the raw string when the tool's JSON schema declares
//! the parameter a `string`; otherwise it is parsed as JSON when it is valid JSON (numbers,
//! booleans, null, objects, arrays, quoted strings) and kept as the raw string when it is not.
//! Without a schema the JSON rule applies to every value, so `"12345"` becomes a number; pass the
//! request's tools with [`GlmOutputParser::with_tools`] to avoid that. A tool call that does not
//! parse (no name, broken argument tags) or is never closed is returned as answer text, so no
//! output is lost.

use crate::stop::partial_match_start;
use serde_json::{Map, Value};
use std::collections::{HashMap, HashSet};

/// Opens the reasoning block.
pub const THINK_START: &str = "<think>";
/// Closes the reasoning block.
pub const THINK_END: &str = "</think>";
/// Opens a tool call.
pub const TOOL_CALL_START: &str = "<tool_call>";
/// Closes a tool call.
pub const TOOL_CALL_END: &str = "</tool_call>";
/// Opens an argument name.
pub const ARG_KEY_START: &str = "<arg_key>";
/// Closes an argument name.
pub const ARG_KEY_END: &str = "</arg_key>";
/// Opens an argument value.
pub const ARG_VALUE_START: &str = "<arg_value>";
/// Closes an argument value.
pub const ARG_VALUE_END: &str = "</arg_value>";

/// A parsed tool call.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    /// Function name.
    pub name: String,
    /// Arguments by name, in the order the model wrote them.
    pub arguments: Map<String, Value>,
}

impl ToolCall {
    /// The arguments as a JSON object string (OpenAI's `function.arguments`).
    pub fn arguments_json(&self) -> String {
        Value::Object(self.arguments.clone()).to_string()
    }
}

/// One piece of parsed output.
#[derive(Clone, Debug, PartialEq)]
pub enum GlmEvent {
    /// More reasoning text.
    Reasoning(String),
    /// More answer text.
    Content(String),
    /// A complete tool call (emitted when its `</tool_call>` arrives).
    ToolCall(ToolCall),
}

/// A whole output, split up.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ParsedOutput {
    /// Reasoning text (empty when the model did not think).
    pub reasoning: String,
    /// Answer text.
    pub content: String,
    /// Tool calls in order.
    pub tool_calls: Vec<ToolCall>,
}

impl ParsedOutput {
    /// Adds one event.
    pub fn push(&mut self, event: GlmEvent) {
        match event {
            GlmEvent::Reasoning(text) => self.reasoning.push_str(&text),
            GlmEvent::Content(text) => self.content.push_str(&text),
            GlmEvent::ToolCall(call) => self.tool_calls.push(call),
        }
    }
}

/// Where the parser is in the output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Section {
    Reasoning,
    Content,
    /// Inside `<tool_call>…`, collecting the body until `</tool_call>`.
    ToolCall,
}

/// Streaming parser of GLM-4.7 output. See the module documentation for the rules.
#[derive(Clone, Debug)]
pub struct GlmOutputParser {
    section: Section,
    /// Received text not yet turned into events.
    pending: String,
    /// Drop whitespace until the next other character (start of a section).
    skip_leading_whitespace: bool,
    /// Nothing but whitespace has been seen yet, so a `<think>` here opens the reasoning.
    at_output_start: bool,
    /// Per tool name, the parameters whose schema type is `string` (kept raw).
    string_parameters: HashMap<String, HashSet<String>>,
    saw_tool_call: bool,
}

impl GlmOutputParser {
    /// A parser for output whose prompt ended inside the reasoning (`thinking = true`, the
    /// prompt ends with `<think>`) or after it (`thinking = false`, the prompt ends with
    /// `</think>`).
    pub fn new(thinking: bool) -> GlmOutputParser {
        GlmOutputParser {
            section: if thinking {
                Section::Reasoning
            } else {
                Section::Content
            },
            pending: String::new(),
            skip_leading_whitespace: true,
            at_output_start: true,
            string_parameters: HashMap::new(),
            saw_tool_call: false,
        }
    }

    /// A parser for output following `prompt`: inside the reasoning when the prompt ends with
    /// `<think>`, answer text otherwise.
    pub fn for_prompt(prompt: &str) -> GlmOutputParser {
        GlmOutputParser::new(prompt.trim_end().ends_with(THINK_START))
    }

    /// Uses the request's tool definitions (OpenAI `{"type": "function", "function": {name,
    /// parameters}}` objects, or bare `{name, parameters}`) to keep string parameters raw.
    pub fn with_tools(mut self, tools: &[Value]) -> GlmOutputParser {
        for tool in tools {
            let function = tool.get("function").unwrap_or(tool);
            let Some(name) = function.get("name").and_then(Value::as_str) else {
                continue;
            };
            let strings = function
                .pointer("/parameters/properties")
                .and_then(Value::as_object)
                .map(|properties| {
                    properties
                        .iter()
                        .filter(|(_, schema)| declares_string(schema))
                        .map(|(param, _)| param.clone())
                        .collect()
                })
                .unwrap_or_default();
            self.string_parameters.insert(name.to_string(), strings);
        }
        self
    }

    /// Whether a tool call has been emitted (the completion's finish reason is then
    /// `tool_calls`).
    pub fn saw_tool_call(&self) -> bool {
        self.saw_tool_call
    }

    /// Whether the parser is currently inside the reasoning.
    pub fn in_reasoning(&self) -> bool {
        self.section == Section::Reasoning
    }

    /// Feeds a text delta; returns the events it completes.
    pub fn push(&mut self, delta: &str) -> Vec<GlmEvent> {
        self.pending.push_str(delta);
        let mut events = Vec::new();
        self.process(&mut events);
        events
    }

    /// Ends the stream: releases held-back text. An unterminated tool call becomes answer text.
    pub fn finish(&mut self) -> Vec<GlmEvent> {
        let mut events = Vec::new();
        let rest = std::mem::take(&mut self.pending);
        match self.section {
            Section::Reasoning => emit(&mut events, GlmEvent::Reasoning, rest),
            Section::Content => emit(&mut events, GlmEvent::Content, rest),
            Section::ToolCall => emit(
                &mut events,
                GlmEvent::Content,
                format!("{TOOL_CALL_START}{rest}"),
            ),
        }
        self.section = Section::Content;
        events
    }

    /// Parses a whole output at once (the same result as streaming it).
    pub fn parse_complete(mut self, text: &str) -> ParsedOutput {
        let mut parsed = ParsedOutput::default();
        for event in self.push(text).into_iter().chain(self.finish()) {
            parsed.push(event);
        }
        parsed
    }

    fn process(&mut self, events: &mut Vec<GlmEvent>) {
        loop {
            if self.skip_leading_whitespace {
                let trimmed = self.pending.trim_start_matches(is_skippable_whitespace);
                let skipped = self.pending.len() - trimmed.len();
                self.pending.drain(..skipped);
                if self.pending.is_empty() {
                    return;
                }
                self.skip_leading_whitespace = false;
            }
            if self.at_output_start {
                if let Some(rest) = self.pending.strip_prefix(THINK_START) {
                    self.pending = rest.to_string();
                    self.section = Section::Reasoning;
                    self.at_output_start = false;
                    self.skip_leading_whitespace = true;
                    continue;
                }
                if THINK_START.starts_with(self.pending.as_str()) {
                    return; // Could still become `<think>`.
                }
                self.at_output_start = false;
            }
            match self.section {
                Section::Reasoning => {
                    if let Some(at) = self.pending.find(THINK_END) {
                        let text = self.take_before(at, THINK_END.len());
                        emit(events, GlmEvent::Reasoning, text);
                        self.section = Section::Content;
                        self.skip_leading_whitespace = true;
                    } else {
                        let text = self.take_all_but_partial(&[THINK_END]);
                        emit(events, GlmEvent::Reasoning, text);
                        return;
                    }
                }
                Section::Content => {
                    if let Some(at) = self.pending.find(TOOL_CALL_START) {
                        let text = self.take_before(at, TOOL_CALL_START.len());
                        emit(events, GlmEvent::Content, text);
                        self.section = Section::ToolCall;
                    } else {
                        let text = self.take_all_but_partial(&[TOOL_CALL_START]);
                        emit(events, GlmEvent::Content, text);
                        return;
                    }
                }
                Section::ToolCall => {
                    let Some(at) = self.pending.find(TOOL_CALL_END) else {
                        return; // The body is only parsed whole.
                    };
                    let body = self.take_before(at, TOOL_CALL_END.len());
                    match parse_tool_call_body(&body, &self.string_parameters) {
                        Some(call) => {
                            self.saw_tool_call = true;
                            events.push(GlmEvent::ToolCall(call));
                        }
                        None => events.push(GlmEvent::Content(format!(
                            "{TOOL_CALL_START}{body}{TOOL_CALL_END}"
                        ))),
                    }
                    self.section = Section::Content;
                    self.skip_leading_whitespace = true;
                }
            }
        }
    }

    /// Removes and returns `pending[..at]`, also dropping the `tag_len` bytes of tag after it.
    fn take_before(&mut self, at: usize, tag_len: usize) -> String {
        let rest = self.pending.split_off(at + tag_len);
        let mut text = std::mem::replace(&mut self.pending, rest);
        text.truncate(at);
        text
    }

    /// Removes and returns all pending text except a suffix that may begin one of `tags`.
    fn take_all_but_partial(&mut self, tags: &[&str]) -> String {
        let hold_from = partial_match_start(&self.pending, tags);
        let held = self.pending.split_off(hold_from);
        std::mem::replace(&mut self.pending, held)
    }
}

/// Parses a whole output. `thinking`: whether the prompt ended with `<think>`.
pub fn parse_complete(text: &str, thinking: bool) -> ParsedOutput {
    GlmOutputParser::new(thinking).parse_complete(text)
}

fn emit(events: &mut Vec<GlmEvent>, kind: fn(String) -> GlmEvent, text: String) {
    if !text.is_empty() {
        events.push(kind(text));
    }
}

fn is_skippable_whitespace(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r')
}

/// Whether a parameter schema's `type` is `string` (or a list of types containing it).
fn declares_string(schema: &Value) -> bool {
    match schema.get("type") {
        Some(Value::String(t)) => t == "string",
        Some(Value::Array(types)) => types.iter().any(|t| t == "string"),
        _ => false,
    }
}

/// Parses `name<arg_key>k</arg_key><arg_value>v</arg_value>…` (whitespace between parts
/// allowed); `None` when malformed.
fn parse_tool_call_body(
    body: &str,
    string_parameters: &HashMap<String, HashSet<String>>,
) -> Option<ToolCall> {
    let (name, mut rest) = match body.find(ARG_KEY_START) {
        Some(at) => body.split_at(at),
        None => (body, ""),
    };
    let name = name.trim();
    // Function names are identifiers; anything else means the model did not write a call.
    if name.is_empty() || name.contains(|c: char| c == '<' || c == '>' || c.is_whitespace()) {
        return None;
    }
    let raw_strings = string_parameters.get(name);
    let mut arguments = Map::new();
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            break;
        }
        let (key, after_key) = between(rest, ARG_KEY_START, ARG_KEY_END)?;
        let (raw, after_value) = between(after_key.trim_start(), ARG_VALUE_START, ARG_VALUE_END)?;
        let key = key.trim();
        let keep_raw = raw_strings.is_some_and(|params| params.contains(key));
        arguments.insert(key.to_string(), argument_value(raw, keep_raw));
        rest = after_value;
    }
    Some(ToolCall {
        name: name.to_string(),
        arguments,
    })
}

/// For text starting with `open`, the text up to `close` and what follows `close`.
fn between<'a>(text: &'a str, open: &str, close: &str) -> Option<(&'a str, &'a str)> {
    let inner = text.strip_prefix(open)?;
    let end = inner.find(close)?;
    Some((&inner[..end], &inner[end + close.len()..]))
}

fn argument_value(raw: &str, keep_raw: bool) -> Value {
    if !keep_raw && let Ok(value) = serde_json::from_str::<Value>(raw) {
        return value;
    }
    Value::String(raw.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Merges adjacent text events of the same kind so streams cut differently compare equal.
    fn normalize(events: Vec<GlmEvent>) -> Vec<GlmEvent> {
        let mut out: Vec<GlmEvent> = Vec::new();
        for event in events {
            match (out.last_mut(), event) {
                (Some(GlmEvent::Reasoning(a)), GlmEvent::Reasoning(b)) => a.push_str(&b),
                (Some(GlmEvent::Content(a)), GlmEvent::Content(b)) => a.push_str(&b),
                (_, event) => out.push(event),
            }
        }
        out
    }

    fn stream(parser: &GlmOutputParser, pieces: &[&str]) -> Vec<GlmEvent> {
        let mut parser = parser.clone();
        let mut events = Vec::new();
        for piece in pieces {
            events.extend(parser.push(piece));
        }
        events.extend(parser.finish());
        normalize(events)
    }

    /// Checks that every 1-, 2- and 3-piece cut at char boundaries, and a char-by-char feed, give
    /// the events of the whole text; returns the whole-text parse.
    fn check_splits(parser: &GlmOutputParser, text: &str) -> ParsedOutput {
        let whole = stream(parser, &[text]);
        let bounds: Vec<usize> = (0..=text.len())
            .filter(|&i| text.is_char_boundary(i))
            .collect();
        for &a in &bounds {
            assert_eq!(
                stream(parser, &[&text[..a], &text[a..]]),
                whole,
                "{text:?} cut at {a}"
            );
            for &b in bounds.iter().filter(|&&b| b > a) {
                assert_eq!(
                    stream(parser, &[&text[..a], &text[a..b], &text[b..]]),
                    whole,
                    "{text:?} cut at {a} and {b}"
                );
            }
        }
        let chars: Vec<&str> = bounds.windows(2).map(|w| &text[w[0]..w[1]]).collect();
        assert_eq!(stream(parser, &chars), whole, "{text:?} char by char");
        let mut parsed = ParsedOutput::default();
        for event in whole {
            parsed.push(event);
        }
        assert_eq!(parser.clone().parse_complete(text), parsed);
        parsed
    }

    fn call(name: &str, arguments: Value) -> ToolCall {
        ToolCall {
            name: name.into(),
            arguments: arguments.as_object().unwrap().clone(),
        }
    }

    #[test]
    fn reasoning_then_answer() {
        let parsed = check_splits(
            &GlmOutputParser::new(true),
            "\nLet me think.\nStep 2 </think>\n\nThe answer is 4.\n",
        );
        assert_eq!(parsed.reasoning, "Let me think.\nStep 2 ");
        assert_eq!(parsed.content, "The answer is 4.\n");
        assert!(parsed.tool_calls.is_empty());
    }

    #[test]
    fn reasoning_only_when_the_stream_ends_early() {
        let parsed = check_splits(
            &GlmOutputParser::new(true),
            "Still thinking about 日本 and 🙂 </th",
        );
        assert_eq!(parsed.reasoning, "Still thinking about 日本 and 🙂 </th");
        assert_eq!(parsed.content, "");
    }

    #[test]
    fn tool_call_with_typed_arguments() {
        let text = "I should call the weather tool.</think><tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value><arg_key>days</arg_key><arg_value>3</arg_value></tool_call>";
        let parser = GlmOutputParser::new(true);
        let parsed = check_splits(&parser, text);
        assert_eq!(parsed.reasoning, "I should call the weather tool.");
        assert_eq!(parsed.content, "");
        assert_eq!(
            parsed.tool_calls,
            [call("get_weather", json!({"city": "Paris", "days": 3}))]
        );
        assert_eq!(
            parsed.tool_calls[0].arguments_json(),
            r#"{"city":"Paris","days":3}"#
        );
        let mut parser = parser;
        parser.push(text);
        assert!(parser.saw_tool_call());
    }

    #[test]
    fn several_tool_calls_in_glm45_layout() {
        let text = "</think>Checking both.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>São Paulo</arg_value>\n</tool_call>\n<tool_call>configure<arg_key>opts</arg_key><arg_value>{\"tz\": \"CET\", \"dst\": true, \"n\": [1, 2.5]}</arg_value><arg_key>flag</arg_key><arg_value>false</arg_value><arg_key>note</arg_key><arg_value>not json {</arg_value></tool_call>\n";
        let parsed = check_splits(&GlmOutputParser::new(true), text);
        assert_eq!(parsed.reasoning, "");
        assert_eq!(parsed.content, "Checking both.\n");
        assert_eq!(
            parsed.tool_calls,
            [
                call("get_weather", json!({"city": "São Paulo"})),
                call(
                    "configure",
                    json!({"opts": {"tz": "CET", "dst": true, "n": [1, 2.5]}, "flag": false, "note": "not json {"})
                ),
            ]
        );
    }

    #[test]
    fn events_interleave_in_order() {
        let text = "plan</think>Before.<tool_call>a</tool_call>Between.<tool_call>b<arg_key>x</arg_key><arg_value>y</arg_value></tool_call>After.";
        let events = stream(&GlmOutputParser::new(true), &[text]);
        assert_eq!(
            events,
            [
                GlmEvent::Reasoning("plan".into()),
                GlmEvent::Content("Before.".into()),
                GlmEvent::ToolCall(call("a", json!({}))),
                GlmEvent::Content("Between.".into()),
                GlmEvent::ToolCall(call("b", json!({"x": "y"}))),
                GlmEvent::Content("After.".into()),
            ]
        );
        check_splits(&GlmOutputParser::new(true), text);
    }

    #[test]
    fn schema_keeps_string_parameters_raw() {
        let tools = [
            json!({"type": "function", "function": {"name": "lookup", "parameters": {
                "type": "object",
                "properties": {"zip": {"type": "string"}, "count": {"type": "integer"}, "tag": {"type": ["string", "null"]}}
            }}}),
        ];
        let text = "<tool_call>lookup<arg_key>zip</arg_key><arg_value>12345</arg_value><arg_key>count</arg_key><arg_value>2</arg_value><arg_key>tag</arg_key><arg_value>true</arg_value><arg_key>other</arg_key><arg_value>7</arg_value></tool_call>";
        let with_schema = GlmOutputParser::new(false).with_tools(&tools);
        assert_eq!(
            check_splits(&with_schema, text).tool_calls,
            [call(
                "lookup",
                json!({"zip": "12345", "count": 2, "tag": "true", "other": 7})
            )]
        );
        assert_eq!(
            GlmOutputParser::new(false).parse_complete(text).tool_calls,
            [call(
                "lookup",
                json!({"zip": 12345, "count": 2, "tag": true, "other": 7})
            )]
        );
    }

    #[test]
    fn unterminated_tool_call_becomes_content() {
        let text = "</think>Sure.<tool_call>get_weather<arg_key>city</arg_key><arg_val";
        let parsed = check_splits(&GlmOutputParser::new(true), text);
        assert_eq!(
            parsed.content,
            "Sure.<tool_call>get_weather<arg_key>city</arg_key><arg_val"
        );
        assert!(parsed.tool_calls.is_empty());
        // A partial opening tag at the end is content too.
        let parsed = check_splits(&GlmOutputParser::new(false), "Sure. <tool_ca");
        assert_eq!(parsed.content, "Sure. <tool_ca");
    }

    #[test]
    fn malformed_tool_calls_become_content() {
        let cases = [
            "<tool_call><arg_key>x</arg_key><arg_value>1</arg_value></tool_call>after",
            "<tool_call>f<arg_key>x</arg_key>oops</tool_call>after",
            "<tool_call>f<arg_key>x<arg_value>1</arg_value></tool_call>after",
            "<tool_call>f junk<arg_key>x</arg_key><arg_value>1</arg_value>tail</tool_call>after",
        ];
        for text in cases {
            let parsed = check_splits(&GlmOutputParser::new(false), text);
            assert!(parsed.tool_calls.is_empty(), "{text}");
            let body = text.strip_suffix("after").unwrap();
            assert_eq!(parsed.content, format!("{body}after"), "{text}");
        }
        // Whitespace around the name is trimmed; whitespace inside it is not a name.
        let parsed = parse_complete("<tool_call>\n f \n</tool_call>", false);
        assert_eq!(parsed.tool_calls, [call("f", json!({}))]);
        let parsed = parse_complete("<tool_call>not a name</tool_call>", false);
        assert_eq!(parsed.content, "<tool_call>not a name</tool_call>");
    }

    #[test]
    fn angle_brackets_that_are_not_tags_pass_through() {
        let text = "if a < b && b<c then <div> </thinking> <tool_call_x> <think >x <</ <t";
        let parsed = check_splits(&GlmOutputParser::new(false), text);
        assert_eq!(parsed.content, text);
        assert_eq!(parsed.reasoning, "");
        // Inside reasoning, a non-closing tag is reasoning text.
        let parsed = check_splits(&GlmOutputParser::new(true), "x <tool_call> y</think>z");
        assert_eq!(parsed.reasoning, "x <tool_call> y");
        assert_eq!(parsed.content, "z");
    }

    #[test]
    fn leading_think_tag_opens_reasoning() {
        for thinking in [false, true] {
            let parsed = check_splits(
                &GlmOutputParser::new(thinking),
                " \n<think>\nreason</think>answer",
            );
            assert_eq!(parsed.reasoning, "reason", "thinking={thinking}");
            assert_eq!(parsed.content, "answer", "thinking={thinking}");
        }
        // Only at the start: later it is plain text.
        let parsed = check_splits(&GlmOutputParser::new(false), "a<think>b</think>c");
        assert_eq!(parsed.content, "a<think>b</think>c");
        // A lone "<thi" at the end stays text.
        let parsed = check_splits(&GlmOutputParser::new(false), "<thi");
        assert_eq!(parsed.content, "<thi");
    }

    #[test]
    fn streaming_holds_back_partial_tags() {
        let mut parser = GlmOutputParser::new(true);
        assert_eq!(parser.push("abc</th"), [GlmEvent::Reasoning("abc".into())]);
        assert!(parser.in_reasoning());
        assert_eq!(parser.push("ink>"), []);
        assert!(!parser.in_reasoning());
        assert_eq!(parser.push("\n\nHi <"), [GlmEvent::Content("Hi ".into())]);
        assert_eq!(parser.push("b>"), [GlmEvent::Content("<b>".into())]);
        assert_eq!(parser.push("<tool_call>f<arg_key>"), []);
        assert_eq!(
            parser.push("k</arg_key><arg_value>v</arg_value></tool_call>"),
            [GlmEvent::ToolCall(call("f", json!({"k": "v"})))]
        );
        assert_eq!(parser.finish(), []);
    }

    #[test]
    fn parser_for_prompt_follows_the_template_ending() {
        assert!(
            GlmOutputParser::for_prompt("[gMASK]<sop><|user|>Hi<|assistant|><think>")
                .in_reasoning()
        );
        assert!(
            !GlmOutputParser::for_prompt("[gMASK]<sop><|user|>Hi<|assistant|></think>")
                .in_reasoning()
        );
        assert_eq!(
            parse_complete("r</think>c", true),
            ParsedOutput {
                reasoning: "r".into(),
                content: "c".into(),
                tool_calls: vec![]
            }
        );
    }
}

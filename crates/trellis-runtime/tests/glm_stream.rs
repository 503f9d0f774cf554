//! GLM output streamed token by token through the real tiny-GLM tokenizer: the incremental
//! detokenizer (special tokens kept) feeding the GLM output parser gives the same result as
//! parsing the whole text, and stop strings cut the visible answer.

use serde_json::json;
use trellis_runtime::glm_output::{GlmEvent, GlmOutputParser, ParsedOutput};
use trellis_runtime::stop::{StopMatcher, StopScan};
use trellis_runtime::tokenizer::Tokenizer;
use trellis_testutil::fixture;

fn tokenizer() -> Tokenizer {
    Tokenizer::from_model_dir(&fixture("exl3/glm4-moe-lite-tiny-4.0bpw")).unwrap()
}

#[test]
fn token_stream_parses_like_the_whole_text() {
    let tokenizer = tokenizer();
    let outputs = [
        "The user wants the weather in Zürich 🙂.</think>Let me check.<tool_call>get_weather<arg_key>city</arg_key><arg_value>Zürich</arg_value><arg_key>days</arg_key><arg_value>3</arg_value></tool_call>",
        "Short.</think>\n\nCafé 日本語 — a < b, done.",
        "unfinished thought with é",
    ];
    for text in outputs {
        let ids = tokenizer.encode(text, false).unwrap();
        // Tags are single special tokens in this vocabulary.
        if text.contains("</think>") {
            assert!(ids.contains(&tokenizer.token_to_id("</think>").unwrap()));
        }
        let mut decoder = tokenizer.incremental_decoder(false);
        let mut parser = GlmOutputParser::new(true);
        let mut streamed = ParsedOutput::default();
        let mut events = Vec::new();
        for &id in &ids {
            let delta = decoder.push(id).unwrap();
            events.extend(parser.push(&delta));
        }
        events.extend(parser.push(&decoder.finish().unwrap()));
        events.extend(parser.finish());
        for event in events {
            streamed.push(event);
        }
        assert_eq!(
            streamed,
            GlmOutputParser::new(true).parse_complete(text),
            "{text}"
        );
    }
}

#[test]
fn streamed_tool_call_has_typed_arguments() {
    let tokenizer = tokenizer();
    let text = "ok</think><tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value><arg_key>days</arg_key><arg_value>3</arg_value></tool_call>";
    let ids = tokenizer.encode(text, false).unwrap();
    let mut decoder = tokenizer.incremental_decoder(false);
    let mut parser = GlmOutputParser::new(true);
    let mut calls = Vec::new();
    for &id in &ids {
        for event in parser.push(&decoder.push(id).unwrap()) {
            if let GlmEvent::ToolCall(call) = event {
                calls.push(call);
            }
        }
    }
    assert!(parser.finish().is_empty());
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].name, "get_weather");
    assert_eq!(
        serde_json::Value::Object(calls[0].arguments.clone()),
        json!({"city": "Paris", "days": 3})
    );
}

#[test]
fn stop_string_split_across_tokens_is_not_emitted() {
    let tokenizer = tokenizer();
    let text = "The answer is forty-two. END OF ANSWER and then more text";
    let ids = tokenizer.encode(text, false).unwrap();
    let mut decoder = tokenizer.incremental_decoder(true);
    let mut matcher = StopMatcher::new(["END OF ANSWER"]);
    let mut shown = String::new();
    let mut stopped = false;
    for &id in &ids {
        match matcher.push(&decoder.push(id).unwrap()) {
            StopScan::Continue { text } => shown.push_str(&text),
            StopScan::Stopped { text, .. } => {
                shown.push_str(&text);
                stopped = true;
                break;
            }
        }
    }
    assert!(stopped);
    assert_eq!(shown, "The answer is forty-two. ");
}

//! The GLM-4.7-Flash chat template rendered byte for byte as `transformers` renders it
//! (`chat_template_cases.json`), plus the other fixture models' templates.

use serde_json::{Map, Value, json};
use trellis_runtime::chat_template::ChatTemplate;
use trellis_runtime::tokenizer::Tokenizer;
use trellis_testutil::fixture;

/// SHA-256 of the canonical GLM-4.7 template is checked by the fixture manifest; here its length.
const GLM_TEMPLATE_BYTES: usize = 3120;

fn cases() -> Vec<Value> {
    let text = std::fs::read_to_string(fixture("chat_template_cases.json")).unwrap();
    let json: Value = serde_json::from_str(&text).unwrap();
    let cases = json["models"]["glm4-moe-lite-tiny"]["cases"]
        .as_array()
        .expect("cases list")
        .clone();
    assert_eq!(cases.len(), 7);
    cases
}

fn render_case(template: &ChatTemplate, case: &Value) -> String {
    let messages = case["messages"].as_array().unwrap();
    let tools = case["tools"].as_array().map(Vec::as_slice);
    let mut kwargs = case["kwargs"].as_object().unwrap().clone();
    let add_generation_prompt = kwargs
        .remove("add_generation_prompt")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    template
        .render(messages, tools, add_generation_prompt, &kwargs)
        .unwrap_or_else(|e| panic!("case {}: {e}", case["name"]))
}

fn check_glm_dir(dir: &str) {
    let dir = fixture(dir);
    let template = ChatTemplate::from_model_dir(&dir)
        .unwrap()
        .expect("GLM ships a template");
    assert_eq!(
        template.source("default").unwrap().len(),
        GLM_TEMPLATE_BYTES
    );
    assert_eq!(
        template.special_tokens().get("eos_token"),
        Some(&json!("<|endoftext|>"))
    );
    assert_eq!(template.special_tokens().get("bos_token"), None);
    let tokenizer = Tokenizer::from_model_dir(&dir).unwrap();
    for case in cases() {
        let rendered = render_case(&template, &case);
        assert_eq!(
            rendered,
            case["expected"].as_str().unwrap(),
            "case {}",
            case["name"]
        );
        let expected_ids: Vec<u32> = case["expected_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            tokenizer.encode(&rendered, false).unwrap(),
            expected_ids,
            "case {}",
            case["name"]
        );
    }
}

#[test]
fn glm_template_from_chat_template_jinja_matches_transformers() {
    check_glm_dir("exl3/glm4-moe-lite-tiny-4.0bpw");
}

#[test]
fn glm_template_from_hf_dir_matches_transformers() {
    check_glm_dir("hf/glm4-moe-lite-tiny");
}

#[test]
fn glm_template_from_tokenizer_config_matches_transformers() {
    // Same template, read from tokenizer_config.json instead of chat_template.jinja.
    let dir = fixture("exl3/glm4-moe-lite-tiny-4.0bpw");
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap())
            .unwrap();
    let source = config["chat_template"].as_str().unwrap();
    let template = ChatTemplate::from_source(source).unwrap();
    for case in cases() {
        assert_eq!(
            render_case(&template, &case),
            case["expected"].as_str().unwrap()
        );
    }
}

#[test]
fn glm_template_reference_vectors() {
    // Vectors from the model reference (§13.2), beyond the fixture cases.
    let template = ChatTemplate::from_model_dir(&fixture("hf/glm4-moe-lite-tiny"))
        .unwrap()
        .unwrap();
    let none = Map::new();
    let render = |messages: Value, add: bool, kwargs: &Map<String, Value>| {
        template
            .render(messages.as_array().unwrap(), None, add, kwargs)
            .unwrap()
    };
    assert_eq!(
        render(
            json!([{"role": "user", "content": [{"type": "text", "text": "A"}, {"type": "image"}, "B"]}]),
            true,
            &none
        ),
        "[gMASK]<sop><|user|>AB<|assistant|><think>"
    );
    assert_eq!(
        render(
            json!([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think>\nr\n</think>\n\nans"}]),
            false,
            &none
        ),
        "[gMASK]<sop><|user|>Q<|assistant|><think>r</think>ans"
    );
    assert_eq!(
        render(
            json!([
                {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"function": {"name": "a", "arguments": {}}},
                    {"function": {"name": "b", "arguments": {"x": "y"}}}
                ]},
                {"role": "tool", "content": "r1"},
                {"role": "tool", "content": "r2"}
            ]),
            true,
            &none
        ),
        "[gMASK]<sop><|user|>Q<|assistant|></think><tool_call>a</tool_call><tool_call>b<arg_key>x</arg_key><arg_value>y</arg_value></tool_call><|observation|><tool_response>r1</tool_response><tool_response>r2</tool_response><|assistant|><think>"
    );
    let mut keep = Map::new();
    keep.insert("clear_thinking".into(), json!(false));
    assert_eq!(
        render(
            json!([
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "<think>greet</think>Hello!"},
                {"role": "user", "content": "Bye"}
            ]),
            true,
            &keep
        ),
        "[gMASK]<sop><|user|>Hi<|assistant|><think>greet</think>Hello!<|user|>Bye<|assistant|><think>"
    );
}

#[test]
fn llama_and_qwen_templates_render() {
    let messages = [
        json!({"role": "system", "content": "Be brief."}),
        json!({"role": "user", "content": "Hi there"}),
    ];
    let llama = ChatTemplate::from_model_dir(&fixture("exl3/llama-tiny-4.0bpw"))
        .unwrap()
        .expect("llama-tiny ships a template in tokenizer_config.json");
    assert_eq!(
        llama.render(&messages, None, true, &Map::new()).unwrap(),
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    let qwen = ChatTemplate::from_model_dir(&fixture("exl3/qwen3-tiny-3.0bpw"))
        .unwrap()
        .expect("qwen3-tiny ships a template in tokenizer_config.json");
    assert_eq!(
        qwen.render(&messages, None, true, &Map::new()).unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn model_dir_without_template_gives_none() {
    let dir = std::env::temp_dir().join(format!("trellis-no-template-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"eos_token": "</s>"}"#,
    )
    .unwrap();
    let loaded = ChatTemplate::from_model_dir(&dir);
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"eos_token": {"content": "</s>"}, "chat_template": [
            {"name": "default", "template": "{{ eos_token }}"},
            {"name": "tool_use", "template": "T{{ eos_token }}"}]}"#,
    )
    .unwrap();
    let named = ChatTemplate::from_model_dir(&dir);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(loaded.unwrap().is_none());
    let named = named.unwrap().unwrap();
    assert_eq!(
        named.template_names().collect::<Vec<_>>(),
        ["default", "tool_use"]
    );
    assert_eq!(named.render(&[], None, false, &Map::new()).unwrap(), "</s>");
    assert_eq!(
        named.render(&[], Some(&[]), false, &Map::new()).unwrap(),
        "T</s>"
    );
}

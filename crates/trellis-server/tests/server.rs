//! The server end to end on the tiny GLM fixture: every endpoint over real HTTP on an
//! ephemeral port, errors, client disconnects, batching, shutdown, and a small load test.

use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};
use trellis_backend::KvDtype;
use trellis_backend::cpu::CpuBackend;
use trellis_format::ModelDir;
use trellis_runtime::chat_template::ChatTemplate;
use trellis_runtime::engine::{Engine, EngineOptions};
use trellis_runtime::sampler::SamplingOptions;
use trellis_runtime::scheduler::{self, SchedulerConfig};
use trellis_runtime::tokenizer::Tokenizer;
use trellis_server::{AppState, ModelContext, OutputFormat, ServerOptions};
use trellis_testutil::fixture;

const MODEL: &str = "exl3/glm4-moe-lite-tiny-4.0bpw";
const NAME: &str = "tiny-glm";
const CTX: usize = 512;
/// Special tokens of the fixture's tokenizer.
const TOOL_CALL_END: u32 = 2041;
const OBSERVATION: u32 = 2037;

struct Server {
    base: String,
    app: Arc<AppState>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    client: reqwest::Client,
}

struct Config {
    max_batch: usize,
    max_queue: usize,
    options: ServerOptions,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_batch: 4,
            max_queue: 64,
            options: ServerOptions::default(),
        }
    }
}

async fn start(config: Config) -> Server {
    let path = fixture(MODEL);
    let tokenizer = Tokenizer::from_model_dir(&path).unwrap();
    let template = ChatTemplate::from_model_dir(&path).unwrap();
    let max_batch = config.max_batch;
    let scheduler = tokio::task::spawn_blocking({
        let tokenizer = tokenizer.clone();
        move || {
            scheduler::spawn(
                move || {
                    let dir = ModelDir::open(&path)?;
                    let options = EngineOptions {
                        ctx_size: Some(CTX),
                        prefill_chunk: 64,
                        kv_dtype: KvDtype::F32,
                        max_batch,
                        ..EngineOptions::default()
                    };
                    Engine::load(&dir, CpuBackend::new(), &options, &mut |_, _, _| {})
                },
                tokenizer,
                SchedulerConfig {
                    max_queue: config.max_queue,
                },
            )
            .unwrap()
        }
    })
    .await
    .unwrap();
    let model = ModelContext {
        name: NAME.into(),
        tokenizer,
        format: OutputFormat::detect(template.as_ref()),
        template,
        // As the fixture's generation_config.json says: greedy unless asked otherwise.
        sampling_defaults: SamplingOptions {
            do_sample: Some(false),
            ..SamplingOptions::default()
        },
        default_max_tokens: None,
    };
    let app = AppState::new(model, scheduler, config.options);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(trellis_server::serve(listener, app.clone()));
    Server {
        base,
        app,
        task,
        client: reqwest::Client::new(),
    }
}

impl Server {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let response = self.client.get(self.url(path)).send().await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    /// A streamed request read to the end: its `data:` payloads.
    async fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        let response = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
        assert_eq!(
            response.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        sse_data(&response.text().await.unwrap())
    }

    async fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.get("/metrics").await;
        metric_value(&text, name)
    }

    async fn stop(self) {
        self.app.begin_shutdown();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("the server stops")
            .unwrap()
            .unwrap();
    }
}

/// The `data:` payloads of an SSE body.
fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|event| {
            let data: Vec<&str> = event
                .lines()
                .filter_map(|l| l.strip_prefix("data: ").or(l.strip_prefix("data:")))
                .collect();
            (!data.is_empty()).then(|| data.join("\n"))
        })
        .collect()
}

/// The value of an unlabelled-or-labelled sample `name{…} value` in Prometheus text.
fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
}

/// Reasoning, content, tool-call deltas, finish reason and usage of a chat stream, after
/// checking its shape: a role chunk first, `[DONE]` last, one finish reason.
struct ChatStreamParts {
    reasoning: String,
    content: String,
    tool_calls: Vec<Value>,
    finish_reason: String,
    usage: Option<Value>,
}

fn chat_stream_parts(data: &[String]) -> ChatStreamParts {
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let mut parts = ChatStreamParts {
        reasoning: String::new(),
        content: String::new(),
        tool_calls: Vec::new(),
        finish_reason: String::new(),
        usage: None,
    };
    let id = chunks[0]["id"].clone();
    for chunk in &chunks {
        assert!(chunk.get("error").is_none(), "stream failed: {chunk}");
        assert_eq!(chunk["id"], id);
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["model"], NAME);
        if let Some(usage) = chunk.get("usage").filter(|u| !u.is_null()) {
            assert!(chunk["choices"].as_array().unwrap().is_empty());
            parts.usage = Some(usage.clone());
            continue;
        }
        let choice = &chunk["choices"][0];
        let delta = &choice["delta"];
        if let Some(t) = delta["reasoning_content"].as_str() {
            parts.reasoning.push_str(t);
        }
        if let Some(t) = delta["content"].as_str() {
            parts.content.push_str(t);
        }
        if let Some(calls) = delta["tool_calls"].as_array() {
            parts.tool_calls.extend(calls.iter().cloned());
        }
        if let Some(reason) = choice["finish_reason"].as_str() {
            assert!(parts.finish_reason.is_empty(), "one finish reason");
            parts.finish_reason = reason.to_string();
        }
    }
    assert!(!parts.finish_reason.is_empty(), "a finish reason was sent");
    parts
}

fn text_stream(data: &[String]) -> (String, String, Option<Value>) {
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    let (mut text, mut finish, mut usage) = (String::new(), String::new(), None);
    for d in &data[..data.len() - 1] {
        let chunk: Value = serde_json::from_str(d).unwrap();
        assert!(chunk.get("error").is_none(), "stream failed: {chunk}");
        assert_eq!(chunk["object"], "text_completion");
        if let Some(u) = chunk.get("usage").filter(|u| !u.is_null()) {
            usage = Some(u.clone());
            continue;
        }
        text.push_str(chunk["choices"][0]["text"].as_str().unwrap());
        if let Some(reason) = chunk["choices"][0]["finish_reason"].as_str() {
            finish = reason.to_string();
        }
    }
    (text, finish, usage)
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_health_metrics_and_tokenizer_endpoints() {
    let server = start(Config::default()).await;
    let (status, body) = server.get("/v1/models").await;
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], NAME);
    assert_eq!(models["data"][0]["max_model_len"], CTX);
    assert_eq!(server.get(&format!("/v1/models/{NAME}")).await.0, 200);
    let (status, body) = server.get("/v1/models/gpt-4").await;
    assert_eq!(status, 404);
    let error: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["error"]["code"], "model_not_found");

    let (status, body) = server.get("/health").await;
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));

    let (status, tokens) = server
        .post("/v1/tokenize", &json!({"prompt": "Once upon a time"}))
        .await;
    assert_eq!(status, 200, "{tokens}");
    let ids = tokens["tokens"].as_array().unwrap().clone();
    assert_eq!(tokens["count"], ids.len());
    assert_eq!(tokens["max_model_len"], CTX);
    let (status, text) = server.post("/v1/detokenize", &json!({"tokens": ids})).await;
    assert_eq!(status, 200);
    assert_eq!(text["prompt"], "Once upon a time");
    // Messages are rendered with the chat template, exactly as chat requests are.
    let (_, chat) = server
        .post("/v1/tokenize", &json!({"messages": user("Hi")}))
        .await;
    let (_, rendered) = server
        .post("/v1/detokenize", &json!({"tokens": chat["tokens"]}))
        .await;
    assert_eq!(
        rendered["prompt"],
        "[gMASK]<sop><|user|>Hi<|assistant|><think>"
    );
    let (status, error) = server
        .post("/v1/detokenize", &json!({"tokens": [1, 999_999]}))
        .await;
    assert_eq!(status, 400);
    assert_eq!(error["error"]["param"], "tokens");
    let (status, _) = server.post("/v1/tokenize", &json!({})).await;
    assert_eq!(status, 400);

    // One generation, then the counters and histograms show it.
    let (status, _) = server
        .post(
            "/v1/completions",
            &json!({"prompt": "Hello", "max_tokens": 4, "ignore_eos": true}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, metrics) = server.get("/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(metric_value(&metrics, "trellis_requests_total"), 1.0);
    assert_eq!(
        metric_value(&metrics, "trellis_generation_tokens_total"),
        4.0
    );
    assert!(metric_value(&metrics, "trellis_prompt_tokens_total") >= 1.0);
    assert_eq!(metric_value(&metrics, "trellis_queue_depth"), 0.0);
    assert_eq!(
        metric_value(&metrics, "trellis_time_to_first_token_seconds_count"),
        1.0
    );
    assert_eq!(
        metric_value(&metrics, "trellis_inter_token_latency_seconds_count"),
        3.0
    );
    for name in [
        "trellis_batch_size",
        "trellis_running_sequences",
        "trellis_requests_cancelled_total",
        "trellis_http_requests_in_flight",
    ] {
        metric_value(&metrics, name);
    }
    assert!(
        metrics.contains("trellis_http_requests_total{route=\"/v1/completions\",status=\"200\"} 1")
    );
    assert!(
        metrics.contains(
            "trellis_time_to_first_token_seconds_bucket{model=\"tiny-glm\",le=\"+Inf\"} 1"
        )
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_whole_and_streamed_give_the_same_answer() {
    let server = start(Config::default()).await;
    let request = json!({"model": NAME, "messages": user("Tell me a story."),
        "max_tokens": 12, "ignore_eos": true});
    let (status, whole) = server.post("/v1/chat/completions", &request).await;
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["object"], "chat.completion");
    assert!(whole["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let choice = &whole["choices"][0];
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(whole["usage"]["completion_tokens"], 12);
    assert_eq!(
        whole["usage"]["total_tokens"],
        whole["usage"]["prompt_tokens"].as_u64().unwrap() + 12
    );
    // The prompt ends with `<think>`: random tokens are reasoning until a `</think>`.
    let reasoning = choice["message"]["reasoning_content"]
        .as_str()
        .unwrap_or("");
    assert!(!reasoning.is_empty(), "{whole}");

    let mut streamed_request = request.clone();
    streamed_request["stream"] = json!(true);
    streamed_request["stream_options"] = json!({"include_usage": true});
    let parts = chat_stream_parts(
        &server
            .stream("/v1/chat/completions", &streamed_request)
            .await,
    );
    assert_eq!(parts.reasoning, reasoning);
    assert_eq!(
        parts.content,
        choice["message"]["content"].as_str().unwrap_or("")
    );
    assert_eq!(parts.finish_reason, "length");
    assert_eq!(parts.usage.as_ref(), Some(&whole["usage"]));

    // Without thinking the answer is content.
    let mut no_think = request.clone();
    no_think["chat_template_kwargs"] = json!({"enable_thinking": false});
    let (_, answer) = server.post("/v1/chat/completions", &no_think).await;
    assert!(
        answer["choices"][0]["message"]
            .get("reasoning_content")
            .is_none()
    );
    assert!(
        !answer["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .is_empty()
    );

    // Without include_usage, chunks carry no usage field.
    streamed_request["stream_options"] = json!(null);
    let data = server
        .stream("/v1/chat/completions", &streamed_request)
        .await;
    let first: Value = serde_json::from_str(&data[0]).unwrap();
    assert!(first.get("usage").is_none());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_prompts_streams_stop_strings_and_echo() {
    let server = start(Config::default()).await;
    let base = json!({"prompt": "Once upon a time", "max_tokens": 16, "ignore_eos": true});
    let (status, whole) = server.post("/v1/completions", &base).await;
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["object"], "text_completion");
    let text = whole["choices"][0]["text"].as_str().unwrap().to_string();
    assert_eq!(whole["choices"][0]["finish_reason"], "length");

    // The same prompt as token ids.
    let (_, tokens) = server
        .post("/v1/tokenize", &json!({"prompt": "Once upon a time"}))
        .await;
    let mut by_ids = base.clone();
    by_ids["prompt"] = tokens["tokens"].clone();
    let (_, same) = server.post("/v1/completions", &by_ids).await;
    assert_eq!(same["choices"][0]["text"], text);

    let mut streamed = base.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let (streamed_text, finish, usage) =
        text_stream(&server.stream("/v1/completions", &streamed).await);
    assert_eq!(streamed_text, text);
    assert_eq!(finish, "length");
    assert_eq!(usage.unwrap()["completion_tokens"], 16);

    // A stop string cuts the text where it begins, in whole and streamed answers.
    let chars: Vec<char> = text.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect();
    let cut = &text[..text.find(&stop).unwrap()];
    let mut stopped = base.clone();
    stopped["stop"] = json!([stop]);
    let (_, answer) = server.post("/v1/completions", &stopped).await;
    assert_eq!(answer["choices"][0]["text"], cut);
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    stopped["stream"] = json!(true);
    let (streamed_cut, finish, _) = text_stream(&server.stream("/v1/completions", &stopped).await);
    assert_eq!(streamed_cut, cut);
    assert_eq!(finish, "stop");

    let mut echo = base.clone();
    echo["echo"] = json!(true);
    let (_, echoed) = server.post("/v1/completions", &echo).await;
    assert_eq!(
        echoed["choices"][0]["text"],
        format!("Once upon a time{text}")
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_sampling_repeats() {
    let server = start(Config::default()).await;
    let request = |seed: u64| {
        json!({"prompt": "The sea", "max_tokens": 24, "temperature": 1.0, "seed": seed,
               "ignore_eos": true})
    };
    let (_, a) = server.post("/v1/completions", &request(7)).await;
    let (_, b) = server.post("/v1/completions", &request(7)).await;
    let (_, c) = server.post("/v1/completions", &request(8)).await;
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
    assert_ne!(a["choices"][0]["text"], c["choices"][0]["text"]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_tool_call_is_returned_as_tool_calls() {
    let server = start(Config::default()).await;
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    // A long message keeps the tools' own tags out of the penalty window: then the biases
    // make the answer `</tool_call>` and, once that is penalized, `<|observation|>` (EOS).
    let long_message = "Please tell me what the weather will be like, ".repeat(8);
    let mut bias = serde_json::Map::new();
    bias.insert(TOOL_CALL_END.to_string(), json!(100));
    bias.insert(OBSERVATION.to_string(), json!(80));
    let request = json!({
        "messages": user(&long_message),
        "tools": tools,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "logit_bias": bias,
        "presence_penalty": 40,
        "max_tokens": 8,
    });
    let (status, whole) = server.post("/v1/chat/completions", &request).await;
    assert_eq!(status, 200, "{whole}");
    let choice = &whole["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{whole}");
    assert_eq!(choice["message"]["content"], Value::Null);
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    assert_eq!(call["function"]["arguments"], "{}");
    assert!(call["id"].as_str().unwrap().starts_with("call_"));

    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let parts = chat_stream_parts(&server.stream("/v1/chat/completions", &streamed).await);
    assert_eq!(parts.finish_reason, "tool_calls");
    assert_eq!(parts.tool_calls.len(), 1);
    let delta = &parts.tool_calls[0];
    assert_eq!(delta["index"], 0);
    assert_eq!(delta["function"]["name"], "get_weather");
    assert_eq!(delta["function"]["arguments"], "{}");

    // A conversation with a call and its result renders and runs.
    let round_trip = json!({
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1",
                "type": "function", "function": {"name": "get_weather",
                "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 20}"},
        ],
        "tools": tools,
        "max_tokens": 4,
    });
    let (status, answer) = server.post("/v1/chat/completions", &round_trip).await;
    assert_eq!(status, 200, "{answer}");
    let (_, tokens) = server
        .post(
            "/v1/tokenize",
            &json!({"messages": round_trip["messages"], "tools": tools}),
        )
        .await;
    let (_, rendered) = server
        .post("/v1/detokenize", &json!({"tokens": tokens["tokens"]}))
        .await;
    let rendered = rendered["prompt"].as_str().unwrap();
    assert!(
        rendered.ends_with(
            "<|user|>Weather in Paris?<|assistant|></think><tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call><|observation|><tool_response>{\"temp\": 20}</tool_response><|assistant|><think>"
        ),
        "{rendered}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_have_openai_bodies_and_statuses() {
    let server = start(Config {
        options: ServerOptions {
            max_body_bytes: 64 * 1024,
            ..ServerOptions::default()
        },
        ..Config::default()
    })
    .await;
    let check = |status: u16, body: &Value, expected: u16, param: Option<&str>| {
        assert_eq!(status, expected, "{body}");
        let error = &body["error"];
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}"
        );
        assert!(error["type"].is_string(), "{body}");
        assert!(error.get("code").is_some() && error.get("param").is_some());
        if let Some(param) = param {
            assert_eq!(error["param"], param, "{body}");
        }
    };
    let chat = "/v1/chat/completions";
    // Malformed JSON.
    let response = server
        .client
        .post(server.url(chat))
        .header("content-type", "application/json")
        .body("{\"messages\": [")
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    check(status, &response.json().await.unwrap(), 400, None);
    for (body, param) in [
        (
            json!({"messages": user("x"), "temperature": "hot"}),
            "temperature",
        ),
        (json!({"messages": "hi"}), "messages"),
        (json!({"messages": []}), "messages"),
        (
            json!({"messages": [{"role": "robot", "content": "x"}]}),
            "messages[0].role",
        ),
        (json!({"messages": user("x"), "n": 2}), "n"),
        (
            json!({"messages": user("x"), "max_tokens": 0}),
            "max_tokens",
        ),
        (json!({"messages": user("x"), "top_p": 0}), "top_p"),
        (
            json!({"messages": user("x"), "logit_bias": {"99999": 1}}),
            "logit_bias",
        ),
        (json!({"messages": user("x"), "stop": 5}), "stop"),
        (json!({"messages": user("x"), "logprobs": true}), "logprobs"),
        (
            json!({"messages": user("x"), "tool_choice": "required"}),
            "tool_choice",
        ),
        (
            json!({"messages": user("x"), "response_format": {"type": "json_schema"}}),
            "response_format",
        ),
    ] {
        let (status, error) = server.post(chat, &body).await;
        check(status, &error, 400, Some(param));
    }
    // A prompt over the context: 400 with the numbers.
    let long = "word ".repeat(CTX * 2);
    let (status, error) = server.post(chat, &json!({"messages": user(&long)})).await;
    check(status, &error, 400, Some("messages"));
    assert_eq!(error["error"]["code"], "context_length_exceeded");
    assert!(error["error"]["message"].as_str().unwrap().contains("512"));
    let (status, error) = server
        .post("/v1/completions", &json!({"prompt": vec![1; CTX]}))
        .await;
    check(status, &error, 400, Some("prompt"));
    let (status, error) = server
        .post("/v1/completions", &json!({"prompt": [5, 99_999]}))
        .await;
    check(status, &error, 400, Some("prompt"));
    let (status, error) = server
        .post("/v1/completions", &json!({"prompt": ["a", "b"]}))
        .await;
    check(status, &error, 400, Some("prompt"));
    // Unknown model.
    let (status, error) = server
        .post(chat, &json!({"model": "gpt-4o", "messages": user("x")}))
        .await;
    check(status, &error, 404, Some("model"));
    // Unknown route and wrong method.
    let response = server.client.get(server.url("/v2/x")).send().await.unwrap();
    let status = response.status().as_u16();
    check(status, &response.json().await.unwrap(), 404, None);
    let response = server.client.get(server.url(chat)).send().await.unwrap();
    let status = response.status().as_u16();
    check(status, &response.json().await.unwrap(), 405, None);
    // Too large a body.
    let big = json!({"messages": user(&"x".repeat(100 * 1024))});
    let (status, error) = server.post(chat, &big).await;
    check(status, &error, 413, None);
    // Far larger than the socket buffers: the 413 must still arrive (not a reset connection).
    for _ in 0..3 {
        let huge = json!({"messages": user(&"x".repeat(8 * 1024 * 1024))});
        let response = server
            .client
            .post(server.url(chat))
            .json(&huge)
            .send()
            .await;
        let response = response.unwrap();
        // The connection cannot be used again, and the client is told so.
        assert_eq!(response.headers()["connection"], "close");
        let status = response.status().as_u16();
        check(status, &response.json().await.unwrap(), 413, None);
    }
    // The server is fine after all that.
    let (status, _) = server
        .post(chat, &json!({"messages": user("x"), "max_tokens": 2}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(server.metric("trellis_requests_failed_total").await, 0.0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_is_required_when_configured() {
    let server = start(Config {
        options: ServerOptions {
            api_key: Some("sekrit".into()),
            ..ServerOptions::default()
        },
        ..Config::default()
    })
    .await;
    let models = server.url("/v1/models");
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("sekrit"),
        Some("Basic sekrit"),
    ] {
        let mut request = server.client.get(&models);
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), 401, "{auth:?}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_api_key");
    }
    let response = server
        .client
        .get(&models)
        .bearer_auth("sekrit")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    // Health and metrics stay open for probes and scrapers.
    assert_eq!(server.get("/health").await.0, 200);
    assert_eq!(server.get("/metrics").await.0, 200);
    server.stop().await;
}

/// A streamed request running until it is dropped, read until its first token.
async fn running_stream(server: &Server) -> reqwest::Response {
    let mut response = server
        .client
        .post(server.url("/v1/completions"))
        .json(&json!({"prompt": "Tell me a long story", "max_tokens": 400,
            "ignore_eos": true, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let mut seen = String::new();
    while !seen.contains("\"text\"") {
        let chunk = response.chunk().await.unwrap().expect("the stream goes on");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    response
}

async fn wait_for_metric(server: &Server, name: &str, value: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = server.metric(name).await;
        if now == value {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} stayed {now}, not {value}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_gives_429() {
    let server = start(Config {
        max_batch: 1,
        max_queue: 1,
        ..Config::default()
    })
    .await;
    let running = running_stream(&server).await;
    // The next request waits for the batch's one place...
    let waiting = server
        .client
        .post(server.url("/v1/completions"))
        .json(&json!({"prompt": "x", "max_tokens": 2, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(waiting.status().as_u16(), 200);
    // ...and one more finds the queue full.
    let response = server
        .client
        .post(server.url("/v1/completions"))
        .json(&json!({"prompt": "x", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 429);
    assert_eq!(response.headers()["retry-after"], "1");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_error");
    drop(running);
    // The waiting request then runs to its end.
    let (_, finish, _) = text_stream(&sse_data(&waiting.text().await.unwrap()));
    assert_eq!(finish, "length");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_cancels_the_sequence() {
    let server = start(Config::default()).await;
    // A stream dropped midway.
    let stream = running_stream(&server).await;
    drop(stream);
    wait_for_metric(&server, "trellis_requests_cancelled_total", 1.0).await;
    wait_for_metric(&server, "trellis_running_sequences", 0.0).await;
    let generated = server.metric("trellis_generation_tokens_total").await;
    assert!(generated < 400.0, "stopped early: {generated} tokens");

    // A whole (non-streamed) request whose client hangs up while it runs.
    {
        use std::io::Write;
        let body = json!({"prompt": "Tell me a long story", "max_tokens": 400,
            "ignore_eos": true})
        .to_string();
        let address = server.base.trim_start_matches("http://");
        let mut socket = std::net::TcpStream::connect(address).unwrap();
        let request = format!(
            "POST /v1/completions HTTP/1.1\r\nhost: {address}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        socket.write_all(request.as_bytes()).unwrap();
        wait_for_metric(&server, "trellis_running_sequences", 1.0).await;
    }
    wait_for_metric(&server, "trellis_requests_cancelled_total", 2.0).await;
    wait_for_metric(&server, "trellis_running_sequences", 0.0).await;

    // Later requests are unaffected.
    let (status, answer) = server
        .post(
            "/v1/completions",
            &json!({"prompt": "Hello", "max_tokens": 5, "ignore_eos": true}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(answer["usage"]["completion_tokens"], 5);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_generation_equals_single_sequence_generation() {
    let server = start(Config::default()).await;
    let prompts = [
        "The quick brown fox jumps over the lazy dog.",
        "Once upon a time, in a small town by the sea, there lived",
        "It was the best of times",
        "Call me Ishmael. Some years ago, never mind how long precisely",
    ];
    let request = |prompt: &str| json!({"prompt": prompt, "max_tokens": 20, "ignore_eos": true});
    // Alone, one after another.
    let mut alone = Vec::new();
    for prompt in prompts {
        let (_, answer) = server.post("/v1/completions", &request(prompt)).await;
        alone.push(answer["choices"][0]["text"].as_str().unwrap().to_string());
    }
    let steps_before = server.metric("trellis_scheduler_steps_total").await;
    // Together, sharing steps.
    let bodies: Vec<Value> = prompts.iter().map(|p| request(p)).collect();
    let together = futures_util::future::join_all(
        bodies
            .iter()
            .map(|body| server.post("/v1/completions", body)),
    )
    .await;
    for ((_, answer), expected) in together.iter().zip(&alone) {
        assert_eq!(answer["choices"][0]["text"], expected.as_str());
    }
    let steps = server.metric("trellis_scheduler_steps_total").await - steps_before;
    assert!(steps < 4.0 * 20.0, "the batch shared steps ({steps} steps)");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_running_requests_finish() {
    let server = start(Config::default()).await;
    let response = server
        .client
        .post(server.url("/v1/completions"))
        .json(
            &json!({"prompt": "Hello", "max_tokens": 60, "ignore_eos": true,
            "stream": true}),
        )
        .send()
        .await
        .unwrap();
    server.app.begin_shutdown();
    // New work is refused while draining (on a fresh connection, or health says so).
    let health = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
        .get(server.url("/health"))
        .send()
        .await;
    assert!(health.is_err() || health.unwrap().status().as_u16() == 503);
    let (_, finish, _) = text_stream(&sse_data(&response.text().await.unwrap()));
    assert_eq!(finish, "length");
    let Server { task, .. } = server;
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_cancels_what_outlives_the_grace_period() {
    let server = start(Config {
        options: ServerOptions {
            shutdown_grace: Duration::from_millis(200),
            ..ServerOptions::default()
        },
        ..Config::default()
    })
    .await;
    let stream = running_stream(&server).await;
    server.app.begin_shutdown();
    let data = sse_data(&stream.text().await.unwrap());
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let error: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(error["error"]["code"], "service_unavailable");
    let Server { task, app, .. } = server;
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        app.scheduler
            .metrics()
            .requests_cancelled
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert!(!app.scheduler.is_running());
}

/// A bounded load test: concurrent streaming clients, some of which hang up midway. Every
/// stream that was not dropped must be whole and well-formed, and the server healthy after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_with_random_cancellations() {
    const CLIENTS: usize = 16;
    const REQUESTS: usize = 3;
    const MAX_TOKENS: usize = 12;
    let server = Arc::new(
        start(Config {
            max_batch: 8,
            ..Config::default()
        })
        .await,
    );
    let clients = (0..CLIENTS).map(|client| {
        let server = server.clone();
        tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(client as u64);
            let (mut whole, mut dropped) = (0, 0);
            for request in 0..REQUESTS {
                let chat = rng.random_bool(0.5);
                let (path, body) = if chat {
                    (
                        "/v1/chat/completions",
                        json!({
                        "messages": user(&format!("Client {client} asks question {request}.")),
                        "max_tokens": MAX_TOKENS, "ignore_eos": true, "stream": true,
                        "stream_options": {"include_usage": true}}),
                    )
                } else {
                    (
                        "/v1/completions",
                        json!({
                        "prompt": format!("Client {client}, request {request}:"),
                        "max_tokens": MAX_TOKENS, "ignore_eos": true, "stream": true,
                        "stream_options": {"include_usage": true}}),
                    )
                };
                let mut response = server
                    .client
                    .post(server.url(path))
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status().as_u16(), 200);
                if rng.random_bool(0.25) {
                    // Hang up after the first chunk.
                    let _ = response.chunk().await;
                    drop(response);
                    dropped += 1;
                    continue;
                }
                let data = sse_data(&response.text().await.unwrap());
                let usage = if chat {
                    chat_stream_parts(&data).usage
                } else {
                    text_stream(&data).2
                };
                assert_eq!(usage.unwrap()["completion_tokens"], MAX_TOKENS);
                whole += 1;
            }
            (whole, dropped)
        })
    });
    let results = futures_util::future::join_all(clients).await;
    let (whole, dropped) = results
        .into_iter()
        .map(Result::unwrap)
        .fold((0, 0), |(w, d), (a, b)| (w + a, d + b));
    assert_eq!(whole + dropped, CLIENTS * REQUESTS);
    assert_eq!(server.get("/health").await.0, 200);
    wait_for_metric(&server, "trellis_running_sequences", 0.0).await;
    assert_eq!(server.metric("trellis_requests_failed_total").await, 0.0);
    assert_eq!(
        server.metric("trellis_requests_total").await,
        (CLIENTS * REQUESTS) as f64
    );
    let server = Arc::into_inner(server).expect("the clients are done");
    server.stop().await;
}

//! The OpenAI wire format: request bodies as they arrive and responses as they leave.
//!
//! Requests are read in two passes: the body must be a JSON object, then it is deserialized
//! with the path of any field of the wrong type kept for the error (`param`). Fields whose
//! shape OpenAI lets vary (`stop`, `prompt`, `tool_choice`, `logit_bias`, …) arrive as JSON
//! values and are checked by hand, so that every error names the field and what was expected.
//! Unknown fields are ignored, as most OpenAI-compatible servers do, so that clients sending
//! newer parameters keep working.

use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use trellis_runtime::sampler::SamplingOptions;
use trellis_runtime::stop::{FinishReason, Usage};

/// The body as a JSON object of type `T`, or the 400/413 that says why not.
pub fn parse_body<T: DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<T, ApiError> {
    from_value(json_object(body, limit)?)
}

/// A request with sampling fields: those are read in a second pass over the same object
/// (rather than with `serde(flatten)`, which loses the path of a field of the wrong type).
pub fn parse_sampled_body<T: DeserializeOwned + Sampled>(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<T, ApiError> {
    let value = json_object(body, limit)?;
    let mut request: T = from_value(value.clone())?;
    *request.sampling_mut() = from_value(value)?;
    Ok(request)
}

/// Requests that carry [`SamplingFields`].
pub trait Sampled {
    fn sampling_mut(&mut self) -> &mut SamplingFields;
}

impl Sampled for ChatRequest {
    fn sampling_mut(&mut self) -> &mut SamplingFields {
        &mut self.sampling
    }
}

impl Sampled for CompletionRequest {
    fn sampling_mut(&mut self) -> &mut SamplingFields {
        &mut self.sampling
    }
}

fn json_object(body: Result<Bytes, BytesRejection>, limit: usize) -> Result<Value, ApiError> {
    let bytes = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::payload_too_large(limit)
        } else {
            ApiError::from_status(rejection.status(), &rejection.body_text())
        }
    })?;
    let value: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::invalid_request(format!("The body is not valid JSON: {e}.")))?;
    if !value.is_object() {
        return Err(ApiError::invalid_request("The body must be a JSON object."));
    }
    Ok(value)
}

fn from_value<T: DeserializeOwned>(value: Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if path.is_empty() || path == "." {
            // A missing required field: serde names it in the message.
            let param = inner
                .strip_prefix("missing field `")
                .and_then(|rest| rest.split('`').next())
                .map(str::to_string);
            let mut error = ApiError::invalid_request(format!("Invalid request: {inner}."));
            error.param = param;
            error
        } else {
            ApiError::invalid_param(&path, format!("Invalid value for `{path}`: {inner}."))
        }
    })
}

/// Sampling and stopping fields shared by chat and text completions, including the common
/// extensions (`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`, …).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct SamplingFields {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// 0 or a negative value (vLLM's -1) turns it off.
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub typical_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub seed: Option<serde_json::Number>,
    pub logit_bias: Option<Map<String, Value>>,
    pub stop: Option<Value>,
    pub ignore_eos: Option<bool>,
    pub n: Option<u32>,
}

impl SamplingFields {
    /// The request's sampling settings (unset fields stay unset, for the model's defaults).
    pub fn options(&self) -> Result<SamplingOptions, ApiError> {
        let seed = match &self.seed {
            None => None,
            // Negative seeds are accepted (some clients send them); their bits seed as well.
            Some(n) => Some(
                n.as_u64()
                    .or_else(|| n.as_i64().map(|v| v as u64))
                    .ok_or_else(|| ApiError::invalid_param("seed", "`seed` must be an integer."))?,
            ),
        };
        Ok(SamplingOptions {
            temperature: self.temperature,
            top_k: self.top_k.map(|k| k.max(0) as usize),
            top_p: self.top_p,
            min_p: self.min_p,
            typical_p: self.typical_p,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logit_bias: self.logit_bias.as_ref().map(parse_logit_bias).transpose()?,
            seed,
            ..SamplingOptions::default()
        })
    }

    /// `stop`: a string or a list of strings (empty strings dropped).
    pub fn stop_strings(&self) -> Result<Vec<String>, ApiError> {
        const MAX_STOP_STRINGS: usize = 16;
        let invalid =
            || ApiError::invalid_param("stop", "`stop` must be a string or a list of strings.");
        let strings = match &self.stop {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_string).ok_or_else(invalid))
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(invalid()),
        };
        if strings.len() > MAX_STOP_STRINGS {
            return Err(ApiError::invalid_param(
                "stop",
                format!("At most {MAX_STOP_STRINGS} stop strings are accepted."),
            ));
        }
        Ok(strings.into_iter().filter(|s| !s.is_empty()).collect())
    }

    /// Only one choice per request is generated.
    pub fn check_n(&self) -> Result<(), ApiError> {
        match self.n {
            None | Some(1) => Ok(()),
            Some(n) => Err(ApiError::unsupported(
                "n",
                format!("Only n=1 is supported (got n={n}); send separate requests instead."),
            )),
        }
    }
}

/// OpenAI's `logit_bias`: token id (as a string key) → bias in [-100, 100].
fn parse_logit_bias(map: &Map<String, Value>) -> Result<Vec<(u32, f32)>, ApiError> {
    map.iter()
        .map(|(key, value)| {
            let token: u32 = key.trim().parse().map_err(|_| {
                ApiError::invalid_param(
                    "logit_bias",
                    format!("`logit_bias` keys must be token ids, got {key:?}."),
                )
            })?;
            let bias = value
                .as_f64()
                .filter(|b| (-100.0..=100.0).contains(b))
                .ok_or_else(|| {
                    ApiError::invalid_param(
                        "logit_bias",
                        format!(
                            "`logit_bias` values must be numbers from -100 to 100, got {value} for token {token}."
                        ),
                    )
                })?;
            Ok((token, bias as f32))
        })
        .collect()
}

/// `max_tokens` / `max_completion_tokens` (the newer name wins when both are given).
pub fn max_tokens(
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
) -> Result<Option<usize>, ApiError> {
    let (param, value) = match (max_completion_tokens, max_tokens) {
        (Some(v), _) => ("max_completion_tokens", v),
        (None, Some(v)) => ("max_tokens", v),
        (None, None) => return Ok(None),
    };
    if value == 0 {
        return Err(ApiError::invalid_param(
            param,
            format!("`{param}` must be at least 1."),
        ));
    }
    Ok(Some(value as usize))
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// `POST /v1/chat/completions`.
#[derive(Clone, Debug, Deserialize)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<Value>,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    /// Extra variables for the chat template (e.g. `enable_thinking`).
    pub chat_template_kwargs: Option<Map<String, Value>>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub response_format: Option<Value>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u32>,
    /// Filled by [`parse_sampled_body`].
    #[serde(skip)]
    pub sampling: SamplingFields,
}

/// `POST /v1/completions`.
#[derive(Clone, Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Value,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<u32>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    pub best_of: Option<u32>,
    pub logprobs: Option<Value>,
    /// Leave special tokens out of the text (default true, as in vLLM).
    pub skip_special_tokens: Option<bool>,
    /// Filled by [`parse_sampled_body`].
    #[serde(skip)]
    pub sampling: SamplingFields,
}

/// `POST /v1/tokenize`: a text prompt, or chat messages rendered with the template.
#[derive(Clone, Debug, Deserialize)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<Vec<Value>>,
    pub tools: Option<Vec<Value>>,
    pub add_special_tokens: Option<bool>,
    pub add_generation_prompt: Option<bool>,
    pub chat_template_kwargs: Option<Map<String, Value>>,
}

/// `POST /v1/detokenize`.
#[derive(Clone, Debug, Deserialize)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<u32>,
}

// ---- responses ----

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FunctionCall {
    pub name: String,
    /// The arguments as a JSON object, in a string (OpenAI's shape).
    pub arguments: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionCall,
}

#[derive(Clone, Debug, Serialize)]
pub struct ChatMessage {
    pub role: &'static str,
    /// `null` when the answer is only tool calls.
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ChatChoice {
    pub index: u32,
    pub message: ChatMessage,
    pub logprobs: Option<()>,
    pub finish_reason: FinishReason,
}

#[derive(Clone, Debug, Serialize)]
pub struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

/// One tool call in a stream: sent whole, with its index among the answer's calls.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ToolCallDelta {
    pub index: u32,
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionCall,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ChatDeltaBody {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ChatChunkChoice {
    pub index: u32,
    pub delta: ChatDeltaBody,
    pub logprobs: Option<()>,
    pub finish_reason: Option<FinishReason>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ChatChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    /// Absent unless `stream_options.include_usage`; then `null` on every chunk but the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TextChoice {
    pub text: String,
    pub index: u32,
    pub logprobs: Option<()>,
    pub finish_reason: Option<FinishReason>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TextCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<TextChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse<T: DeserializeOwned + Sampled>(body: Value) -> Result<T, ApiError> {
        parse_sampled_body(Ok(Bytes::from(body.to_string())), 1 << 20)
    }

    #[test]
    fn wrong_types_name_the_field() {
        let e = parse::<ChatRequest>(json!({"messages": [], "temperature": "hot"})).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.param.as_deref(), Some("temperature"), "{e:?}");
        let e = parse::<ChatRequest>(json!({"model": "m"})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"), "{e:?}");
        let e =
            parse::<CompletionRequest>(json!({"prompt": "x", "stop": 1, "seed": "s"})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("seed"), "{e:?}");
        let ok =
            parse::<CompletionRequest>(json!({"prompt": "x", "top_k": -1, "unknown": 1})).unwrap();
        assert_eq!(ok.sampling.top_k, Some(-1));
        let e = parse_sampled_body::<ChatRequest>(Ok(Bytes::from_static(b"{\"messages\": [")), 100)
            .unwrap_err();
        assert!(e.message.contains("not valid JSON"), "{e:?}");
        let e = parse::<ChatRequest>(json!([1, 2])).unwrap_err();
        assert!(e.message.contains("JSON object"));
    }

    #[test]
    fn stop_is_a_string_or_a_list() {
        let fields = |stop: Value| SamplingFields {
            stop: Some(stop),
            ..SamplingFields::default()
        };
        assert_eq!(fields(json!("x")).stop_strings().unwrap(), ["x"]);
        assert_eq!(
            fields(json!(["a", "", "b"])).stop_strings().unwrap(),
            ["a", "b"]
        );
        assert!(fields(json!([1])).stop_strings().is_err());
        assert!(fields(json!(3)).stop_strings().is_err());
    }

    #[test]
    fn logit_bias_keys_are_token_ids() {
        let mut map = Map::new();
        map.insert("12".into(), json!(-100));
        assert_eq!(parse_logit_bias(&map).unwrap(), [(12, -100.0)]);
        map.insert("x".into(), json!(1));
        assert!(parse_logit_bias(&map).is_err());
        let mut map = Map::new();
        map.insert("1".into(), json!(101));
        assert!(parse_logit_bias(&map).is_err());
    }

    #[test]
    fn max_completion_tokens_wins() {
        assert_eq!(max_tokens(Some(5), Some(7)).unwrap(), Some(7));
        assert_eq!(max_tokens(Some(5), None).unwrap(), Some(5));
        assert!(max_tokens(Some(0), None).is_err());
    }
}

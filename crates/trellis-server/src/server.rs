//! The router, its middleware (API key, request accounting, panics and error bodies), the
//! small endpoints, and serving with graceful shutdown.

use crate::chat::{chat_completions, normalize_messages};
use crate::completions::completions;
use crate::error::ApiError;
use crate::protocol::{DetokenizeRequest, TokenizeRequest, parse_body};
use crate::state::AppState;
use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::{FutureExt, StreamExt};
use serde_json::{Value, json};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

/// Every route, with the middleware.
pub fn router(app: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/models/{model}", get(get_model))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/tokenize", post(tokenize))
        .route("/v1/detokenize", post(detokenize))
        .route_layer(middleware::from_fn_with_state(app.clone(), require_api_key));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            app.clone(),
            refuse_oversized_body,
        ))
        .layer(middleware::from_fn_with_state(app.clone(), track))
        .layer(DefaultBodyLimit::max(app.options.max_body_bytes))
        .with_state(app)
}

/// Serve until shutdown begins ([`AppState::begin_shutdown`], e.g. on a signal), then stop
/// accepting, let running requests finish within the grace period (cancelling the rest),
/// and stop the scheduler.
pub async fn serve(listener: TcpListener, app: Arc<AppState>) -> std::io::Result<()> {
    let grace = {
        let app = app.clone();
        tokio::spawn(async move {
            app.draining.cancelled().await;
            tokio::select! {
                _ = tokio::time::sleep(app.options.shutdown_grace) => {
                    tracing::warn!("shutdown grace period over: cancelling running requests");
                    app.abort_requests();
                }
                _ = app.abort.cancelled() => {}
            }
        })
    };
    let draining = app.draining.clone();
    let served = axum::serve(listener, router(app.clone()))
        .with_graceful_shutdown(async move { draining.cancelled().await })
        .await;
    grace.abort();
    let scheduler = app.scheduler.clone();
    tokio::task::spawn_blocking(move || scheduler.shutdown())
        .await
        .map_err(std::io::Error::other)?;
    served
}

/// `Authorization: Bearer <key>` when the server has a key (compared in constant time).
async fn require_api_key(
    State(app): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(key) = &app.options.api_key {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            });
        match given {
            None => {
                return ApiError::unauthorized(
                    "Missing API key: send it as `Authorization: Bearer <key>`.",
                )
                .into_response();
            }
            Some(token) if !same_secret(token.as_bytes(), key.as_bytes()) => {
                return ApiError::unauthorized("Incorrect API key provided.").into_response();
            }
            Some(_) => {}
        }
    }
    next.run(request).await
}

/// The most of a too-large body that is read and thrown away before the 413 goes out, and
/// how long that may take.
const OVERSIZED_BODY_DRAIN_BYTES: u64 = 256 * 1024 * 1024;
const OVERSIZED_BODY_DRAIN_TIME: Duration = Duration::from_secs(30);

/// A body whose declared length is over the limit gets its 413 only after the body has been
/// read (and dropped), with `Connection: close`. Answering first and closing over unread bytes
/// makes the kernel reset the connection, and a client still sending loses the answer: it
/// sees "server disconnected" instead of the error.
async fn refuse_oversized_body(
    State(app): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let limit = app.options.max_body_bytes;
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let Some(declared) = declared.filter(|&n| n > limit as u64) else {
        return next.run(request).await;
    };
    if declared <= OVERSIZED_BODY_DRAIN_BYTES {
        let mut chunks = request.into_body().into_data_stream();
        let drain = async { while let Some(Ok(_)) = chunks.next().await {} };
        if tokio::time::timeout(OVERSIZED_BODY_DRAIN_TIME, drain)
            .await
            .is_err()
        {
            tracing::warn!(declared, "gave up reading an oversized request body");
        }
    }
    let mut response = ApiError::payload_too_large(limit).into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Equality whose time does not depend on where the inputs differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Counts and logs every response, turns a panicking handler into a 500, and gives error
/// responses that axum produced itself (405, a rejected body, …) OpenAI's error body.
async fn track(State(app): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = request.method().clone();
    let started = Instant::now();
    let _in_flight = app.http_metrics.in_flight();
    let response = match AssertUnwindSafe(next.run(request)).catch_unwind().await {
        Ok(response) => response,
        Err(_) => {
            tracing::error!(%route, "a handler panicked");
            ApiError::internal("The server failed while handling this request.").into_response()
        }
    };
    let response = with_openai_error_body(response).await;
    let status = response.status().as_u16();
    app.http_metrics.record(&route, status);
    tracing::info!(
        %method,
        %route,
        status,
        ms = started.elapsed().as_millis() as u64,
        "request"
    );
    response
}

async fn with_openai_error_body(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let detail = axum::body::to_bytes(body, 16 * 1024)
        .await
        .unwrap_or_default();
    let mut rewritten =
        ApiError::from_status(status, &String::from_utf8_lossy(&detail)).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            rewritten.headers_mut().insert(name, value.clone());
        }
    }
    rewritten
}

async fn not_found(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!("No route {} {}.", request.method(), request.uri().path()),
    )
    .with_code("not_found")
}

fn model_card(app: &AppState) -> Value {
    json!({
        "id": app.model.name,
        "object": "model",
        "created": app.started,
        "owned_by": "trellis",
        "max_model_len": app.ctx_size(),
    })
}

async fn list_models(State(app): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [model_card(&app)]}))
}

async fn get_model(
    State(app): State<Arc<AppState>>,
    Path(model): Path<String>,
) -> Result<Json<Value>, ApiError> {
    app.check_model(Some(&model))?;
    Ok(Json(model_card(&app)))
}

async fn health(State(app): State<Arc<AppState>>) -> Response {
    if app.draining.is_cancelled() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "shutting down"})),
        )
            .into_response()
    } else if !app.scheduler.is_running() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "engine stopped"})),
        )
            .into_response()
    } else {
        Json(json!({"status": "ok"})).into_response()
    }
}

async fn metrics(State(app): State<Arc<AppState>>) -> Response {
    let text = crate::metrics::render(&app.http_metrics, app.scheduler.metrics(), &app.model.name);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        Body::from(text),
    )
        .into_response()
}

/// `prompt` as the tokenizer encodes it, or `messages` rendered by the chat template.
async fn tokenize(
    State(app): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let request: TokenizeRequest = parse_body(body, app.options.max_body_bytes)?;
    app.check_model(request.model.as_deref())?;
    let worker = app.clone();
    let tokens = tokio::task::spawn_blocking(move || tokenize_request(&worker, request))
        .await
        .map_err(|e| ApiError::internal(format!("Tokenizing failed: {e}")))??;
    Ok(Json(json!({
        "count": tokens.len(),
        "max_model_len": app.ctx_size(),
        "tokens": tokens,
    })))
}

fn tokenize_request(app: &AppState, request: TokenizeRequest) -> Result<Vec<u32>, ApiError> {
    let tokenizer = &app.model.tokenizer;
    let encode = |text: &str, add_special: bool, param: &str| {
        tokenizer
            .encode(text, add_special)
            .map_err(|e| ApiError::invalid_param(param, format!("Tokenizing failed: {e}.")))
    };
    match (request.prompt, request.messages) {
        (Some(prompt), None) => encode(
            &prompt,
            request.add_special_tokens.unwrap_or(true),
            "prompt",
        ),
        (None, Some(messages)) => {
            let Some(template) = &app.model.template else {
                return Err(ApiError::invalid_param(
                    "messages",
                    "This model has no chat template; send `prompt` instead.",
                ));
            };
            let messages = normalize_messages(messages)?;
            let kwargs = request.chat_template_kwargs.unwrap_or_default();
            let text = template
                .render(
                    &messages,
                    request.tools.as_deref().filter(|t| !t.is_empty()),
                    request.add_generation_prompt.unwrap_or(true),
                    &kwargs,
                )
                .map_err(|e| {
                    ApiError::invalid_param("messages", format!("The chat template failed: {e}."))
                })?;
            // The template writes its own special tokens.
            encode(
                &text,
                request.add_special_tokens.unwrap_or(false),
                "messages",
            )
        }
        _ => Err(ApiError::invalid_request(
            "Send exactly one of `prompt` (a string) or `messages`.",
        )),
    }
}

/// Token ids back to text (special tokens kept, so tokenize → detokenize round-trips).
async fn detokenize(
    State(app): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let request: DetokenizeRequest = parse_body(body, app.options.max_body_bytes)?;
    app.check_model(request.model.as_deref())?;
    let vocab = app.model.tokenizer.vocab_size();
    if let Some(&id) = request.tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::invalid_param(
            "tokens",
            format!("Token id {id} is outside the tokenizer's vocabulary (0..{vocab})."),
        ));
    }
    let text = app
        .model
        .tokenizer
        .decode(&request.tokens, false)
        .map_err(|e| ApiError::invalid_param("tokens", format!("{e}.")))?;
    Ok(Json(json!({"prompt": text})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"abcd"));
        assert!(!same_secret(b"", b"a"));
    }
}

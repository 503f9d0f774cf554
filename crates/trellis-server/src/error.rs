//! Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the HTTP
//! status that says what went wrong. Every failed request gets one of these bodies, whatever
//! layer refused it (see `server::openai_error_bodies` for the ones axum itself produces).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// An error to send to the client.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, ….
    pub kind: &'static str,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    /// A machine-readable code, e.g. `context_length_exceeded`.
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }

    /// 400: the request is malformed or asks for something impossible.
    pub fn invalid_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 about one field.
    pub fn invalid_param(param: &str, message: impl Into<String>) -> ApiError {
        ApiError::invalid_request(message).with_param(param)
    }

    /// 400 for an OpenAI feature this server does not implement.
    pub fn unsupported(param: &str, message: impl Into<String>) -> ApiError {
        ApiError::invalid_param(param, message).with_code("unsupported_parameter")
    }

    /// 401: the API key is missing or wrong.
    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "authentication_error", message)
            .with_code("invalid_api_key")
    }

    /// 404: the request names a model this server does not serve.
    pub fn model_not_found(requested: &str, served: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("The model `{requested}` does not exist; this server serves `{served}`."),
        )
        .with_param("model")
        .with_code("model_not_found")
    }

    /// 413: the body is larger than the server accepts.
    pub fn payload_too_large(limit: usize) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("The request body is larger than the limit of {limit} bytes."),
        )
        .with_code("request_too_large")
    }

    /// 429: too many requests are waiting.
    pub fn queue_full(max_queue: usize) -> ApiError {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!(
                "The server is busy: {max_queue} requests are already waiting. Try again shortly."
            ),
        )
        .with_code("rate_limit_exceeded")
    }

    /// 503: the server is shutting down or its engine stopped.
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
            .with_code("service_unavailable")
    }

    /// 500: something failed inside the server.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    pub fn with_param(mut self, param: &str) -> ApiError {
        self.param = Some(param.to_string());
        self
    }

    pub fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    /// The JSON body, also sent as an SSE event when a stream fails midway.
    pub fn body(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }

    /// The error OpenAI's shape gives a bare status (e.g. one axum produced itself), with
    /// `detail` as the message when there is one.
    pub fn from_status(status: StatusCode, detail: &str) -> ApiError {
        let reason = status.canonical_reason().unwrap_or("Error");
        let message = if detail.trim().is_empty() {
            reason.to_string()
        } else {
            format!("{reason}: {}", detail.trim())
        };
        match status {
            StatusCode::UNAUTHORIZED => ApiError::unauthorized(message),
            StatusCode::TOO_MANY_REQUESTS => {
                ApiError::new(status, "rate_limit_error", message).with_code("rate_limit_exceeded")
            }
            s if s.is_server_error() => ApiError::new(s, "server_error", message),
            s => ApiError::new(s, "invalid_request_error", message),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_openai_fields() {
        let e = ApiError::invalid_param("temperature", "bad").with_code("x");
        assert_eq!(
            e.body(),
            json!({"error": {"message": "bad", "type": "invalid_request_error", "param": "temperature", "code": "x"}})
        );
    }

    #[test]
    fn bare_statuses_get_a_type() {
        let e = ApiError::from_status(StatusCode::METHOD_NOT_ALLOWED, "");
        assert_eq!(e.message, "Method Not Allowed");
        assert_eq!(e.kind, "invalid_request_error");
        assert_eq!(
            ApiError::from_status(StatusCode::BAD_GATEWAY, "x").kind,
            "server_error"
        );
    }
}

//! Server-sent events as OpenAI streams them: one `data: {json}` event per chunk, an error
//! as `data: {"error": …}`, and `data: [DONE]` at the end.

use crate::error::ApiError;
pub use axum::response::sse::Event;
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use futures_util::stream;
use serde::Serialize;
use std::convert::Infallible;
use std::future::Future;

pub fn json_event<T: Serialize>(value: &T) -> Event {
    // The response types serialize infallibly (no maps with non-string keys, no NaN).
    Event::default().data(serde_json::to_string(value).unwrap_or_else(|e| {
        ApiError::internal(format!("cannot serialize a chunk: {e}"))
            .body()
            .to_string()
    }))
}

pub fn error_event(error: &ApiError) -> Event {
    Event::default().data(error.body().to_string())
}

pub fn done_event() -> Event {
    Event::default().data("[DONE]")
}

/// A streaming response driven by `step`, which takes the stream's state and returns the next
/// events with the state back; no events ends the stream. Dropping the response (the client
/// went away) drops the state, which cancels its generation.
pub fn response<S, F, Fut>(state: S, mut step: F) -> Response
where
    S: Send + 'static,
    F: FnMut(S) -> Fut + Send + 'static,
    Fut: Future<Output = (Vec<Event>, S)> + Send + 'static,
{
    let events = stream::unfold(state, move |state| {
        let next = step(state);
        async move {
            let (events, state) = next.await;
            (!events.is_empty()).then(|| {
                let batch = stream::iter(events.into_iter().map(Ok::<_, Infallible>));
                (batch, state)
            })
        }
    })
    .flatten();
    // Comments every 15 s keep idle connections (a long prefill, a queue) from timing out.
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

//! An OpenAI-compatible HTTP server over the continuous-batching scheduler.
//!
//! The engine runs on the scheduler's own thread; handlers here render and tokenize prompts,
//! submit them, and turn each sequence's events into an OpenAI response — whole, or streamed
//! as server-sent events. A handler holds its sequence's cancel flag in a guard, so a client
//! that disconnects (dropping the handler or the stream) cancels its generation at once.
//!
//! Endpoints: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`,
//! `POST /v1/tokenize`, `POST /v1/detokenize`, `GET /health`, `GET /metrics`.

pub mod chat;
pub mod completions;
pub mod error;
pub mod metrics;
pub mod output;
pub mod protocol;
pub mod server;
mod sse;
pub mod state;

pub use error::ApiError;
pub use output::OutputFormat;
pub use server::{router, serve};
pub use state::{AppState, ModelContext, ServerOptions};

//! Generation runtime: KV cache management, the generation loop, streaming, sampling,
//! chat templates, stop rules and model-specific output parsing.

pub mod bench;
pub mod chat_template;
pub mod engine;
pub mod generation;
pub mod glm_output;
pub mod perplexity;
pub mod sampler;
pub mod scheduler;
pub mod stop;
pub mod tokenizer;

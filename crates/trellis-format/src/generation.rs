//! `generation_config.json`: the model author's sampling defaults and stop tokens.

use crate::error::Result;
use crate::json::Fields;
use serde::Serialize;

/// File name of the generation defaults.
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";

/// Sampling defaults; every field is optional because any may be absent.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct GenerationDefaults {
    /// Stop tokens (one id or a list in the file).
    pub eos_token_id: Option<Vec<u32>>,
    pub bos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// 0 means "no top-k limit" as in transformers; a negative value in the file reads as `None`.
    pub top_k: Option<usize>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub do_sample: Option<bool>,
    pub max_new_tokens: Option<usize>,
    pub max_length: Option<usize>,
}

impl GenerationDefaults {
    /// Parse the JSON of a `generation_config.json`; `file` labels errors.
    pub fn from_json(value: &serde_json::Value, file: &str) -> Result<GenerationDefaults> {
        let f = Fields::root(value, file)?;
        let non_negative = |key: &str| -> Result<Option<f64>> {
            match f.opt_f64(key)? {
                Some(v) if v < 0.0 => {
                    Err(f.err(key, format!("expected a non-negative number, got {v}")))
                }
                other => Ok(other),
            }
        };
        Ok(GenerationDefaults {
            eos_token_id: f.opt_token_list("eos_token_id")?,
            bos_token_id: f.opt_token("bos_token_id")?,
            pad_token_id: f.opt_token("pad_token_id")?,
            temperature: non_negative("temperature")?,
            top_p: non_negative("top_p")?,
            // Some tools write -1 for "no limit".
            top_k: match f.get("top_k").and_then(serde_json::Value::as_i64) {
                Some(k) if k < 0 => None,
                _ => f.opt_count("top_k")?,
            },
            min_p: non_negative("min_p")?,
            repetition_penalty: f.opt_positive_f64("repetition_penalty")?,
            do_sample: f.opt_bool("do_sample")?,
            max_new_tokens: f.opt_count("max_new_tokens")?,
            max_length: f.opt_count("max_length")?,
        })
    }
}

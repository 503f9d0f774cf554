//! GGUF hyperparameters (`{arch}.*` metadata) → a Hugging Face `config.json`.
//!
//! GGUF records what llama.cpp needs at run time and no more, so a few Hugging Face fields
//! are reconstructed from llama.cpp's own fixed rules for the architecture (noted where
//! used). The configs carry both the classic keys (`rope_theta`, `rope_scaling`) and
//! transformers 5's `rope_parameters`, so either generation of transformers reads them.

use super::super::{GgufError, GgufFile, GgufValue, Result};
use super::Family;
use serde_json::{Value, json};

/// The sizes import needs beyond the JSON (tensor checks and Q/K un-permutation).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Dimensions {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub tie_word_embeddings: bool,
}

/// Typed reads of `{arch}.{key}`.
struct Hparams<'a> {
    gguf: &'a GgufFile,
    arch: &'a str,
}

impl Hparams<'_> {
    fn key(&self, key: &str) -> String {
        format!("{}.{key}", self.arch)
    }

    fn req_count(&self, key: &str) -> Result<usize> {
        let full = self.key(key);
        match self.gguf.get(&full) {
            Some(v) if v.as_array().is_some() => Err(GgufError::Unsupported {
                file: self.gguf.path().to_path_buf(),
                what: format!(
                    "metadata `{full}` is a per-layer array; import supports one value for all \
                     layers"
                ),
            }),
            _ => {
                let value = self.gguf.req_u64(&full)?;
                self.positive(&full, value)
            }
        }
    }

    fn opt_count(&self, key: &str) -> Result<Option<usize>> {
        let full = self.key(key);
        if self.gguf.get(&full).is_none() {
            return Ok(None);
        }
        self.req_count(key).map(Some)
    }

    fn positive(&self, key: &str, value: u64) -> Result<usize> {
        match usize::try_from(value) {
            Ok(v) if v > 0 && v <= 1 << 40 => Ok(v),
            _ => Err(self
                .gguf
                .metadata_error(key, format!("expected a positive size, got {value}"))),
        }
    }

    /// A number as f64. An f32 is converted through its shortest decimal form, so that the
    /// `1e-6` a converter stored as f32 reads back as `1e-6`, not `9.999999974752427e-7`.
    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        let full = self.key(key);
        match self.gguf.get(&full) {
            Some(GgufValue::F32(v)) => Ok(Some(v.to_string().parse().unwrap_or(f64::from(*v)))),
            _ => self.gguf.opt_f64(&full),
        }
    }

    fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        self.gguf.opt_str(&self.key(key))
    }
}

/// The `config.json` of `family` and the dimensions behind it.
pub(crate) fn hf_config(
    gguf: &GgufFile,
    family: Family,
    vocab_size: usize,
    tie_word_embeddings: bool,
    special: &SpecialIds,
    torch_dtype: &str,
) -> Result<(Value, Dimensions)> {
    let arch = family.gguf_arch();
    let h = Hparams { gguf, arch };
    let hidden_size = h.req_count("embedding_length")?;
    let num_layers = h.req_count("block_count")?;
    let intermediate_size = h.req_count("feed_forward_length")?;
    let heads = h.req_count("attention.head_count")?;
    let kv_heads = h.opt_count("attention.head_count_kv")?.unwrap_or(heads);
    if kv_heads > heads || !heads.is_multiple_of(kv_heads) {
        return Err(gguf.metadata_error(
            &h.key("attention.head_count_kv"),
            format!("{kv_heads} does not divide the head count {heads}"),
        ));
    }
    let head_dim = match h.opt_count("attention.key_length")? {
        Some(d) => d,
        None if hidden_size.is_multiple_of(heads) => hidden_size / heads,
        None => {
            return Err(gguf.metadata_error(
                &h.key("attention.key_length"),
                format!(
                    "missing, and the hidden size {hidden_size} is not divisible by {heads} heads"
                ),
            ));
        }
    };
    if let Some(value_dim) = h.opt_count("attention.value_length")?
        && value_dim != head_dim
    {
        return Err(GgufError::Unsupported {
            file: gguf.path().to_path_buf(),
            what: format!(
                "value head size {value_dim} differs from key head size {head_dim}; the \
                 supported architectures use one head size"
            ),
        });
    }
    let default_context = match family {
        Family::Gemma3 => 131_072,
        _ => 4096,
    };
    let max_positions = h.opt_count("context_length")?.unwrap_or(default_context);
    let rms_norm_eps = h
        .opt_f64("attention.layer_norm_rms_epsilon")?
        .unwrap_or(1e-6);
    let default_theta = match family {
        Family::Gemma3 => 1_000_000.0,
        _ => 10_000.0,
    };
    let rope_theta = h.opt_f64("rope.freq_base")?.unwrap_or(default_theta);
    if let Some(rope_dims) = h.opt_count("rope.dimension_count")?
        && rope_dims != head_dim
    {
        return Err(GgufError::Unsupported {
            file: gguf.path().to_path_buf(),
            what: format!(
                "partial rotary embedding ({rope_dims} of {head_dim} dims per head) is not \
                 supported by import"
            ),
        });
    }
    let rope_scaling = rope_scaling(&h, max_positions)?;
    if gguf.tensor("rope_freqs.weight").is_some() {
        return Err(GgufError::Unsupported {
            file: gguf.path().to_path_buf(),
            what: "per-frequency RoPE factors (`rope_freqs.weight`, Llama 3.1-style scaling) \
                   cannot be mapped to a Hugging Face rope_scaling yet"
                .into(),
        });
    }

    let mut config = json!({
        "architectures": [family.class_name()],
        "model_type": family.model_type(),
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": rms_norm_eps,
        "max_position_embeddings": max_positions,
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": special.bos,
        "eos_token_id": special.eos,
        "pad_token_id": special.pad,
        "torch_dtype": torch_dtype,
        "attention_dropout": 0.0,
    });
    let fields = config.as_object_mut().expect("a JSON object");
    let mut set = |key: &str, value: Value| {
        fields.insert(key.to_string(), value);
    };
    match family {
        Family::Llama | Family::Qwen2 | Family::Qwen3 => {
            set("hidden_act", json!("silu"));
            set("rope_theta", json!(rope_theta));
            let mut params = json!({ "rope_type": "default", "rope_theta": rope_theta });
            match &rope_scaling {
                Some(scaling) => {
                    set("rope_scaling", scaling.clone());
                    merge(&mut params, scaling);
                }
                None => set("rope_scaling", Value::Null),
            }
            set("rope_parameters", params);
            if family == Family::Llama {
                let bias = gguf.tensor("blk.0.attn_q.bias").is_some();
                set("attention_bias", json!(bias));
                set("mlp_bias", json!(false));
            } else {
                set("use_sliding_window", json!(false));
                set("sliding_window", Value::Null);
                set("max_window_layers", json!(num_layers));
            }
            if family == Family::Qwen3 {
                set("attention_bias", json!(false));
            }
        }
        Family::Gemma3 => {
            // llama.cpp's Gemma 3 rules, which GGUF does not record: every sixth layer is
            // global, the local layers use RoPE base 10000 unscaled, and attention scores
            // are scaled by head_dim^-1/2 — except the 27B model (62 layers), whose
            // query_pre_attn_scalar is hidden_size / heads.
            let pattern = 6;
            let layer_types: Vec<&str> = (0..num_layers)
                .map(|i| {
                    if i % pattern == pattern - 1 {
                        "full_attention"
                    } else {
                        "sliding_attention"
                    }
                })
                .collect();
            let query_pre_attn_scalar = if num_layers == 62 {
                hidden_size / heads
            } else {
                head_dim
            };
            let sliding_window = h.opt_count("attention.sliding_window")?.unwrap_or(4096);
            let local_theta = 10_000.0;
            set("hidden_activation", json!("gelu_pytorch_tanh"));
            set("query_pre_attn_scalar", json!(query_pre_attn_scalar));
            set("sliding_window", json!(sliding_window));
            set("sliding_window_pattern", json!(pattern));
            set("layer_types", json!(layer_types));
            set("rope_theta", json!(rope_theta));
            set("rope_local_base_freq", json!(local_theta));
            set("rope_scaling", rope_scaling.clone().unwrap_or(Value::Null));
            let mut global = json!({ "rope_type": "default", "rope_theta": rope_theta });
            if let Some(scaling) = &rope_scaling {
                merge(&mut global, scaling);
            }
            set(
                "rope_parameters",
                json!({
                    "full_attention": global,
                    "sliding_attention": { "rope_type": "default", "rope_theta": local_theta },
                }),
            );
            set("attention_bias", json!(false));
            let softcap = |key: &str| -> Result<Value> {
                Ok(h.opt_f64(key)?.map_or(Value::Null, |v| json!(v)))
            };
            set(
                "final_logit_softcapping",
                softcap("final_logit_softcapping")?,
            );
            set("attn_logit_softcapping", softcap("attn_logit_softcapping")?);
        }
    }
    Ok((
        config,
        Dimensions {
            vocab_size,
            hidden_size,
            num_layers,
            heads,
            kv_heads,
            head_dim,
            tie_word_embeddings,
        },
    ))
}

/// Copy the fields of `extra` (an object) into `target` (an object).
fn merge(target: &mut Value, extra: &Value) {
    if let (Some(target), Some(extra)) = (target.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            target.insert(k.clone(), v.clone());
        }
    }
}

/// `{arch}.rope.scaling.*` → a Hugging Face `rope_scaling` object (`None` for plain RoPE).
fn rope_scaling(h: &Hparams<'_>, max_positions: usize) -> Result<Option<Value>> {
    let kind = h.opt_str("rope.scaling.type")?;
    let factor = h.opt_f64("rope.scaling.factor")?;
    let original = h.opt_count("rope.scaling.original_context_length")?;
    match (kind, factor) {
        (None | Some("none"), _) => Ok(None),
        (Some(_), Some(f)) if f == 1.0 || f == 0.0 => Ok(None),
        (Some("linear"), Some(f)) => Ok(Some(json!({ "rope_type": "linear", "factor": f }))),
        (Some("yarn"), Some(f)) => Ok(Some(json!({
            "rope_type": "yarn",
            "factor": f,
            "original_max_position_embeddings": original.unwrap_or(max_positions),
        }))),
        (Some(kind), _) => Err(GgufError::Unsupported {
            file: h.gguf.path().to_path_buf(),
            what: format!(
                "`{}` = {kind:?} with factor {factor:?}: import supports linear and yarn \
                 scaling with a factor",
                h.key("rope.scaling.type")
            ),
        }),
    }
}

/// Special token ids as they go into `config.json`.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct SpecialIds {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub pad: Option<u32>,
}

//! Gemma 3: interleaved sliding-window (local) and global attention layers with separate RoPE
//! settings, q/k norms, GELU-tanh MLP, tied embeddings by default.
//!
//! `gemma3_text` configs are read directly; `gemma3` (the multimodal wrapper) contributes its
//! `text_config` (token ids and tying fall back to the top level). Released Gemma 3 configs
//! leave many fields at transformers' class defaults (e.g. the 4B `text_config` has no head
//! counts), so those defaults are applied here; the sizes that every released config states
//! (hidden size, layers, FFN width) are required.

use super::llama::{LayerAttention, explicit_layer_types, parse_heads_with_defaults};
use super::rope::{RopeConfig, RopeScaling, RopeSource};
use super::{Architecture, SpecialTokens};
use crate::error::Result;
use crate::json::Fields;
use serde::Serialize;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Gemma3Config {
    pub architecture: Architecture,
    pub class_name: String,
    /// Default 262208.
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    /// Default 8.
    pub num_attention_heads: usize,
    /// Default 4.
    pub num_key_value_heads: usize,
    /// Default 256.
    pub head_dim: usize,
    pub intermediate_size: usize,
    /// Default 1e-6.
    pub rms_norm_eps: f64,
    /// RoPE of the global layers: `rope_theta` (default 1e6) and `rope_scaling`.
    pub rope_global: RopeConfig,
    /// RoPE of the sliding layers: `rope_local_base_freq` (default 10000), unscaled.
    pub rope_local: RopeConfig,
    /// Attention scores are scaled by query_pre_attn_scalar^-0.5 (default 256).
    pub query_pre_attn_scalar: f64,
    /// Default 4096.
    pub sliding_window: usize,
    /// From `layer_types`, else every `sliding_window_pattern`-th layer (default 6) is global.
    pub layer_types: Vec<LayerAttention>,
    pub final_logit_softcapping: Option<f64>,
    pub attn_logit_softcapping: Option<f64>,
    /// Default "gelu_pytorch_tanh".
    pub hidden_activation: String,
    /// Default true.
    pub tie_word_embeddings: bool,
    /// Default 131072.
    pub max_position_embeddings: usize,
    /// Default false.
    pub attention_bias: bool,
    pub tokens: SpecialTokens,
}

impl Gemma3Config {
    pub(crate) fn parse(
        root: &Fields<'_>,
        architecture: Architecture,
        class_name: String,
    ) -> Result<Gemma3Config> {
        let f = if architecture == Architecture::Gemma3 {
            let text = root.opt_object("text_config")?.ok_or_else(|| {
                root.err(
                    "text_config",
                    "missing (Gemma3ForConditionalGeneration needs it)",
                )
            })?;
            root.nested(text, "text_config.")
        } else {
            *root
        };
        let hidden_size = f.req_positive("hidden_size")?;
        let num_hidden_layers = f.req_layer_count("num_hidden_layers")?;
        let heads_count = f.positive_or("num_attention_heads", 8)?;
        let heads = parse_heads_with_defaults(&f, hidden_size, heads_count, 4, Some(256))?;
        let max_position_embeddings = f.positive_or("max_position_embeddings", 131_072)?;
        let layer_types = match explicit_layer_types(&f, num_hidden_layers)? {
            Some(types) => types,
            None => {
                let pattern = f.positive_or("sliding_window_pattern", 6)?;
                (0..num_hidden_layers)
                    .map(|i| {
                        if i % pattern == pattern - 1 {
                            LayerAttention::Full
                        } else {
                            LayerAttention::Sliding
                        }
                    })
                    .collect()
            }
        };
        let global = RopeSource {
            root: f,
            layer_type: "full_attention",
            default_theta: 1_000_000.0,
            max_position_embeddings,
        };
        let local_theta = f.positive_f64_or("rope_local_base_freq", 10_000.0)?;
        let local = RopeSource {
            root: f,
            layer_type: "sliding_attention",
            default_theta: local_theta,
            max_position_embeddings,
        };
        let rope_local = if local.has_layer_entry()? {
            local.parse()?
        } else {
            RopeConfig {
                theta: local_theta,
                scaling: RopeScaling::None,
                partial_rotary_factor: 1.0,
            }
        };
        let mut tokens = SpecialTokens::parse(&f)?;
        let mut tie = f.opt_bool("tie_word_embeddings")?;
        if architecture == Architecture::Gemma3 {
            let outer = SpecialTokens::parse(root)?;
            if tokens.eos.is_empty() {
                tokens.eos = outer.eos;
            }
            tokens.bos = tokens.bos.or(outer.bos);
            tokens.pad = tokens.pad.or(outer.pad);
            tie = tie.or(root.opt_bool("tie_word_embeddings")?);
        }
        if tokens.eos.is_empty() && !f.has_key("eos_token_id") {
            tokens.eos = vec![1];
        }
        if !f.has_key("bos_token_id") && tokens.bos.is_none() {
            tokens.bos = Some(2);
        }
        if !f.has_key("pad_token_id") && tokens.pad.is_none() {
            tokens.pad = Some(0);
        }
        Ok(Gemma3Config {
            architecture,
            class_name,
            vocab_size: f.positive_or("vocab_size", 262_208)?,
            hidden_size,
            num_hidden_layers,
            num_attention_heads: heads.heads,
            num_key_value_heads: heads.kv_heads,
            head_dim: heads.head_dim,
            intermediate_size: f.req_positive("intermediate_size")?,
            rms_norm_eps: f.positive_f64_or("rms_norm_eps", 1e-6)?,
            rope_global: global.parse()?,
            rope_local,
            query_pre_attn_scalar: f.positive_f64_or("query_pre_attn_scalar", 256.0)?,
            sliding_window: f.positive_or("sliding_window", 4096)?,
            layer_types,
            final_logit_softcapping: f.opt_positive_f64("final_logit_softcapping")?,
            attn_logit_softcapping: f.opt_positive_f64("attn_logit_softcapping")?,
            hidden_activation: f
                .str_or("hidden_activation", "gelu_pytorch_tanh")?
                .to_string(),
            tie_word_embeddings: tie.unwrap_or(true),
            max_position_embeddings,
            attention_bias: f.bool_or("attention_bias", false)?,
            tokens,
        })
    }
}

//! Llama-style decoders with grouped-query attention: Llama, Mistral, Qwen2, Qwen3, and the
//! Qwen3 mixture-of-experts variant.

use super::rope::{RopeConfig, RopeSource};
use super::{Architecture, SpecialTokens};
use crate::error::Result;
use crate::json::Fields;
use serde::Serialize;

/// Which member of the Llama family a [`LlamaConfig`] describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LlamaFamily {
    Llama,
    /// Sliding-window attention on every layer when `sliding_window` is set.
    Mistral,
    /// Biases on q/k/v (not o); optional sliding window on layers ≥ `max_window_layers`.
    Qwen2,
    /// Per-head RMSNorm of q and k before RoPE.
    Qwen3,
}

/// Attention span of one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerAttention {
    /// Attends to every previous position.
    Full,
    /// Attends to the last `sliding_window` positions only.
    Sliding,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LlamaConfig {
    pub architecture: Architecture,
    pub class_name: String,
    pub family: LlamaFamily,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Default `num_attention_heads`.
    pub num_key_value_heads: usize,
    /// Default hidden_size / num_attention_heads.
    pub head_dim: usize,
    pub intermediate_size: usize,
    /// Default 1e-6.
    pub rms_norm_eps: f64,
    pub rope: RopeConfig,
    /// Default false.
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v projections: `attention_bias` (default false), always true for Qwen2.
    pub qkv_bias: bool,
    /// Bias on o_proj: `attention_bias` (default false), always false for Qwen2.
    pub o_bias: bool,
    /// Biases on the MLP projections: `mlp_bias`, default false.
    pub mlp_bias: bool,
    /// Per-head q/k RMSNorm (Qwen3).
    pub qk_norm: bool,
    /// Window of the sliding layers; `None` when no layer slides.
    pub sliding_window: Option<usize>,
    pub layer_types: Vec<LayerAttention>,
    pub max_position_embeddings: usize,
    /// Default "silu".
    pub hidden_act: String,
    pub tokens: SpecialTokens,
}

impl LlamaConfig {
    pub(crate) fn parse(
        f: &Fields<'_>,
        architecture: Architecture,
        class_name: String,
    ) -> Result<LlamaConfig> {
        let family = match architecture {
            Architecture::Mistral => LlamaFamily::Mistral,
            Architecture::Qwen2 => LlamaFamily::Qwen2,
            Architecture::Qwen3 => LlamaFamily::Qwen3,
            _ => LlamaFamily::Llama,
        };
        let hidden_size = f.req_positive("hidden_size")?;
        let num_hidden_layers = f.req_layer_count("num_hidden_layers")?;
        let heads = parse_heads(f, hidden_size)?;
        let default_max_positions = match family {
            LlamaFamily::Llama => 2048,
            LlamaFamily::Mistral => 131_072,
            LlamaFamily::Qwen2 | LlamaFamily::Qwen3 => 32_768,
        };
        let max_position_embeddings =
            f.positive_or("max_position_embeddings", default_max_positions)?;
        let (layer_types, sliding_window) = match family {
            LlamaFamily::Llama => (vec![LayerAttention::Full; num_hidden_layers], None),
            LlamaFamily::Mistral => {
                let window = f.opt_positive("sliding_window")?;
                let kind = if window.is_some() {
                    LayerAttention::Sliding
                } else {
                    LayerAttention::Full
                };
                (vec![kind; num_hidden_layers], window)
            }
            LlamaFamily::Qwen2 | LlamaFamily::Qwen3 => qwen_sliding(f, num_hidden_layers)?,
        };
        let attention_bias = f.bool_or("attention_bias", false)?;
        Ok(LlamaConfig {
            architecture,
            class_name,
            family,
            vocab_size: f.req_positive("vocab_size")?,
            hidden_size,
            num_hidden_layers,
            num_attention_heads: heads.heads,
            num_key_value_heads: heads.kv_heads,
            head_dim: heads.head_dim,
            intermediate_size: f.req_positive("intermediate_size")?,
            rms_norm_eps: f.positive_f64_or("rms_norm_eps", 1e-6)?,
            rope: RopeSource {
                root: *f,
                layer_type: "full_attention",
                default_theta: 10_000.0,
                max_position_embeddings,
            }
            .parse()?,
            tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
            qkv_bias: family == LlamaFamily::Qwen2 || attention_bias,
            o_bias: family != LlamaFamily::Qwen2 && attention_bias,
            mlp_bias: f.bool_or("mlp_bias", false)?,
            qk_norm: family == LlamaFamily::Qwen3,
            sliding_window,
            layer_types,
            max_position_embeddings,
            hidden_act: f.str_or("hidden_act", "silu")?.to_string(),
            tokens: SpecialTokens::parse(f)?,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Qwen3MoeConfig {
    pub class_name: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    /// FFN width of the dense layers (`mlp_only_layers` and off-step layers).
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    /// Default false (transformers' class default; released checkpoints set true).
    pub norm_topk_prob: bool,
    /// Every `decoder_sparse_step`-th layer is MoE (default 1).
    pub decoder_sparse_step: usize,
    /// Layers forced dense (default none).
    pub mlp_only_layers: Vec<usize>,
    pub rms_norm_eps: f64,
    pub rope: RopeConfig,
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v/o (default false).
    pub attention_bias: bool,
    pub sliding_window: Option<usize>,
    pub layer_types: Vec<LayerAttention>,
    pub max_position_embeddings: usize,
    pub hidden_act: String,
    pub tokens: SpecialTokens,
}

impl Qwen3MoeConfig {
    pub(crate) fn parse(f: &Fields<'_>, class_name: String) -> Result<Qwen3MoeConfig> {
        let hidden_size = f.req_positive("hidden_size")?;
        let num_hidden_layers = f.req_layer_count("num_hidden_layers")?;
        let heads = parse_heads(f, hidden_size)?;
        // transformers 5 saves the expert count under its alias `num_local_experts`.
        let experts_key = if !f.has("num_experts") && f.has("num_local_experts") {
            "num_local_experts"
        } else {
            "num_experts"
        };
        let num_experts = f.req_count(experts_key)?;
        let num_experts_per_tok = f.req_count("num_experts_per_tok")?;
        if num_experts_per_tok > num_experts {
            return Err(f.err(
                "num_experts_per_tok",
                format!("is {num_experts_per_tok}, more than num_experts {num_experts}"),
            ));
        }
        let max_position_embeddings = f.positive_or("max_position_embeddings", 32_768)?;
        let (layer_types, sliding_window) = qwen_sliding(f, num_hidden_layers)?;
        Ok(Qwen3MoeConfig {
            class_name,
            vocab_size: f.req_positive("vocab_size")?,
            hidden_size,
            num_hidden_layers,
            num_attention_heads: heads.heads,
            num_key_value_heads: heads.kv_heads,
            head_dim: heads.head_dim,
            intermediate_size: f.req_positive("intermediate_size")?,
            moe_intermediate_size: f.req_positive("moe_intermediate_size")?,
            num_experts,
            num_experts_per_tok,
            norm_topk_prob: f.bool_or("norm_topk_prob", false)?,
            decoder_sparse_step: f.positive_or("decoder_sparse_step", 1)?,
            mlp_only_layers: f.opt_count_list("mlp_only_layers")?.unwrap_or_default(),
            rms_norm_eps: f.positive_f64_or("rms_norm_eps", 1e-6)?,
            rope: RopeSource {
                root: *f,
                layer_type: "full_attention",
                default_theta: 10_000.0,
                max_position_embeddings,
            }
            .parse()?,
            tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
            attention_bias: f.bool_or("attention_bias", false)?,
            sliding_window,
            layer_types,
            max_position_embeddings,
            hidden_act: f.str_or("hidden_act", "silu")?.to_string(),
            tokens: SpecialTokens::parse(f)?,
        })
    }

    /// Whether layer `layer` has a MoE FFN (transformers' rule).
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        !self.mlp_only_layers.contains(&layer)
            && self.num_experts > 0
            && layer % self.decoder_sparse_step == self.decoder_sparse_step - 1
    }
}

/// Head counts of a grouped-query attention block.
pub(crate) struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// `num_attention_heads`, `num_key_value_heads` (default = heads) and `head_dim`
/// (default hidden / heads), checked for consistency.
pub(crate) fn parse_heads(f: &Fields<'_>, hidden_size: usize) -> Result<Heads> {
    let heads = f.req_positive("num_attention_heads")?;
    parse_heads_with_defaults(f, hidden_size, heads, heads, None)
}

pub(crate) fn parse_heads_with_defaults(
    f: &Fields<'_>,
    hidden_size: usize,
    heads: usize,
    default_kv_heads: usize,
    default_head_dim: Option<usize>,
) -> Result<Heads> {
    let kv_heads = f.positive_or("num_key_value_heads", default_kv_heads)?;
    if kv_heads > heads || !heads.is_multiple_of(kv_heads) {
        return Err(f.err(
            "num_key_value_heads",
            format!("is {kv_heads}, which does not divide num_attention_heads {heads}"),
        ));
    }
    let head_dim = match (f.opt_positive("head_dim")?, default_head_dim) {
        (Some(d), _) | (None, Some(d)) => d,
        (None, None) if hidden_size.is_multiple_of(heads) => hidden_size / heads,
        (None, None) => {
            return Err(f.err(
                "head_dim",
                format!(
                    "missing, and hidden_size {hidden_size} is not divisible by \
                     num_attention_heads {heads}"
                ),
            ));
        }
    };
    Ok(Heads {
        heads,
        kv_heads,
        head_dim,
    })
}

/// Per-layer attention kinds from an explicit `layer_types` list, checked against the layer
/// count; `None` when the list is absent.
pub(crate) fn explicit_layer_types(
    f: &Fields<'_>,
    num_layers: usize,
) -> Result<Option<Vec<LayerAttention>>> {
    let Some(types) = f.opt_str_list("layer_types")? else {
        return Ok(None);
    };
    if types.len() != num_layers {
        return Err(f.err(
            "layer_types",
            format!(
                "has {} entries, expected one per layer ({num_layers})",
                types.len()
            ),
        ));
    }
    types
        .iter()
        .map(|t| match *t {
            "full_attention" => Ok(LayerAttention::Full),
            "sliding_attention" => Ok(LayerAttention::Sliding),
            other => Err(f.err(
                "layer_types",
                format!("expected \"full_attention\" or \"sliding_attention\", got `{other}`"),
            )),
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// Qwen2/Qwen3 sliding windows: `layer_types` when given, else layers ≥ `max_window_layers`
/// slide when `use_sliding_window` is true. The window is only reported when some layer
/// uses it (Qwen configs carry a `sliding_window` value even when it is switched off).
fn qwen_sliding(f: &Fields<'_>, num_layers: usize) -> Result<(Vec<LayerAttention>, Option<usize>)> {
    let use_sliding = f.bool_or("use_sliding_window", false)?;
    let types = match explicit_layer_types(f, num_layers)? {
        Some(types) => types,
        None => {
            let first_sliding = f.count_or("max_window_layers", num_layers)?;
            (0..num_layers)
                .map(|i| {
                    if use_sliding && i >= first_sliding {
                        LayerAttention::Sliding
                    } else {
                        LayerAttention::Full
                    }
                })
                .collect()
        }
    };
    let window = f.opt_positive("sliding_window")?;
    if !types.contains(&LayerAttention::Sliding) {
        return Ok((types, None));
    }
    match window {
        Some(w) => Ok((types, Some(w))),
        None => Err(f.err(
            "sliding_window",
            "missing, but some layers use sliding-window attention",
        )),
    }
}

//! GLM-4.7-Flash (`glm4_moe_lite`) and the DeepSeek-V2/V3 family: multi-head latent
//! attention (MLA) with a DeepSeek-style mixture of experts.

use super::rope::{RopeConfig, RopeSource};
use super::{Architecture, SpecialTokens};
use crate::error::Result;
use crate::json::Fields;
use serde::Serialize;

/// How router logits become expert scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScoringFunc {
    Softmax,
    Sigmoid,
}

/// How the top-k experts are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TopkMethod {
    /// Plain top-k over all experts (DeepSeek-V2 default).
    Greedy,
    /// Top-k within the best `topk_group` of `n_group` groups, by the group maximum.
    GroupLimitedGreedy,
    /// DeepSeek-V3 / GLM: selection on scores plus `e_score_correction_bias`, groups ranked by
    /// the sum of their top-2 scores; weights from the unbiased scores.
    NoauxTc,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MlaMoeConfig {
    pub architecture: Architecture,
    pub class_name: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Main decoder layers; MTP layers follow at indices `num_hidden_layers..`.
    pub num_hidden_layers: usize,
    /// FFN width of the dense (non-MoE) layers.
    pub intermediate_size: usize,
    /// FFN width of each routed expert (and of each shared expert).
    pub moe_intermediate_size: usize,
    pub n_routed_experts: usize,
    pub n_shared_experts: usize,
    pub num_experts_per_tok: usize,
    /// Layers `0..first_k_dense_replace` are dense.
    pub first_k_dense_replace: usize,
    /// Default 1.
    pub moe_layer_freq: usize,
    /// Default 1 (no group limit) when absent.
    pub n_group: usize,
    /// Default 1 when absent.
    pub topk_group: usize,
    /// Default `noaux_tc` for glm4_moe_lite and deepseek_v3, `greedy` for deepseek_v2.
    pub topk_method: TopkMethod,
    /// Default sigmoid for glm4_moe_lite and deepseek_v3, softmax for deepseek_v2.
    pub scoring_func: ScoringFunc,
    /// Default 1.0.
    pub routed_scaling_factor: f64,
    /// Default true for glm4_moe_lite and deepseek_v3, false for deepseek_v2.
    pub norm_topk_prob: bool,
    /// `None` (JSON null) means a direct `q_proj` instead of `q_a_proj`/`q_b_proj`.
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub num_attention_heads: usize,
    pub rms_norm_eps: f64,
    pub rope: RopeConfig,
    /// GPT-J style (interleaved pairs) rotation of the rope slice. Default true: GLM's class
    /// default, and what DeepSeek checkpoints need (their q/k rope dims are stored
    /// interleaved).
    pub rope_interleave: bool,
    pub max_position_embeddings: usize,
    /// Default false.
    pub tie_word_embeddings: bool,
    /// Default 0.
    pub num_nextn_predict_layers: usize,
    /// Default false.
    pub attention_bias: bool,
    /// Default "silu".
    pub hidden_act: String,
    pub tokens: SpecialTokens,
    /// Per main layer: true when its FFN is a mixture of experts. From `mlp_layer_types` when
    /// present, else `n_routed_experts > 0 && i ≥ first_k_dense_replace && i % moe_layer_freq == 0`.
    pub moe_layers: Vec<bool>,
}

impl MlaMoeConfig {
    pub(crate) fn parse(
        f: &Fields<'_>,
        architecture: Architecture,
        class_name: String,
    ) -> Result<MlaMoeConfig> {
        let deepseek_v2 = architecture == Architecture::DeepseekV2;
        let num_hidden_layers = f.req_layer_count("num_hidden_layers")?;
        let n_routed_experts = f.req_count("n_routed_experts")?;
        let num_experts_per_tok = f.req_count("num_experts_per_tok")?;
        if num_experts_per_tok > n_routed_experts {
            return Err(f.err(
                "num_experts_per_tok",
                format!("is {num_experts_per_tok}, more than n_routed_experts {n_routed_experts}"),
            ));
        }
        let first_k_dense_replace = f.count_or("first_k_dense_replace", 0)?;
        let moe_layer_freq = f.positive_or("moe_layer_freq", 1)?;
        let n_group = f.positive_or("n_group", 1)?;
        let topk_group = f.positive_or("topk_group", 1)?;
        if topk_group > n_group {
            return Err(f.err(
                "topk_group",
                format!("is {topk_group}, more than n_group {n_group}"),
            ));
        }
        let topk_method = match f.opt_str("topk_method")? {
            None if deepseek_v2 => TopkMethod::Greedy,
            None => TopkMethod::NoauxTc,
            Some("greedy") => TopkMethod::Greedy,
            Some("group_limited_greedy") => TopkMethod::GroupLimitedGreedy,
            Some("noaux_tc") => TopkMethod::NoauxTc,
            Some(other) => {
                return Err(f.err(
                    "topk_method",
                    format!("expected greedy, group_limited_greedy or noaux_tc, got `{other}`"),
                ));
            }
        };
        let scoring_func = match f.opt_str("scoring_func")? {
            None if deepseek_v2 => ScoringFunc::Softmax,
            None => ScoringFunc::Sigmoid,
            Some("softmax") => ScoringFunc::Softmax,
            Some("sigmoid") => ScoringFunc::Sigmoid,
            Some(other) => {
                return Err(f.err(
                    "scoring_func",
                    format!("expected softmax or sigmoid, got `{other}`"),
                ));
            }
        };
        // Required even though it may be null: a silently defaulted rank would look for
        // tensors that do not exist.
        let q_lora_rank = if f.has_key("q_lora_rank") {
            f.opt_positive("q_lora_rank")?
        } else {
            return Err(f.err(
                "q_lora_rank",
                "missing (use null for models with a direct q_proj)",
            ));
        };
        let max_position_embeddings = f.req_positive("max_position_embeddings")?;
        let moe_layers = match f.opt_str_list("mlp_layer_types")? {
            Some(types) => {
                if types.len() != num_hidden_layers {
                    return Err(f.err(
                        "mlp_layer_types",
                        format!(
                            "has {} entries, expected one per layer ({num_hidden_layers})",
                            types.len()
                        ),
                    ));
                }
                types
                    .iter()
                    .map(|t| match *t {
                        "dense" => Ok(false),
                        "sparse" => Ok(true),
                        other => Err(f.err(
                            "mlp_layer_types",
                            format!("expected \"dense\" or \"sparse\" entries, got `{other}`"),
                        )),
                    })
                    .collect::<Result<Vec<bool>>>()?
            }
            None => (0..num_hidden_layers)
                .map(|i| {
                    n_routed_experts > 0
                        && i >= first_k_dense_replace
                        && i.is_multiple_of(moe_layer_freq)
                })
                .collect(),
        };
        Ok(MlaMoeConfig {
            architecture,
            class_name,
            vocab_size: f.req_positive("vocab_size")?,
            hidden_size: f.req_positive("hidden_size")?,
            num_hidden_layers,
            intermediate_size: f.req_positive("intermediate_size")?,
            moe_intermediate_size: f.req_positive("moe_intermediate_size")?,
            n_routed_experts,
            n_shared_experts: f.count_or("n_shared_experts", 0)?,
            num_experts_per_tok,
            first_k_dense_replace,
            moe_layer_freq,
            n_group,
            topk_group,
            topk_method,
            scoring_func,
            routed_scaling_factor: f.positive_f64_or("routed_scaling_factor", 1.0)?,
            norm_topk_prob: f.bool_or("norm_topk_prob", !deepseek_v2)?,
            q_lora_rank,
            kv_lora_rank: f.req_positive("kv_lora_rank")?,
            qk_nope_head_dim: f.req_positive("qk_nope_head_dim")?,
            qk_rope_head_dim: f.req_positive("qk_rope_head_dim")?,
            v_head_dim: f.req_positive("v_head_dim")?,
            num_attention_heads: f.req_positive("num_attention_heads")?,
            rms_norm_eps: f.positive_f64_or("rms_norm_eps", 1e-6)?,
            rope: RopeSource {
                root: *f,
                layer_type: "full_attention",
                default_theta: 10_000.0,
                max_position_embeddings,
            }
            .parse()?,
            rope_interleave: f.bool_or("rope_interleave", true)?,
            max_position_embeddings,
            tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
            num_nextn_predict_layers: f.count_or("num_nextn_predict_layers", 0)?,
            attention_bias: f.bool_or("attention_bias", false)?,
            hidden_act: f.str_or("hidden_act", "silu")?.to_string(),
            tokens: SpecialTokens::parse(f)?,
            moe_layers,
        })
    }

    /// Query/key head width: nope + rope part.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim.saturating_add(self.qk_rope_head_dim)
    }

    /// Width of one token's cached latent per layer: kv_lora_rank + qk_rope_head_dim.
    pub fn kv_latent_dim(&self) -> usize {
        self.kv_lora_rank.saturating_add(self.qk_rope_head_dim)
    }

    /// Whether layer `layer` has a MoE FFN. Past the main layers (MTP layers) the
    /// `first_k_dense_replace` / `moe_layer_freq` rule applies.
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.moe_layers.get(layer).copied().unwrap_or_else(|| {
            self.n_routed_experts > 0
                && layer >= self.first_k_dense_replace
                && layer.is_multiple_of(self.moe_layer_freq)
        })
    }
}

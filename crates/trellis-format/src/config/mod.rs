//! `config.json` → one typed config per architecture family.
//!
//! The architecture is chosen by `model_type`, falling back to the first known class in
//! `architectures`. Required fields without a sensible default are errors when missing;
//! optional ones take the defaults of the corresponding transformers config class, noted on
//! each field.

mod gemma3;
mod llama;
mod mla;
mod rope;

pub use gemma3::Gemma3Config;
pub use llama::{LayerAttention, LlamaConfig, LlamaFamily, Qwen3MoeConfig};
pub use mla::{MlaMoeConfig, ScoringFunc, TopkMethod};
pub use rope::{RopeConfig, RopeScaling};

use crate::error::{FormatError, Result};
use crate::json::Fields;
use serde::Serialize;
use std::path::Path;

/// The label used in errors when a config does not come from a known file.
pub const CONFIG_FILE: &str = "config.json";

/// Every architecture this crate parses a config for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Architecture {
    /// GLM-4.7-Flash (`Glm4MoeLiteForCausalLM`): MLA attention + DeepSeek-V3-style MoE.
    Glm4MoeLite,
    DeepseekV2,
    DeepseekV3,
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Qwen3Moe,
    /// Text-only Gemma 3 (`Gemma3ForCausalLM`).
    Gemma3Text,
    /// Multimodal Gemma 3 (`Gemma3ForConditionalGeneration`); only `text_config` is used.
    Gemma3,
}

impl Architecture {
    pub const ALL: [Architecture; 10] = [
        Architecture::Glm4MoeLite,
        Architecture::DeepseekV2,
        Architecture::DeepseekV3,
        Architecture::Llama,
        Architecture::Mistral,
        Architecture::Qwen2,
        Architecture::Qwen3,
        Architecture::Qwen3Moe,
        Architecture::Gemma3Text,
        Architecture::Gemma3,
    ];

    /// The `model_type` value in `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Glm4MoeLite => "glm4_moe_lite",
            Architecture::DeepseekV2 => "deepseek_v2",
            Architecture::DeepseekV3 => "deepseek_v3",
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
            Architecture::Qwen3Moe => "qwen3_moe",
            Architecture::Gemma3Text => "gemma3_text",
            Architecture::Gemma3 => "gemma3",
        }
    }

    /// The transformers class name in `config.json` → `architectures`.
    pub fn class_name(self) -> &'static str {
        match self {
            Architecture::Glm4MoeLite => "Glm4MoeLiteForCausalLM",
            Architecture::DeepseekV2 => "DeepseekV2ForCausalLM",
            Architecture::DeepseekV3 => "DeepseekV3ForCausalLM",
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Qwen3 => "Qwen3ForCausalLM",
            Architecture::Qwen3Moe => "Qwen3MoeForCausalLM",
            Architecture::Gemma3Text => "Gemma3ForCausalLM",
            Architecture::Gemma3 => "Gemma3ForConditionalGeneration",
        }
    }

    pub fn from_model_type(model_type: &str) -> Option<Architecture> {
        Architecture::ALL
            .into_iter()
            .find(|a| a.model_type() == model_type)
    }

    pub fn from_class_name(class: &str) -> Option<Architecture> {
        Architecture::ALL
            .into_iter()
            .find(|a| a.class_name() == class)
    }

    /// "glm4_moe_lite (Glm4MoeLiteForCausalLM), …" for error messages.
    pub fn supported_list() -> String {
        let names: Vec<String> = Architecture::ALL
            .iter()
            .map(|a| format!("{} ({})", a.model_type(), a.class_name()))
            .collect();
        names.join(", ")
    }
}

/// Special token ids from `config.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SpecialTokens {
    /// `eos_token_id`, given as one id or a list.
    pub eos: Vec<u32>,
    pub bos: Option<u32>,
    pub pad: Option<u32>,
}

impl SpecialTokens {
    pub(crate) fn parse(fields: &Fields<'_>) -> Result<SpecialTokens> {
        Ok(SpecialTokens {
            eos: fields.opt_token_list("eos_token_id")?.unwrap_or_default(),
            bos: fields.opt_token("bos_token_id")?,
            pad: fields.opt_token("pad_token_id")?,
        })
    }
}

/// What every architecture has, for front ends that do not care about the family.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CommonConfig {
    /// Class name, e.g. `Glm4MoeLiteForCausalLM`.
    pub architecture: String,
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Main decoder layers (MTP layers not included).
    pub num_layers: usize,
    pub max_position_embeddings: usize,
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    pub tie_word_embeddings: bool,
}

/// A parsed `config.json`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "family", rename_all = "snake_case")]
pub enum ModelConfig {
    /// GLM-4.7-Flash and the DeepSeek-V2/V3 family.
    MlaMoe(MlaMoeConfig),
    /// Llama, Mistral, Qwen2, Qwen3.
    Llama(LlamaConfig),
    Qwen3Moe(Qwen3MoeConfig),
    Gemma3(Gemma3Config),
}

impl ModelConfig {
    /// Parse a config; errors are labelled `config.json`.
    pub fn from_json(value: &serde_json::Value) -> Result<ModelConfig> {
        ModelConfig::from_json_labeled(value, CONFIG_FILE)
    }

    /// Read and parse a `config.json` file; errors name the file.
    pub fn from_file(path: &Path) -> Result<(ModelConfig, serde_json::Value)> {
        let value = read_json(path)?;
        let config = ModelConfig::from_json_labeled(&value, &path.display().to_string())?;
        Ok((config, value))
    }

    /// Parse a config; `label` names the source in error messages.
    pub fn from_json_labeled(value: &serde_json::Value, label: &str) -> Result<ModelConfig> {
        let fields = Fields::root(value, label)?;
        let architecture = detect_architecture(&fields)?;
        let class_name = class_name_of(&fields, architecture)?;
        Ok(match architecture {
            Architecture::Glm4MoeLite | Architecture::DeepseekV2 | Architecture::DeepseekV3 => {
                ModelConfig::MlaMoe(MlaMoeConfig::parse(&fields, architecture, class_name)?)
            }
            Architecture::Llama
            | Architecture::Mistral
            | Architecture::Qwen2
            | Architecture::Qwen3 => {
                ModelConfig::Llama(LlamaConfig::parse(&fields, architecture, class_name)?)
            }
            Architecture::Qwen3Moe => {
                ModelConfig::Qwen3Moe(Qwen3MoeConfig::parse(&fields, class_name)?)
            }
            Architecture::Gemma3Text | Architecture::Gemma3 => {
                ModelConfig::Gemma3(Gemma3Config::parse(&fields, architecture, class_name)?)
            }
        })
    }

    pub fn architecture(&self) -> Architecture {
        match self {
            ModelConfig::MlaMoe(c) => c.architecture,
            ModelConfig::Llama(c) => c.architecture,
            ModelConfig::Qwen3Moe(_) => Architecture::Qwen3Moe,
            ModelConfig::Gemma3(c) => c.architecture,
        }
    }

    pub fn common(&self) -> CommonConfig {
        let architecture = self.architecture();
        let (class_name, vocab, hidden, layers, max_pos, tokens, tie) = match self {
            ModelConfig::MlaMoe(c) => (
                &c.class_name,
                c.vocab_size,
                c.hidden_size,
                c.num_hidden_layers,
                c.max_position_embeddings,
                &c.tokens,
                c.tie_word_embeddings,
            ),
            ModelConfig::Llama(c) => (
                &c.class_name,
                c.vocab_size,
                c.hidden_size,
                c.num_hidden_layers,
                c.max_position_embeddings,
                &c.tokens,
                c.tie_word_embeddings,
            ),
            ModelConfig::Qwen3Moe(c) => (
                &c.class_name,
                c.vocab_size,
                c.hidden_size,
                c.num_hidden_layers,
                c.max_position_embeddings,
                &c.tokens,
                c.tie_word_embeddings,
            ),
            ModelConfig::Gemma3(c) => (
                &c.class_name,
                c.vocab_size,
                c.hidden_size,
                c.num_hidden_layers,
                c.max_position_embeddings,
                &c.tokens,
                c.tie_word_embeddings,
            ),
        };
        CommonConfig {
            architecture: class_name.clone(),
            model_type: architecture.model_type().to_string(),
            vocab_size: vocab,
            hidden_size: hidden,
            num_layers: layers,
            max_position_embeddings: max_pos,
            eos_token_ids: tokens.eos.clone(),
            bos_token_id: tokens.bos,
            pad_token_id: tokens.pad,
            tie_word_embeddings: tie,
        }
    }

    /// Values one token adds to the KV cache over all main layers.
    ///
    /// MLA caches the compressed latent and the shared rope key:
    /// layers × (kv_lora_rank + qk_rope_head_dim). Other families cache K and V:
    /// layers × 2 × kv_heads × head_dim. For Gemma 3 the sliding-window layers are counted
    /// in full too; that is the per-token cost up to the window length, an upper bound beyond.
    pub fn kv_cache_values_per_token(&self) -> usize {
        let gqa = |layers: usize, kv_heads: usize, head_dim: usize| {
            layers
                .saturating_mul(2)
                .saturating_mul(kv_heads)
                .saturating_mul(head_dim)
        };
        match self {
            ModelConfig::MlaMoe(c) => c
                .num_hidden_layers
                .saturating_mul(c.kv_lora_rank.saturating_add(c.qk_rope_head_dim)),
            ModelConfig::Llama(c) => gqa(c.num_hidden_layers, c.num_key_value_heads, c.head_dim),
            ModelConfig::Qwen3Moe(c) => gqa(c.num_hidden_layers, c.num_key_value_heads, c.head_dim),
            ModelConfig::Gemma3(c) => gqa(c.num_hidden_layers, c.num_key_value_heads, c.head_dim),
        }
    }
}

/// Read a JSON file; errors name the file.
pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| FormatError::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| FormatError::Json {
        path: path.to_path_buf(),
        source,
    })
}

fn detect_architecture(fields: &Fields<'_>) -> Result<Architecture> {
    let model_type = fields.opt_str("model_type")?;
    let classes = fields.opt_str_list("architectures")?.unwrap_or_default();
    if let Some(arch) = model_type.and_then(Architecture::from_model_type) {
        return Ok(arch);
    }
    if let Some(arch) = classes
        .iter()
        .find_map(|c| Architecture::from_class_name(c))
    {
        return Ok(arch);
    }
    let found = match (model_type, classes.is_empty()) {
        (None, true) => "(neither `model_type` nor `architectures` is set)".to_string(),
        (Some(t), true) => format!("model_type `{t}`"),
        (None, false) => format!("architectures {classes:?}"),
        (Some(t), false) => format!("model_type `{t}` / architectures {classes:?}"),
    };
    Err(FormatError::UnknownArchitecture {
        file: fields.file.to_string(),
        found,
        supported: Architecture::supported_list(),
    })
}

/// The class named in `architectures` that belongs to `arch`, else its canonical name.
fn class_name_of(fields: &Fields<'_>, arch: Architecture) -> Result<String> {
    let classes = fields.opt_str_list("architectures")?.unwrap_or_default();
    Ok(classes
        .iter()
        .find(|c| Architecture::from_class_name(c) == Some(arch))
        .or(classes.first())
        .map_or_else(|| arch.class_name().to_string(), |c| c.to_string()))
}

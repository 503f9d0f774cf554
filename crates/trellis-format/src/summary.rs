//! The model summary behind `trellis inspect`: parameters, bits per weight, codebooks, the
//! stored tensors and the KV-cache cost.
//!
//! Parameter counts are those of the *stored* model, counted logically: each EXL3 linear
//! counts in_features × out_features with the unpadded sizes (plus its bias), each dense
//! tensor its element count; EXL3 side tensors (suh/svh/markers) are not parameters. A model
//! whose original ties `lm_head` to the embedding but whose EXL3 conversion stores a separate
//! quantized `lm_head` therefore counts the head once more than the original did.
//!
//! Logical sizes of EXL3 linears come from the config for the architectures this crate knows
//! (the trellis only records sizes padded to 128, e.g. GLM's `kv_a_proj_with_mqa` is 576 wide
//! but stored as 640). For a linear whose name is not recognised the padded sizes are used,
//! and the summary says so in `notes`.

use crate::config::ModelConfig;
use crate::dtype::DType;
use crate::error::Result;
use crate::linear::TrellisShape;
use crate::model_dir::ModelDir;
use crate::quant::QuantizationConfig;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use trellis_codec::BitWidth;

/// Suffixes of the tensors that belong to an EXL3 linear group next to its `.trellis`.
const GROUP_SUFFIXES: [&str; 8] = ["trellis", "suh", "svh", "su", "sv", "mul1", "mcg", "bias"];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TensorKind {
    /// An EXL3 linear group (reported under its module name).
    Exl3,
    /// A plain tensor.
    Dense,
}

/// One row of the tensor list: an EXL3 linear (all its tensors together) or a dense tensor.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TensorSummary {
    /// Module name for EXL3 linears (`….q_proj`), tensor name for dense tensors.
    pub name: String,
    pub kind: TensorKind,
    /// dtype of the tensor (for EXL3: of `.trellis`).
    pub dtype: DType,
    /// Stored shape (for EXL3: of `.trellis`, `[k/16, n/16, 16·K]`).
    pub shape: Vec<usize>,
    /// Bits per weight K (EXL3 only).
    pub bits: Option<f64>,
    /// Codebook name (EXL3 only).
    pub codebook: Option<&'static str>,
    /// Stored bytes (for EXL3: all tensors of the group).
    pub bytes: u64,
    /// Logical parameters.
    pub parameters: u64,
    /// Logical (unpadded) input / output features (EXL3 only).
    pub in_features: Option<usize>,
    pub out_features: Option<usize>,
    /// Padded sizes as stored (EXL3 only).
    pub in_padded: Option<usize>,
    pub out_padded: Option<usize>,
    /// False when the logical sizes were not derivable from the config and the padded
    /// sizes were used instead.
    pub logical_from_config: bool,
}

/// How many EXL3 linears, and how many of their weights, use one bit width.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BpwBucket {
    pub bits: f64,
    pub linears: usize,
    pub weights: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelSummary {
    pub path: String,
    /// Class name, e.g. `Glm4MoeLiteForCausalLM`.
    pub architecture: String,
    pub model_type: String,
    /// Logical parameters of the stored model (see the module docs).
    pub parameters: u64,
    pub exl3_parameters: u64,
    pub dense_parameters: u64,
    pub total_file_bytes: u64,
    pub files: Vec<String>,
    pub exl3_linears: usize,
    /// Mean K over EXL3 linears weighted by their logical weights, without `lm_head`.
    pub bpw_excluding_head: Option<f64>,
    /// The same including `lm_head`.
    pub bpw_including_head: Option<f64>,
    /// Every stored byte of the EXL3 groups (padding, suh/svh, markers) × 8 per logical weight.
    pub exl3_storage_bpw: Option<f64>,
    pub bpw_histogram: Vec<BpwBucket>,
    pub codebooks: Vec<&'static str>,
    pub dense_tensors: Vec<String>,
    /// KV-cache values per token times 2 bytes (f16), all main layers.
    pub kv_cache_bytes_per_token: u64,
    pub quantization: Option<QuantizationConfig>,
    pub tensors: Vec<TensorSummary>,
    pub notes: Vec<String>,
}

/// Summarise a model directory. Fails when a tensor group is invalid or a known linear's
/// stored shape disagrees with the config.
pub fn summarize(dir: &ModelDir) -> Result<ModelSummary> {
    let store = &dir.tensors;
    let common = dir.config.common();
    let prefixes: Vec<&str> = store
        .names()
        .filter_map(|n| n.strip_suffix(".trellis"))
        .collect();
    let mut grouped: BTreeSet<String> = BTreeSet::new();
    for prefix in &prefixes {
        for suffix in GROUP_SUFFIXES {
            grouped.insert(format!("{prefix}.{suffix}"));
        }
    }

    let mut tensors = Vec::new();
    let mut notes = Vec::new();
    let mut histogram: BTreeMap<BitWidth, (usize, u64)> = BTreeMap::new();
    let mut codebooks = BTreeSet::new();
    let (mut exl3_parameters, mut dense_parameters) = (0u64, 0u64);
    let (mut bit_weights_all, mut weights_all) = (0f64, 0u64);
    let (mut bit_weights_body, mut weights_body) = (0f64, 0u64);
    let mut exl3_bytes = 0u64;
    let mut unknown = Vec::new();

    for prefix in &prefixes {
        let logical = logical_linear_shape(&dir.config, prefix);
        if logical.is_none() {
            unknown.push(prefix.to_string());
        }
        let linear = store.trellis_linear(prefix, logical)?;
        let shape: TrellisShape = store.trellis_shape(prefix)?;
        let trellis = store.get(&format!("{prefix}.trellis"))?;
        let bytes: u64 = GROUP_SUFFIXES
            .iter()
            .filter_map(|s| store.try_get(&format!("{prefix}.{s}")))
            .map(|v| v.bytes.len() as u64)
            .sum();
        let weights = (linear.in_features as u64).saturating_mul(linear.out_features as u64);
        let parameters = weights.saturating_add(
            linear
                .bias
                .as_ref()
                .map_or(0, |_| linear.out_features as u64),
        );
        exl3_parameters = exl3_parameters.saturating_add(parameters);
        exl3_bytes = exl3_bytes.saturating_add(bytes);
        let bucket = histogram.entry(shape.bits).or_default();
        bucket.0 += 1;
        bucket.1 = bucket.1.saturating_add(weights);
        codebooks.insert(linear.codebook.name());
        let k = shape.bits.as_f64();
        bit_weights_all += k * weights as f64;
        weights_all = weights_all.saturating_add(weights);
        if !is_head(prefix) {
            bit_weights_body += k * weights as f64;
            weights_body = weights_body.saturating_add(weights);
        }
        tensors.push(TensorSummary {
            name: prefix.to_string(),
            kind: TensorKind::Exl3,
            dtype: trellis.dtype,
            shape: trellis.shape.to_vec(),
            bits: Some(k),
            codebook: Some(linear.codebook.name()),
            bytes,
            parameters,
            in_features: Some(linear.in_features),
            out_features: Some(linear.out_features),
            in_padded: Some(shape.k_padded),
            out_padded: Some(shape.n_padded),
            logical_from_config: logical.is_some(),
        });
    }

    let mut dense_tensors = Vec::new();
    for name in store.names() {
        if grouped.contains(name) {
            continue;
        }
        let view = store.get(name)?;
        let parameters = view.numel() as u64;
        dense_parameters = dense_parameters.saturating_add(parameters);
        dense_tensors.push(name.to_string());
        tensors.push(TensorSummary {
            name: name.to_string(),
            kind: TensorKind::Dense,
            dtype: view.dtype,
            shape: view.shape.to_vec(),
            bits: None,
            codebook: None,
            bytes: view.bytes.len() as u64,
            parameters,
            in_features: None,
            out_features: None,
            in_padded: None,
            out_padded: None,
            logical_from_config: true,
        });
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));

    if !unknown.is_empty() {
        notes.push(format!(
            "{} EXL3 linear(s) not recognised for {}; their parameters use padded sizes: {}",
            unknown.len(),
            common.architecture,
            unknown.join(", ")
        ));
    }
    let ratio = |num: f64, den: u64| (den > 0).then(|| num / den as f64);
    Ok(ModelSummary {
        path: dir.path.display().to_string(),
        architecture: common.architecture.clone(),
        model_type: common.model_type.clone(),
        parameters: exl3_parameters.saturating_add(dense_parameters),
        exl3_parameters,
        dense_parameters,
        total_file_bytes: store.total_file_bytes(),
        files: store
            .files()
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
        exl3_linears: prefixes.len(),
        bpw_excluding_head: ratio(bit_weights_body, weights_body),
        bpw_including_head: ratio(bit_weights_all, weights_all),
        exl3_storage_bpw: ratio(exl3_bytes as f64 * 8.0, weights_all),
        bpw_histogram: histogram
            .into_iter()
            .map(|(bits, (linears, weights))| BpwBucket {
                bits: bits.as_f64(),
                linears,
                weights,
            })
            .collect(),
        codebooks: codebooks.into_iter().collect(),
        dense_tensors,
        kv_cache_bytes_per_token: (dir.config.kv_cache_values_per_token() as u64).saturating_mul(2),
        quantization: dir.quantization.clone(),
        tensors,
        notes,
    })
}

/// The output head (`lm_head`, possibly under a wrapper such as `language_model.`).
fn is_head(prefix: &str) -> bool {
    prefix == "lm_head" || prefix.ends_with(".lm_head")
}

/// The part of a tensor prefix after `layers.{i}.`, with the layer index.
fn split_layer(prefix: &str) -> Option<(usize, &str)> {
    let mut search = prefix;
    let mut offset = 0;
    while let Some(pos) = search.find("layers.") {
        let start = offset + pos + "layers.".len();
        let at_boundary = pos == 0 || prefix.as_bytes()[offset + pos - 1] == b'.';
        let tail = &prefix[start..];
        let digits = tail.bytes().take_while(u8::is_ascii_digit).count();
        if at_boundary && digits > 0 && tail.as_bytes().get(digits) == Some(&b'.') {
            let layer = tail[..digits].parse().ok()?;
            return Some((layer, &tail[digits + 1..]));
        }
        offset = start;
        search = &prefix[start..];
    }
    None
}

/// Logical (in_features, out_features) of the linear `prefix` for this config, when the
/// name is one this crate recognises.
pub fn logical_linear_shape(config: &ModelConfig, prefix: &str) -> Option<(usize, usize)> {
    let common = config.common();
    let hidden = common.hidden_size;
    if is_head(prefix) {
        return Some((hidden, common.vocab_size));
    }
    let (_, module) = split_layer(prefix)?;
    // Expert FFNs: `mlp.experts.{e}.{gate,up,down}_proj`.
    let expert_proj = module
        .strip_prefix("mlp.experts.")
        .and_then(|rest| rest.split_once('.'))
        .filter(|(e, _)| !e.is_empty() && e.bytes().all(|b| b.is_ascii_digit()))
        .map(|(_, proj)| proj);
    let ffn = |proj: &str, width: usize| match proj {
        "gate_proj" | "up_proj" => Some((hidden, width)),
        "down_proj" => Some((width, hidden)),
        _ => None,
    };
    match config {
        ModelConfig::MlaMoe(c) => {
            let heads = c.num_attention_heads;
            if let Some(proj) = expert_proj {
                return ffn(proj, c.moe_intermediate_size);
            }
            if let Some(proj) = module.strip_prefix("mlp.shared_experts.") {
                return ffn(proj, mul(c.moe_intermediate_size, c.n_shared_experts));
            }
            if let Some(proj) = module.strip_prefix("mlp.") {
                return match proj {
                    "gate" => Some((hidden, c.n_routed_experts)),
                    _ => ffn(proj, c.intermediate_size),
                };
            }
            match module {
                "self_attn.q_a_proj" => Some((hidden, c.q_lora_rank?)),
                "self_attn.q_b_proj" => Some((c.q_lora_rank?, mul(heads, c.qk_head_dim()))),
                "self_attn.q_proj" => Some((hidden, mul(heads, c.qk_head_dim()))),
                "self_attn.kv_a_proj_with_mqa" => Some((hidden, c.kv_latent_dim())),
                "self_attn.kv_b_proj" => Some((
                    c.kv_lora_rank,
                    mul(heads, c.qk_nope_head_dim.saturating_add(c.v_head_dim)),
                )),
                "self_attn.o_proj" => Some((mul(heads, c.v_head_dim), hidden)),
                "eh_proj" => Some((mul(2, hidden), hidden)),
                "shared_head.head" => Some((hidden, c.vocab_size)),
                _ => None,
            }
        }
        ModelConfig::Llama(c) => gqa_shape(
            module,
            hidden,
            mul(c.num_attention_heads, c.head_dim),
            mul(c.num_key_value_heads, c.head_dim),
            c.intermediate_size,
        ),
        ModelConfig::Gemma3(c) => gqa_shape(
            module,
            hidden,
            mul(c.num_attention_heads, c.head_dim),
            mul(c.num_key_value_heads, c.head_dim),
            c.intermediate_size,
        ),
        ModelConfig::Qwen3Moe(c) => {
            if let Some(proj) = expert_proj {
                return ffn(proj, c.moe_intermediate_size);
            }
            if module == "mlp.gate" {
                return Some((hidden, c.num_experts));
            }
            gqa_shape(
                module,
                hidden,
                mul(c.num_attention_heads, c.head_dim),
                mul(c.num_key_value_heads, c.head_dim),
                c.intermediate_size,
            )
        }
    }
}

/// Sizes come from config files: saturate rather than overflow on absurd values (the
/// shape check against the stored tensors then reports the mismatch).
fn mul(a: usize, b: usize) -> usize {
    a.saturating_mul(b)
}

/// Attention and dense-FFN linears of a grouped-query-attention layer.
fn gqa_shape(
    module: &str,
    hidden: usize,
    q_width: usize,
    kv_width: usize,
    intermediate: usize,
) -> Option<(usize, usize)> {
    match module {
        "self_attn.q_proj" => Some((hidden, q_width)),
        "self_attn.k_proj" | "self_attn.v_proj" => Some((hidden, kv_width)),
        "self_attn.o_proj" => Some((q_width, hidden)),
        "mlp.gate_proj" | "mlp.up_proj" => Some((hidden, intermediate)),
        "mlp.down_proj" => Some((intermediate, hidden)),
        _ => None,
    }
}

impl fmt::Display for ModelSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "model          {}", self.path)?;
        writeln!(
            f,
            "architecture   {} ({})",
            self.architecture, self.model_type
        )?;
        writeln!(
            f,
            "parameters     {} ({} in {} EXL3 linears, {} dense)",
            self.parameters, self.exl3_parameters, self.exl3_linears, self.dense_parameters
        )?;
        writeln!(
            f,
            "files          {} bytes in {} file(s)",
            self.total_file_bytes,
            self.files.len()
        )?;
        if let Some(bpw) = self.bpw_excluding_head {
            writeln!(f, "bpw (no head)  {bpw:.3}")?;
        }
        if let Some(bpw) = self.bpw_including_head {
            writeln!(f, "bpw (all)      {bpw:.3}")?;
        }
        if let Some(bpw) = self.exl3_storage_bpw {
            writeln!(f, "storage bpw    {bpw:.3}")?;
        }
        for bucket in &self.bpw_histogram {
            writeln!(
                f,
                "  K = {:<4} {:>6} linears {:>14} weights",
                bucket.bits, bucket.linears, bucket.weights
            )?;
        }
        if !self.codebooks.is_empty() {
            writeln!(f, "codebooks      {}", self.codebooks.join(", "))?;
        }
        writeln!(f, "dense tensors  {}", self.dense_tensors.len())?;
        writeln!(
            f,
            "KV cache       {} bytes/token (f16)",
            self.kv_cache_bytes_per_token
        )?;
        for note in &self.notes {
            writeln!(f, "note: {note}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_split() {
        assert_eq!(
            split_layer("model.layers.12.self_attn.q_proj"),
            Some((12, "self_attn.q_proj"))
        );
        assert_eq!(
            split_layer("model.language_model.layers.0.mlp.down_proj"),
            Some((0, "mlp.down_proj"))
        );
        assert_eq!(split_layer("layers.3.eh_proj"), Some((3, "eh_proj")));
        assert_eq!(split_layer("model.sublayers.3.x"), None);
        assert_eq!(split_layer("model.layers.x.layers.4.y"), Some((4, "y")));
        assert_eq!(split_layer("model.layers.7"), None);
        assert_eq!(split_layer("model.layers."), None);
        assert_eq!(split_layer("lm_head"), None);
    }

    #[test]
    fn head_names() {
        assert!(is_head("lm_head"));
        assert!(is_head("language_model.lm_head"));
        assert!(!is_head("model.layers.47.shared_head.head"));
    }
}

//! GGUF tensor names → Hugging Face names, and the edits llama.cpp's converter made that
//! import has to undo so the weights mean what transformers expects:
//!
//! * Llama (`llama` architecture): the converter permutes the rows of `q_proj` and `k_proj`
//!   (weights and biases) within each head from the "rotate halves" RoPE layout to ggml's
//!   interleaved one: HF row `j·(d/2) + i` of a head of size d becomes GGUF row `2i + j`.
//!   Qwen2, Qwen3 and Gemma 3 use the halves layout in ggml too and are stored unpermuted.
//! * Gemma 3: every RMSNorm weight (`*norm.weight`, q/k norms included) is stored plus one,
//!   because ggml multiplies by the weight where Gemma's RMSNorm multiplies by `1 + w`.

use super::super::{GgufError, GgufFile, GgufTensorInfo, Result};
use super::Family;
use super::config::Dimensions;

/// What to do to a tensor's f32 values on the way to the Hugging Face file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transform {
    None,
    /// Undo the interleaving RoPE permutation; rows per head = head size.
    UnpermuteRope {
        heads: usize,
        head_dim: usize,
    },
    /// Subtract the 1 the converter added to a Gemma norm weight.
    SubtractOne,
}

/// One output tensor.
#[derive(Clone, Debug)]
pub(crate) struct PlannedTensor {
    pub hf_name: String,
    pub source: GgufTensorInfo,
    pub transform: Transform,
}

/// The Hugging Face name of a GGUF tensor, or `None` when it has none for `family`.
fn hf_name(family: Family, name: &str) -> Option<String> {
    let top = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(top) = top {
        return Some(top.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let gemma = family == Family::Gemma3;
    let hf_module = match module {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" if family != Family::Llama && family != Family::Qwen2 => "self_attn.q_norm",
        "attn_k_norm" if family != Family::Llama && family != Family::Qwen2 => "self_attn.k_norm",
        "ffn_norm" if gemma => "pre_feedforward_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "post_attention_norm" if gemma => "post_attention_layernorm",
        "post_ffw_norm" if gemma => "post_feedforward_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf_module}.{suffix}"))
}

/// The GGUF tensors every layer of `family` must have.
fn required_layer_tensors(family: Family) -> &'static [&'static str] {
    match family {
        Family::Llama | Family::Qwen2 => &[
            "attn_norm.weight",
            "attn_q.weight",
            "attn_k.weight",
            "attn_v.weight",
            "attn_output.weight",
            "ffn_norm.weight",
            "ffn_gate.weight",
            "ffn_up.weight",
            "ffn_down.weight",
        ],
        Family::Qwen3 => &[
            "attn_norm.weight",
            "attn_q.weight",
            "attn_k.weight",
            "attn_v.weight",
            "attn_output.weight",
            "attn_q_norm.weight",
            "attn_k_norm.weight",
            "ffn_norm.weight",
            "ffn_gate.weight",
            "ffn_up.weight",
            "ffn_down.weight",
        ],
        Family::Gemma3 => &[
            "attn_norm.weight",
            "attn_q.weight",
            "attn_k.weight",
            "attn_v.weight",
            "attn_output.weight",
            "attn_q_norm.weight",
            "attn_k_norm.weight",
            "post_attention_norm.weight",
            "ffn_norm.weight",
            "ffn_gate.weight",
            "ffn_up.weight",
            "ffn_down.weight",
            "post_ffw_norm.weight",
        ],
    }
}

/// Map every tensor of the file, checking that the set is complete, every type can be
/// dequantized and the attention shapes match the config (the un-permutation depends on it).
pub(crate) fn plan(
    gguf: &GgufFile,
    family: Family,
    dims: &Dimensions,
) -> Result<Vec<PlannedTensor>> {
    let tensor_error = |tensor: &str, problem: String| GgufError::Tensor {
        file: gguf.path().to_path_buf(),
        tensor: tensor.to_string(),
        problem,
    };
    let mut missing = Vec::new();
    for required in ["token_embd.weight", "output_norm.weight"] {
        if gguf.tensor(required).is_none() {
            missing.push(required.to_string());
        }
    }
    for layer in 0..dims.num_layers {
        for suffix in required_layer_tensors(family) {
            let name = format!("blk.{layer}.{suffix}");
            if gguf.tensor(&name).is_none() {
                missing.push(name);
            }
        }
    }
    if !missing.is_empty() {
        let shown: Vec<&str> = missing.iter().take(8).map(String::as_str).collect();
        return Err(GgufError::Unsupported {
            file: gguf.path().to_path_buf(),
            what: format!(
                "{} tensors that a {} model needs are missing: {}{}",
                missing.len(),
                family.gguf_arch(),
                shown.join(", "),
                if missing.len() > shown.len() {
                    ", …"
                } else {
                    ""
                }
            ),
        });
    }

    let mut planned = Vec::with_capacity(gguf.tensors().len());
    for info in gguf.tensors() {
        let name = info.name.as_str();
        let hf = hf_name(family, name).ok_or_else(|| {
            tensor_error(
                name,
                format!(
                    "has no Hugging Face counterpart in a {} model (unknown tensor name)",
                    family.gguf_arch()
                ),
            )
        })?;
        if let Some(layer) = layer_of(name)
            && layer >= dims.num_layers
        {
            return Err(tensor_error(
                name,
                format!(
                    "belongs to layer {layer}, but block_count is {}",
                    dims.num_layers
                ),
            ));
        }
        if !info.ggml_type.can_dequantize() {
            return Err(tensor_error(
                name,
                format!(
                    "has type {}, which import cannot dequantize (supported: F32, F16, BF16, \
                     Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K)",
                    info.ggml_type
                ),
            ));
        }
        let module = name.rsplit('.').nth(1).unwrap_or("");
        let is_norm = name.ends_with("norm.weight");
        let transform = match family {
            Family::Gemma3 if is_norm => Transform::SubtractOne,
            Family::Llama if module == "attn_q" => Transform::UnpermuteRope {
                heads: dims.heads,
                head_dim: dims.head_dim,
            },
            Family::Llama if module == "attn_k" => Transform::UnpermuteRope {
                heads: dims.kv_heads,
                head_dim: dims.head_dim,
            },
            _ => Transform::None,
        };
        check_shape(gguf, info, module, dims)?;
        planned.push(PlannedTensor {
            hf_name: hf,
            source: info.clone(),
            transform,
        });
    }
    Ok(planned)
}

fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// The Hugging Face shape each known module must have.
fn check_shape(
    gguf: &GgufFile,
    info: &GgufTensorInfo,
    module: &str,
    dims: &Dimensions,
) -> Result<()> {
    let hidden = dims.hidden_size;
    let q_rows = dims.heads * dims.head_dim;
    let kv_rows = dims.kv_heads * dims.head_dim;
    let is_bias = info.name.ends_with(".bias");
    let expected: Option<Vec<usize>> = match (module, is_bias) {
        ("token_embd" | "output", false) => Some(vec![dims.vocab_size, hidden]),
        ("attn_q", false) => Some(vec![q_rows, hidden]),
        ("attn_k" | "attn_v", false) => Some(vec![kv_rows, hidden]),
        ("attn_output", false) => Some(vec![hidden, q_rows]),
        ("attn_q", true) => Some(vec![q_rows]),
        ("attn_k" | "attn_v", true) => Some(vec![kv_rows]),
        ("attn_q_norm" | "attn_k_norm", _) => Some(vec![dims.head_dim]),
        ("attn_norm" | "ffn_norm" | "output_norm" | "post_attention_norm" | "post_ffw_norm", _) => {
            Some(vec![hidden])
        }
        _ => None,
    };
    let shape = info.shape();
    match expected {
        Some(expected) if expected != shape => Err(GgufError::Tensor {
            file: gguf.path().to_path_buf(),
            tensor: info.name.clone(),
            problem: format!(
                "has shape {shape:?} (PyTorch order), but the metadata implies {expected:?}"
            ),
        }),
        _ => Ok(()),
    }
}

/// Dequantize one planned tensor and apply its transform; the result is in the Hugging Face
/// shape's row-major order. Planning checked the type and shape, so this cannot fail.
pub(crate) fn hf_values(gguf: &GgufFile, tensor: &PlannedTensor) -> Vec<f32> {
    let info = &tensor.source;
    let mut values = vec![0f32; info.numel()];
    super::super::dequantize(info.ggml_type, gguf.tensor_bytes(info), &mut values)
        .expect("planning checked that the type dequantizes and the size matches");
    match tensor.transform {
        Transform::None => values,
        Transform::SubtractOne => {
            values.iter_mut().for_each(|v| *v -= 1.0);
            values
        }
        Transform::UnpermuteRope { heads, head_dim } => {
            let rows = heads * head_dim;
            let cols = values.len() / rows;
            let half = head_dim / 2;
            let mut out = vec![0f32; values.len()];
            for head in 0..heads {
                for i in 0..half {
                    for j in 0..2 {
                        let hf_row = head * head_dim + j * half + i;
                        let gguf_row = head * head_dim + 2 * i + j;
                        out[hf_row * cols..(hf_row + 1) * cols]
                            .copy_from_slice(&values[gguf_row * cols..(gguf_row + 1) * cols]);
                    }
                }
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let g = Family::Gemma3;
        let l = Family::Llama;
        assert_eq!(
            hf_name(l, "blk.3.ffn_norm.weight").unwrap(),
            "model.layers.3.post_attention_layernorm.weight"
        );
        assert_eq!(
            hf_name(g, "blk.3.ffn_norm.weight").unwrap(),
            "model.layers.3.pre_feedforward_layernorm.weight"
        );
        assert_eq!(
            hf_name(g, "blk.0.post_ffw_norm.weight").unwrap(),
            "model.layers.0.post_feedforward_layernorm.weight"
        );
        assert_eq!(
            hf_name(Family::Qwen2, "blk.11.attn_k.bias").unwrap(),
            "model.layers.11.self_attn.k_proj.bias"
        );
        assert_eq!(hf_name(l, "blk.0.attn_q_norm.weight"), None);
        assert_eq!(hf_name(l, "blk.x.attn_q.weight"), None);
        assert_eq!(hf_name(l, "rope_freqs.weight"), None);
        assert_eq!(hf_name(l, "output.weight").unwrap(), "lm_head.weight");
    }
}

//! Rotary position embedding settings, from either config style:
//!
//! * classic: top-level `rope_theta` plus `rope_scaling` (`{"type"|"rope_type": …, …}` or null);
//! * transformers 5: `rope_parameters = {"rope_theta": …, "rope_type": …, …}`, which for
//!   models with several attention types may instead be keyed by layer type
//!   (`{"full_attention": {…}, "sliding_attention": {…}}`).

use crate::error::Result;
use crate::json::Fields;
use serde::Serialize;

/// Frequency scaling applied on top of the base rotary frequencies.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RopeScaling {
    /// Plain RoPE (`rope_type` "default" or no scaling object).
    None,
    /// Position interpolation: positions divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1 wavelength-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// YaRN (DeepSeek-V3, Qwen long context).
    Yarn {
        factor: f64,
        original_max_position_embeddings: usize,
        beta_fast: f64,
        beta_slow: f64,
        mscale: f64,
        mscale_all_dim: f64,
        /// Explicit attention (magnitude) factor; `None` means derive it from the factor.
        attention_factor: Option<f64>,
    },
}

/// The RoPE settings of one kind of attention layer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RopeConfig {
    /// Base of the rotary frequencies.
    pub theta: f64,
    pub scaling: RopeScaling,
    /// Fraction of each head's dims that are rotated (1.0 = all).
    pub partial_rotary_factor: f64,
}

/// The rope types this crate understands, for error messages.
const SUPPORTED_TYPES: &str = "default, linear, llama3, yarn";

/// Layer-type keys that mark the per-layer-type form of `rope_parameters`.
const LAYER_TYPE_KEYS: [&str; 2] = ["full_attention", "sliding_attention"];

/// Where a model's rope settings for one layer type come from.
pub(crate) struct RopeSource<'a> {
    /// The root config object (or `text_config`).
    pub root: Fields<'a>,
    /// Key under `rope_parameters` when it is keyed by layer type.
    pub layer_type: &'static str,
    pub default_theta: f64,
    /// Used when a YaRN config omits `original_max_position_embeddings`, as transformers does.
    pub max_position_embeddings: usize,
}

impl RopeSource<'_> {
    /// Whether `rope_parameters` is keyed by layer type and has an entry for ours.
    pub(crate) fn has_layer_entry(&self) -> Result<bool> {
        Ok(match self.root.opt_object("rope_parameters")? {
            Some(params) => params.get(self.layer_type).is_some_and(|v| v.is_object()),
            None => false,
        })
    }

    pub(crate) fn parse(&self) -> Result<RopeConfig> {
        let root = self.root;
        let top_partial = root.opt_positive_f64("partial_rotary_factor")?;
        if let Some(params) = root.opt_object("rope_parameters")? {
            let keyed = LAYER_TYPE_KEYS.iter().any(|k| params.contains_key(*k));
            let params = if keyed {
                let nested = root.nested(params, "rope_parameters.");
                let entry = nested.opt_object(self.layer_type)?.ok_or_else(|| {
                    nested.err(
                        self.layer_type,
                        "missing (rope_parameters is keyed by layer type)",
                    )
                })?;
                root.nested(entry, layer_path(self.layer_type))
            } else {
                root.nested(params, "rope_parameters.")
            };
            let theta = match params.opt_positive_f64("rope_theta")? {
                Some(t) => t,
                None => root.positive_f64_or("rope_theta", self.default_theta)?,
            };
            let partial = params.opt_positive_f64("partial_rotary_factor")?;
            return Ok(RopeConfig {
                theta,
                scaling: parse_scaling(&params, self.max_position_embeddings)?,
                partial_rotary_factor: check_partial(&root, partial.or(top_partial))?,
            });
        }
        let theta = root.positive_f64_or("rope_theta", self.default_theta)?;
        let scaling = match root.opt_object("rope_scaling")? {
            Some(obj) => parse_scaling(
                &root.nested(obj, "rope_scaling."),
                self.max_position_embeddings,
            )?,
            None => RopeScaling::None,
        };
        Ok(RopeConfig {
            theta,
            scaling,
            partial_rotary_factor: check_partial(&root, top_partial)?,
        })
    }
}

fn layer_path(layer_type: &str) -> &'static str {
    match layer_type {
        "sliding_attention" => "rope_parameters.sliding_attention.",
        _ => "rope_parameters.full_attention.",
    }
}

fn check_partial(root: &Fields<'_>, partial: Option<f64>) -> Result<f64> {
    match partial {
        Some(p) if p > 1.0 => Err(root.err(
            "partial_rotary_factor",
            format!("expected a number in (0, 1], got {p}"),
        )),
        Some(p) => Ok(p),
        None => Ok(1.0),
    }
}

/// The scaling described by one `rope_scaling` / `rope_parameters` object.
fn parse_scaling(obj: &Fields<'_>, max_position_embeddings: usize) -> Result<RopeScaling> {
    let (type_key, kind) = match obj.opt_str("rope_type")? {
        Some(t) => ("rope_type", t),
        None => ("type", obj.str_or("type", "default")?),
    };
    Ok(match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: obj.req_positive_f64("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: obj.req_positive_f64("factor")?,
            low_freq_factor: obj.req_positive_f64("low_freq_factor")?,
            high_freq_factor: obj.req_positive_f64("high_freq_factor")?,
            original_max_position_embeddings: obj
                .req_positive("original_max_position_embeddings")?,
        },
        "yarn" => RopeScaling::Yarn {
            factor: obj.req_positive_f64("factor")?,
            original_max_position_embeddings: obj
                .positive_or("original_max_position_embeddings", max_position_embeddings)?,
            beta_fast: obj.positive_f64_or("beta_fast", 32.0)?,
            beta_slow: obj.positive_f64_or("beta_slow", 1.0)?,
            mscale: obj.f64_or("mscale", 1.0)?,
            mscale_all_dim: obj.f64_or("mscale_all_dim", 0.0)?,
            attention_factor: obj.opt_positive_f64("attention_factor")?,
        },
        other => {
            return Err(obj.err(
                type_key,
                format!("rope type `{other}` is not supported (supported: {SUPPORTED_TYPES})"),
            ));
        }
    })
}

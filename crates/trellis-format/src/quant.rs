//! The EXL3 quantization config: `config.json` → `quantization_config` (exl3-format.md §2.1)
//! and, optionally, the per-module `tensor_storage` index of `quantization_config.json`
//! (§2.2). The safetensors headers stay the ground truth; these are informational.

use crate::error::{FormatError, Result};
use crate::json::{Fields, show};
use serde::Serialize;
use std::collections::BTreeMap;
use trellis_codec::{Codebook, MCG_MULTIPLIER, MUL1_MULTIPLIER};

/// File name of the optional per-module storage index.
pub const QUANTIZATION_CONFIG_FILE: &str = "quantization_config.json";

/// Calibration set size used by the quantizer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Calibration {
    pub rows: usize,
    pub cols: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct QuantizationConfig {
    /// Always "exl3" (anything else is rejected).
    pub quant_method: String,
    /// ExLlamaV3 version that wrote the model.
    pub version: Option<String>,
    /// Achieved average bpw over the non-head linears.
    pub bits: Option<f64>,
    /// Bits of `lm_head` (16 = unquantized in ExLlamaV3 1.6.5).
    pub head_bits: Option<f64>,
    pub calibration: Option<Calibration>,
    pub out_scales: Option<String>,
    /// Default codebook of the conversion; informational, the per-tensor markers decide.
    #[serde(serialize_with = "codebook_name")]
    pub codebook: Option<Codebook>,
    pub mtp_bits: Option<f64>,
    pub vision_bits: Option<f64>,
    /// The source checkpoint's own quantization config (e.g. FP8), kept verbatim.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub original_quantization_config: Option<serde_json::Value>,
    /// `quantization_config.json` → `tensor_storage`, when that file exists.
    #[serde(skip)]
    pub tensor_storage: Option<BTreeMap<String, ModuleStorage>>,
}

/// One module's entry in `tensor_storage`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModuleStorage {
    pub stored_tensors: BTreeMap<String, StoredTensor>,
    /// "exl3" for a quantized linear.
    pub quant_format: Option<String>,
    pub bits_per_weight: Option<f64>,
    /// From the presence of `mul1_multiplier` / `mcg_multiplier` (quantized linears only).
    #[serde(serialize_with = "codebook_name")]
    pub codebook: Option<Codebook>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StoredTensor {
    pub shape: Vec<usize>,
    pub n_bytes: u64,
    /// Torch dtype name, e.g. "torch.float16".
    pub dtype: String,
}

impl QuantizationConfig {
    /// Parse a `quantization_config` object; `file` labels errors.
    pub fn from_json(value: &serde_json::Value, file: &str) -> Result<QuantizationConfig> {
        let f = Fields::root(value, file)?;
        parse_main(&f)
    }

    /// Add the `tensor_storage` map of a parsed `quantization_config.json`.
    pub fn attach_tensor_storage(&mut self, value: &serde_json::Value, file: &str) -> Result<()> {
        let f = Fields::root(value, file)?;
        let Some(storage) = f.opt_object("tensor_storage")? else {
            return Ok(());
        };
        let mut modules = BTreeMap::new();
        for (module, entry) in storage {
            let path = format!("tensor_storage.{module}.");
            let entry_obj = entry.as_object().ok_or_else(|| {
                f.err(
                    &format!("tensor_storage.{module}"),
                    format!("expected an object, got {}", show(entry)),
                )
            })?;
            let m = f.nested(entry_obj, &path);
            let mut stored = BTreeMap::new();
            if let Some(tensors) = m.opt_object("stored_tensors")? {
                let tensors_path = format!("{path}stored_tensors.");
                let t = m.nested(tensors, &tensors_path);
                for (name, info) in tensors {
                    let info_obj = info.as_object().ok_or_else(|| {
                        t.err(name, format!("expected an object, got {}", show(info)))
                    })?;
                    let info_path = format!("{tensors_path}{name}.");
                    let i = t.nested(info_obj, &info_path);
                    stored.insert(
                        name.clone(),
                        StoredTensor {
                            shape: i.opt_count_list("shape")?.unwrap_or_default(),
                            n_bytes: i.count_or("n_bytes", 0)? as u64,
                            dtype: i.str_or("dtype", "")?.to_string(),
                        },
                    );
                }
            }
            let codebook = if m.has("mul1_multiplier") {
                Some(Codebook::Mul1)
            } else if m.has("mcg_multiplier") {
                Some(Codebook::Mcg)
            } else if m.opt_str("quant_format")? == Some("exl3") {
                Some(Codebook::Inst3)
            } else {
                None
            };
            modules.insert(
                module.clone(),
                ModuleStorage {
                    stored_tensors: stored,
                    quant_format: m.opt_str("quant_format")?.map(str::to_string),
                    bits_per_weight: m.opt_positive_f64("bits_per_weight")?,
                    codebook,
                },
            );
        }
        self.tensor_storage = Some(modules);
        Ok(())
    }
}

fn parse_main(f: &Fields<'_>) -> Result<QuantizationConfig> {
    let method = f
        .opt_str("quant_method")?
        .ok_or_else(|| f.err("quant_method", "missing (expected \"exl3\")"))?;
    if method != "exl3" {
        return Err(FormatError::UnsupportedQuantization {
            file: f.file.to_string(),
            method: method.to_string(),
        });
    }
    let calibration = match f.opt_object("calibration")? {
        Some(obj) => {
            let c = f.nested(obj, "calibration.");
            Some(Calibration {
                rows: c.req_count("rows")?,
                cols: c.req_count("cols")?,
            })
        }
        None => None,
    };
    let codebook = match f.opt_str("codebook")? {
        Some(name) => {
            Some(
                Codebook::from_name(name).ok_or_else(|| FormatError::UnknownCodebook {
                    file: f.file.to_string(),
                    name: name.to_string(),
                })?,
            )
        }
        None => None,
    };
    // `version` is a string in ExLlamaV3's output; accept a bare number too.
    let version = match f.get("version") {
        None => None,
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Number(n)) => Some(n.to_string()),
        Some(v) => return Err(f.err("version", format!("expected a string, got {}", show(v)))),
    };
    Ok(QuantizationConfig {
        quant_method: method.to_string(),
        version,
        bits: f.opt_positive_f64("bits")?,
        head_bits: f.opt_positive_f64("head_bits")?,
        calibration,
        out_scales: f.opt_str("out_scales")?.map(str::to_string),
        codebook,
        mtp_bits: f.opt_positive_f64("mtp_bits")?,
        vision_bits: f.opt_positive_f64("vision_bits")?,
        original_quantization_config: f.get("original_quantization_config").cloned(),
        tensor_storage: None,
    })
}

/// Codebooks serialise as their config names ("mul1", "mcg", "3inst").
fn codebook_name<S: serde::Serializer>(
    codebook: &Option<Codebook>,
    serializer: S,
) -> std::result::Result<S::Ok, S::Error> {
    match codebook {
        Some(cb) => serializer.serialize_some(cb.name()),
        None => serializer.serialize_none(),
    }
}

/// The values ExLlamaV3 stores in codebook marker tensors (informational).
pub fn marker_value(codebook: Codebook) -> Option<u32> {
    match codebook {
        Codebook::Mul1 => Some(MUL1_MULTIPLIER),
        Codebook::Mcg => Some(MCG_MULTIPLIER),
        Codebook::Inst3 => None,
    }
}

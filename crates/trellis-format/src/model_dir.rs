//! A model directory: config, optional quantization and generation configs, and tensors.

use crate::config::{CONFIG_FILE, ModelConfig, read_json};
use crate::error::Result;
use crate::generation::{GENERATION_CONFIG_FILE, GenerationDefaults};
use crate::quant::{QUANTIZATION_CONFIG_FILE, QuantizationConfig};
use crate::store::TensorStore;
use std::path::{Path, PathBuf};

/// Everything `format` knows about a model directory. Opening reads the JSON files and the
/// safetensors headers only; tensor data stays mapped, not read.
#[derive(Debug)]
pub struct ModelDir {
    pub path: PathBuf,
    pub config: ModelConfig,
    /// `config.json` as parsed JSON, for fields this crate does not model.
    pub raw_config: serde_json::Value,
    /// `config.json` → `quantization_config` (or, when config.json has none,
    /// `quantization_config.json`), plus `quantization_config.json`'s `tensor_storage` when
    /// present; `None` for an unquantized model.
    pub quantization: Option<QuantizationConfig>,
    /// `generation_config.json`, all `None` when the file is absent.
    pub generation: GenerationDefaults,
    pub tensors: TensorStore,
}

impl ModelDir {
    pub fn open(path: &Path) -> Result<ModelDir> {
        let config_path = path.join(CONFIG_FILE);
        let (config, raw_config) = ModelConfig::from_file(&config_path)?;
        let config_label = config_path.display().to_string();

        // ExLlamaV3 writes the quantization config into config.json and, with the
        // tensor_storage index added, into quantization_config.json; either is enough.
        let index_path = path.join(QUANTIZATION_CONFIG_FILE);
        let index = if index_path.is_file() {
            Some(read_json(&index_path)?)
        } else {
            None
        };
        let index_label = index_path.display().to_string();
        let quantization = match (raw_config.get("quantization_config"), &index) {
            (Some(q), _) if !q.is_null() => {
                let label = format!("{config_label} (quantization_config)");
                Some(QuantizationConfig::from_json(q, &label)?)
            }
            (_, Some(index)) => Some(QuantizationConfig::from_json(index, &index_label)?),
            _ => None,
        };
        let quantization = match (quantization, &index) {
            (Some(mut quant), Some(index)) => {
                quant.attach_tensor_storage(index, &index_label)?;
                Some(quant)
            }
            (quant, _) => quant,
        };

        let generation_path = path.join(GENERATION_CONFIG_FILE);
        let generation = if generation_path.is_file() {
            let value = read_json(&generation_path)?;
            GenerationDefaults::from_json(&value, &generation_path.display().to_string())?
        } else {
            GenerationDefaults::default()
        };

        let tensors = TensorStore::open(path)?;
        Ok(ModelDir {
            path: path.to_path_buf(),
            config,
            raw_config,
            quantization,
            generation,
            tensors,
        })
    }

    /// Stop tokens: `generation_config.json`'s list when given, else `config.json`'s.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        match &self.generation.eos_token_id {
            Some(ids) if !ids.is_empty() => ids.clone(),
            _ => self.config.common().eos_token_ids,
        }
    }
}

//! `trellis import`: a GGUF model → a Hugging Face model directory (`config.json`,
//! `generation_config.json`, `tokenizer.json`, `tokenizer_config.json`, safetensors weights
//! in f32 or bf16, Hugging Face names and orientation) that trellis and transformers load.
//!
//! Supported: `gemma3` (→ `Gemma3ForCausalLM`), `llama` (→ `LlamaForCausalLM`), `qwen2`,
//! `qwen3`. Quantized weights are dequantized; nothing is requantized.

mod config;
mod tensors;
mod tokenizer;

use super::{GgufError, GgufFile, Result};
use crate::dtype::DType;
use crate::writer::{TensorSource, write_json, write_safetensors};
use half::bf16;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The model families import understands, by GGUF `general.architecture`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Family {
    Llama,
    Qwen2,
    Qwen3,
    Gemma3,
}

impl Family {
    const ALL: [Family; 4] = [Family::Llama, Family::Qwen2, Family::Qwen3, Family::Gemma3];

    fn gguf_arch(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma3 => "gemma3",
        }
    }

    fn class_name(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
            Family::Gemma3 => "Gemma3ForCausalLM",
        }
    }

    fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma3 => "gemma3_text",
        }
    }
}

/// Element type of the written weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ImportDtype {
    /// Exact: every dequantized value as computed.
    F32,
    /// Half the size; dequantized values rounded to nearest-even bf16 (relative error ≤ 2^-9,
    /// far below the quantization error of any GGUF quant type).
    BF16,
}

impl ImportDtype {
    fn dtype(self) -> DType {
        match self {
            ImportDtype::F32 => DType::F32,
            ImportDtype::BF16 => DType::BF16,
        }
    }

    fn torch_name(self) -> &'static str {
        match self {
            ImportDtype::F32 => "float32",
            ImportDtype::BF16 => "bfloat16",
        }
    }

    fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            ImportDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ImportDtype::BF16 => values
                .iter()
                .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                .collect(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ImportOptions {
    pub dtype: ImportDtype,
    /// Weights beyond this many bytes are split into shards with an index.
    pub max_shard_bytes: u64,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            dtype: ImportDtype::BF16,
            max_shard_bytes: 5 << 30,
        }
    }
}

/// What an import wrote.
#[derive(Clone, Debug, Serialize)]
pub struct ImportReport {
    /// `general.architecture` of the GGUF file.
    pub gguf_architecture: String,
    /// The Hugging Face class, e.g. `Gemma3ForCausalLM`.
    pub architecture: String,
    pub tensors: usize,
    /// Tensor count per source ggml type.
    pub source_types: BTreeMap<String, usize>,
    pub parameters: usize,
    pub vocab_size: usize,
    pub dtype: ImportDtype,
    /// Every file written, weights last.
    pub files: Vec<PathBuf>,
    /// Things the user should know about the result.
    pub notes: Vec<String>,
}

/// Import the GGUF file at `gguf_path` into the directory `out` (created; existing files of
/// the same names are replaced). `progress(done, total)` counts weight bytes written.
pub fn import_gguf(
    gguf_path: &Path,
    out: &Path,
    options: &ImportOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ImportReport> {
    let gguf = Arc::new(GgufFile::open(gguf_path)?);
    import_from(gguf, out, options, progress)
}

/// [`import_gguf`] for an already opened file.
pub fn import_from(
    gguf: Arc<GgufFile>,
    out: &Path,
    options: &ImportOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ImportReport> {
    let arch = gguf.req_str("general.architecture")?.to_string();
    let family = Family::ALL
        .into_iter()
        .find(|f| f.gguf_arch() == arch)
        .ok_or_else(|| GgufError::Unsupported {
            file: gguf.path().to_path_buf(),
            what: format!(
                "general.architecture = {arch:?}: import supports {}",
                Family::ALL.map(|f| f.gguf_arch()).join(", ")
            ),
        })?;
    let context_length = gguf
        .opt_u64(&format!("{arch}.context_length"))?
        .map(|v| v as usize);
    let tokenizer = tokenizer::build(&gguf, context_length)?;
    let embedding = gguf
        .tensor("token_embd.weight")
        .ok_or_else(|| GgufError::Tensor {
            file: gguf.path().to_path_buf(),
            tensor: "token_embd.weight".into(),
            problem: "missing (every supported model has a token embedding)".into(),
        })?;
    let vocab_size = embedding.shape()[0];
    let tie = gguf.tensor("output.weight").is_none();
    let (hf_config, dims) = config::hf_config(
        &gguf,
        family,
        vocab_size,
        tie,
        &tokenizer.special,
        options.dtype.torch_name(),
    )?;
    let mut notes = tokenizer.notes.clone();
    if tokenizer.vocab_size != vocab_size {
        notes.push(format!(
            "the tokenizer has {} tokens and the embedding {vocab_size} rows",
            tokenizer.vocab_size
        ));
    }
    // Parse the config with trellis's own reader before writing gigabytes, so a mapping
    // mistake fails here with a field name.
    crate::ModelConfig::from_json_labeled(&hf_config, "config.json (from GGUF)")?;
    let planned = tensors::plan(&gguf, family, &dims)?;

    std::fs::create_dir_all(out).map_err(|source| GgufError::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let mut files = Vec::new();
    let mut json_file = |name: &str, value: &serde_json::Value| -> Result<()> {
        let path = out.join(name);
        write_json(&path, value)?;
        files.push(path);
        Ok(())
    };
    json_file("config.json", &hf_config)?;
    let mut generation = serde_json::Map::new();
    if let Some(bos) = tokenizer.special.bos {
        generation.insert("bos_token_id".into(), bos.into());
    }
    if !tokenizer.stop_ids.is_empty() {
        generation.insert("eos_token_id".into(), tokenizer.stop_ids.clone().into());
    }
    if let Some(pad) = tokenizer.special.pad {
        generation.insert("pad_token_id".into(), pad.into());
    }
    json_file("generation_config.json", &generation.into())?;
    json_file("tokenizer.json", &tokenizer.tokenizer_json)?;
    json_file("tokenizer_config.json", &tokenizer.tokenizer_config)?;

    let mut source_types = BTreeMap::new();
    let mut parameters = 0;
    let dtype = options.dtype;
    let sources: Vec<TensorSource> = planned
        .into_iter()
        .map(|tensor| {
            *source_types
                .entry(tensor.source.ggml_type.name().to_string())
                .or_insert(0) += 1;
            parameters += tensor.source.numel();
            let shape = tensor.source.shape();
            let name = tensor.hf_name.clone();
            let gguf = Arc::clone(&gguf);
            TensorSource::new(
                name,
                dtype.dtype(),
                shape,
                Box::new(move || dtype.encode(&tensors::hf_values(&gguf, &tensor))),
            )
        })
        .collect();
    let total: u64 = sources.iter().map(|s| s.byte_len() as u64).sum();
    let mut done = 0u64;
    progress(0, total);
    let metadata = [("format".to_string(), "pt".to_string())].into();
    let weight_files = write_safetensors(
        out,
        &sources,
        options.max_shard_bytes,
        Some(metadata),
        &mut |bytes| {
            done += bytes as u64;
            progress(done, total);
        },
    )?;
    files.extend(weight_files);
    Ok(ImportReport {
        gguf_architecture: arch,
        architecture: family.class_name().to_string(),
        tensors: sources.len(),
        source_types,
        parameters,
        vocab_size,
        dtype,
        files,
        notes,
    })
}

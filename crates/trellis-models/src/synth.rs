//! Synthetic model directories: a real architecture's config and tensor shapes with random
//! EXL3 trellis words (every bit pattern is a valid trellis), scales that keep activations
//! finite, and a byte-level tokenizer — for speed and memory work without the real weights.
//!
//! The layout is the one ExLlamaV3 1.6.5 writes for GLM-4.7-Flash: attention projections,
//! the dense FFN, every expert and the shared expert as EXL3 at `bits`, `lm_head` at
//! `head_bits`; `kv_b_proj` and the router fp16, embeddings and norms bf16, the router bias f32.

use crate::{ModelError, Result};
use half::{bf16, f16};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::{Value, json};
use std::path::Path;
use trellis_codec::{BitWidth, Codebook};
use trellis_format::{DType, TensorSource, pad_to_exl3, write_json, write_safetensors};

/// Shards of at most this many bytes, like the checkpoints people download.
const SHARD_BYTES: u64 = 4 << 30;

/// Which size of the architecture to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// The real model's shapes (GLM-4.7-Flash: 47 layers, 64 experts, vocab 154,880).
    Full,
    /// A toy with the same structure (3 layers, 16 experts), for tests.
    Tiny,
}

/// What to synthesize.
#[derive(Clone, Debug)]
pub struct SynthOptions {
    pub preset: Preset,
    pub bits: BitWidth,
    pub head_bits: BitWidth,
    pub codebook: Codebook,
    pub seed: u64,
}

/// The GLM-4.7-Flash `config.json` (as published), or its tiny counterpart.
pub fn glm4_moe_lite_config(preset: Preset) -> Value {
    let (vocab, hidden, layers, inter, moe_inter, experts, heads, q_rank, max_pos) = match preset {
        Preset::Full => (154_880, 2048, 47, 10_240, 1536, 64, 20, 768, 202_752),
        Preset::Tiny => (2048, 512, 3, 1024, 256, 16, 4, 768, 4096),
    };
    let eos = match preset {
        Preset::Full => json!([154_820, 154_827, 154_829]),
        Preset::Tiny => json!([2028, 2035, 2037]),
    };
    json!({
        "architectures": ["Glm4MoeLiteForCausalLM"],
        "model_type": "glm4_moe_lite",
        "attention_bias": false,
        "attention_dropout": 0.0,
        "eos_token_id": eos,
        "pad_token_id": eos[0],
        "first_k_dense_replace": 1,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "kv_lora_rank": 512,
        "max_position_embeddings": max_pos,
        "moe_intermediate_size": moe_inter,
        "n_group": 1,
        "n_routed_experts": experts,
        "n_shared_experts": 1,
        "norm_topk_prob": true,
        "num_attention_heads": heads,
        "num_experts_per_tok": 4,
        "num_hidden_layers": layers,
        "num_key_value_heads": heads,
        "num_nextn_predict_layers": 0,
        "partial_rotary_factor": 1.0,
        "q_lora_rank": q_rank,
        "qk_nope_head_dim": 192,
        "qk_rope_head_dim": 64,
        "rms_norm_eps": 1e-5,
        "rope_scaling": null,
        "rope_theta": 1_000_000.0,
        "routed_scaling_factor": 1.8,
        "tie_word_embeddings": false,
        "topk_group": 1,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "v_head_dim": 256,
        "vocab_size": vocab,
    })
}

/// GLM's special tokens, placed at the end of the vocabulary in GLM order.
const GLM_SPECIAL_TOKENS: [&str; 20] = [
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<arg_key>",
    "</arg_key>",
    "<arg_value>",
    "</arg_value>",
];

/// GLM's turn format without its tool and reasoning machinery, so that `trellis chat` and the
/// server's chat endpoint work on synthetic models (whose answers are noise either way).
const SYNTH_CHAT_TEMPLATE: &str = "[gMASK]<sop>{% for m in messages %}<|{{ m.role }}|>\n\
{{ m.content }}{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}";

/// GPT-2's byte-to-character map of byte-level BPE: printable bytes stand for themselves,
/// the others are shifted above U+0100.
fn byte_level_char(byte: u8) -> char {
    let printable = |b: u8| {
        (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    if printable(byte) {
        char::from(byte)
    } else {
        let rank = (0..byte).filter(|&b| !printable(b)).count() as u32;
        char::from_u32(256 + rank).expect("valid code point")
    }
}

/// A byte-level BPE `tokenizer.json` of `vocab_size` tokens: the 256 bytes, filler tokens,
/// and the special tokens from id `first_special` on. Any text encodes (byte by byte) and any
/// id decodes.
pub fn synthetic_tokenizer(vocab_size: usize, first_special: usize, specials: &[&str]) -> Value {
    let mut vocab = serde_json::Map::new();
    for b in 0..=255u8 {
        vocab.insert(byte_level_char(b).to_string(), json!(b));
    }
    assert!(256 <= first_special && first_special + specials.len() <= vocab_size);
    for id in (256..first_special).chain(first_special + specials.len()..vocab_size) {
        vocab.insert(format!("tok{id}"), json!(id));
    }
    let added: Vec<Value> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"id": first_special + i, "content": s, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    for (i, s) in specials.iter().enumerate() {
        vocab.insert((*s).to_string(), json!(first_special + i));
    }
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": []}
    })
}

/// A deterministic generator per tensor, so that tensors can be produced in any order.
fn rng_for(seed: u64, name: &str) -> SmallRng {
    let mut h = seed ^ 0x9E37_79B9_7F4A_7C15;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3);
    }
    SmallRng::seed_from_u64(h)
}

fn uniform_bytes(
    seed: u64,
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    half_width: f32,
) -> TensorSource {
    let key = name.clone();
    TensorSource::new(
        name,
        dtype,
        shape.clone(),
        Box::new(move || {
            let n: usize = shape.iter().product();
            let mut rng = rng_for(seed, &key);
            let mut out = Vec::with_capacity(n * dtype.size_of());
            for _ in 0..n {
                let v = rng.random_range(-half_width..=half_width);
                match dtype {
                    DType::F32 => out.extend_from_slice(&v.to_le_bytes()),
                    DType::F16 => out.extend_from_slice(&f16::from_f32(v).to_le_bytes()),
                    DType::BF16 => out.extend_from_slice(&bf16::from_f32(v).to_le_bytes()),
                    other => unreachable!("uniform values of {other:?}"),
                }
            }
            out
        }),
    )
}

fn constant_bf16(name: String, len: usize, value: f32) -> TensorSource {
    TensorSource::from_bytes(
        name,
        DType::BF16,
        vec![len],
        bf16::from_f32(value).to_le_bytes().repeat(len),
    )
}

/// The tensors of one EXL3 linear: random words, and scales chosen so that a unit-RMS input
/// gives a unit-RMS output (the decoded matrix has the codebook's RMS; Hadamards keep norms).
fn trellis_linear(
    seed: u64,
    prefix: &str,
    in_f: usize,
    out_f: usize,
    bits: BitWidth,
    codebook: Codebook,
) -> Vec<TensorSource> {
    let (k, n) = (pad_to_exl3(in_f), pad_to_exl3(out_f));
    let words = (k / 16) * (n / 16) * bits.tile_words();
    let key = format!("{prefix}.trellis");
    let mut tensors = vec![TensorSource::new(
        key.clone(),
        DType::I16,
        vec![k / 16, n / 16, bits.tile_words()],
        Box::new(move || {
            let mut bytes = vec![0u8; 2 * words];
            rng_for(seed, &key).fill_bytes(&mut bytes);
            bytes
        }),
    )];
    let rms = codebook.table_f32().iter().map(|v| v * v).sum::<f32>() / 65536.0;
    let input_scale = 1.0 / ((in_f as f32).sqrt() * rms.sqrt());
    let signs = |name: &str, len: usize, logical: usize, scale: f32| {
        let mut rng = rng_for(seed, name);
        let bytes: Vec<u8> = (0..len)
            .flat_map(|i| {
                let v = if i >= logical {
                    0.0
                } else if rng.random::<bool>() {
                    scale
                } else {
                    -scale
                };
                f16::from_f32(v).to_le_bytes()
            })
            .collect();
        TensorSource::from_bytes(name.to_string(), DType::F16, vec![len], bytes)
    };
    tensors.push(signs(&format!("{prefix}.suh"), k, in_f, input_scale));
    // Padded output columns get zero scale, as ExLlamaV3 writes them.
    tensors.push(signs(&format!("{prefix}.svh"), n, out_f, 1.0));
    let (marker, value) = match codebook {
        Codebook::Mul1 => (Some("mul1"), trellis_codec::MUL1_MULTIPLIER),
        Codebook::Mcg => (Some("mcg"), trellis_codec::MCG_MULTIPLIER),
        Codebook::Inst3 => (None, 0),
    };
    if let Some(m) = marker {
        tensors.push(TensorSource::from_bytes(
            format!("{prefix}.{m}"),
            DType::I32,
            vec![],
            value.to_le_bytes().to_vec(),
        ));
    }
    tensors
}

/// Every tensor of a synthetic GLM-4.7-Flash-shaped EXL3 model, in checkpoint order.
fn glm_tensors(cfg: &Value, o: &SynthOptions) -> Vec<TensorSource> {
    let get = |k: &str| cfg[k].as_u64().expect("synth config fields are integers") as usize;
    let (vocab, hidden, layers) = (
        get("vocab_size"),
        get("hidden_size"),
        get("num_hidden_layers"),
    );
    let (heads, q_rank, kv_rank) = (
        get("num_attention_heads"),
        get("q_lora_rank"),
        get("kv_lora_rank"),
    );
    let (nope, rope, v) = (
        get("qk_nope_head_dim"),
        get("qk_rope_head_dim"),
        get("v_head_dim"),
    );
    let (inter, moe_inter, experts) = (
        get("intermediate_size"),
        get("moe_intermediate_size"),
        get("n_routed_experts"),
    );
    let seed = o.seed;
    let lin =
        |p: String, i: usize, out: usize| trellis_linear(seed, &p, i, out, o.bits, o.codebook);
    let mut t = vec![uniform_bytes(
        seed,
        "model.embed_tokens.weight".into(),
        DType::BF16,
        vec![vocab, hidden],
        1.0,
    )];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        t.push(constant_bf16(
            format!("{p}.input_layernorm.weight"),
            hidden,
            1.0,
        ));
        t.push(constant_bf16(
            format!("{p}.post_attention_layernorm.weight"),
            hidden,
            1.0,
        ));
        t.extend(lin(format!("{p}.self_attn.q_a_proj"), hidden, q_rank));
        t.push(constant_bf16(
            format!("{p}.self_attn.q_a_layernorm.weight"),
            q_rank,
            1.0,
        ));
        t.extend(lin(
            format!("{p}.self_attn.q_b_proj"),
            q_rank,
            heads * (nope + rope),
        ));
        t.extend(lin(
            format!("{p}.self_attn.kv_a_proj_with_mqa"),
            hidden,
            kv_rank + rope,
        ));
        t.push(constant_bf16(
            format!("{p}.self_attn.kv_a_layernorm.weight"),
            kv_rank,
            1.0,
        ));
        let kv_b_scale = (3.0 / kv_rank as f32).sqrt();
        t.push(uniform_bytes(
            seed,
            format!("{p}.self_attn.kv_b_proj.weight"),
            DType::F16,
            vec![heads * (nope + v), kv_rank],
            kv_b_scale,
        ));
        t.extend(lin(format!("{p}.self_attn.o_proj"), heads * v, hidden));
        if l == 0 {
            t.extend(lin(format!("{p}.mlp.gate_proj"), hidden, inter));
            t.extend(lin(format!("{p}.mlp.up_proj"), hidden, inter));
            t.extend(lin(format!("{p}.mlp.down_proj"), inter, hidden));
        } else {
            let router_scale = (3.0 / hidden as f32).sqrt();
            t.push(uniform_bytes(
                seed,
                format!("{p}.mlp.gate.weight"),
                DType::F16,
                vec![experts, hidden],
                router_scale,
            ));
            t.push(uniform_bytes(
                seed,
                format!("{p}.mlp.gate.e_score_correction_bias"),
                DType::F32,
                vec![experts],
                0.01,
            ));
            for e in 0..experts {
                t.extend(lin(
                    format!("{p}.mlp.experts.{e}.gate_proj"),
                    hidden,
                    moe_inter,
                ));
                t.extend(lin(
                    format!("{p}.mlp.experts.{e}.up_proj"),
                    hidden,
                    moe_inter,
                ));
                t.extend(lin(
                    format!("{p}.mlp.experts.{e}.down_proj"),
                    moe_inter,
                    hidden,
                ));
            }
            t.extend(lin(
                format!("{p}.mlp.shared_experts.gate_proj"),
                hidden,
                moe_inter,
            ));
            t.extend(lin(
                format!("{p}.mlp.shared_experts.up_proj"),
                hidden,
                moe_inter,
            ));
            t.extend(lin(
                format!("{p}.mlp.shared_experts.down_proj"),
                moe_inter,
                hidden,
            ));
        }
    }
    t.push(constant_bf16("model.norm.weight".into(), hidden, 1.0));
    t.extend(trellis_linear(
        seed,
        "lm_head",
        hidden,
        vocab,
        o.head_bits,
        o.codebook,
    ));
    t
}

/// Write a synthetic model of architecture `arch` into `out`. `progress` receives
/// (bytes written, total bytes).
pub fn synthesize(
    arch: &str,
    options: &SynthOptions,
    out: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    if !options.bits.is_integer() && options.codebook != Codebook::Mul1 {
        return Err(ModelError::Invalid(format!(
            "{} bits per weight exists only with the mul1 codebook",
            options.bits
        )));
    }
    let mut config = match arch {
        "glm4_moe_lite" | "glm-4.7-flash" | "glm" => glm4_moe_lite_config(options.preset),
        other => {
            return Err(ModelError::Unsupported(format!(
                "synth knows the architecture glm4_moe_lite (GLM-4.7-Flash), not `{other}`"
            )));
        }
    };
    let quantization = json!({
        "quant_method": "exl3",
        "version": "trellis-synth",
        "bits": options.bits.as_f64(),
        "head_bits": options.head_bits.as_f64(),
        "codebook": options.codebook.name(),
        "calibration": {"rows": 0, "cols": 0},
        "out_scales": "never",
    });
    config["quantization_config"] = quantization.clone();
    let tensors = glm_tensors(&config, options);
    let total: u64 = tensors.iter().map(|t| t.byte_len() as u64).sum();
    let mut written = 0u64;
    write_safetensors(out, &tensors, SHARD_BYTES, None, &mut |n| {
        written += n as u64;
        progress(written, total);
    })?;
    let vocab = config["vocab_size"].as_u64().expect("integer") as usize;
    write_json(&out.join("config.json"), &config)?;
    write_json(&out.join("quantization_config.json"), &quantization)?;
    write_json(
        &out.join("generation_config.json"),
        &json!({"eos_token_id": config["eos_token_id"], "pad_token_id": config["pad_token_id"],
                "temperature": 1.0, "top_p": 0.95, "do_sample": true}),
    )?;
    // GLM's special tokens start at its `<|endoftext|>`, the first EOS id.
    let first_special = config["eos_token_id"][0].as_u64().expect("integer") as usize;
    write_json(
        &out.join("tokenizer.json"),
        &synthetic_tokenizer(vocab, first_special, &GLM_SPECIAL_TOKENS),
    )?;
    write_json(
        &out.join("tokenizer_config.json"),
        &json!({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>", "model_max_length": config["max_position_embeddings"],
                "chat_template": SYNTH_CHAT_TEMPLATE}),
    )?;
    Ok(())
}

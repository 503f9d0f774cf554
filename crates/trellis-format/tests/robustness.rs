//! No input file makes the crate panic: mutated and truncated real safetensors files, random
//! headers and random or mutated configs all come back as `Result`s. Whatever opens is then
//! exercised (every accessor, every linear, the summary) to reach the later checks too.

mod common;

use common::{copy_json_files, exl3_dir, temp_dir};
use proptest::prelude::*;
use proptest::test_runner::Config;
use serde_json::{Value, json};
use std::path::Path;
use std::sync::OnceLock;
use trellis_format::{
    GenerationDefaults, ModelConfig, ModelDir, QuantizationConfig, TensorStore,
    logical_linear_shape, summarize,
};

const LLAMA: &str = "llama-tiny-4.0bpw";

/// Modest case counts: the whole crate's tests must stay well under a minute on two slow
/// cores; failures are not persisted into the source tree.
fn cases(n: u32) -> Config {
    Config {
        cases: n,
        failure_persistence: None,
        ..Config::default()
    }
}

fn llama_bytes() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| std::fs::read(exl3_dir(LLAMA).join("model.safetensors")).unwrap())
}

fn header_end() -> usize {
    let bytes = llama_bytes();
    8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize
}

/// Byte positions of the lowercase letters inside tensor names in the llama header.
fn name_letter_positions() -> &'static [usize] {
    static POSITIONS: OnceLock<Vec<usize>> = OnceLock::new();
    POSITIONS.get_or_init(|| {
        let bytes = llama_bytes();
        let header = std::str::from_utf8(&bytes[8..header_end()]).unwrap();
        let names: serde_json::Map<String, Value> = serde_json::from_str(header).unwrap();
        let mut out = Vec::new();
        for name in names.keys() {
            let quoted = format!("\"{name}\":");
            let at = header.find(&quoted).unwrap() + 1;
            for (i, b) in name.bytes().enumerate() {
                if b.is_ascii_lowercase() {
                    out.push(8 + at + i);
                }
            }
        }
        out
    })
}

/// Touch everything a loaded store offers; results are ignored, panics are not.
fn exercise_store(store: &TensorStore, config: Option<&ModelConfig>) {
    let names: Vec<String> = store.names().map(str::to_string).collect();
    for name in &names {
        let view = store.get(name).unwrap();
        let _ = view.numel();
        let _ = view.to_f32();
        let _ = view.as_f16();
        let _ = view.as_u16_words();
        let _ = view.to_i64();
        let _ = view.check(&[trellis_format::DType::F16], &[1]);
    }
    for name in &names {
        let Some(prefix) = name
            .strip_suffix(".trellis")
            .or_else(|| name.strip_suffix(".weight"))
        else {
            continue;
        };
        let logical = config.and_then(|c| logical_linear_shape(c, prefix));
        let (in_f, out_f) = logical.unwrap_or((512, 512));
        if let Ok(trellis_format::LinearWeights::Trellis(t)) = store.linear(prefix, in_f, out_f) {
            // Decoding reads every word; the codec must accept any bit pattern.
            if t.trellis.len() <= 1 << 16 {
                let _ = t.decode_inner();
            }
        }
        let _ = store.trellis_shape(prefix);
        let _ = store.trellis_linear_padded(prefix);
    }
}

fn write_model(dir: &Path, bytes: &[u8]) {
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
}

proptest! {
    #![proptest_config(cases(32))]

    /// Any proper prefix of a valid file is rejected with the file named.
    #[test]
    fn truncated_files_are_errors(fraction in 0.0f64..1.0) {
        let bytes = llama_bytes();
        let cut = ((bytes.len() as f64) * fraction) as usize;
        let dir = temp_dir();
        write_model(dir.path(), &bytes[..cut.min(bytes.len() - 1)]);
        let err = TensorStore::open(dir.path()).expect_err("a truncated file must not open");
        prop_assert!(err.to_string().contains("model.safetensors"), "{}", err);
    }
}

proptest! {
    #![proptest_config(cases(96))]

    /// Changed bytes in the length field or JSON header: an error or a store that behaves.
    /// Besides arbitrary bytes, letters inside tensor names are swapped for letters (the file
    /// stays valid, so the renamed groups reach linear() and the summary) and digits for
    /// digits (changed shapes, offsets or layer numbers).
    #[test]
    fn mutated_headers_never_panic(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        mode in 0u8..4,
    ) {
        let mut bytes = llama_bytes().to_vec();
        let header = 8..header_end();
        let positions: Vec<usize> = match mode {
            0 => (0..8).collect(),
            1 => header.collect(),
            2 => name_letter_positions().to_vec(),
            _ => header.filter(|&i| bytes[i].is_ascii_digit()).collect(),
        };
        for (at, value) in edits {
            let pos = positions[at.index(positions.len())];
            bytes[pos] = match mode {
                2 => b'a' + value % 26,
                3 => b'0' + value % 10,
                _ => value,
            };
        }
        let dir = temp_dir();
        copy_json_files(&exl3_dir(LLAMA), dir.path());
        write_model(dir.path(), &bytes);
        if let Ok(model) = ModelDir::open(dir.path()) {
            exercise_store(&model.tensors, Some(&model.config));
            let _ = summarize(&model);
        }
    }
}

/// A dtype name for a random header: mostly valid, sometimes not.
fn arb_dtype() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "F32", "F16", "BF16", "I16", "I32", "I64", "U8", "BOOL", "F64", "U16", "F4", "F8_E4M3",
        "Q4", "",
    ])
}

/// Names that hit the EXL3 group logic of linear().
fn arb_tensor_name() -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec!["x", "lm_head", "model.layers.0.self_attn.q_proj"]),
        prop::sample::select(vec![
            "trellis", "suh", "svh", "su", "sv", "mul1", "mcg", "bias", "scale", "weight",
        ]),
    )
        .prop_map(|(p, s)| format!("{p}.{s}"))
}

fn dtype_size(name: &str) -> usize {
    match name {
        "F64" | "I64" => 8,
        "F32" | "I32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        _ => 1,
    }
}

proptest! {
    #![proptest_config(cases(128))]

    /// Random headers, with offsets either consistent (so many files open) or arbitrary.
    #[test]
    fn random_headers_never_panic(
        tensors in prop::collection::vec(
            (
                arb_tensor_name(),
                arb_dtype(),
                prop::collection::vec(
                    prop_oneof![
                        0usize..4,
                        Just(8usize),
                        Just(16),
                        Just(24),
                        Just(40),
                        Just(1usize << 62),
                    ],
                    0..4,
                ),
                (0usize..300, 0usize..300),
            ),
            0..8,
        ),
        consistent in any::<bool>(),
        extra_data in 0usize..64,
        logical in (1usize..700, 1usize..700),
        junk_metadata in any::<bool>(),
    ) {
        let mut header = serde_json::Map::new();
        let mut offset = 0usize;
        for (name, dtype, shape, (a, b)) in &tensors {
            let (start, end) = if consistent {
                let n = shape
                    .iter()
                    .try_fold(dtype_size(dtype), |acc, &d| acc.checked_mul(d))
                    .unwrap_or(usize::MAX / 4);
                let range = (offset, offset.saturating_add(n));
                offset = offset.saturating_add(n);
                range
            } else {
                (*a, *b)
            };
            header.insert(
                name.clone(),
                json!({"dtype": dtype, "shape": shape, "data_offsets": [start, end]}),
            );
        }
        if junk_metadata {
            header.insert("__metadata__".into(), json!({"format": "pt", "n": 3}));
        }
        // Huge declared sizes stay in the header; the file itself stays small.
        let data_len = offset.min(1 << 16) + if consistent { 0 } else { extra_data };
        let text = Value::Object(header).to_string();
        let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(text.as_bytes());
        bytes.extend((0..data_len).map(|i| (i * 37 % 251) as u8));
        let dir = temp_dir();
        write_model(dir.path(), &bytes);
        if let Ok(store) = TensorStore::open(dir.path()) {
            exercise_store(&store, None);
            for prefix in ["x", "lm_head", "model.layers.0.self_attn.q_proj"] {
                let _ = store.linear(prefix, logical.0, logical.1);
            }
        }
    }
}

/// Arbitrary JSON, biased towards values config parsers care about.
fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        (-3i64..5000).prop_map(|i| json!(i)),
        any::<i64>().prop_map(|i| json!(i)),
        Just(json!(u64::MAX)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        (0.0f64..3.0).prop_map(|f| json!(f)),
        prop::sample::select(vec![
            "default",
            "linear",
            "llama3",
            "yarn",
            "dynamic",
            "full_attention",
            "sliding_attention",
            "dense",
            "sparse",
            "noaux_tc",
            "greedy",
            "sigmoid",
            "softmax",
            "exl3",
            "mul1",
            "mcg",
            "3inst",
            "llama",
            "gemma3",
            "",
        ])
        .prop_map(|s| Value::String(s.to_string())),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop::sample::select(vec![
                    "rope_theta",
                    "rope_type",
                    "type",
                    "factor",
                    "full_attention",
                    "sliding_attention",
                    "original_max_position_embeddings",
                    "low_freq_factor",
                    "high_freq_factor",
                    "hidden_size",
                    "rows",
                    "cols",
                    "quant_method",
                ]),
                inner,
                0..6,
            )
            .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
        ]
    })
}

/// Configs to mutate: the fixtures' plus hand-written ones for the other families.
fn base_configs() -> &'static [Value] {
    static CONFIGS: OnceLock<Vec<Value>> = OnceLock::new();
    CONFIGS.get_or_init(|| {
        let mut configs: Vec<Value> = [
            "glm4-moe-lite-tiny-4.0bpw",
            "llama-tiny-4.0bpw",
            "qwen3-tiny-3.0bpw",
        ]
        .iter()
        .map(|d| common::read_json(&exl3_dir(d).join("config.json")))
        .collect();
        configs.push(json!({
            "model_type": "deepseek_v3", "vocab_size": 1000, "hidden_size": 64,
            "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 4,
            "num_attention_heads": 4, "n_shared_experts": 1, "n_routed_experts": 8,
            "kv_lora_rank": 32, "q_lora_rank": null, "qk_rope_head_dim": 16, "v_head_dim": 16,
            "qk_nope_head_dim": 16, "n_group": 2, "topk_group": 1, "num_experts_per_tok": 2,
            "first_k_dense_replace": 1, "max_position_embeddings": 4096,
            "rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 1024}
        }));
        configs.push(json!({
            "model_type": "gemma3", "eos_token_id": [1, 106],
            "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 6,
                "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0},
                                    "sliding_attention": {"rope_type": "default"}}}
        }));
        configs.push(json!({
            "model_type": "qwen3_moe", "vocab_size": 1000, "hidden_size": 64,
            "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 8,
            "num_experts_per_tok": 2, "decoder_sparse_step": 2, "mlp_only_layers": [0],
            "use_sliding_window": true, "sliding_window": 128, "max_window_layers": 2
        }));
        configs
    })
}

/// Parse and, when that works, use every derived view of the config.
fn exercise_config(value: &Value) {
    let Ok(config) = ModelConfig::from_json(value) else {
        return;
    };
    let common = config.common();
    let _ = config.kv_cache_values_per_token();
    let _ = serde_json::to_string(&config);
    for name in [
        "lm_head",
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.kv_b_proj",
        "model.layers.1.self_attn.q_b_proj",
        "model.layers.2.mlp.experts.3.down_proj",
        "model.layers.1.mlp.shared_experts.up_proj",
        "model.layers.3.eh_proj",
        "model.layers.0.mlp.gate",
    ] {
        let _ = logical_linear_shape(&config, name);
    }
    if let ModelConfig::MlaMoe(c) = &config {
        for layer in [0, 1, common.num_layers, usize::MAX] {
            let _ = c.is_moe_layer(layer);
        }
    }
    if let ModelConfig::Qwen3Moe(c) = &config {
        for layer in [0, 1, usize::MAX] {
            let _ = c.is_moe_layer(layer);
        }
    }
}

proptest! {
    #![proptest_config(cases(256))]

    /// One field of a real config replaced, removed, or nested one level down.
    #[test]
    fn mutated_configs_never_panic(
        which in any::<prop::sample::Index>(),
        edits in prop::collection::vec(
            (any::<prop::sample::Index>(), any::<prop::sample::Index>(), prop::option::of(arb_json())),
            1..4,
        ),
    ) {
        let bases = base_configs();
        let mut config = bases[which.index(bases.len())].clone();
        for (key_pick, nested_pick, value) in edits {
            let obj = config.as_object_mut().unwrap();
            let keys: Vec<String> = obj.keys().cloned().collect();
            let key = keys[key_pick.index(keys.len())].clone();
            // Half the time, edit inside a nested object (rope_parameters, text_config, …).
            let target = match obj.get_mut(&key) {
                Some(Value::Object(inner)) if !inner.is_empty() && nested_pick.index(2) == 0 => {
                    let inner_keys: Vec<String> = inner.keys().cloned().collect();
                    let inner_key = inner_keys[nested_pick.index(inner_keys.len())].clone();
                    (inner, inner_key)
                }
                _ => (obj, key),
            };
            let (map, key) = target;
            match value {
                Some(v) => {
                    map.insert(key, v);
                }
                None => {
                    map.remove(&key);
                }
            }
        }
        exercise_config(&config);
        if let Some(q) = config.get("quantization_config")
            && let Ok(mut parsed) = QuantizationConfig::from_json(q, "config.json")
        {
            let _ = parsed.attach_tensor_storage(&config, "quantization_config.json");
        }
        let _ = GenerationDefaults::from_json(&config, "generation_config.json");
    }

    /// Entirely random documents.
    #[test]
    fn random_json_configs_never_panic(value in arb_json(), model_type in prop::sample::select(
        vec!["glm4_moe_lite", "deepseek_v2", "llama", "mistral", "qwen2", "qwen3", "qwen3_moe",
             "gemma3_text", "gemma3", "unknown"],
    )) {
        exercise_config(&value);
        let mut typed = value.clone();
        if let Value::Object(map) = &mut typed {
            map.insert("model_type".into(), json!(model_type));
        }
        exercise_config(&typed);
        let _ = QuantizationConfig::from_json(&value, "q");
        let _ = GenerationDefaults::from_json(&value, "g");
        let mut storage = QuantizationConfig::from_json(&json!({"quant_method": "exl3"}), "q").unwrap();
        let _ = storage.attach_tensor_storage(&json!({"tensor_storage": value}), "q");
    }
}

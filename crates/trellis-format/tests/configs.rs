//! Config parsing for every supported architecture, both RoPE styles, defaults, and the
//! quantization and generation configs.

mod common;

use common::err_msg;
use serde_json::{Value, json};
use trellis_codec::Codebook;
use trellis_format::{
    Architecture, GenerationDefaults, LayerAttention, LlamaFamily, ModelConfig, QuantizationConfig,
    RopeScaling, ScoringFunc, TopkMethod,
};

fn parse(v: &Value) -> ModelConfig {
    ModelConfig::from_json(v).unwrap_or_else(|e| panic!("{e}"))
}

/// The real GLM-4.7-Flash config (glm-4.7-flash.md §2): classic top-level RoPE fields.
fn glm_flash() -> Value {
    json!({
        "architectures": ["Glm4MoeLiteForCausalLM"], "model_type": "glm4_moe_lite",
        "hidden_size": 2048, "num_hidden_layers": 47, "vocab_size": 154880,
        "intermediate_size": 10240, "moe_intermediate_size": 1536, "n_routed_experts": 64,
        "n_shared_experts": 1, "num_experts_per_tok": 4, "first_k_dense_replace": 1,
        "n_group": 1, "topk_group": 1, "topk_method": "noaux_tc", "routed_scaling_factor": 1.8,
        "norm_topk_prob": true, "q_lora_rank": 768, "kv_lora_rank": 512,
        "qk_nope_head_dim": 192, "qk_rope_head_dim": 64, "v_head_dim": 256,
        "num_attention_heads": 20, "num_key_value_heads": 20, "rope_theta": 1000000,
        "rope_scaling": null, "partial_rotary_factor": 1.0, "rms_norm_eps": 1e-05,
        "max_position_embeddings": 202752, "tie_word_embeddings": false,
        "num_nextn_predict_layers": 1, "hidden_act": "silu", "attention_bias": false,
        "pad_token_id": 154820, "eos_token_id": [154820, 154827, 154829]
    })
}

fn deepseek_v3() -> Value {
    json!({
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
        "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
        "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
        "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
        "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
        "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": true,
        "scoring_func": "sigmoid", "max_position_embeddings": 163840, "rms_norm_eps": 1e-06,
        "rope_theta": 10000,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"},
        "num_nextn_predict_layers": 1, "bos_token_id": 0, "eos_token_id": 1,
        "tie_word_embeddings": false
    })
}

#[test]
fn glm_flash_classic_rope() {
    let config = parse(&glm_flash());
    let ModelConfig::MlaMoe(c) = &config else {
        panic!("not MLA");
    };
    assert_eq!(c.architecture, Architecture::Glm4MoeLite);
    assert_eq!(c.rope.theta, 1e6);
    assert_eq!(c.rope.scaling, RopeScaling::None);
    assert_eq!(c.scoring_func, ScoringFunc::Sigmoid);
    assert!(c.rope_interleave, "class default");
    assert_eq!(c.num_nextn_predict_layers, 1);
    assert_eq!(c.moe_layers.len(), 47);
    assert!(!c.is_moe_layer(0) && c.is_moe_layer(1) && c.is_moe_layer(46));
    assert!(c.is_moe_layer(47), "the MTP layer is MoE");
    assert_eq!(c.tokens.bos, None);
    // glm-4.7-flash.md §9.1: 47 × 576 values = 54,144 bytes per token at 2 bytes.
    assert_eq!(config.kv_cache_values_per_token() * 2, 54_144);
    let common = config.common();
    assert_eq!(common.eos_token_ids, vec![154820, 154827, 154829]);
    assert_eq!(common.max_position_embeddings, 202_752);
}

#[test]
fn deepseek_v3_yarn_and_groups() {
    let config = parse(&deepseek_v3());
    let ModelConfig::MlaMoe(c) = &config else {
        panic!("not MLA");
    };
    assert_eq!(c.architecture, Architecture::DeepseekV3);
    assert_eq!((c.n_group, c.topk_group), (8, 4));
    assert_eq!(c.topk_method, TopkMethod::NoauxTc);
    assert_eq!(c.first_k_dense_replace, 3);
    assert!(!c.is_moe_layer(2) && c.is_moe_layer(3));
    assert_eq!(c.q_lora_rank, Some(1536));
    assert_eq!(c.tokens.eos, vec![1]);
    assert_eq!(c.tokens.bos, Some(0));
    assert_eq!(
        c.rope.scaling,
        RopeScaling::Yarn {
            factor: 40.0,
            original_max_position_embeddings: 4096,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: 1.0,
            mscale_all_dim: 1.0,
            attention_factor: None,
        }
    );
    assert_eq!(config.kv_cache_values_per_token(), 61 * 576);

    // Without scoring_func, deepseek_v3 still means sigmoid.
    let mut v = deepseek_v3();
    v.as_object_mut().unwrap().remove("scoring_func");
    let ModelConfig::MlaMoe(c) = parse(&v) else {
        panic!("not MLA");
    };
    assert_eq!(c.scoring_func, ScoringFunc::Sigmoid);

    // The same YaRN settings in transformers-5 form, with defaults filled in.
    let mut v = deepseek_v3();
    let obj = v.as_object_mut().unwrap();
    obj.remove("rope_theta");
    obj.remove("rope_scaling");
    obj.insert(
        "rope_parameters".into(),
        json!({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40,
               "mscale": 1.0, "mscale_all_dim": 1.0}),
    );
    let ModelConfig::MlaMoe(c) = parse(&v) else {
        panic!("not MLA");
    };
    assert_eq!(c.rope.theta, 10_000.0);
    assert_eq!(
        c.rope.scaling,
        RopeScaling::Yarn {
            factor: 40.0,
            // Falls back to max_position_embeddings, as transformers does.
            original_max_position_embeddings: 163_840,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: 1.0,
            mscale_all_dim: 1.0,
            attention_factor: None,
        }
    );
}

#[test]
fn deepseek_v2_lite_defaults() {
    let mut v = deepseek_v3();
    let obj = v.as_object_mut().unwrap();
    obj.insert("model_type".into(), json!("deepseek_v2"));
    obj.insert("architectures".into(), json!(["DeepseekV2ForCausalLM"]));
    obj.insert("q_lora_rank".into(), Value::Null);
    for key in [
        "scoring_func",
        "topk_method",
        "norm_topk_prob",
        "n_group",
        "topk_group",
    ] {
        obj.remove(key);
    }
    let ModelConfig::MlaMoe(c) = parse(&v) else {
        panic!("not MLA");
    };
    assert_eq!(c.architecture, Architecture::DeepseekV2);
    assert_eq!(c.q_lora_rank, None, "null ⇒ direct q_proj");
    assert_eq!(c.scoring_func, ScoringFunc::Softmax);
    assert_eq!(c.topk_method, TopkMethod::Greedy);
    assert!(!c.norm_topk_prob);
    assert_eq!((c.n_group, c.topk_group), (1, 1));

    v.as_object_mut().unwrap().remove("q_lora_rank");
    let msg = err_msg(ModelConfig::from_json(&v));
    assert!(
        msg.contains("`q_lora_rank` missing") && msg.contains("null"),
        "{msg}"
    );

    let mut v = deepseek_v3();
    v["scoring_func"] = json!("relu");
    assert!(err_msg(ModelConfig::from_json(&v)).contains("scoring_func"));
    let mut v = deepseek_v3();
    v["num_experts_per_tok"] = json!(300);
    assert!(err_msg(ModelConfig::from_json(&v)).contains("n_routed_experts 256"));
    let mut v = deepseek_v3();
    v["moe_layer_freq"] = json!(0);
    assert!(err_msg(ModelConfig::from_json(&v)).contains("moe_layer_freq"));
}

fn llama_like(model_type: &str, class: &str) -> Value {
    json!({
        "architectures": [class], "model_type": model_type, "vocab_size": 32000,
        "hidden_size": 4096, "num_hidden_layers": 4, "num_attention_heads": 32,
        "num_key_value_heads": 8, "intermediate_size": 14336, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "bos_token_id": 1,
        "eos_token_id": 2
    })
}

#[test]
fn llama_family_members() {
    let ModelConfig::Llama(c) = parse(&llama_like("llama", "LlamaForCausalLM")) else {
        panic!("not Llama");
    };
    assert_eq!(c.family, LlamaFamily::Llama);
    assert_eq!(c.head_dim, 128, "hidden / heads");
    assert_eq!(c.layer_types, vec![LayerAttention::Full; 4]);
    assert_eq!(c.rope.scaling, RopeScaling::None);
    assert_eq!(c.tokens.eos, vec![2]);

    let mut m = llama_like("mistral", "MistralForCausalLM");
    m["sliding_window"] = json!(4096);
    let ModelConfig::Llama(c) = parse(&m) else {
        panic!("not Llama");
    };
    assert_eq!(c.family, LlamaFamily::Mistral);
    assert_eq!(c.sliding_window, Some(4096));
    assert_eq!(c.layer_types, vec![LayerAttention::Sliding; 4]);
    m["sliding_window"] = Value::Null;
    let ModelConfig::Llama(c) = parse(&m) else {
        panic!("not Llama");
    };
    assert_eq!(c.sliding_window, None);

    // Qwen2: q/k/v biases without a config key; the window is off unless switched on.
    let mut q = llama_like("qwen2", "Qwen2ForCausalLM");
    q["sliding_window"] = json!(131072);
    q["use_sliding_window"] = json!(false);
    q["max_window_layers"] = json!(2);
    q["tie_word_embeddings"] = json!(true);
    let ModelConfig::Llama(c) = parse(&q) else {
        panic!("not Llama");
    };
    assert_eq!(c.family, LlamaFamily::Qwen2);
    assert!(c.qkv_bias && !c.o_bias && c.tie_word_embeddings);
    assert_eq!(c.sliding_window, None);
    q["use_sliding_window"] = json!(true);
    let ModelConfig::Llama(c) = parse(&q) else {
        panic!("not Llama");
    };
    assert_eq!(c.sliding_window, Some(131_072));
    use LayerAttention::{Full, Sliding};
    assert_eq!(c.layer_types, vec![Full, Full, Sliding, Sliding]);

    // Qwen3 with an explicit head_dim wider than hidden / heads, and a linear-scaled RoPE.
    let mut q3 = llama_like("qwen3", "Qwen3ForCausalLM");
    q3["head_dim"] = json!(256);
    q3["rope_scaling"] = json!({"type": "linear", "factor": 2.0});
    q3["partial_rotary_factor"] = json!(0.5);
    let config = parse(&q3);
    let ModelConfig::Llama(c) = &config else {
        panic!("not Llama");
    };
    assert!(c.qk_norm);
    assert_eq!(c.head_dim, 256);
    assert_eq!(c.rope.scaling, RopeScaling::Linear { factor: 2.0 });
    assert_eq!(c.rope.partial_rotary_factor, 0.5);
    assert_eq!(config.kv_cache_values_per_token(), 4 * 2 * 8 * 256);

    q3["rope_scaling"] = json!({"type": "dynamic", "factor": 2.0});
    let msg = err_msg(ModelConfig::from_json(&q3));
    assert!(
        msg.contains("rope_scaling.type") && msg.contains("dynamic"),
        "{msg}"
    );
    q3["rope_scaling"] = Value::Null;
    q3["partial_rotary_factor"] = json!(1.5);
    assert!(err_msg(ModelConfig::from_json(&q3)).contains("partial_rotary_factor"));
}

#[test]
fn qwen3_moe() {
    let mut v = llama_like("qwen3_moe", "Qwen3MoeForCausalLM");
    let obj = v.as_object_mut().unwrap();
    obj.insert("num_experts".into(), json!(128));
    obj.insert("num_experts_per_tok".into(), json!(8));
    obj.insert("moe_intermediate_size".into(), json!(768));
    obj.insert("norm_topk_prob".into(), json!(true));
    obj.insert("decoder_sparse_step".into(), json!(1));
    obj.insert("mlp_only_layers".into(), json!([0]));
    obj.insert("head_dim".into(), json!(128));
    let config = parse(&v);
    let ModelConfig::Qwen3Moe(c) = &config else {
        panic!("not Qwen3-MoE");
    };
    assert_eq!(config.architecture(), Architecture::Qwen3Moe);
    assert_eq!((c.num_experts, c.num_experts_per_tok), (128, 8));
    assert!(c.norm_topk_prob);
    assert!(!c.is_moe_layer(0) && c.is_moe_layer(1) && c.is_moe_layer(3));
    v["decoder_sparse_step"] = json!(2);
    v["mlp_only_layers"] = json!([]);
    let ModelConfig::Qwen3Moe(c) = parse(&v) else {
        panic!("not Qwen3-MoE");
    };
    let moe: Vec<bool> = (0..4).map(|i| c.is_moe_layer(i)).collect();
    assert_eq!(moe, vec![false, true, false, true]);
    v["decoder_sparse_step"] = json!(0);
    assert!(err_msg(ModelConfig::from_json(&v)).contains("decoder_sparse_step"));
}

#[test]
fn gemma3_text_and_wrapper() {
    let text = json!({
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
        "vocab_size": 262144, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
        "rope_scaling": null, "sliding_window": 512, "sliding_window_pattern": 6,
        "query_pre_attn_scalar": 256, "final_logit_softcapping": null,
        "attn_logit_softcapping": null, "max_position_embeddings": 32768,
        "eos_token_id": [1, 106], "bos_token_id": 2, "pad_token_id": 0
    });
    let config = parse(&text);
    let ModelConfig::Gemma3(c) = &config else {
        panic!("not Gemma 3");
    };
    assert_eq!(c.architecture, Architecture::Gemma3Text);
    assert_eq!(c.layer_types.len(), 26);
    let globals: Vec<usize> = (0..26)
        .filter(|&i| c.layer_types[i] == LayerAttention::Full)
        .collect();
    assert_eq!(globals, vec![5, 11, 17, 23]);
    assert_eq!(c.rope_global.theta, 1e6);
    assert_eq!(c.rope_local.theta, 10_000.0);
    assert_eq!(c.sliding_window, 512);
    assert_eq!(c.final_logit_softcapping, None);
    assert_eq!(c.hidden_activation, "gelu_pytorch_tanh");
    assert!(c.tie_word_embeddings, "default true");
    assert_eq!(c.tokens.eos, vec![1, 106]);
    assert_eq!(config.kv_cache_values_per_token(), 26 * 2 * 256);

    // The multimodal wrapper of the 4B model: a sparse text_config relying on defaults.
    let wrapper = json!({
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "eos_token_id": [1, 106],
        "text_config": {
            "hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
            "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "sliding_window": 1024
        },
        "vision_config": {"hidden_size": 1152}
    });
    let config = parse(&wrapper);
    let ModelConfig::Gemma3(c) = &config else {
        panic!("not Gemma 3");
    };
    assert_eq!(c.architecture, Architecture::Gemma3);
    assert_eq!(
        (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
        (8, 4, 256)
    );
    assert_eq!(c.vocab_size, 262_208);
    assert_eq!(c.rope_global.scaling, RopeScaling::Linear { factor: 8.0 });
    assert_eq!(c.rope_local.scaling, RopeScaling::None);
    assert_eq!(c.tokens.eos, vec![1, 106]);
    assert_eq!((c.tokens.bos, c.tokens.pad), (Some(2), Some(0)));
    assert_eq!(
        config.common().architecture,
        "Gemma3ForConditionalGeneration"
    );
    let missing = json!({"model_type": "gemma3"});
    assert!(err_msg(ModelConfig::from_json(&missing)).contains("text_config"));
    let mut partial = wrapper.clone();
    partial["text_config"]
        .as_object_mut()
        .unwrap()
        .remove("hidden_size");
    assert!(
        err_msg(ModelConfig::from_json(&partial)).contains("`text_config.hidden_size` missing")
    );

    // transformers 5: rope_parameters keyed by layer type, explicit layer_types.
    let mut t5 = text.clone();
    let obj = t5.as_object_mut().unwrap();
    for key in [
        "rope_theta",
        "rope_local_base_freq",
        "rope_scaling",
        "sliding_window_pattern",
    ] {
        obj.remove(key);
    }
    obj.insert(
        "rope_parameters".into(),
        json!({
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}
        }),
    );
    let mut types = vec!["sliding_attention"; 26];
    types[3] = "full_attention";
    obj.insert("layer_types".into(), json!(types));
    let ModelConfig::Gemma3(c) = parse(&t5) else {
        panic!("not Gemma 3");
    };
    assert_eq!(c.rope_global.theta, 1e6);
    assert_eq!(c.rope_global.scaling, RopeScaling::Linear { factor: 8.0 });
    assert_eq!(c.rope_local.theta, 10_000.0);
    assert_eq!(c.rope_local.scaling, RopeScaling::None);
    assert_eq!(c.layer_types[3], LayerAttention::Full);
    assert_eq!(c.layer_types[5], LayerAttention::Sliding);
    t5["layer_types"] = json!(["full_attention"]);
    assert!(err_msg(ModelConfig::from_json(&t5)).contains("one per layer (26)"));
    t5["layer_types"] = json!(vec!["full_attention"; 26]);
    t5["rope_parameters"]
        .as_object_mut()
        .unwrap()
        .remove("full_attention");
    assert!(err_msg(ModelConfig::from_json(&t5)).contains("rope_parameters.full_attention"));
}

#[test]
fn field_types_and_detection() {
    let mut v = llama_like("llama", "LlamaForCausalLM");
    v["hidden_size"] = json!(4096.0);
    v["pad_token_id"] = json!(-1);
    v["eos_token_id"] = json!([2, 128009]);
    let config = parse(&v);
    let common = config.common();
    assert_eq!(common.hidden_size, 4096, "integral floats are accepted");
    assert_eq!(common.pad_token_id, None, "-1 means none");
    assert_eq!(common.eos_token_ids, vec![2, 128009]);
    v["hidden_size"] = json!(4096.5);
    assert!(err_msg(ModelConfig::from_json(&v)).contains("got 4096.5"));
    v["hidden_size"] = json!(4096);
    v["eos_token_id"] = json!("</s>");
    assert!(err_msg(ModelConfig::from_json(&v)).contains("eos_token_id"));

    // Detection by class name alone.
    let mut by_class = llama_like("llama", "MistralForCausalLM");
    by_class.as_object_mut().unwrap().remove("model_type");
    assert_eq!(parse(&by_class).architecture(), Architecture::Mistral);
    let msg = err_msg(ModelConfig::from_json(&json!({"hidden_size": 1})));
    assert!(
        msg.contains("neither `model_type` nor `architectures`"),
        "{msg}"
    );
    assert!(err_msg(ModelConfig::from_json(&json!([1, 2]))).contains("JSON object"));
    for arch in Architecture::ALL {
        assert_eq!(Architecture::from_model_type(arch.model_type()), Some(arch));
        assert_eq!(Architecture::from_class_name(arch.class_name()), Some(arch));
    }
    // Configs serialise (for `inspect --json`).
    serde_json::to_string(&parse(&glm_flash())).unwrap();
}

#[test]
fn quantization_config_fields() {
    let q = QuantizationConfig::from_json(
        &json!({
            "quant_method": "exl3", "version": "1.6.5", "bits": 4.03, "head_bits": 6,
            "calibration": {"rows": 250, "cols": 2048}, "out_scales": "always",
            "codebook": "mcg", "mtp_bits": 4,
            "original_quantization_config": {"quant_method": "fp8"}
        }),
        "config.json",
    )
    .unwrap();
    assert_eq!(q.bits, Some(4.03));
    assert_eq!(q.head_bits, Some(6.0));
    assert_eq!(q.calibration.map(|c| (c.rows, c.cols)), Some((250, 2048)));
    assert_eq!(q.codebook, Some(Codebook::Mcg));
    assert_eq!(q.mtp_bits, Some(4.0));
    assert_eq!(q.vision_bits, None);
    assert!(q.original_quantization_config.is_some());
    let json = serde_json::to_value(&q).unwrap();
    assert_eq!(json["codebook"], "mcg");

    let minimal = QuantizationConfig::from_json(&json!({"quant_method": "exl3"}), "c").unwrap();
    assert_eq!(minimal.codebook, None);
    let msg = err_msg(QuantizationConfig::from_json(&json!({"bits": 4}), "c.json"));
    assert!(
        msg.contains("quant_method") && msg.contains("exl3"),
        "{msg}"
    );
    let msg = err_msg(QuantizationConfig::from_json(
        &json!({"quant_method": "exl3", "codebook": "hyb"}),
        "c.json",
    ));
    assert!(msg.contains("c.json") && msg.contains("hyb"), "{msg}");
    let msg = err_msg(QuantizationConfig::from_json(
        &json!({"quant_method": "exl3", "bits": "four"}),
        "c.json",
    ));
    assert!(msg.contains("`bits`"), "{msg}");
}

#[test]
fn generation_defaults() {
    let g = GenerationDefaults::from_json(
        &json!({"eos_token_id": 7, "temperature": 0.6, "top_p": 0.95, "top_k": -1,
                "min_p": 0.0, "repetition_penalty": 1.1, "do_sample": true,
                "max_new_tokens": 256, "transformers_version": "5.0"}),
        "generation_config.json",
    )
    .unwrap();
    assert_eq!(g.eos_token_id, Some(vec![7]));
    assert_eq!(g.temperature, Some(0.6));
    assert_eq!(g.top_p, Some(0.95));
    assert_eq!(g.top_k, None);
    assert_eq!(g.min_p, Some(0.0));
    assert_eq!(g.repetition_penalty, Some(1.1));
    assert_eq!(g.do_sample, Some(true));
    assert_eq!(g.max_new_tokens, Some(256));
    let g = GenerationDefaults::from_json(&json!({"top_k": 40}), "g").unwrap();
    assert_eq!(g.top_k, Some(40));
    let msg = err_msg(GenerationDefaults::from_json(
        &json!({"top_p": -1}),
        "g.json",
    ));
    assert!(msg.contains("g.json") && msg.contains("top_p"), "{msg}");
}

/// A corrupt layer count is refused before any per-layer table is sized from it (it used to
/// overflow a Vec's capacity: a panic, found by the mutation fuzz test).
#[test]
fn absurd_layer_counts_are_refused() {
    let configs = [
        llama_like("llama", "LlamaForCausalLM"),
        llama_like("mistral", "MistralForCausalLM"),
        glm_flash(),
        deepseek_v3(),
    ];
    for mut v in configs {
        v["num_hidden_layers"] = json!(1u64 << 62);
        let msg = err_msg(ModelConfig::from_json(&v));
        assert!(
            msg.contains("num_hidden_layers") && msg.contains("layers"),
            "{msg}"
        );
        v["num_hidden_layers"] = json!(65_536);
        ModelConfig::from_json(&v).unwrap_or_else(|e| panic!("65,536 layers: {e}"));
    }
}

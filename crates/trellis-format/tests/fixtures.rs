//! Every fixture model directory opens, its config parses to the documented values, every
//! quantized linear loads with the right K and codebook and decodes, dense tensors load with
//! checked shapes, and the summary reports the parameter counts derived below.

mod common;

use common::exl3_dir;
use std::borrow::Cow;
use trellis_codec::{BitWidth, Codebook};
use trellis_format::{
    Architecture, DType, LayerAttention, LinearWeights, LlamaFamily, ModelConfig, ModelDir,
    RopeScaling, ScoringFunc, TensorKind, TopkMethod, logical_linear_shape, summarize,
};
use trellis_testutil::{EXL3_MODELS, fixture};

const GLM_DIRS: [(&str, f64, Codebook); 3] = [
    ("glm4-moe-lite-tiny-4.0bpw", 4.0, Codebook::Mul1),
    ("glm4-moe-lite-tiny-2.5bpw", 2.5, Codebook::Mul1),
    ("glm4-moe-lite-tiny-3.0bpw-mcg", 3.0, Codebook::Mcg),
];

fn bits(k: f64) -> BitWidth {
    BitWidth::from_f64(k).unwrap()
}

fn mla(dir: &ModelDir) -> &trellis_format::MlaMoeConfig {
    match &dir.config {
        ModelConfig::MlaMoe(c) => c,
        other => panic!("expected an MLA config, got {other:?}"),
    }
}

/// The logical shapes of every linear of the tiny GLM model, by module name.
fn glm_linears() -> Vec<(String, usize, usize)> {
    let mut out = vec![("lm_head".to_string(), 512, 2048)];
    for layer in 0..3 {
        let attn = format!("model.layers.{layer}.self_attn");
        out.push((format!("{attn}.q_a_proj"), 512, 768));
        out.push((format!("{attn}.q_b_proj"), 768, 4 * 256));
        out.push((format!("{attn}.kv_a_proj_with_mqa"), 512, 576));
        out.push((format!("{attn}.o_proj"), 4 * 256, 512));
        let mlp = format!("model.layers.{layer}.mlp");
        let mut ffn = |prefix: String, width: usize| {
            out.push((format!("{prefix}.gate_proj"), 512, width));
            out.push((format!("{prefix}.up_proj"), 512, width));
            out.push((format!("{prefix}.down_proj"), width, 512));
        };
        if layer == 0 {
            ffn(mlp.clone(), 1024);
        } else {
            for e in 0..16 {
                ffn(format!("{mlp}.experts.{e}"), 256);
            }
            ffn(format!("{mlp}.shared_experts"), 256);
        }
    }
    out
}

#[test]
fn every_fixture_dir_opens() {
    for name in EXL3_MODELS {
        let dir = ModelDir::open(&exl3_dir(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(dir.quantization.is_some(), "{name}");
        assert!(!dir.tensors.is_empty());
        assert_eq!(dir.tensors.files().len(), 1);
        let q = dir.quantization.as_ref().unwrap();
        assert_eq!(q.quant_method, "exl3");
        assert_eq!(q.version.as_deref(), Some("1.6.5"));
        assert_eq!(q.head_bits, Some(6.0));
        assert_eq!(q.out_scales.as_deref(), Some("auto"));
        let storage = q
            .tensor_storage
            .as_ref()
            .expect("quantization_config.json index");
        // The convenience index agrees with the headers on every stored tensor.
        for module in storage.values() {
            for (tensor, info) in &module.stored_tensors {
                let view = dir.tensors.get(tensor).unwrap();
                assert_eq!(view.shape, info.shape.as_slice(), "{tensor}");
                assert_eq!(view.bytes.len() as u64, info.n_bytes, "{tensor}");
            }
        }
    }
    let hf = ModelDir::open(&fixture("hf/glm4-moe-lite-tiny")).unwrap();
    assert!(hf.quantization.is_none());
    assert_eq!(hf.tensors.len(), 139);
}

#[test]
fn glm_config_values() {
    for path in [
        fixture("hf/glm4-moe-lite-tiny"),
        exl3_dir("glm4-moe-lite-tiny-4.0bpw"),
    ] {
        let dir = ModelDir::open(&path).unwrap();
        let c = mla(&dir);
        assert_eq!(c.architecture, Architecture::Glm4MoeLite);
        assert_eq!(c.class_name, "Glm4MoeLiteForCausalLM");
        assert_eq!(
            (c.vocab_size, c.hidden_size, c.num_hidden_layers),
            (2048, 512, 3)
        );
        assert_eq!((c.intermediate_size, c.moe_intermediate_size), (1024, 256));
        assert_eq!(
            (
                c.n_routed_experts,
                c.n_shared_experts,
                c.num_experts_per_tok
            ),
            (16, 1, 4)
        );
        assert_eq!((c.first_k_dense_replace, c.moe_layer_freq), (1, 1));
        assert_eq!((c.n_group, c.topk_group), (1, 1));
        assert_eq!(c.topk_method, TopkMethod::NoauxTc);
        assert_eq!(c.scoring_func, ScoringFunc::Sigmoid, "absent ⇒ sigmoid");
        assert_eq!(c.routed_scaling_factor, 1.8);
        assert!(c.norm_topk_prob);
        assert_eq!(c.q_lora_rank, Some(768));
        assert_eq!(
            (c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim),
            (512, 192, 64)
        );
        assert_eq!((c.v_head_dim, c.num_attention_heads), (256, 4));
        assert_eq!(c.qk_head_dim(), 256);
        assert_eq!(c.rms_norm_eps, 1e-5);
        // rope_parameters form (transformers 5), no top-level rope_theta.
        assert_eq!(c.rope.theta, 1e6);
        assert_eq!(c.rope.scaling, RopeScaling::None);
        assert_eq!(c.rope.partial_rotary_factor, 1.0);
        assert!(c.rope_interleave);
        assert_eq!(c.max_position_embeddings, 4096);
        assert!(!c.tie_word_embeddings);
        assert_eq!(c.num_nextn_predict_layers, 0);
        assert!(!c.attention_bias);
        assert_eq!(c.tokens.eos, vec![2028, 2035, 2037]);
        assert_eq!(c.tokens.bos, None);
        assert_eq!(c.tokens.pad, Some(2028));
        assert_eq!(c.moe_layers, vec![false, true, true]);
        assert!(!c.is_moe_layer(0) && c.is_moe_layer(1) && c.is_moe_layer(2));

        let common = dir.config.common();
        assert_eq!(common.architecture, "Glm4MoeLiteForCausalLM");
        assert_eq!(common.model_type, "glm4_moe_lite");
        assert_eq!(common.num_layers, 3);
        assert_eq!(common.eos_token_ids, vec![2028, 2035, 2037]);
        // 3 layers × (512 + 64) latent values.
        assert_eq!(dir.config.kv_cache_values_per_token(), 1728);
        assert_eq!(dir.generation.eos_token_id, Some(vec![2028, 2035, 2037]));
        assert_eq!(dir.generation.do_sample, Some(false));
        assert_eq!(dir.generation.pad_token_id, Some(2028));
        assert_eq!(dir.generation.temperature, None);
        assert_eq!(dir.eos_token_ids(), vec![2028, 2035, 2037]);
    }
}

#[test]
fn llama_and_qwen3_config_values() {
    let llama = ModelDir::open(&exl3_dir("llama-tiny-4.0bpw")).unwrap();
    let ModelConfig::Llama(c) = &llama.config else {
        panic!("llama-tiny is not a Llama config");
    };
    assert_eq!(c.family, LlamaFamily::Llama);
    assert_eq!(c.architecture, Architecture::Llama);
    assert_eq!(
        (c.vocab_size, c.hidden_size, c.num_hidden_layers),
        (2048, 512, 2)
    );
    assert_eq!(
        (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
        (8, 2, 64)
    );
    assert_eq!(c.intermediate_size, 1024);
    assert_eq!(c.rms_norm_eps, 1e-5);
    assert_eq!(c.rope.theta, 500_000.0);
    assert_eq!(
        c.rope.scaling,
        RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 256
        }
    );
    assert!(!c.tie_word_embeddings && !c.qkv_bias && !c.o_bias && !c.mlp_bias && !c.qk_norm);
    assert_eq!(c.sliding_window, None);
    assert_eq!(c.max_position_embeddings, 2048);
    assert_eq!(c.tokens.eos, vec![2029, 2036, 2037]);
    assert_eq!(c.tokens.bos, Some(2028));
    assert_eq!(c.tokens.pad, None);
    // 2 layers × 2 × 2 KV heads × 64.
    assert_eq!(llama.config.kv_cache_values_per_token(), 512);
    assert_eq!(llama.generation.bos_token_id, Some(2028));

    let qwen = ModelDir::open(&exl3_dir("qwen3-tiny-3.0bpw")).unwrap();
    let ModelConfig::Llama(c) = &qwen.config else {
        panic!("qwen3-tiny is not a Llama-family config");
    };
    assert_eq!(c.family, LlamaFamily::Qwen3);
    assert_eq!(
        (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
        (8, 4, 128)
    );
    assert!(c.qk_norm && !c.qkv_bias);
    assert_eq!(c.rms_norm_eps, 1e-6);
    assert_eq!(c.rope.theta, 1e6);
    assert_eq!(c.rope.scaling, RopeScaling::None);
    assert_eq!(c.layer_types, vec![LayerAttention::Full; 2]);
    assert_eq!(c.sliding_window, None);
    // The EXL3 conversion unties the head (it stores a separate lm_head).
    assert!(!c.tie_word_embeddings);
    assert_eq!(c.tokens.eos, vec![2030, 2028]);
    // 2 layers × 2 × 4 KV heads × 128.
    assert_eq!(qwen.config.kv_cache_values_per_token(), 2048);
}

#[test]
fn every_quantized_linear_loads_with_its_k_and_codebook() {
    for (name, k, codebook) in GLM_DIRS {
        let dir = ModelDir::open(&exl3_dir(name)).unwrap();
        let linears = glm_linears();
        assert_eq!(linears.len(), 118, "117 linears + lm_head");
        for (prefix, in_f, out_f) in linears {
            let weights = dir.tensors.linear(&prefix, in_f, out_f).unwrap();
            let LinearWeights::Trellis(t) = &weights else {
                panic!("{name}: {prefix} is not EXL3");
            };
            let expect_k = if prefix == "lm_head" { 6.0 } else { k };
            assert_eq!(t.bits, bits(expect_k), "{name}: {prefix}");
            assert_eq!(t.codebook, codebook, "{name}: {prefix}");
            assert_eq!((t.in_features, t.out_features), (in_f, out_f));
            assert_eq!(weights.in_features(), in_f);
            assert_eq!(weights.out_features(), out_f);
            assert!(t.bias.is_none());
            // The summary's name-based sizes agree with the hand-written table.
            assert_eq!(
                logical_linear_shape(&dir.config, &prefix),
                Some((in_f, out_f)),
                "{prefix}"
            );
        }
    }
}

#[test]
fn quantized_linears_decode_and_borrow_from_the_map() {
    for (name, _, _) in GLM_DIRS {
        let dir = ModelDir::open(&exl3_dir(name)).unwrap();
        for (prefix, in_f, out_f) in [
            ("model.layers.1.self_attn.kv_a_proj_with_mqa", 512, 576),
            ("model.layers.1.mlp.experts.3.down_proj", 256, 512),
            ("lm_head", 512, 2048),
        ] {
            let LinearWeights::Trellis(t) = dir.tensors.linear(prefix, in_f, out_f).unwrap() else {
                panic!("{prefix} is not EXL3");
            };
            assert!(
                matches!(t.trellis, Cow::Borrowed(_)),
                "{prefix} trellis copied"
            );
            assert!(matches!(t.suh, Cow::Borrowed(_)), "{prefix} suh copied");
            let inner = t.decode_inner();
            assert_eq!(inner.len(), t.k_padded * t.n_padded);
            assert!(inner.iter().all(|v| v.is_finite()));
            let dense = t.reconstruct();
            assert_eq!(dense.len(), in_f * out_f);
            assert!(dense.iter().all(|v| v.is_finite()));
        }
    }
    // Every linear of every other fixture decodes (the Llama and Qwen3 conversions).
    for (name, k) in [("llama-tiny-4.0bpw", 4.0), ("qwen3-tiny-3.0bpw", 3.0)] {
        let dir = ModelDir::open(&exl3_dir(name)).unwrap();
        let prefixes: Vec<String> = dir
            .tensors
            .names()
            .filter_map(|n| n.strip_suffix(".trellis").map(str::to_string))
            .collect();
        assert_eq!(prefixes.len(), 15, "{name}: 14 linears + lm_head");
        for prefix in prefixes {
            let (in_f, out_f) = logical_linear_shape(&dir.config, &prefix).unwrap();
            let LinearWeights::Trellis(t) = dir.tensors.linear(&prefix, in_f, out_f).unwrap()
            else {
                panic!("{prefix} is not EXL3");
            };
            let expect_k = if prefix == "lm_head" { 6.0 } else { k };
            assert_eq!(t.bits, bits(expect_k), "{name}: {prefix}");
            assert_eq!(t.codebook, Codebook::Mul1);
            assert!(t.decode_inner().iter().all(|v| v.is_finite()));
        }
    }
}

#[test]
fn kv_a_proj_is_padded_to_640() {
    for (name, k, _) in GLM_DIRS {
        let dir = ModelDir::open(&exl3_dir(name)).unwrap();
        let prefix = "model.layers.0.self_attn.kv_a_proj_with_mqa";
        let shape = dir.tensors.trellis_shape(prefix).unwrap();
        assert_eq!((shape.k_padded, shape.n_padded), (512, 640));
        assert_eq!(shape.bits, bits(k));
        let LinearWeights::Trellis(t) = dir.tensors.linear(prefix, 512, 576).unwrap() else {
            panic!("not EXL3");
        };
        assert_eq!((t.n_padded, t.out_features), (640, 576));
        assert_eq!(t.svh.len(), 640);
        // The padded output scales are exactly zero (exl3-format.md §3.3).
        assert!(t.svh[576..].iter().all(|v| v.to_f32() == 0.0));
        // Any logical width that pads to 640 is accepted; one that pads elsewhere means the
        // config and the tensors disagree.
        assert!(dir.tensors.linear(prefix, 512, 640).is_ok());
        let err = dir
            .tensors
            .linear(prefix, 512, 512)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("{prefix}.trellis")), "{err}");
        assert!(err.contains("out_features 512"), "{err}");
    }
}

#[test]
fn dense_tensors_load_with_checked_shapes() {
    for (name, _, _) in GLM_DIRS {
        let dir = ModelDir::open(&exl3_dir(name)).unwrap();
        let t = &dir.tensors;
        for layer in 0..3 {
            let kv_b = t
                .linear(
                    &format!("model.layers.{layer}.self_attn.kv_b_proj"),
                    512,
                    4 * (192 + 256),
                )
                .unwrap();
            let LinearWeights::Dense { weight, bias } = kv_b else {
                panic!("kv_b_proj should be dense");
            };
            assert_eq!(weight.dtype, DType::F16);
            assert_eq!(weight.shape, &[1792, 512]);
            assert!(bias.is_none());
            assert_eq!(weight.as_f16().unwrap().len(), 1792 * 512);
            assert_eq!(weight.to_f32().unwrap().len(), 1792 * 512);
        }
        for layer in 1..3 {
            let router = t
                .expect(
                    &format!("model.layers.{layer}.mlp.gate.weight"),
                    &[DType::F16],
                    &[16, 512],
                )
                .unwrap();
            assert_eq!(router.numel(), 16 * 512);
            let bias = t
                .expect(
                    &format!("model.layers.{layer}.mlp.gate.e_score_correction_bias"),
                    &[DType::F32],
                    &[16],
                )
                .unwrap();
            let values = bias.to_f32().unwrap();
            assert_eq!(values, bias.as_f32().unwrap().into_owned());
            assert!(values.iter().all(|v| v.is_finite() && v.abs() < 1.0));
            // The router is also reachable as a dense linear [out, in].
            let gate = t
                .linear(&format!("model.layers.{layer}.mlp.gate"), 512, 16)
                .unwrap();
            assert!(!gate.is_quantized());
        }
        let embed = t
            .expect("model.embed_tokens.weight", &[DType::BF16], &[2048, 512])
            .unwrap();
        assert_eq!(embed.as_bf16().unwrap().len(), 2048 * 512);
        let norm = t.expect("model.norm.weight", &[DType::BF16, DType::F16], &[512]);
        assert!(norm.is_ok());
        let marker = t.get("lm_head.trellis").unwrap();
        assert_eq!(marker.dtype, DType::I16);
        assert_eq!(marker.as_u16_words().unwrap().len(), marker.numel());
    }
}

#[test]
fn hf_checkpoint_linears_are_dense() {
    let dir = ModelDir::open(&fixture("hf/glm4-moe-lite-tiny")).unwrap();
    for (prefix, in_f, out_f) in glm_linears() {
        let w = dir.tensors.linear(&prefix, in_f, out_f).unwrap();
        let LinearWeights::Dense { weight, .. } = w else {
            panic!("{prefix} is not dense in the HF checkpoint");
        };
        assert_eq!(weight.dtype, DType::BF16);
        assert_eq!(weight.shape, &[out_f, in_f]);
    }
    let bias = dir
        .tensors
        .get("model.layers.1.mlp.gate.e_score_correction_bias")
        .unwrap();
    assert_eq!(bias.dtype, DType::F32);
}

/// Parameter counts, derived by hand:
///
/// * GLM tiny (25,812,256 = the fixture README's count): embed + lm_head 2 × 2048·512 =
///   2,097,152; final norm 512; per layer attention q_a 512·768 + q_a_norm 768 +
///   q_b 768·1024 + kv_a 512·576 + kv_a_norm 512 + kv_b 512·1792 + o 1024·512 + 2 norms
///   1024 = 2,918,656 (× 3); dense FFN of layer 0 3·512·1024 = 1,572,864; each MoE layer
///   17 experts · 3·512·256 + router 16·512 + bias 16 = 6,692,880 (× 2). The EXL3
///   conversions count the same: linears are counted unpadded (kv_a 576, not 640) and
///   suh/svh/markers are not parameters.
/// * Llama tiny (6,556,160, as documented): 2,097,152 + 512 + 2 × (attention
///   2·512·512 + 2·512·128 = 655,360; FFN 1,572,864; norms 1,024).
/// * Qwen3 tiny: the original is tied and has 7,343,104 parameters; the EXL3 conversion
///   stores a separate quantized lm_head (512·2048 = 1,048,576), so the stored model has
///   8,391,680: embed 1,048,576 + lm_head 1,048,576 + norm 512 + 2 × (attention
///   512·1024 + 2·512·512 + 1024·512 = 1,572,864; q/k norms 256; FFN 1,572,864; norms 1,024).
#[test]
fn summary_parameter_counts() {
    let cases = [
        ("hf/glm4-moe-lite-tiny", 25_812_256u64, 0usize),
        ("exl3/glm4-moe-lite-tiny-4.0bpw", 25_812_256, 118),
        ("exl3/glm4-moe-lite-tiny-2.5bpw", 25_812_256, 118),
        ("exl3/glm4-moe-lite-tiny-3.0bpw-mcg", 25_812_256, 118),
        ("exl3/llama-tiny-4.0bpw", 6_556_160, 15),
        ("exl3/qwen3-tiny-3.0bpw", 8_391_680, 15),
    ];
    for (path, params, linears) in cases {
        let dir = ModelDir::open(&fixture(path)).unwrap();
        let s = summarize(&dir).unwrap();
        assert_eq!(s.parameters, params, "{path}");
        assert_eq!(s.exl3_linears, linears, "{path}");
        assert_eq!(s.parameters, s.exl3_parameters + s.dense_parameters);
        assert!(s.notes.is_empty(), "{path}: {:?}", s.notes);
        assert_eq!(s.total_file_bytes, dir.tensors.total_file_bytes());
        assert_eq!(
            s.total_file_bytes,
            std::fs::metadata(fixture(&format!("{path}/model.safetensors")))
                .unwrap()
                .len()
        );
        let listed: u64 = s.tensors.iter().map(|t| t.bytes).sum();
        // Every byte of tensor data is attributed to exactly one summary row.
        let data: u64 = dir
            .tensors
            .names()
            .map(|n| dir.tensors.get(n).unwrap().bytes.len() as u64)
            .sum();
        assert_eq!(listed, data, "{path}");
        serde_json::to_string(&s).unwrap();
        assert!(s.to_string().contains(&params.to_string()));
    }
}

#[test]
fn summary_bits_histogram_and_kv() {
    for (name, k, codebook) in GLM_DIRS {
        let dir = ModelDir::open(&exl3_dir(name)).unwrap();
        let s = summarize(&dir).unwrap();
        assert_eq!(s.architecture, "Glm4MoeLiteForCausalLM");
        assert_eq!(s.bpw_excluding_head, Some(k), "{name}");
        // Including the K = 6 head raises the mean by the head's share of the weights.
        let head_weights = 512u64 * 2048;
        let body_weights = s.exl3_parameters - head_weights;
        let expect_all = (k * body_weights as f64 + 6.0 * head_weights as f64)
            / (body_weights + head_weights) as f64;
        assert!((s.bpw_including_head.unwrap() - expect_all).abs() < 1e-12);
        assert!(s.exl3_storage_bpw.unwrap() > s.bpw_including_head.unwrap());
        assert_eq!(s.bpw_histogram.len(), 2);
        assert_eq!(s.bpw_histogram[0].bits, k);
        assert_eq!(s.bpw_histogram[0].linears, 117);
        assert_eq!(s.bpw_histogram[0].weights, body_weights);
        assert_eq!(s.bpw_histogram[1].bits, 6.0);
        assert_eq!(s.bpw_histogram[1].linears, 1);
        assert_eq!(s.codebooks, vec![codebook.name()]);
        // 3 × 576 latent values × 2 bytes.
        assert_eq!(s.kv_cache_bytes_per_token, 3456);
        // Dense: embed, 3 × (2 norms + 2 attention norms + kv_b), final norm, 2 × (router, bias).
        assert_eq!(s.dense_tensors.len(), 1 + 3 * 5 + 1 + 2 * 2);
        let kv_a = s
            .tensors
            .iter()
            .find(|t| t.name == "model.layers.0.self_attn.kv_a_proj_with_mqa")
            .unwrap();
        assert_eq!(kv_a.kind, TensorKind::Exl3);
        assert_eq!(
            (kv_a.in_features, kv_a.out_features),
            (Some(512), Some(576))
        );
        assert_eq!((kv_a.in_padded, kv_a.out_padded), (Some(512), Some(640)));
        assert_eq!(kv_a.parameters, 512 * 576);
        assert_eq!(kv_a.bits, Some(k));
        assert_eq!(kv_a.codebook, Some(codebook.name()));
        assert_eq!(kv_a.dtype, DType::I16);
        let words = (512 / 16) * (640 / 16) * (16.0 * k) as u64;
        // trellis + suh + svh + 4-byte marker.
        assert_eq!(kv_a.bytes, 2 * words + 2 * 512 + 2 * 640 + 4);
        let kv_b = s
            .tensors
            .iter()
            .find(|t| t.name == "model.layers.0.self_attn.kv_b_proj.weight")
            .unwrap();
        assert_eq!(kv_b.kind, TensorKind::Dense);
        assert_eq!(kv_b.dtype, DType::F16);
    }
    let hf = summarize(&ModelDir::open(&fixture("hf/glm4-moe-lite-tiny")).unwrap()).unwrap();
    assert_eq!(hf.bpw_excluding_head, None);
    assert!(hf.bpw_histogram.is_empty() && hf.codebooks.is_empty());
}

//! The Llama family (Llama, Mistral, Qwen2, Qwen3), Qwen3-MoE and Gemma 3 against transformers
//! float32 logits of tiny seeded models (`scripts/make_reference_models.py`), and token-by-token
//! decode against one-pass prefill, past the sliding windows.

mod common;

use common::{Harness, ids};
use trellis_testutil::{TensorFile, argmax, max_abs_rel, repo_fixture, top2_margin};

/// Every family's tiny model, with what it exercises (see the script's `FAMILIES`).
const FAMILIES: [&str; 6] = ["llama", "mistral", "qwen2", "qwen3", "qwen3-moe", "gemma3"];

fn reference(family: &str) -> (Vec<u32>, Vec<f32>) {
    let t = TensorFile::open(repo_fixture(&format!(
        "{family}-tiny/reference.safetensors"
    )));
    (ids(&t, "input_ids"), t.f32("logits").data)
}

fn check_against_transformers(family: &str) {
    let (input, want) = reference(family);
    let mut h = Harness::load(&repo_fixture(&format!("{family}-tiny")));
    let n = input.len();
    let logits = h.logits_in_chunks(&input, n, n);
    let err = max_abs_rel(&logits, &want);
    eprintln!("{family}: logits max error {err:.2e} of max|logit|");
    assert!(
        err <= 1e-5,
        "{family}: logits max error {err:.2e} of max|logit|"
    );
    let v = h.vocab;
    for p in 0..n {
        let row = p * v..(p + 1) * v;
        if top2_margin(&want[row.clone()]) > 1e-3 {
            assert_eq!(
                argmax(&logits[row.clone()]),
                argmax(&want[row]),
                "{family}: argmax at {p}"
            );
        }
    }
}

#[test]
fn llama_with_llama3_rope_and_biases_matches_transformers() {
    check_against_transformers("llama");
}

#[test]
fn mistral_with_a_short_sliding_window_matches_transformers() {
    check_against_transformers("mistral");
}

#[test]
fn qwen2_with_biases_tied_head_and_upper_sliding_layers_matches_transformers() {
    check_against_transformers("qwen2");
}

#[test]
fn qwen3_with_qk_norm_matches_transformers() {
    check_against_transformers("qwen3");
}

#[test]
fn qwen3_moe_matches_transformers() {
    check_against_transformers("qwen3-moe");
}

#[test]
fn gemma3_with_local_and_global_layers_matches_transformers() {
    check_against_transformers("gemma3");
}

/// Token-by-token decode, and prefill in uneven chunks, reproduce a one-pass prefill at every
/// position; the 48 positions run well past every sliding window (8–12).
#[test]
fn decode_and_chunked_prefill_equal_one_pass_prefill_for_every_family() {
    for family in FAMILIES {
        let (input, _) = reference(family);
        let mut h = Harness::load(&repo_fixture(&format!("{family}-tiny")));
        let n = input.len();
        let full = h.logits_in_chunks(&input, n, n);
        let v = h.vocab;
        for (first, rest) in [(1, 1), (5, 7)] {
            let stepwise = h.logits_in_chunks(&input, first, rest);
            for p in 0..n {
                let row = p * v..(p + 1) * v;
                let err = max_abs_rel(&stepwise[row.clone()], &full[row]);
                assert!(
                    err <= 1e-5,
                    "{family}: chunks ({first}, {rest}), position {p} differs by {err:.2e} × max|logit|"
                );
            }
        }
    }
}

/// The multimodal wrapper's layout — config under `text_config`, decoder tensors under
/// `language_model.model.` (as released Gemma 3 checkpoints store them) — loads the same text
/// model.
#[test]
fn gemma3_conditional_generation_layout_loads_the_text_model() {
    let source = repo_fixture("gemma3-tiny");
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("gemma3-conditional-tiny");
    std::fs::create_dir_all(&dir).unwrap();
    let text_config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("config.json")).unwrap())
            .unwrap();
    let config = serde_json::json!({
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "text_config": text_config,
    });
    trellis_format::write_json(&dir.join("config.json"), &config).unwrap();
    let store = trellis_format::TensorStore::open(&source).unwrap();
    let tensors: Vec<trellis_format::TensorSource> = store
        .names()
        .map(|name| {
            let t = store.get(name).unwrap();
            let renamed = name.replacen("model.", "language_model.model.", 1);
            trellis_format::TensorSource::from_bytes(
                renamed,
                t.dtype,
                t.shape.to_vec(),
                t.bytes.to_vec(),
            )
        })
        .collect();
    trellis_format::write_safetensors_file(&dir.join("model.safetensors"), &tensors).unwrap();

    let (input, want) = reference("gemma3");
    let mut h = Harness::load(&dir);
    assert_eq!(
        h.model.info().architecture,
        "Gemma3ForConditionalGeneration"
    );
    let n = input.len();
    let logits = h.logits_in_chunks(&input, n, n);
    let err = max_abs_rel(&logits, &want);
    assert!(err <= 1e-5, "logits max error {err:.2e} of max|logit|");
}

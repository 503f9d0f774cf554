//! `trellis inspect`, `logits` and `generate` on the EXL3 Llama and Qwen3 fixtures.

use std::path::Path;
use std::process::{Command, Output};
use trellis_testutil::{TensorFile, fixture, rel_l2, top2_margin};

const MODELS: [&str; 2] = ["llama-tiny-4.0bpw", "qwen3-tiny-3.0bpw"];

fn trellis(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(args)
        .output()
        .expect("the trellis binary runs")
}

fn ok(args: &[&str]) -> String {
    let out = trellis(args);
    assert!(
        out.status.success(),
        "trellis {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

fn reference(name: &str) -> TensorFile {
    TensorFile::open(fixture(&format!(
        "ref/exl3/{name}/reference_exl3.safetensors"
    )))
}

#[test]
fn inspect_names_the_architecture() {
    for (name, class) in MODELS.iter().zip(["LlamaForCausalLM", "Qwen3ForCausalLM"]) {
        let out = ok(&["inspect", path(&fixture(&format!("exl3/{name}")))]);
        assert!(out.contains(class), "{name}: inspect says\n{out}");
    }
}

#[test]
fn logits_command_matches_exllamav3() {
    let tmp = tempfile::tempdir().unwrap();
    for name in MODELS {
        let reference = reference(name);
        let ids: Vec<String> = reference
            .i64("input_ids")
            .data
            .iter()
            .map(i64::to_string)
            .collect();
        let out = tmp.path().join(format!("{name}.safetensors"));
        ok(&[
            "logits",
            path(&fixture(&format!("exl3/{name}"))),
            "--tokens",
            &ids.join(","),
            "--out",
            path(&out),
            "--prefill-chunk",
            "16",
        ]);
        let got = TensorFile::open(&out).f32("logits");
        let want = reference.f32("logits");
        assert_eq!(got.shape, want.shape);
        let err = rel_l2(&got.data, &want.data);
        assert!(err <= 1e-2, "{name}: logits rel L2 {err:.2e}");
    }
}

#[test]
fn generate_streams_the_reference_greedy_tokens() {
    let prompt = "The quick brown fox jumps over the lazy dog. Once upon a time, in a small town by the sea,";
    for name in MODELS {
        let model = fixture(&format!("exl3/{name}"));
        let reference = reference(name);
        let greedy: Vec<u32> = reference
            .i64("greedy_ids")
            .data
            .iter()
            .map(|&v| v as u32)
            .collect();
        // Greedy choices are only pinned down while the reference's top two differ clearly.
        let logits = reference.f32("greedy_logits");
        let vocab = logits.shape[1];
        let steps = (0..8)
            .take_while(|&j| top2_margin(&logits.data[j * vocab..(j + 1) * vocab]) >= 2e-2)
            .count();
        assert!(steps > 0, "{name}: the first greedy step is a near tie");
        let text = ok(&[
            "generate",
            path(&model),
            "--prompt",
            prompt,
            "--max-tokens",
            &steps.to_string(),
            "--temperature",
            "0",
            "--kv-f32",
        ]);
        let tokenizer = trellis_runtime::tokenizer::Tokenizer::from_model_dir(&model).unwrap();
        let want = tokenizer.decode(&greedy[..steps], false).unwrap();
        assert_eq!(
            text.trim_end_matches('\n'),
            want,
            "{name}: {steps} greedy tokens"
        );
    }
}

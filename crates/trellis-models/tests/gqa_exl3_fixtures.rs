//! The EXL3 conversions of a tiny Llama (4.0 bpw, GQA 4:1, llama3 rope) and a tiny Qwen3
//! (3.0 bpw, q/k norms, head_dim 128) against ExLlamaV3's own logits, within the fixture
//! README's tolerances: every position of one forward, and teacher-forced greedy steps.

mod common;

use common::{Harness, ids};
use trellis_testutil::{TensorFile, argmax, fixture, rel_l2, top2_margin};

fn check_exl3(name: &str) {
    let reference = TensorFile::open(fixture(&format!(
        "ref/exl3/{name}/reference_exl3.safetensors"
    )));
    let mut h = Harness::load(&fixture(&format!("exl3/{name}")));
    let v = h.vocab;

    let input = ids(&reference, "input_ids");
    let n = input.len();
    let logits = h.logits_in_chunks(&input, n, n);
    let want = reference.f32("logits");
    let err = rel_l2(&logits, &want.data);
    eprintln!("{name}: logits rel L2 {err:.2e}");
    assert!(err <= 1e-2, "{name}: logits rel L2 {err:.2e}");
    for p in 0..n {
        let row = p * v..(p + 1) * v;
        if top2_margin(&want.data[row.clone()]) >= 2e-2 {
            assert_eq!(
                argmax(&logits[row.clone()]),
                argmax(&want.data[row]),
                "{name}: argmax at {p}"
            );
        }
    }

    // Teacher-forced generation: prefill the prompt, then decode the reference's greedy
    // tokens one at a time; the logits before each greedy token are compared.
    let prompt = ids(&reference, "prompt_ids");
    let greedy = ids(&reference, "greedy_ids");
    let fed: Vec<u32> = prompt
        .iter()
        .chain(&greedy[..greedy.len() - 1])
        .copied()
        .collect();
    let tf = h.logits_in_chunks(&fed, prompt.len(), 1);
    let want = reference.f32("greedy_logits");
    let mut worst = 0.0f64;
    for j in 0..greedy.len() {
        let got = &tf[(prompt.len() - 1 + j) * v..(prompt.len() + j) * v];
        let err = rel_l2(got, &want.data[j * v..(j + 1) * v]);
        worst = worst.max(err);
        assert!(
            err <= 1e-2,
            "{name}: teacher-forced step {j} rel L2 {err:.2e}"
        );
    }
    eprintln!("{name}: teacher-forced greedy logits worst step rel L2 {worst:.2e}");
}

#[test]
fn llama_exl3_4bpw_matches_exllamav3() {
    check_exl3("llama-tiny-4.0bpw");
}

#[test]
fn qwen3_exl3_3bpw_matches_exllamav3() {
    check_exl3("qwen3-tiny-3.0bpw");
}

/// The quantized models decode token by token exactly as they prefill: to f32 rounding, or,
/// where mul1 products quantize their activations to int16 (both fixtures are mul1), to
/// about one quantization step, since the f32-level differences between the two paths' inputs
/// can flip a rounding (measured 2.9·10^-5 and 6.8·10^-5 of max|logit|; run with
/// `TRELLIS_CPU_ISA=avx512fp16` for the strict check there).
#[test]
fn exl3_decode_equals_one_pass_prefill() {
    use trellis_backend::cpu::trellis_kernels::Isa;
    let tolerance = if Isa::selected().approximates(trellis_codec::Codebook::Mul1) {
        5e-4
    } else {
        1e-5
    };
    for name in ["llama-tiny-4.0bpw", "qwen3-tiny-3.0bpw"] {
        let reference = TensorFile::open(fixture(&format!(
            "ref/exl3/{name}/reference_exl3.safetensors"
        )));
        let input = ids(&reference, "input_ids");
        let mut h = Harness::load(&fixture(&format!("exl3/{name}")));
        let n = input.len();
        let full = h.logits_in_chunks(&input, n, n);
        let stepwise = h.logits_in_chunks(&input, 1, 1);
        let err = trellis_testutil::max_abs_rel(&stepwise, &full);
        eprintln!("{name}: decode differs from prefill by {err:.2e}");
        assert!(
            err <= tolerance,
            "{name}: decode differs from prefill by {err:.2e}"
        );
    }
}

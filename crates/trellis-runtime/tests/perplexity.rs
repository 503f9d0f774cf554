//! Perplexity of the float GLM fixture over the reference ids equals the one computed from
//! transformers' logits for the same windowing (second half of the window scored).

use trellis_backend::KvDtype;
use trellis_backend::cpu::CpuBackend;
use trellis_format::ModelDir;
use trellis_runtime::engine::{Engine, EngineOptions};
use trellis_runtime::perplexity::perplexity;
use trellis_testutil::{TensorFile, fixture};

#[test]
fn perplexity_matches_the_reference_logits() {
    let reference = TensorFile::open(fixture(
        "ref/hf/glm4-moe-lite-tiny/reference_hf.safetensors",
    ));
    let ids: Vec<u32> = reference
        .i64("input_ids")
        .data
        .iter()
        .map(|&v| v as u32)
        .collect();
    let logits = reference.f32("logits");
    let vocab = logits.shape[1];
    let ctx = ids.len();
    // Rows ctx/2 .. ctx-2 predict tokens ctx/2+1 .. ctx-1.
    let mut nll = 0.0f64;
    for i in ctx / 2..ctx - 1 {
        let row = &logits.data[i * vocab..(i + 1) * vocab];
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max
            + row
                .iter()
                .map(|&v| (v as f64 - max).exp())
                .sum::<f64>()
                .ln();
        nll += lse - row[ids[i + 1] as usize] as f64;
    }
    let want = (nll / (ctx / 2 - 1) as f64).exp();

    let dir = ModelDir::open(&fixture("hf/glm4-moe-lite-tiny")).unwrap();
    let options = EngineOptions {
        ctx_size: Some(ctx),
        prefill_chunk: 24,
        all_logits: true,
        kv_dtype: KvDtype::F32,
        ..EngineOptions::default()
    };
    let mut engine = Engine::load(&dir, CpuBackend::new(), &options, &mut |_, _, _| {}).unwrap();
    let report = perplexity(&mut engine, &ids, ctx, None, |_, _, _| {}).unwrap();
    assert_eq!(report.windows, 1);
    assert_eq!(report.scored_tokens, ctx / 2 - 1);
    assert!(
        (report.perplexity - want).abs() / want < 1e-4,
        "{} vs {want}",
        report.perplexity
    );
}

//! DeepSeek-V2 and -V3 configurations through the same MLA/MoE model code, against
//! transformers float32 logits of tiny seeded models (`scripts/make_reference_models.py`):
//! direct `q_proj`, softmax routing limited to groups by their maximum, sigmoid routing with
//! selection bias and top-2-sum group ranking, several shared experts, YaRN with mscale.

use trellis_backend::cpu::CpuBackend;
use trellis_backend::{Backend, Batch, KvDtype};
use trellis_format::ModelDir;
use trellis_models::LoadOptions;
use trellis_testutil::{TensorFile, argmax, max_abs_rel, repo_fixture, top2_margin};

fn check(family: &str) {
    let dir = repo_fixture(&format!("{family}-tiny"));
    let reference = TensorFile::open(dir.join("reference.safetensors"));
    let ids: Vec<u32> = reference
        .i64("input_ids")
        .data
        .iter()
        .map(|&v| v as u32)
        .collect();
    let want = reference.f32("logits");
    let model_dir = ModelDir::open(&dir).unwrap();
    let backend = CpuBackend::new();
    let n = ids.len();
    let options = LoadOptions {
        max_rows: n,
        max_logit_rows: n,
    };
    let mut model =
        trellis_models::load(&model_dir, &backend, &options, &mut |_, _, _| {}).unwrap();
    let vocab = model.info().vocab_size;
    let layout = model.kv_layout(n.next_multiple_of(16), 16, KvDtype::F32);
    let mut cache = backend.alloc_kv_cache(&layout).unwrap();
    let positions: Vec<u32> = (0..n as u32).collect();
    let tables: Vec<u32> = (0..layout.num_blocks as u32).collect();
    let batch = Batch {
        positions: &positions,
        sequence: &vec![0; n],
        block_tables: &tables,
        blocks_per_sequence: layout.num_blocks,
        block_size: 16,
    };
    model
        .forward(&backend, &ids, &batch, &mut cache, &positions, None)
        .unwrap();
    let mut logits = vec![0.0; n * vocab];
    model.read_logits(&backend, &mut logits);
    let err = max_abs_rel(&logits, &want.data);
    assert!(
        err <= 1e-4,
        "{family}: logits max error {err:.2e} of max|logit|"
    );
    for p in 0..n {
        let row = p * vocab..(p + 1) * vocab;
        if top2_margin(&want.data[row.clone()]) > 1e-3 {
            assert_eq!(
                argmax(&logits[row.clone()]),
                argmax(&want.data[row]),
                "{family}: argmax at {p}"
            );
        }
    }
}

#[test]
fn deepseek_v2_matches_transformers() {
    check("deepseek-v2");
}

#[test]
fn deepseek_v3_matches_transformers() {
    check("deepseek-v3");
}

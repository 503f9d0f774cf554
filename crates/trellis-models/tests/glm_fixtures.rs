//! GLM-4.7-Flash-style tiny model against transformers (float32, bf16 weights) and against
//! ExLlamaV3 on its EXL3 conversions, within the fixture README's tolerances.

use trellis_backend::cpu::CpuBackend;
use trellis_backend::{Backend, Batch, KvDtype};
use trellis_format::ModelDir;
use trellis_models::{CausalLm, LoadOptions, Tap};
use trellis_testutil::{TensorFile, argmax, fixture, max_abs_rel, rel_l2, top2_margin};

const BLOCK: usize = 16;

struct Harness {
    backend: CpuBackend,
    model: Box<dyn CausalLm<CpuBackend>>,
    vocab: usize,
}

impl Harness {
    fn load(rel: &str) -> Harness {
        Harness::load_with(rel, false)
    }

    /// With `kv_b_int8`, MLA's `kv_b_proj` is held as `--kv-b-int8` holds it.
    fn load_with(rel: &str, kv_b_int8: bool) -> Harness {
        let dir = ModelDir::open(&fixture(rel)).expect("model dir opens");
        let mut backend = CpuBackend::new();
        backend.set_kv_b_int8(kv_b_int8);
        let options = LoadOptions {
            max_rows: 128,
            max_logit_rows: 128,
        };
        let model =
            trellis_models::load(&dir, &backend, &options, &mut |_, _, _| {}).expect("model loads");
        let vocab = model.info().vocab_size;
        Harness {
            backend,
            model,
            vocab,
        }
    }

    /// One forward over `ids` from position 0 with a fresh cache; logits of every position.
    fn logits_all(
        &mut self,
        ids: &[u32],
        mut observer: Option<&mut dyn FnMut(Tap<'_>)>,
    ) -> Vec<f32> {
        let n = ids.len();
        let layout = self
            .model
            .kv_layout(n.next_multiple_of(BLOCK), BLOCK, KvDtype::F32);
        let mut cache = self.backend.alloc_kv_cache(&layout).unwrap();
        let positions: Vec<u32> = (0..n as u32).collect();
        let sequence = vec![0u32; n];
        let tables: Vec<u32> = (0..layout.num_blocks as u32).collect();
        let batch = Batch {
            positions: &positions,
            sequence: &sequence,
            block_tables: &tables,
            blocks_per_sequence: layout.num_blocks,
            block_size: BLOCK,
        };
        self.model
            .forward(
                &self.backend,
                ids,
                &batch,
                &mut cache,
                &positions,
                observer.take(),
            )
            .unwrap();
        let mut logits = vec![0.0; n * self.vocab];
        self.model.read_logits(&self.backend, &mut logits);
        logits
    }

    /// Prefill `prompt`, then decode `steps` tokens one at a time feeding `feed[j]`;
    /// returns the logits after the prompt and after each fed token (steps + 1 rows... the
    /// last row is dropped so that row j predicts token j).
    fn teacher_forced(&mut self, prompt: &[u32], feed: &[u32]) -> Vec<f32> {
        let total = prompt.len() + feed.len();
        let layout = self
            .model
            .kv_layout(total.next_multiple_of(BLOCK), BLOCK, KvDtype::F32);
        let mut cache = self.backend.alloc_kv_cache(&layout).unwrap();
        let tables: Vec<u32> = (0..layout.num_blocks as u32).collect();
        let mut out = Vec::new();
        let mut row = vec![0.0; self.vocab];
        let positions: Vec<u32> = (0..prompt.len() as u32).collect();
        let sequence = vec![0u32; prompt.len()];
        let batch = Batch {
            positions: &positions,
            sequence: &sequence,
            block_tables: &tables,
            blocks_per_sequence: layout.num_blocks,
            block_size: BLOCK,
        };
        let last = [prompt.len() as u32 - 1];
        self.model
            .forward(&self.backend, prompt, &batch, &mut cache, &last, None)
            .unwrap();
        self.model.read_logits(&self.backend, &mut row);
        out.extend_from_slice(&row);
        for (j, &tok) in feed.iter().enumerate().take(feed.len() - 1) {
            let pos = [(prompt.len() + j) as u32];
            let batch = Batch {
                positions: &pos,
                sequence: &[0],
                block_tables: &tables,
                blocks_per_sequence: layout.num_blocks,
                block_size: BLOCK,
            };
            self.model
                .forward(&self.backend, &[tok], &batch, &mut cache, &[0], None)
                .unwrap();
            self.model.read_logits(&self.backend, &mut row);
            out.extend_from_slice(&row);
        }
        out
    }
}

fn ids(t: &TensorFile, name: &str) -> Vec<u32> {
    t.i64(name).data.iter().map(|&v| v as u32).collect()
}

#[test]
fn hf_float_model_matches_transformers() {
    let reference = TensorFile::open(fixture(
        "ref/hf/glm4-moe-lite-tiny/reference_hf.safetensors",
    ));
    let mut h = Harness::load("hf/glm4-moe-lite-tiny");
    let input = ids(&reference, "input_ids");
    let n = input.len();
    let hidden_ref = reference.f32("hidden_states");
    let hidden = hidden_ref.shape[2];
    let mut hidden_got: Vec<Vec<f32>> = Vec::new();
    let mut routes: Vec<Vec<u32>> = Vec::new();
    let mut route_weights: Vec<Vec<f32>> = Vec::new();
    let mut observer = |tap: Tap<'_>| match tap {
        Tap::Hidden { values, .. } | Tap::FinalNorm { values } => hidden_got.push(values.to_vec()),
        Tap::Routing { ids, weights, .. } => {
            routes.push(ids.to_vec());
            route_weights.push(weights.to_vec());
        }
    };
    let logits = h.logits_all(&input, Some(&mut observer));

    let want = reference.f32("logits");
    let err = max_abs_rel(&logits, &want.data);
    eprintln!("hf logits err {err:.3e}");
    assert!(err <= 1e-3, "logits max error {err:.2e} of max|logit|");
    for p in 0..n {
        let row = p * h.vocab..(p + 1) * h.vocab;
        assert_eq!(
            argmax(&logits[row.clone()]),
            argmax(&want.data[row]),
            "argmax at position {p}"
        );
    }
    // hidden_states[1..3] follow layers 0..1; [3] is after the last layer and the final norm.
    let slices = [&hidden_got[0], &hidden_got[1], &hidden_got[3]];
    for (i, got) in slices.iter().enumerate() {
        let want = &hidden_ref.data[(i + 1) * n * hidden..(i + 2) * n * hidden];
        let err = max_abs_rel(got, want);
        assert!(err <= 1e-3, "hidden_states[{}] max error {err:.2e}", i + 1);
    }
    let want_ids = reference.i64("router_topk_ids");
    let want_w = reference.f32("router_topk_weights");
    for layer in 0..2 {
        let got: Vec<i64> = routes[layer].iter().map(|&v| i64::from(v)).collect();
        assert_eq!(
            got,
            want_ids.data[layer * n * 4..(layer + 1) * n * 4],
            "router ids of MoE layer {layer}"
        );
        let err = max_abs_rel(
            &route_weights[layer],
            &want_w.data[layer * n * 4..(layer + 1) * n * 4],
        );
        assert!(
            err <= 1e-4,
            "router weights of MoE layer {layer}: {err:.2e}"
        );
    }
}

#[test]
fn hf_float_model_greedy_generation_matches() {
    let reference = TensorFile::open(fixture(
        "ref/hf/glm4-moe-lite-tiny/reference_hf.safetensors",
    ));
    let mut h = Harness::load("hf/glm4-moe-lite-tiny");
    let prompt = ids(&reference, "prompt_ids");
    let greedy = ids(&reference, "greedy_ids");
    let logits = h.teacher_forced(&prompt, &greedy);
    let want = reference.f32("greedy_logits");
    let err = max_abs_rel(&logits, &want.data);
    assert!(
        err <= 1e-3,
        "teacher-forced greedy logits max error {err:.2e}"
    );
    for (j, &tok) in greedy.iter().enumerate() {
        assert_eq!(
            argmax(&logits[j * h.vocab..(j + 1) * h.vocab]) as u32,
            tok,
            "greedy step {j}"
        );
    }
}

fn check_exl3(name: &str) {
    let reference = TensorFile::open(fixture(&format!(
        "ref/exl3/{name}/reference_exl3.safetensors"
    )));
    let mut h = Harness::load(&format!("exl3/{name}"));
    let input = ids(&reference, "input_ids");
    let logits = h.logits_all(&input, None);
    let want = reference.f32("logits");
    let err = rel_l2(&logits, &want.data);
    eprintln!("{name} logits rel {err:.3e}");
    assert!(err <= 1e-2, "{name}: logits rel L2 {err:.2e}");
    for p in 0..input.len() {
        let row = p * h.vocab..(p + 1) * h.vocab;
        if top2_margin(&want.data[row.clone()]) >= 2e-2 {
            assert_eq!(
                argmax(&logits[row.clone()]),
                argmax(&want.data[row]),
                "{name}: argmax at {p}"
            );
        }
    }
    let prompt = ids(&reference, "prompt_ids");
    let greedy = ids(&reference, "greedy_ids");
    let tf = h.teacher_forced(&prompt, &greedy);
    let want = reference.f32("greedy_logits");
    let steps = greedy.len() * h.vocab;
    eprintln!(
        "{name} teacher-forced rel {:.3e}",
        rel_l2(&tf[..steps], &want.data[..steps])
    );
    for j in 0..greedy.len() {
        let row = j * h.vocab..(j + 1) * h.vocab;
        let err = rel_l2(&tf[row.clone()], &want.data[row]);
        assert!(
            err <= 1e-2,
            "{name}: teacher-forced step {j} rel L2 {err:.2e}"
        );
    }
}

#[test]
fn exl3_4bpw_matches_exllamav3() {
    check_exl3("glm4-moe-lite-tiny-4.0bpw");
}

#[test]
fn exl3_2_5bpw_matches_exllamav3() {
    check_exl3("glm4-moe-lite-tiny-2.5bpw");
}

#[test]
fn exl3_3bpw_mcg_matches_exllamav3() {
    check_exl3("glm4-moe-lite-tiny-3.0bpw-mcg");
}

/// `--kv-b-int8` against the exact path: its logits stay within 2·10⁻² of ExLlamaV3's
/// (relative L2; the exact path is within 1·10⁻³–5·10⁻³), and measured against the float
/// model, the error it adds is small next to the quantization's own (at most 2 % more),
/// also for the float model itself (within 3·10⁻² of transformers). The 64 positions run
/// absorbed, as decode does.
#[test]
fn int8_kv_b_costs_little_next_to_the_quantization() {
    let float = TensorFile::open(fixture(
        "ref/hf/glm4-moe-lite-tiny/reference_hf.safetensors",
    ));
    let float_logits = float.f32("logits");
    let input = ids(&float, "input_ids");
    let mut int8 = Harness::load_with("hf/glm4-moe-lite-tiny", true);
    let err = rel_l2(&int8.logits_all(&input, None), &float_logits.data);
    eprintln!("float model, int8 kv_b: rel {err:.3e} against transformers");
    assert!(err <= 3e-2, "float model with int8 kv_b: rel L2 {err:.2e}");
    for name in [
        "glm4-moe-lite-tiny-4.0bpw",
        "glm4-moe-lite-tiny-2.5bpw",
        "glm4-moe-lite-tiny-3.0bpw-mcg",
    ] {
        let reference = TensorFile::open(fixture(&format!(
            "ref/exl3/{name}/reference_exl3.safetensors"
        )));
        assert_eq!(ids(&reference, "input_ids"), input);
        let exllamav3 = reference.f32("logits");
        let exact = Harness::load(&format!("exl3/{name}")).logits_all(&input, None);
        let int8 = Harness::load_with(&format!("exl3/{name}"), true).logits_all(&input, None);
        let against_exllamav3 = rel_l2(&int8, &exllamav3.data);
        let (exact_vs_float, int8_vs_float) = (
            rel_l2(&exact, &float_logits.data),
            rel_l2(&int8, &float_logits.data),
        );
        eprintln!(
            "{name}, int8 kv_b: rel {against_exllamav3:.3e} against ExLlamaV3; against the float model {int8_vs_float:.4e} (exact path {exact_vs_float:.4e})"
        );
        assert!(
            against_exllamav3 <= 2e-2,
            "{name}: int8 kv_b rel L2 {against_exllamav3:.2e} against ExLlamaV3"
        );
        assert!(
            int8_vs_float <= 1.02 * exact_vs_float,
            "{name}: int8 kv_b {int8_vs_float:.4e} against the float model, exact {exact_vs_float:.4e}"
        );
    }
}

/// Token-by-token decode over the latent cache reproduces a one-pass prefill at every
/// position (same weights, f32 cache), for the float and a quantized model.
#[test]
fn absorbed_decode_equals_full_prefill_position_by_position() {
    for model in [
        "hf/glm4-moe-lite-tiny",
        "exl3/glm4-moe-lite-tiny-3.0bpw-mcg",
    ] {
        let reference = TensorFile::open(fixture(
            "ref/hf/glm4-moe-lite-tiny/reference_hf.safetensors",
        ));
        let input = ids(&reference, "input_ids");
        let mut h = Harness::load(model);
        let full = h.logits_all(&input, None);
        let stepwise = h.teacher_forced(&input[..1], &input[1..]);
        let v = h.vocab;
        for p in 0..input.len() - 1 {
            let err = max_abs_rel(&stepwise[p * v..(p + 1) * v], &full[p * v..(p + 1) * v]);
            assert!(
                err <= 1e-5,
                "{model}: position {p} differs by {err:.2e} × max|logit|"
            );
        }
    }
}

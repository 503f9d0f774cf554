//! Whole conversions of the tiny seeded models of every family (`tests/fixtures/*-tiny`):
//! the plan per architecture, bit allocation, loading and running the output, resume after
//! an interruption, and the errors a user can run into.

use std::path::{Path, PathBuf};
use trellis_backend::KvDtype;
use trellis_backend::cpu::CpuBackend;
use trellis_codec::Codebook;
use trellis_format::ModelDir;
use trellis_quant::alloc::{allocate, average_bits};
use trellis_quant::plan::{Role, plan};
use trellis_quant::{
    Calibration, Event, Overwrite, QuantError, QuantizeOptions, quantize_model, work_dir_of,
};
use trellis_runtime::engine::{Engine, EngineOptions};
use trellis_testutil::{fixture, rel_l2, repo_fixture};

const FAMILIES: [&str; 8] = [
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "qwen3-moe",
    "gemma3",
    "deepseek-v2",
    "deepseek-v3",
];

/// Deterministic pseudo-random ids below `vocab`.
fn tokens(vocab: usize, n: usize, seed: u64) -> Vec<u32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % vocab as u64) as u32
        })
        .collect()
}

fn vocab_of(dir: &Path) -> usize {
    ModelDir::open(dir).unwrap().config.common().vocab_size
}

fn calibration(dir: &Path) -> Calibration {
    Calibration::from_tokens(&tokens(vocab_of(dir), 4 * 64, 1), 4, 64).unwrap()
}

fn logits(dir: &Path, input: &[u32]) -> Vec<f32> {
    let dir = ModelDir::open(dir).unwrap();
    let options = EngineOptions {
        ctx_size: None,
        prefill_chunk: 64,
        all_logits: true,
        kv_dtype: KvDtype::F32,
        max_batch: 1,
    };
    let mut engine = Engine::load(&dir, CpuBackend::new(), &options, &mut |_, _, _| {}).unwrap();
    engine.logits_all(input).unwrap()
}

fn quiet(_: Event<'_>) {}

#[test]
fn plan_per_architecture() {
    // (family, quantized linears, input groups of layer 0, tied head)
    let expected = [
        ("llama", 7, 4, false),
        ("qwen2", 7, 4, true),
        ("gemma3", 7, 4, true),
    ];
    for (family, per_layer, groups, tied) in expected {
        let dir = ModelDir::open(&repo_fixture(&format!("{family}-tiny"))).unwrap();
        let p = plan(&dir.config, &dir.tensors).unwrap();
        let layer = &p.layers[0];
        assert_eq!(layer.linears.len(), per_layer, "{family}");
        assert_eq!(layer.groups().len(), groups, "{family}");
        assert_eq!(p.head.tied, tied, "{family}");
        // q/k/v share one input, recorded once; gate/up another.
        let q = layer
            .linears
            .iter()
            .find(|l| l.name.ends_with("q_proj"))
            .unwrap();
        let v = layer
            .linears
            .iter()
            .find(|l| l.name.ends_with("v_proj"))
            .unwrap();
        assert_eq!(q.group, v.group);
        assert!(q.captures && !v.captures);
        // Every planned weight exists with the planned shape.
        for l in p.budgeted().map(|(_, l)| l) {
            let t = dir.tensors.get(&format!("{}.weight", l.name)).unwrap();
            assert_eq!(t.shape, [l.out_features, l.in_features], "{}", l.name);
        }
    }

    // GLM-4.7-Flash (MLA + MoE): q_a and kv_a share the attention input; every expert's
    // gate/up and the shared expert's share the MoE input; kv_b_proj and the router stay
    // dense in fp16.
    let dir = ModelDir::open(&fixture("hf/glm4-moe-lite-tiny")).unwrap();
    let p = plan(&dir.config, &dir.tensors).unwrap();
    assert_eq!(
        p.budgeted().count(),
        117,
        "as in the ExLlamaV3 conversion, lm_head apart"
    );
    let moe = &p.layers[1];
    let q_a = moe
        .linears
        .iter()
        .find(|l| l.name.ends_with("q_a_proj"))
        .unwrap();
    let kv_a = moe
        .linears
        .iter()
        .find(|l| l.name.ends_with("kv_a_proj_with_mqa"))
        .unwrap();
    assert_eq!((q_a.group, kv_a.out_features), (kv_a.group, 576));
    let experts_in: Vec<_> = moe
        .linears
        .iter()
        .filter(|l| l.name.ends_with("gate_proj") || l.name.ends_with("up_proj"))
        .collect();
    assert_eq!(experts_in.len(), 34);
    assert!(experts_in.iter().all(|l| l.group == experts_in[0].group));
    assert_eq!(experts_in.iter().filter(|l| l.captures).count(), 1);
    assert!(
        experts_in
            .iter()
            .filter(|l| l.name.contains("shared_experts"))
            .all(|l| l.role == Role::SharedExpert)
    );
    assert!(
        moe.fp16_tensors
            .iter()
            .any(|t| t.ends_with("kv_b_proj.weight"))
    );
    assert!(
        moe.fp16_tensors
            .iter()
            .any(|t| t.ends_with("mlp.gate.weight"))
    );
    assert!(!moe.linears.iter().any(|l| l.name.ends_with("kv_b_proj")));
    assert!(!p.head.tied);

    // The other families plan without error.
    for family in FAMILIES {
        let dir = ModelDir::open(&repo_fixture(&format!("{family}-tiny"))).unwrap();
        let p = plan(&dir.config, &dir.tensors).unwrap();
        assert!(p.budgeted().count() > 0, "{family}");
    }
}

#[test]
fn allocation_hits_the_target() {
    let dir = ModelDir::open(&fixture("hf/glm4-moe-lite-tiny")).unwrap();
    let p = plan(&dir.config, &dir.tensors).unwrap();
    for (codebook, targets) in [
        (
            Codebook::Mul1,
            &[2.0, 2.25, 2.5, 3.0, 3.3, 3.75, 4.0, 5.5, 8.0][..],
        ),
        (Codebook::Mcg, &[2.0, 2.5, 3.0, 3.75, 6.0][..]),
    ] {
        for &target in targets {
            let widths = allocate(&p, target, codebook).unwrap();
            let avg = average_bits(&p, &widths);
            eprintln!("{} {target}: {avg:.4}", codebook.name());
            assert!(avg <= target + 1e-9, "{target}: {avg}");
            // Whole units move, so the average lands below the target by less than one
            // unit's worth; on this model that is within 0.25 bpw.
            assert!(avg >= target - 0.25, "{target}: {avg}");
            if codebook == Codebook::Mcg {
                assert!(widths.iter().all(|w| w.is_integer()));
            }
        }
        assert!(allocate(&p, 0.5, codebook).is_err());
        assert!(allocate(&p, 9.0, codebook).is_err());
    }
    // Exact widths: every tensor at that width.
    let widths = allocate(&p, 2.5, Codebook::Mul1).unwrap();
    assert!(widths.iter().all(|w| w.as_f64() == 2.5));
}

/// One family of each kind (GQA, MoE, Gemma 3, MLA) converts at 4 bpw and the output loads
/// and runs in the engine, close to the original; the head of a tied model becomes its own
/// quantized tensor.
#[test]
fn every_kind_of_family_converts_loads_and_runs() {
    let work = tempfile::tempdir().unwrap();
    for family in ["llama", "qwen3-moe", "gemma3", "deepseek-v3"] {
        let src = repo_fixture(&format!("{family}-tiny"));
        let out = work.path().join(family);
        let options = QuantizeOptions {
            bits: 4.0,
            ..QuantizeOptions::default()
        };
        let summary = quantize_model(
            &src,
            &out,
            &calibration(&src),
            &options,
            Overwrite::Refuse,
            &mut quiet,
        )
        .unwrap_or_else(|e| panic!("{family}: {e}"));
        assert!((summary.average_bits - 4.0).abs() < 1e-9);
        assert!(
            !work_dir_of(&out).exists(),
            "{family}: work dir left behind"
        );
        for t in &summary.tensors {
            assert!(!t.fallback, "{family}: {} had no Hessian", t.name);
            assert!(t.weight_error < 0.05, "{family}: {} {t:?}", t.name);
        }
        let qdir = ModelDir::open(&out).unwrap();
        assert!(
            qdir.quantization.is_some(),
            "{family}: no quantization_config"
        );
        assert!(out.join("quantization_config.json").is_file());
        let input = tokens(vocab_of(&src), 48, 9);
        let want = logits(&src, &input);
        let got = logits(&out, &input);
        let err = rel_l2(&got, &want);
        eprintln!("{family}: 4 bpw logits relative L2 {err:.4}");
        assert!(got.iter().all(|v| v.is_finite()), "{family}");
        // Tiny MoE models amplify weight error through changed expert choices.
        assert!(err < 0.25, "{family}: logits relative L2 {err}");
    }
}

fn file_bytes(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| (p.file_name().unwrap().into(), std::fs::read(&p).unwrap()))
        .collect()
}

/// A run interrupted after its first layer continues from the checkpoint with `Resume` and
/// writes exactly what an uninterrupted run writes.
#[test]
fn resume_continues_an_interrupted_run() {
    let src = repo_fixture("llama-tiny");
    let cal = calibration(&src);
    let options = QuantizeOptions {
        bits: 3.0,
        ..QuantizeOptions::default()
    };
    let work = tempfile::tempdir().unwrap();
    let straight = work.path().join("straight");
    quantize_model(
        &src,
        &straight,
        &cal,
        &options,
        Overwrite::Refuse,
        &mut quiet,
    )
    .unwrap();

    let out = work.path().join("resumed");
    // Interrupt: the event handler panics once layer 0 is checkpointed.
    let interrupted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        quantize_model(
            &src,
            &out,
            &cal,
            &options,
            Overwrite::Refuse,
            &mut |e: Event<'_>| {
                if let Event::LayerDone { layer: 0, .. } = e {
                    panic!("interrupted");
                }
            },
        )
    }));
    assert!(interrupted.is_err());
    assert!(!out.exists(), "an interrupted run must not look complete");
    assert!(work_dir_of(&out).is_dir());

    // Without --resume or --force an interrupted run is started afresh; with other
    // settings a resume is refused.
    let other = QuantizeOptions {
        bits: 4.0,
        ..options.clone()
    };
    let err = quantize_model(&src, &out, &cal, &other, Overwrite::Resume, &mut quiet).unwrap_err();
    assert!(matches!(err, QuantError::Resume(_)), "{err}");

    let mut resumed_at = None;
    quantize_model(
        &src,
        &out,
        &cal,
        &options,
        Overwrite::Resume,
        &mut |e: Event<'_>| {
            if let Event::Planned { resumed_at: r, .. } = e {
                resumed_at = Some(r);
            }
        },
    )
    .unwrap();
    assert_eq!(resumed_at, Some(1));
    assert_eq!(file_bytes(&out), file_bytes(&straight));
    assert!(!work_dir_of(&out).exists());

    // A finished output is refused without --force, and --resume has nothing to do.
    let err =
        quantize_model(&src, &out, &cal, &options, Overwrite::Refuse, &mut quiet).unwrap_err();
    assert!(matches!(err, QuantError::OutputExists(_)), "{err}");
    let err =
        quantize_model(&src, &out, &cal, &options, Overwrite::Resume, &mut quiet).unwrap_err();
    assert!(matches!(err, QuantError::AlreadyComplete(_)), "{err}");
}

#[test]
fn bad_inputs_are_refused_clearly() {
    let work = tempfile::tempdir().unwrap();
    let src = repo_fixture("llama-tiny");
    let cal = calibration(&src);
    let options = QuantizeOptions::default();
    let run = |src: &Path, out: &Path, cal: &Calibration, options: &QuantizeOptions| {
        quantize_model(src, out, cal, options, Overwrite::Refuse, &mut quiet)
            .map(|_| ())
            .unwrap_err()
    };

    // An EXL3 model.
    let err = run(
        &fixture("exl3/llama-tiny-4.0bpw"),
        &work.path().join("a"),
        &cal,
        &options,
    );
    assert!(matches!(err, QuantError::AlreadyQuantized(_)), "{err}");
    assert!(err.to_string().contains("already quantized"));

    // An architecture nobody implements.
    let odd = work.path().join("odd");
    std::fs::create_dir(&odd).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config["model_type"] = "mamba".into();
    config["architectures"] = serde_json::json!(["MambaForCausalLM"]);
    std::fs::write(odd.join("config.json"), config.to_string()).unwrap();
    std::fs::copy(src.join("model.safetensors"), odd.join("model.safetensors")).unwrap();
    let err = run(&odd, &work.path().join("b"), &cal, &options);
    assert!(err.to_string().to_lowercase().contains("mamba"), "{err}");

    // Too little calibration text, tokens outside the vocabulary.
    let err = Calibration::from_tokens(&[1, 2, 3], 2, 64).unwrap_err();
    assert!(err.to_string().contains("fewer than"), "{err}");
    let bad = Calibration {
        rows: vec![vec![1_000_000; 32]],
    };
    let err = run(&src, &work.path().join("c"), &bad, &options);
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");

    // Bits out of range.
    let err = run(
        &src,
        &work.path().join("d"),
        &cal,
        &QuantizeOptions {
            bits: 12.0,
            ..QuantizeOptions::default()
        },
    );
    assert!(err.to_string().contains("bits"), "{err}");

    // An existing output directory.
    let existing = work.path().join("exists");
    std::fs::create_dir(&existing).unwrap();
    let err = run(&src, &existing, &cal, &options);
    assert!(matches!(err, QuantError::OutputExists(_)), "{err}");

    // Nothing was left behind by any of these.
    for name in ["a", "b", "c", "d"] {
        assert!(!work.path().join(name).exists(), "{name}");
    }
}

//! The `trellis` binary as a user runs it: commands on the fixtures, outputs checked against
//! the references, and bad inputs answered with clear errors.

use std::path::Path;
use std::process::{Command, Output};
use trellis_testutil::{TensorFile, fixture, max_abs_rel, rel_l2};

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

/// Runs `args` followed by `extra`, succeeds, and prints one JSON document on stdout.
fn ok_json(args: &[&str], extra: &[&str]) -> serde_json::Value {
    let args = [args, extra].concat();
    serde_json::from_str(&ok(&args)).unwrap_or_else(|e| panic!("trellis {args:?}: not JSON: {e}"))
}

/// Runs, fails, and says something containing each of `needles` on stderr.
fn fails_with(args: &[&str], needles: &[&str]) {
    let out = trellis(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "trellis {args:?} should fail");
    assert!(
        !stderr.contains("panicked"),
        "trellis {args:?} panicked:\n{stderr}"
    );
    for n in needles {
        assert!(
            stderr.contains(n),
            "trellis {args:?}: stderr lacks `{n}`:\n{stderr}"
        );
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

#[test]
fn inspect_reports_parameters_and_bits() {
    let cases = [
        ("exl3/glm4-moe-lite-tiny-4.0bpw", 25_812_256u64, 4.0),
        ("exl3/glm4-moe-lite-tiny-2.5bpw", 25_812_256, 2.5),
        ("exl3/glm4-moe-lite-tiny-3.0bpw-mcg", 25_812_256, 3.0),
        ("exl3/llama-tiny-4.0bpw", 6_556_160, 4.0),
        // The EXL3 conversion stores a separate quantized lm_head (the original was tied).
        ("exl3/qwen3-tiny-3.0bpw", 8_391_680, 3.0),
    ];
    for (dir, params, bpw) in cases {
        let json = ok_json(&["inspect", path(&fixture(dir)), "--json"], &[]);
        assert_eq!(
            json["parameters"].as_u64(),
            Some(params),
            "{dir} parameters"
        );
        let got = json["bpw_excluding_head"].as_f64().unwrap();
        assert!((got - bpw).abs() < 1e-9, "{dir}: bpw {got}");
        let text = ok(&["inspect", path(&fixture(dir))]);
        assert!(
            text.contains(&params.to_string()),
            "{dir}: text summary lacks the parameter count"
        );
    }
}

#[test]
fn dequant_writes_the_reference_reconstruction() {
    let tmp = tempfile::tempdir().unwrap();
    for name in [
        "glm4-moe-lite-tiny-4.0bpw",
        "glm4-moe-lite-tiny-2.5bpw",
        "glm4-moe-lite-tiny-3.0bpw-mcg",
    ] {
        let reference = TensorFile::open(fixture(&format!(
            "ref/exl3/{name}/reference_exl3.safetensors"
        )));
        for key in [
            "model.layers.1.self_attn.kv_a_proj_with_mqa",
            "model.layers.1.mlp.experts.3.down_proj",
            "lm_head",
        ] {
            let out = tmp.path().join(format!("{name}-{key}.safetensors"));
            ok(&[
                "dequant",
                path(&fixture(&format!("exl3/{name}"))),
                "--tensor",
                key,
                "--out",
                path(&out),
            ]);
            let got = TensorFile::open(&out).f32(&format!("{key}.weight"));
            let want = reference.f32(&format!("w.{key}"));
            let (in_f, out_f) = (want.shape[0], want.shape[1]);
            assert_eq!(
                got.shape,
                [out_f, in_f],
                "{name} {key}: HF orientation [out, in]"
            );
            // The reference is (in, out); compare transposed.
            let mut transposed = vec![0.0; in_f * out_f];
            for i in 0..in_f {
                for o in 0..out_f {
                    transposed[i * out_f + o] = got.data[o * in_f + i];
                }
            }
            let err = max_abs_rel(&transposed, &want.data);
            assert!(err <= 1e-3, "{name} {key}: {err:.2e} × max|w|");
        }
    }
}

#[test]
fn logits_command_matches_exllamav3() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = TensorFile::open(fixture(
        "ref/exl3/glm4-moe-lite-tiny-4.0bpw/reference_exl3.safetensors",
    ));
    let ids: Vec<String> = reference
        .i64("input_ids")
        .data
        .iter()
        .map(i64::to_string)
        .collect();
    let out = tmp.path().join("logits.safetensors");
    let model = fixture("exl3/glm4-moe-lite-tiny-4.0bpw");
    ok(&[
        "logits",
        path(&model),
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
    assert!(err <= 1e-2, "logits rel L2 {err:.2e}");
}

#[test]
fn generate_streams_the_reference_greedy_tokens() {
    // The float model's greedy continuation of the fixture prompt, decoded to text.
    let model = fixture("hf/glm4-moe-lite-tiny");
    let prompt = "The quick brown fox jumps over the lazy dog. Once upon a time, in a small town by the sea,";
    let text = ok(&[
        "generate",
        path(&model),
        "--prompt",
        prompt,
        "--max-tokens",
        "8",
        "--kv-f32",
    ]);
    let tokenizer = trellis_runtime::tokenizer::Tokenizer::from_model_dir(&model).unwrap();
    let reference = TensorFile::open(fixture(
        "ref/hf/glm4-moe-lite-tiny/reference_hf.safetensors",
    ));
    let greedy: Vec<u32> = reference
        .i64("greedy_ids")
        .data
        .iter()
        .take(8)
        .map(|&v| v as u32)
        .collect();
    let want = tokenizer.decode(&greedy, false).unwrap();
    assert_eq!(text.trim_end_matches('\n'), want);
}

/// `trellis bench` reports every figure the README promises, with sane values; `--batch` above
/// 1 is refused with a message rather than measured wrongly.
#[test]
fn bench_reports_speed_memory_and_roofline() {
    let model = fixture("exl3/glm4-moe-lite-tiny-4.0bpw");
    let bench = |extra: &[&str]| {
        let args = [
            "bench",
            path(&model),
            "--prompt-tokens",
            "16",
            "--gen-tokens",
            "4",
            "--repeat",
            "1",
            "--threads",
            "2",
        ];
        ok_json(&args, extra)
    };
    let json = bench(&[]);
    for field in [
        "prefill_tok_s",
        "decode_tok_s",
        "ttft_ms",
        "roofline_fraction",
    ] {
        let v = json[field].as_f64().unwrap_or(f64::NAN);
        assert!(v.is_finite() && v > 0.0, "{field} = {v}");
    }
    for field in [
        "peak_rss_bytes",
        "bytes_per_token",
        "weight_bytes_per_token",
        "bandwidth_bytes_per_s",
    ] {
        assert!(
            json[field].as_f64().is_some_and(|v| v > 0.0),
            "{field} = {}",
            json[field]
        );
    }
    // Bytes per token cover at least the quantized weights a decode step reads.
    assert!(json["bytes_per_token"].as_u64() >= json["weight_bytes_per_token"].as_u64());
    assert_eq!(json["device"], "cpu");
    assert_eq!(json["prompt_tokens"], 16);
    assert!(!json["cpu_isa"].as_str().unwrap_or("").is_empty());
    assert_eq!(json["runs"].as_array().map(Vec::len), Some(1));
    assert!(json.get("kv_b_int8").is_none());

    // `--kv-b-int8`: three layers of kv_b [1792, 512], f16 in the file, now one byte a value
    // plus f32 scales for 1792 rows and 512 channels.
    let int8 = bench(&["--kv-b-int8"]);
    assert_eq!(int8["kv_b_int8"], true);
    assert!(int8["decode_tok_s"].as_f64().is_some_and(|v| v > 0.0));
    let saved = 3 * (1792 * 512 * 2 - (1792 * 512 + 4 * (1792 + 512)));
    assert_eq!(
        json["weight_bytes_per_token"].as_u64().unwrap() - saved,
        int8["weight_bytes_per_token"].as_u64().unwrap()
    );
    fails_with(
        &["bench", path(&model), "--batch", "4"],
        &["--batch 4", "not available"],
    );
}

#[test]
fn bad_inputs_give_clear_errors() {
    let model = fixture("exl3/glm4-moe-lite-tiny-4.0bpw");
    let m = path(&model);
    fails_with(
        &[
            "logits",
            m,
            "--tokens",
            "1,2,99999",
            "--out",
            "/tmp/never.safetensors",
        ],
        &["99999", "vocabulary"],
    );
    fails_with(
        &[
            "logits",
            m,
            "--tokens",
            "1,x",
            "--out",
            "/tmp/never.safetensors",
        ],
        &["`x`"],
    );
    fails_with(
        &[
            "generate",
            m,
            "--prompt",
            "The quick brown fox jumps over the lazy dog",
            "--ctx-size",
            "4",
        ],
        &["context", "--ctx-size"],
    );
    fails_with(
        &["generate", m, "--prompt", "hi", "--ctx-size", "100000"],
        &["maximum context"],
    );
    fails_with(&["inspect", "/nonexistent/model"], &["/nonexistent/model"]);
    fails_with(
        &[
            "dequant",
            m,
            "--tensor",
            "model.layers.9.mlp.nothing",
            "--out",
            "/tmp/never.safetensors",
        ],
        &["model.layers.9.mlp.nothing"],
    );
    fails_with(
        &["synth", "llama", "--out", "/tmp/never-synth"],
        &["glm4_moe_lite"],
    );
    // Dequantized weights are a GPU path; this build may not even have CUDA.
    fails_with(
        &["generate", m, "--prompt", "hi", "--dequantize", "all"],
        &["--dequantize", "--device cuda"],
    );
    fails_with(
        &[
            "generate",
            m,
            "--prompt",
            "hi",
            "--device",
            "auto",
            "--dequantize",
            "all",
        ],
        &["cuda"],
    );

    // `--kv-b-int8` is a CPU option.
    fails_with(
        &[
            "generate",
            m,
            "--prompt",
            "hi",
            "--kv-b-int8",
            "--device",
            "cuda",
        ],
        &["--kv-b-int8", "CPU"],
    );
    fails_with(
        &[
            "generate",
            m,
            "--prompt",
            "hi",
            "--kv-b-int8",
            "--dequantize",
            "all",
        ],
        &["--kv-b-int8", "--dequantize"],
    );

    // The quantizer's GPU search in a build without CUDA: refused before anything is
    // written. (A CUDA build on a GPU machine would run it.)
    if !cfg!(feature = "cuda") {
        let hf = fixture("hf/glm4-moe-lite-tiny");
        let out_dir = tempfile::tempdir().unwrap();
        let out = out_dir.path().join("q");
        let args = [
            "quantize",
            path(&hf),
            "--out",
            path(&out),
            "--bits",
            "4",
            "--device",
            "cuda",
        ];
        fails_with(&args, &["--device cuda", "without CUDA"]);
        assert!(!out.exists() && !trellis_quant::work_dir_of(&out).exists());
    }

    // A model directory without tokenizer.json.
    let tmp = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(model.join(f), tmp.path().join(f)).unwrap();
    }
    fails_with(
        &["generate", path(tmp.path()), "--prompt", "hi"],
        &["tokenizer.json"],
    );
}

#[test]
fn synth_tiny_model_loads_and_generates() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("synth");
    ok(&[
        "synth",
        "glm4_moe_lite",
        "--preset",
        "tiny",
        "--bits",
        "3",
        "--out",
        path(&out),
    ]);
    let json = ok_json(&["inspect", path(&out), "--json"], &[]);
    assert_eq!(json["parameters"].as_u64(), Some(25_812_256));
    assert_eq!(json["bpw_excluding_head"].as_f64(), Some(3.0));
    let text = ok(&[
        "generate",
        path(&out),
        "--prompt",
        "hello world",
        "--max-tokens",
        "6",
        // Its generation config samples at temperature 1 and its random weights give each of
        // its three end tokens a fair chance: greedy and end-blind, the run always has output.
        "--temperature",
        "0",
        "--ignore-eos",
    ]);
    assert!(!text.trim().is_empty(), "synthetic model generated nothing");
    // It ships a chat template, so chat front ends work on it.
    let messages = tmp.path().join("messages.json");
    std::fs::write(&messages, r#"[{"role": "user", "content": "hi"}]"#).unwrap();
    let prompt = ok(&["template", path(&out), "--messages", path(&messages)]);
    assert_eq!(prompt, "[gMASK]<sop><|user|>\nhi<|assistant|>\n");
}

#[test]
fn template_prints_the_exact_render() {
    let cases: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("chat_template_cases.json")).unwrap(),
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("exl3/glm4-moe-lite-tiny-4.0bpw");
    for case in cases["models"]["glm4-moe-lite-tiny"]["cases"]
        .as_array()
        .unwrap()
    {
        let messages = tmp.path().join("messages.json");
        std::fs::write(&messages, case["messages"].to_string()).unwrap();
        let mut kwargs = case["kwargs"].as_object().unwrap().clone();
        let generation_prompt = kwargs
            .remove("add_generation_prompt")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let mut args = vec![
            "template".to_string(),
            path(&model).to_string(),
            "--messages".into(),
            path(&messages).into(),
        ];
        if !case["tools"].is_null() {
            let tools = tmp.path().join("tools.json");
            std::fs::write(&tools, case["tools"].to_string()).unwrap();
            args.extend(["--tools".into(), path(&tools).into()]);
        }
        if !generation_prompt {
            args.push("--no-generation-prompt".into());
        }
        args.extend([
            "--kwargs".into(),
            serde_json::Value::Object(kwargs).to_string(),
        ]);
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_eq!(
            ok(&argv),
            case["expected"].as_str().unwrap(),
            "case {}",
            case["name"]
        );
    }
}

#[test]
fn chat_keeps_the_conversation_in_the_cache() {
    use std::io::Write;
    let model = fixture("exl3/glm4-moe-lite-tiny-4.0bpw");
    let mut child = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args([
            "chat",
            path(&model),
            "--max-tokens",
            "8",
            "--temperature",
            "0",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let long_turn = "tell me about the sea ".repeat(20);
    writeln!(
        child.stdin.as_mut().unwrap(),
        "{long_turn}\nand the fox?\n/reset\nhi"
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "chat failed:\n{stderr}");
    let computed: Vec<usize> = stderr
        .lines()
        .filter_map(|l| {
            l.split('(')
                .nth(1)?
                .split(" new prompt tokens")
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(computed.len(), 3, "one answer per message:\n{stderr}");
    assert!(
        computed[0] > 80,
        "the first turn is prefilled whole: {computed:?}"
    );
    assert!(
        computed[1] < 20,
        "the second turn prefills only what is new: {computed:?}"
    );
    assert!(stderr.contains("conversation reset"));
    assert!(
        computed[2] < 20,
        "after /reset a short message is short: {computed:?}"
    );
    let answers = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .count();
    assert!(answers >= 3, "three answers on stdout, got {answers}");
}

/// `trellis kld` of a model against itself measures what `--kv-b-int8` costs: the reference
/// runs as the file holds it, so without the option the divergence is exactly zero and with
/// it small but not zero.
#[test]
fn kld_against_itself_measures_int8_kv_b() {
    let model = fixture("exl3/glm4-moe-lite-tiny-4.0bpw");
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.txt");
    let ids: Vec<String> = (0..96u32)
        .map(|i| ((i * 677 + 31) % 2028).to_string())
        .collect();
    std::fs::write(&tokens, ids.join(" ")).unwrap();
    let kld = |extra: &[&str]| {
        let args = [
            "kld",
            path(&model),
            "--reference",
            path(&model),
            "--tokens-file",
            path(&tokens),
            "--ctx",
            "48",
            "--json",
        ];
        ok_json(&args, extra)
    };
    let same = kld(&[]);
    assert_eq!(same["kld_mean"].as_f64(), Some(0.0), "{same}");
    assert_eq!(same["top1_agreement"].as_f64(), Some(1.0), "{same}");
    let int8 = kld(&["--kv-b-int8"]);
    let mean = int8["kld_mean"].as_f64().unwrap_or(f64::NAN);
    eprintln!("kld of int8 kv_b against the file's f16: {int8}");
    assert!(mean > 0.0 && mean < 1e-3, "kld_mean {mean}");
}

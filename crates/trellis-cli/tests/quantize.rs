//! `trellis quantize` on the tiny GLM-4.7-Flash fixture, interrupted after its first layer and
//! resumed, then `trellis kld` of the result and of ExLlamaV3's conversion at the same width
//! against the original, on the same tokens.
//!
//! Ignored by default: the conversion Viterbi-encodes ≈ 120 000 tiles, several minutes on a
//! 2-core machine. Run it with `cargo test -p trellis-cli --test quantize -- --ignored`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use trellis_testutil::fixture;

fn trellis() -> Command {
    Command::new(env!("CARGO_BIN_EXE_trellis"))
}

fn kld_mean(model: &Path, reference: &Path, tokens: &Path) -> f64 {
    let out = trellis()
        .args(["kld"])
        .arg(model)
        .arg("--reference")
        .arg(reference)
        .arg("--tokens-file")
        .arg(tokens)
        .args(["--ctx", "256", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in ["kld_median", "kld_p99", "top1_agreement"] {
        assert!(report[key].is_number(), "{key} missing: {report}");
    }
    report["kld_mean"].as_f64().unwrap()
}

#[test]
#[ignore = "a full conversion: several minutes on 2 cores"]
fn quantized_glm_resumes_and_matches_exllamav3_quality() {
    let hf = fixture("hf/glm4-moe-lite-tiny");
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("glm-4.0bpw");
    let partial = work.path().join("glm-4.0bpw.partial");
    let args = |extra: &[&str]| {
        let mut c = trellis();
        c.arg("quantize")
            .arg(&hf)
            .arg("--out")
            .arg(&out)
            .args(["--bits", "4", "--calibration-rows", "32"])
            .args(["--calibration-cols", "1024"])
            .args(extra);
        c
    };

    // Interrupt once layer 0 is checkpointed.
    let mut child = args(&[]).spawn().unwrap();
    let checkpoint = partial.join("quantize-state.json");
    let start = Instant::now();
    while !checkpoint.exists() {
        assert!(child.try_wait().unwrap().is_none(), "finished too early");
        assert!(start.elapsed() < Duration::from_secs(1800));
        std::thread::sleep(Duration::from_millis(200));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!out.exists());

    // The interrupted run continues from its checkpoint; afterwards the finished output is
    // refused without --force.
    let resumed = args(&["--resume"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{stderr}");
    assert!(stderr.contains("resuming after layer 0"), "{stderr}");
    assert!(out.join("config.json").is_file() && !partial.exists());
    let again = args(&[]).output().unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));

    // The same 1024 random ids for both models (the references' ids are random too).
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let ids: Vec<String> = (0..1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 2000).to_string()
        })
        .collect();
    let tokens = work.path().join("tokens.txt");
    std::fs::write(&tokens, ids.join(" ")).unwrap();
    let ours = kld_mean(&out, &hf, &tokens);
    let theirs = kld_mean(&fixture("exl3/glm4-moe-lite-tiny-4.0bpw"), &hf, &tokens);
    eprintln!("KL to the original at 4.0 bpw: ours {ours:.6}, ExLlamaV3 {theirs:.6}");
    // Measured 0.000822 vs 0.000735 with these settings (see BENCHMARKS.md): within 1.25×,
    // not yet at parity.
    assert!(ours <= 1.25 * theirs, "ours {ours} vs ExLlamaV3 {theirs}");
}

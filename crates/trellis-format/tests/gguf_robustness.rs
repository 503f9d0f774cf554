//! No GGUF input makes the reader or the import panic or allocate absurdly: truncations at
//! every length class, mutated header bytes, and hand-made headers with absurd counts,
//! lengths and dimensions all come back as errors (or, where a mutation is harmless, as a
//! file whose every tensor can then be read). This test binary runs under an allocator
//! that refuses any single allocation above 256 MiB, so an absurd count that reached
//! `Vec::with_capacity` would abort the test instead of passing by luck.

mod gguf_support;

use gguf_support::*;
use proptest::prelude::*;
use proptest::test_runner::Config;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::{Arc, OnceLock};
use trellis_format::gguf::{GgufError, GgufFile, GgufWriter, ImportOptions, import_from};
use trellis_testutil::repo_fixture;

/// The largest single allocation this test allows.
const ALLOCATION_CAP: usize = 256 << 20;

struct CappedAllocator;

// SAFETY: forwards to the system allocator, refusing (returning null for) oversized requests,
// which the standard library turns into an allocation-failure abort.
unsafe impl GlobalAlloc for CappedAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ALLOCATION_CAP {
            return std::ptr::null_mut();
        }
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > ALLOCATION_CAP {
            return std::ptr::null_mut();
        }
        // SAFETY: as for `alloc`; `ptr` came from this allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CappedAllocator = CappedAllocator;

fn cases(n: u32) -> Config {
    Config {
        cases: n,
        failure_persistence: None,
        ..Config::default()
    }
}

fn quants_bytes() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| std::fs::read(repo_fixture("gguf/quants.gguf")).unwrap())
}

fn model_bytes() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        tiny_gguf(&TinyOptions {
            arch: Arch::Gemma3,
            tie: true,
            quantized_q: true,
            gpt2_tokenizer: false,
            chat_template: Some("{{ messages }}".into()),
        })
        .0
    })
}

/// Read everything an opened file offers; errors are fine, panics are not.
fn exercise(file: &GgufFile) {
    for (key, value) in file.metadata() {
        let _ = (
            file.opt_u64(key),
            file.opt_f64(key),
            file.opt_str(key),
            value.describe(),
        );
    }
    for t in file.tensors() {
        let _ = (t.shape(), file.dequantize(t));
    }
}

/// Import into a fresh directory; errors are fine, panics are not.
fn try_import(bytes: Vec<u8>) {
    let Ok(file) = GgufFile::from_bytes("fuzzed.gguf", bytes) else {
        return;
    };
    exercise(&file);
    let out = tempfile::tempdir().unwrap();
    let _ = import_from(
        Arc::new(file),
        out.path(),
        &ImportOptions::default(),
        &mut |_, _| {},
    );
}

/// Byte length of the header of a valid file (magic through the last tensor info).
fn header_len(bytes: &[u8]) -> usize {
    let file = GgufFile::from_bytes("h.gguf", bytes.to_vec()).unwrap();
    // The data section starts at the aligned end of the header; the header itself ends at
    // most one alignment earlier.
    file.data_offset() as usize
}

#[test]
fn every_truncation_of_the_header_is_an_error() {
    for bytes in [quants_bytes(), model_bytes()] {
        let header = header_len(bytes);
        for len in 0..header.saturating_sub(64) {
            let err = GgufFile::from_bytes("cut.gguf", bytes[..len].to_vec()).unwrap_err();
            assert!(matches!(err, GgufError::Parse { .. }), "{len}: {err}");
        }
        // Cut inside the data: the last tensor runs past the end.
        let err = GgufFile::from_bytes("cut.gguf", bytes[..bytes.len() - 1].to_vec()).unwrap_err();
        assert!(
            err.to_string().contains("runs past the end of the file"),
            "{err}"
        );
    }
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn truncated_files_never_panic(cut in 0.0f64..1.0) {
        for bytes in [quants_bytes(), model_bytes()] {
            let len = (bytes.len() as f64 * cut) as usize;
            if let Ok(file) = GgufFile::from_bytes("cut.gguf", bytes[..len].to_vec()) {
                exercise(&file);
            }
        }
    }

    #[test]
    fn mutated_headers_never_panic(
        edits in prop::collection::vec((0.0f64..1.0, any::<u8>()), 1..6),
        model in any::<bool>(),
    ) {
        let original = if model { model_bytes() } else { quants_bytes() };
        let header = header_len(original);
        let mut bytes = original.to_vec();
        for (at, value) in edits {
            bytes[(at * header as f64) as usize] = value;
        }
        if model {
            try_import(bytes);
        } else if let Ok(file) = GgufFile::from_bytes("mutated.gguf", bytes) {
            exercise(&file);
        }
    }

    #[test]
    fn mutated_data_never_panics(
        edits in prop::collection::vec((0.0f64..1.0, any::<u8>()), 1..32),
    ) {
        // Tensor data is never validated (any bytes are some quant values), but the import
        // must still cope with whatever NaN or infinity the blocks now decode to.
        let original = model_bytes();
        let header = header_len(original);
        let mut bytes = original.to_vec();
        for (at, value) in edits {
            let i = header + (at * (bytes.len() - header) as f64) as usize;
            let last = bytes.len() - 1;
            bytes[i.min(last)] = value;
        }
        try_import(bytes);
    }
}

/// A header built by hand: magic, version, counts, then `rest`.
fn raw_header(version: u32, tensors: u64, kvs: u64, rest: &[u8]) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&tensors.to_le_bytes());
    out.extend_from_slice(&kvs.to_le_bytes());
    out.extend_from_slice(rest);
    out
}

fn string(s: &str) -> Vec<u8> {
    let mut out = (s.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(s.as_bytes());
    out
}

fn parse_error(bytes: Vec<u8>) -> String {
    match GgufFile::from_bytes("absurd.gguf", bytes) {
        Ok(_) => panic!("an absurd header opened"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn absurd_headers_are_rejected_without_allocating() {
    // Counts far beyond what the file could hold.
    let err = parse_error(raw_header(3, u64::MAX, 0, &[]));
    assert!(err.contains("tensor count"), "{err}");
    let err = parse_error(raw_header(3, 0, 1 << 60, &[0; 64]));
    assert!(err.contains("metadata count"), "{err}");
    // A string length of 2^63.
    let mut rest = (1u64 << 63).to_le_bytes().to_vec();
    rest.extend_from_slice(&[b'x'; 16]);
    let err = parse_error(raw_header(3, 0, 1, &rest));
    assert!(
        err.contains("truncated") && err.contains("metadata key #0"),
        "{err}"
    );
    // An array of 2^61 strings, u64s and nested arrays.
    for element_type in [8u32, 10, 9] {
        let mut rest = string("k");
        rest.extend_from_slice(&9u32.to_le_bytes());
        rest.extend_from_slice(&element_type.to_le_bytes());
        rest.extend_from_slice(&(1u64 << 61).to_le_bytes());
        rest.extend_from_slice(&[0; 32]);
        let err = parse_error(raw_header(3, 0, 1, &rest));
        assert!(err.contains("count") && err.contains("`k`"), "{err}");
    }
    // Arrays nested past the depth limit.
    let mut rest = string("deep");
    rest.extend_from_slice(&9u32.to_le_bytes());
    for _ in 0..100 {
        rest.extend_from_slice(&9u32.to_le_bytes());
        rest.extend_from_slice(&1u64.to_le_bytes());
    }
    let err = parse_error(raw_header(3, 0, 1, &rest));
    assert!(err.contains("nested deeper"), "{err}");
    // Unknown value type, bad magic, versions 1 and big-endian.
    let mut rest = string("k");
    rest.extend_from_slice(&13u32.to_le_bytes());
    rest.push(0);
    assert!(parse_error(raw_header(3, 0, 1, &rest)).contains("unknown value type 13"));
    assert!(parse_error(b"GGML\x03\0\0\0".to_vec()).contains("not a GGUF file"));
    assert!(parse_error(raw_header(1, 0, 0, &[])).contains("version 1"));
    assert!(parse_error(raw_header(3u32.swap_bytes(), 0, 0, &[])).contains("big-endian"));
    assert!(parse_error(raw_header(4, 0, 0, &[])).contains("version 4"));
}

/// One tensor info after an empty metadata section.
fn tensor_header(dims: &[u64], type_id: u32, offset: u64, data: usize) -> Vec<u8> {
    let mut rest = string("t");
    rest.extend_from_slice(&(dims.len() as u32).to_le_bytes());
    for d in dims {
        rest.extend_from_slice(&d.to_le_bytes());
    }
    rest.extend_from_slice(&type_id.to_le_bytes());
    rest.extend_from_slice(&offset.to_le_bytes());
    let mut out = raw_header(3, 1, 0, &rest);
    out.resize(out.len().next_multiple_of(32) + data, 0);
    out
}

#[test]
fn absurd_tensor_infos_are_rejected() {
    // Dimensions whose product overflows, or fits in u64 but not in the file.
    let err = parse_error(tensor_header(&[1 << 32, 1 << 32, 1 << 32], 0, 0, 64));
    assert!(err.contains("overflow"), "{err}");
    let err = parse_error(tensor_header(&[1 << 20, 1 << 20], 0, 0, 64));
    assert!(err.contains("runs past the end"), "{err}");
    // Zero or five dimensions, unknown type, unaligned offset, block-length mismatch.
    assert!(parse_error(tensor_header(&[], 0, 0, 64)).contains("0 dimensions"));
    assert!(parse_error(tensor_header(&[1; 5], 0, 0, 64)).contains("5 dimensions"));
    assert!(parse_error(tensor_header(&[4], 4, 0, 64)).contains("unknown ggml type id 4"));
    assert!(parse_error(tensor_header(&[4], 0, 3, 64)).contains("not a multiple of the alignment"));
    assert!(parse_error(tensor_header(&[33], 8, 0, 64)).contains("block length 32"));
    // An offset near u64::MAX must not wrap around.
    let offset = u64::MAX - 31;
    assert!(parse_error(tensor_header(&[4], 0, offset, 64)).contains("runs past the end"));
    // Valid after all: a one-element F32 tensor.
    let file = GgufFile::from_bytes("ok.gguf", tensor_header(&[1], 0, 0, 4)).unwrap();
    assert_eq!(file.tensor_f32("t").unwrap(), vec![0.0]);
}

#[test]
fn duplicate_keys_and_names_and_bad_alignment_are_errors() {
    let mut rest = string("k");
    rest.extend_from_slice(&4u32.to_le_bytes());
    rest.extend_from_slice(&1u32.to_le_bytes());
    let mut twice = rest.clone();
    twice.extend_from_slice(&rest);
    assert!(parse_error(raw_header(3, 0, 2, &twice)).contains("appears twice"));

    let mut w = GgufWriter::new();
    w.set("general.alignment", 3u32);
    assert!(parse_error(w.to_bytes()).contains("power of two"));

    let mut w = GgufWriter::new();
    w.add_f32("a", &[1], &[1.0]).unwrap();
    assert!(
        w.add_f32("a", &[1], &[1.0]).is_err(),
        "the writer refuses duplicates too"
    );
}

#[test]
fn writer_output_round_trips_every_alignment() {
    for alignment in [1u64, 8, 32, 4096] {
        let mut w = GgufWriter::new();
        w.set_alignment(alignment);
        w.set("general.architecture", "x");
        w.add_f32("a", &[3], &[1.0, 2.0, 3.0]).unwrap();
        w.add_f32("b", &[2, 1], &[4.0, 5.0]).unwrap();
        let file = GgufFile::from_bytes("aligned.gguf", w.to_bytes()).unwrap();
        assert_eq!(file.alignment(), alignment);
        assert_eq!(file.tensor_f32("a").unwrap(), vec![1.0, 2.0, 3.0]);
        assert_eq!(file.tensor_f32("b").unwrap(), vec![4.0, 5.0]);
        assert_eq!(file.tensor("b").unwrap().dims, vec![1, 2]);
    }
}

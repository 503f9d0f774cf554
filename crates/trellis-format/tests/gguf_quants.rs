//! The GGUF reader and dequantizers against `tests/fixtures/gguf/quants.gguf`, a file
//! written by the `gguf` Python package (scripts/make_gguf_quant_fixture.py): random blocks
//! of every supported type next to that package's own dequantization of them, plus metadata
//! of every value type and a non-default alignment.
//!
//! Dequantization must be bit-exact: the decoders evaluate ggml's products in ggml's order,
//! and the package does the same in float32 numpy, so no tolerance (not even 1 ulp) is
//! needed for any type.

use trellis_format::gguf::{GgmlType, GgufArray, GgufFile, GgufValue};
use trellis_testutil::repo_fixture;

const TYPES: [GgmlType; 13] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

fn fixture() -> GgufFile {
    GgufFile::open(&repo_fixture("gguf/quants.gguf")).unwrap()
}

#[test]
fn every_type_dequantizes_bit_exactly_like_the_gguf_package() {
    let file = fixture();
    for ty in TYPES {
        let quant = file.tensor(&format!("q.{ty}")).unwrap();
        assert_eq!(quant.ggml_type, ty);
        assert_eq!(quant.shape(), vec![8, 256], "{ty}");
        assert_eq!(quant.dims, vec![256, 8], "{ty}: ggml order is reversed");
        let reference = file.tensor(&format!("ref.{ty}")).unwrap();
        assert_eq!(reference.ggml_type, GgmlType::F32);
        let got = file.dequantize(quant).unwrap();
        let want = file.dequantize(reference).unwrap();
        assert_eq!(got.len(), 2048);
        let mismatches: Vec<(usize, f32, f32)> = got
            .iter()
            .zip(&want)
            .enumerate()
            .filter(|(_, (g, w))| g.to_bits() != w.to_bits())
            .map(|(i, (g, w))| (i, *g, *w))
            .collect();
        assert!(
            mismatches.is_empty(),
            "{ty}: {} of 2048 values differ, first {:?}",
            mismatches.len(),
            &mismatches[..mismatches.len().min(5)]
        );
        // Random blocks span every code: the values must not be degenerate.
        let distinct: std::collections::BTreeSet<u32> = got.iter().map(|v| v.to_bits()).collect();
        assert!(
            distinct.len() > 64,
            "{ty}: only {} distinct values",
            distinct.len()
        );
    }
}

#[test]
fn metadata_of_every_value_type_reads_back() {
    let file = fixture();
    assert_eq!(file.version(), 3);
    assert_eq!(file.alignment(), 64);
    assert_eq!(file.data_offset() % 64, 0);
    for t in file.tensors() {
        assert_eq!(t.offset % 64, 0, "{}", t.name);
    }
    assert_eq!(file.architecture(), Some("trellis-test"));
    let get = |k: &str| file.get(k).unwrap_or_else(|| panic!("{k} missing")).clone();
    assert_eq!(get("test.u8"), GgufValue::U8(200));
    assert_eq!(get("test.i8"), GgufValue::I8(-100));
    assert_eq!(get("test.u16"), GgufValue::U16(60000));
    assert_eq!(get("test.i16"), GgufValue::I16(-30000));
    assert_eq!(get("test.u32"), GgufValue::U32(4_000_000_000));
    assert_eq!(get("test.i32"), GgufValue::I32(-2_000_000_000));
    assert_eq!(get("test.f32"), GgufValue::F32(0.15625));
    assert_eq!(get("test.u64"), GgufValue::U64((1 << 63) + 5));
    assert_eq!(get("test.i64"), GgufValue::I64(-(1 << 62)));
    assert_eq!(get("test.f64"), GgufValue::F64(-2.5e-300));
    assert_eq!(get("test.bool"), GgufValue::Bool(true));
    assert_eq!(get("test.string"), GgufValue::String("héllo ▁wörld".into()));
    assert_eq!(
        get("test.strings"),
        GgufValue::Array(GgufArray::String(vec![
            "a".into(),
            "".into(),
            "▁b".into(),
            "<0x0A>".into()
        ]))
    );
    assert_eq!(
        get("test.i32s"),
        GgufValue::Array(GgufArray::I32(vec![1, -2, 3]))
    );
    assert_eq!(
        get("test.f32s"),
        GgufValue::Array(GgufArray::F32(vec![0.5, -1.25]))
    );
    assert_eq!(
        get("test.bools"),
        GgufValue::Array(GgufArray::Bool(vec![true, false, true]))
    );
    assert_eq!(
        get("test.nested"),
        GgufValue::Array(GgufArray::Array(vec![
            GgufArray::I32(vec![1, 2]),
            GgufArray::I32(vec![3])
        ]))
    );
    // Typed readers widen integers and reject the wrong kind with the key in the message.
    assert_eq!(file.opt_u64("test.u8").unwrap(), Some(200));
    assert_eq!(file.opt_u64("test.u64").unwrap(), Some((1 << 63) + 5));
    assert_eq!(file.opt_f64("test.i32").unwrap(), Some(-2e9));
    assert_eq!(file.opt_u64("absent").unwrap(), None);
    let err = file.opt_u64("test.i8").unwrap_err().to_string();
    assert!(err.contains("test.i8") && err.contains("i8 -100"), "{err}");
    let err = file.req_str("test.bool").unwrap_err().to_string();
    assert!(err.contains("expected a string"), "{err}");
}

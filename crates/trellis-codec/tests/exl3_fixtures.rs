//! The codec against ExLlamaV3's own reconstructions and outputs in the shared fixtures.

use half::f16;
use std::borrow::Cow;
use trellis_codec::{BitWidth, Codebook, TrellisLinear};
use trellis_testutil::{EXL3_MODELS, TensorFile, fixture, max_abs_rel, rel_l2};

/// Build a linear straight from a model file's tensors (independent of the format crate).
fn load_linear<'a>(
    model: &'a TensorFile,
    key: &str,
    in_f: usize,
    out_f: usize,
) -> TrellisLinear<'a> {
    let trellis = model.i64(&format!("{key}.trellis"));
    let bits = BitWidth::from_tile_words(trellis.shape[2]).expect("valid K");
    let codebook = if model.has(&format!("{key}.mul1")) {
        Codebook::Mul1
    } else if model.has(&format!("{key}.mcg")) {
        Codebook::Mcg
    } else {
        Codebook::Inst3
    };
    let words: Vec<u16> = trellis.data.iter().map(|&w| w as i16 as u16).collect();
    let f16s = |name: &str| -> Vec<f16> {
        model
            .f16_bits(name)
            .data
            .into_iter()
            .map(f16::from_bits)
            .collect()
    };
    TrellisLinear::new(
        Cow::Owned(words),
        Cow::Owned(f16s(&format!("{key}.suh"))),
        Cow::Owned(f16s(&format!("{key}.svh"))),
        None,
        bits,
        codebook,
        in_f,
        out_f,
    )
    .expect("valid linear")
}

/// The reconstructed linears of each reference file, from the `w.<key>` tensor names.
fn reference_keys(reference: &TensorFile) -> Vec<String> {
    reference
        .names()
        .into_iter()
        .filter_map(|n| n.strip_prefix("w.").map(str::to_string))
        .collect()
}

#[test]
fn inner_weights_are_bit_exact() {
    let mut checked = 0;
    for name in EXL3_MODELS {
        let model = TensorFile::open(fixture(&format!("exl3/{name}/model.safetensors")));
        let reference = TensorFile::open(fixture(&format!(
            "ref/exl3/{name}/reference_exl3.safetensors"
        )));
        for key in reference_keys(&reference) {
            let inner_name = format!("w_inner.{key}");
            if !reference.has(&inner_name) {
                continue;
            }
            let want = reference.f16_bits(&inner_name);
            let (k, n) = (want.shape[0], want.shape[1]);
            let linear = load_linear(&model, &key, k, n);
            let got: Vec<u16> = linear.decode_inner().iter().map(|v| v.to_bits()).collect();
            let mismatches = got.iter().zip(&want.data).filter(|(a, b)| a != b).count();
            assert_eq!(
                mismatches,
                0,
                "{name} {key}: {mismatches} of {} differ",
                got.len()
            );
            checked += 1;
        }
    }
    assert!(checked >= 5, "only {checked} inner weights checked");
}

#[test]
fn reconstruction_and_forward_match_exllamav3() {
    let mut checked = 0;
    for name in EXL3_MODELS {
        let model = TensorFile::open(fixture(&format!("exl3/{name}/model.safetensors")));
        let reference = TensorFile::open(fixture(&format!(
            "ref/exl3/{name}/reference_exl3.safetensors"
        )));
        for key in reference_keys(&reference) {
            let w = reference.f32(&format!("w.{key}"));
            let (in_f, out_f) = (w.shape[0], w.shape[1]);
            let linear = load_linear(&model, &key, in_f, out_f);
            let dense = linear.reconstruct();
            let err = max_abs_rel(&dense, &w.data);
            assert!(
                err <= 1e-3,
                "{name} {key}: reconstruction max error {err:.2e} × max|w|"
            );
            // The parallel transposed form: the same matrix up to float rounding.
            let transposed = linear.dequantize_transposed();
            assert_eq!(transposed.len(), in_f * out_f);
            let back: Vec<f32> = (0..in_f * out_f)
                .map(|idx| transposed[(idx % out_f) * in_f + idx / out_f])
                .collect();
            let err = max_abs_rel(&back, &dense);
            assert!(
                err <= 1e-6,
                "{name} {key}: transposed dequantization differs by {err:.2e} × max|w|"
            );

            for (x_name, y_name) in [
                (format!("x.{key}"), format!("y.{key}")),
                (format!("x.{key}"), format!("y1.{key}")),
            ] {
                let y = reference.f32(&y_name);
                let m = y.shape[0];
                let x = reference.f32(&x_name);
                let got = linear.apply(&x.data[..m * in_f], m);
                let err = rel_l2(&got, &y.data);
                assert!(
                    err <= 2e-3,
                    "{name} {key} {y_name}: forward rel L2 {err:.2e}"
                );
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 15, "three linears per fixture model");
}

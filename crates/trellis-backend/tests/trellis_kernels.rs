//! The CPU trellis kernels against the codec's reference: every instruction-set level this
//! machine supports, every bit width and codebook, decode bit for bit and forward within f32
//! accumulation error, for one row (GEMV) and several (GEMM), padded shapes included.

use rand::{Rng, SeedableRng, rngs::StdRng};
use trellis_backend::cpu::trellis_kernels::{Isa, PackedTrellis, forward_with};
use trellis_codec::{BitWidth, Codebook, TrellisLinear};
use trellis_testutil::{random_trellis, rel_l2};

/// Every (width, codebook) pair the format allows: half-integer widths are mul1 only.
fn cases() -> Vec<(BitWidth, Codebook)> {
    let mut cases = Vec::new();
    for bits in BitWidth::ALL {
        for cb in Codebook::ALL {
            if bits.is_integer() || cb == Codebook::Mul1 {
                cases.push((bits, cb));
            }
        }
    }
    cases
}

#[test]
fn every_level_decodes_tiles_bit_exactly() {
    let mut rng = StdRng::seed_from_u64(7);
    for (bits, cb) in cases() {
        // Two strips deep and 10 strips wide: strip and tile offsets both matter.
        let t = random_trellis(&mut rng, 256, 160, bits, cb, false);
        let inner = t.decode_inner();
        let p = PackedTrellis::new(&t);
        for isa in Isa::available() {
            for strip in 0..p.strips() {
                for kt in 0..p.tiles_k() {
                    let tile = p.decode_tile_with(isa, strip, kt);
                    for r in 0..16 {
                        for c in 0..16 {
                            let want = inner[(16 * kt + r) * t.n_padded + 16 * strip + c];
                            let got = tile[r * 16 + c];
                            assert_eq!(
                                got.to_bits(),
                                want.to_f32().to_bits(),
                                "{isa:?} K {bits} {cb:?} strip {strip} kt {kt} ({r}, {c})"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Relative L2 error a level's product may have: f32 accumulation error, or for the levels
/// that quantize activations (mul1 on VNNI), the bound that
/// `approximate_products_error_is_bounded` establishes.
fn bound(isa: Isa, codebook: Codebook) -> f64 {
    if isa.approximates(codebook) {
        APPROX_REL_L2
    } else {
        2e-6
    }
}

fn check_forward(t: &TrellisLinear<'_>, rows_list: &[usize], rng: &mut StdRng, what: &str) {
    let p = PackedTrellis::new(t);
    for &rows in rows_list {
        let x: Vec<f32> = (0..rows * t.in_features)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let want = t.apply(&x, rows);
        for isa in Isa::available() {
            // NaN never passes rel_l2, so an output the kernel forgets to write fails.
            let mut got = vec![f32::NAN; rows * t.out_features + 3];
            forward_with(&p, isa, &x, rows, &mut got);
            let err = rel_l2(&got[..rows * t.out_features], &want);
            assert!(
                err < bound(isa, t.codebook),
                "{what}: {isa:?} K {} {:?} rows {rows}: rel L2 {err:e}",
                t.bits,
                t.codebook
            );
            assert!(
                got[rows * t.out_features..].iter().all(|v| v.is_nan()),
                "{what}: {isa:?} wrote past its output"
            );
        }
    }
}

#[test]
fn every_level_matches_the_reference_forward() {
    let mut rng = StdRng::seed_from_u64(11);
    for (bits, cb) in cases() {
        let t = random_trellis(&mut rng, 256, 384, bits, cb, false);
        check_forward(&t, &[1, 2, 7, 16, 33], &mut rng, "256 → 384");
    }
}

#[test]
fn padded_shapes_and_bias() {
    let mut rng = StdRng::seed_from_u64(13);
    let shapes = [(512, 576), (300, 200), (128, 128), (640, 1000)];
    for (i, &(in_f, out_f)) in shapes.iter().enumerate() {
        for (bits, cb) in [
            (BitWidth::integer(4).unwrap(), Codebook::Mul1),
            (BitWidth::integer(3).unwrap(), Codebook::Mcg),
            (BitWidth::from_f64(2.5).unwrap(), Codebook::Mul1),
            (BitWidth::integer(6).unwrap(), Codebook::Inst3),
        ] {
            let t = random_trellis(&mut rng, in_f, out_f, bits, cb, i % 2 == 0);
            check_forward(
                &t,
                &[1, 2, 7, 16, 33],
                &mut rng,
                &format!("{in_f} → {out_f}"),
            );
        }
    }
}

/// More rows than one GEMM row block (64), with a partial last block.
#[test]
fn many_rows() {
    let mut rng = StdRng::seed_from_u64(17);
    let t = random_trellis(
        &mut rng,
        384,
        200,
        BitWidth::integer(3).unwrap(),
        Codebook::Mul1,
        true,
    );
    check_forward(&t, &[64, 65, 150], &mut rng, "384 → 200");
}

#[test]
fn levels_are_detected_consistently() {
    let available = Isa::available();
    eprintln!("levels on this machine: {available:?}");
    assert_eq!(available[0], Isa::Scalar);
    assert!(available.contains(&Isa::selected()));
    for isa in Isa::ALL {
        assert_eq!(Isa::from_name(isa.name()), Some(isa));
    }
}

/// A batch of products of different shapes and widths in one region equals each product alone
/// (the reference forward), at every level.
#[test]
fn batched_products_match_the_reference() {
    use trellis_backend::cpu::trellis_kernels::{MAX_BATCH, gemv_batch_with};
    let mut rng = StdRng::seed_from_u64(19);
    let shapes = [
        (256, 384, 3, Codebook::Mul1),
        (300, 200, 4, Codebook::Mcg),
        (128, 128, 2, Codebook::Inst3),
        (512, 576, 6, Codebook::Mul1),
        (256, 384, 3, Codebook::Mul1),
    ];
    let linears: Vec<TrellisLinear<'static>> = shapes
        .iter()
        .enumerate()
        .map(|(i, &(in_f, out_f, k, cb))| {
            random_trellis(
                &mut rng,
                in_f,
                out_f,
                BitWidth::integer(k).unwrap(),
                cb,
                i == 1,
            )
        })
        .collect();
    let packed: Vec<PackedTrellis> = linears.iter().map(PackedTrellis::new).collect();
    let xs: Vec<Vec<f32>> = linears
        .iter()
        .map(|t| {
            (0..t.in_features)
                .map(|_| rng.random_range(-1.0f32..1.0))
                .collect()
        })
        .collect();
    let want: Vec<f32> = linears
        .iter()
        .zip(&xs)
        .flat_map(|(t, x)| t.apply(x, 1))
        .collect();
    assert!(linears.len() <= MAX_BATCH);
    for isa in Isa::available() {
        for jobs in [1, 2, linears.len()] {
            let len: usize = linears[..jobs].iter().map(|t| t.out_features).sum();
            let mut got = vec![f32::NAN; len + 5];
            gemv_batch_with(isa, jobs, |j| (&packed[j], &xs[j][..]), &mut got);
            let mut offset = 0;
            for t in &linears[..jobs] {
                let range = offset..offset + t.out_features;
                offset = range.end;
                let err = rel_l2(&got[range.clone()], &want[range]);
                let max = bound(isa, t.codebook);
                assert!(err < max, "{isa:?} {jobs} jobs: rel L2 {err:e}");
            }
            assert!(
                got[len..].iter().all(|v| v.is_nan()),
                "{isa:?} wrote past its output"
            );
        }
    }
    // Each job's results in its own buffer (the selected level).
    let mut bufs: Vec<Vec<f32>> = linears
        .iter()
        .map(|t| vec![f32::NAN; t.out_features])
        .collect();
    let mut outs: Vec<&mut [f32]> = bufs.iter_mut().map(|b| &mut b[..]).collect();
    trellis_backend::cpu::trellis_kernels::gemv_batch_into(
        linears.len(),
        |j| (&packed[j], &xs[j][..]),
        &mut outs,
    );
    let mut offset = 0;
    for (t, got) in linears.iter().zip(&bufs) {
        let range = offset..offset + t.out_features;
        offset = range.end;
        let err = rel_l2(got, &want[range]);
        let max = bound(Isa::selected(), t.codebook);
        assert!(err < max, "separate outputs: rel L2 {err:e}");
    }
}

/// A batch of GEMMs with different shapes and row counts (1 row, a partial row block, more
/// than one block) equals each product alone, at every level.
#[test]
fn batched_gemms_match_the_reference() {
    use trellis_backend::cpu::trellis_kernels::gemm_batch_with;
    let mut rng = StdRng::seed_from_u64(29);
    let cases = [
        (256, 384, 3, Codebook::Mul1, 3),
        (300, 200, 4, Codebook::Mcg, 1),
        (128, 128, 2, Codebook::Inst3, 70),
        (512, 576, 6, Codebook::Mul1, 9),
    ];
    let linears: Vec<TrellisLinear<'static>> = cases
        .iter()
        .enumerate()
        .map(|(i, &(in_f, out_f, k, cb, _))| {
            random_trellis(
                &mut rng,
                in_f,
                out_f,
                BitWidth::integer(k).unwrap(),
                cb,
                i == 1,
            )
        })
        .collect();
    let packed: Vec<PackedTrellis> = linears.iter().map(PackedTrellis::new).collect();
    let xs: Vec<Vec<f32>> = linears
        .iter()
        .zip(&cases)
        .map(|(t, c)| {
            (0..c.4 * t.in_features)
                .map(|_| rng.random_range(-1.0f32..1.0))
                .collect()
        })
        .collect();
    let want: Vec<f32> = linears
        .iter()
        .zip(&xs)
        .zip(&cases)
        .flat_map(|((t, x), c)| t.apply(x, c.4))
        .collect();
    for isa in Isa::available() {
        let mut got = vec![f32::NAN; want.len() + 5];
        gemm_batch_with(
            isa,
            linears.len(),
            |j| (&packed[j], &xs[j][..], cases[j].4),
            &mut got,
        );
        let mut offset = 0;
        for (t, c) in linears.iter().zip(&cases) {
            let range = offset..offset + c.4 * t.out_features;
            offset = range.end;
            let err = rel_l2(&got[range.clone()], &want[range]);
            let max = bound(isa, t.codebook);
            assert!(err < max, "{isa:?}: rel L2 {err:e}");
        }
        assert!(
            got[want.len()..].iter().all(|v| v.is_nan()),
            "{isa:?} wrote past its output"
        );
    }
}

/// The bound of [`bound`] for approximate one-row products: several times the largest error
/// measured by [`approximate_gemv_error_is_bounded`] (~3·10^-4, the weights' skipped fp16
/// rounding; see the kernel's documentation).
const APPROX_REL_L2: f64 = 1e-3;

/// The levels that quantize activations against the exact reference, on every width mul1
/// allows, with inputs like a model's (Gaussian with a few large outliers): the relative L2
/// error of every output vector stays below [`APPROX_REL_L2`], and non-finite inputs reach the
/// outputs. Every row's results are bit-equal whatever rows share its product (GEMV, GEMM,
/// batched), so that a sequence decodes the same alone or batched.
#[test]
fn approximate_products_error_is_bounded() {
    use trellis_backend::cpu::trellis_kernels::{gemm_batch_with, gemv_batch_with};
    let mut rng = StdRng::seed_from_u64(31);
    let levels: Vec<Isa> = Isa::available()
        .into_iter()
        .filter(|i| i.approximates(Codebook::Mul1))
        .collect();
    if levels.is_empty() {
        eprintln!("no approximate level on this CPU");
        return;
    }
    let gaussian = |rng: &mut StdRng, n: usize| -> Vec<f32> {
        (0..n)
            .map(|i| {
                // Box–Muller, and every 97th value an outlier 20× larger.
                let (u, v): (f32, f32) = (rng.random_range(1e-7..1.0), rng.random());
                let g = (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos();
                if i % 97 == 5 { 20.0 * g } else { g }
            })
            .collect()
    };
    let mut worst = 0.0f64;
    // More rows than one GEMM row block (64).
    let rows = 67;
    for bits in BitWidth::ALL {
        let t = random_trellis(&mut rng, 1000, 520, bits, Codebook::Mul1, bits.is_integer());
        let p = PackedTrellis::new(&t);
        let n = t.out_features;
        let mut x: Vec<f32> = (0..t.in_features)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        for _ in 1..rows {
            x.extend(gaussian(&mut rng, t.in_features));
        }
        let want = t.apply(&x, rows);
        for &isa in &levels {
            let mut got = vec![f32::NAN; rows * n];
            forward_with(&p, isa, &x, rows, &mut got);
            for (r, (got, want)) in got.chunks_exact(n).zip(want.chunks_exact(n)).enumerate() {
                let err = rel_l2(got, want);
                assert!(
                    err < APPROX_REL_L2,
                    "{isa:?} K {bits} row {r}: rel L2 {err:e}"
                );
                worst = worst.max(err);
            }
            for r in [0, 1, 66] {
                let xr = &x[r * t.in_features..(r + 1) * t.in_features];
                let row = &got[r * n..(r + 1) * n];
                let mut alone = vec![f32::NAN; n];
                forward_with(&p, isa, xr, 1, &mut alone);
                assert!(alone == row, "{isa:?} K {bits} row {r}: GEMV ≠ GEMM");
                let mut batched = vec![f32::NAN; 2 * n];
                gemv_batch_with(isa, 2, |_| (&p, xr), &mut batched);
                assert!(
                    batched[n..] == *row,
                    "{isa:?} K {bits}: batched GEMV differs"
                );
            }
            // Jobs of 1 and 2 rows: rows 0 and 0, 1 of the product above.
            let mut batched = vec![f32::NAN; 3 * n];
            let job = |j: usize| (&p, &x[..(j + 1) * t.in_features], j + 1);
            gemm_batch_with(isa, 2, job, &mut batched);
            assert!(
                batched[..n] == got[..n],
                "{isa:?} K {bits}: batched GEMM differs"
            );
            assert!(
                batched[n..] == got[..2 * n],
                "{isa:?} K {bits}: batched GEMM differs"
            );
        }
        // Tiny activations (transformed block maxima ~1e-36, whose 32767/max overflows f32)
        // keep their precision.
        let tiny: Vec<f32> = gaussian(&mut rng, t.in_features)
            .iter()
            .map(|v| v * 1e-35)
            .collect();
        let want = t.apply(&tiny, 1);
        for &isa in &levels {
            let mut got = vec![f32::NAN; n];
            forward_with(&p, isa, &tiny, 1, &mut got);
            let err = rel_l2(&got, &want);
            assert!(err < APPROX_REL_L2, "{isa:?} K {bits} tiny: rel L2 {err:e}");
        }
        for &isa in &levels {
            for bad in [f32::NAN, f32::INFINITY] {
                let mut x = gaussian(&mut rng, t.in_features);
                x[17] = bad;
                let mut got = vec![0.0f32; t.out_features];
                forward_with(&p, isa, &x, 1, &mut got);
                assert!(
                    got.iter().all(|v| !v.is_finite()),
                    "{isa:?} K {bits}: {bad} in the input vanished"
                );
            }
        }
    }
    eprintln!("worst rel L2 {worst:.3e}");
}

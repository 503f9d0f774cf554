//! The Viterbi encoder through the public API: its output must decode back to exactly the
//! states and values it claims, close the ring, and reach trellis-coded distortion.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use trellis_codec::encode::{
    Effort, EncodedTile, encode_tile, encode_tiles, encode_tiles_with_effort,
};
use trellis_codec::tile::{
    POSITION_TO_TILE_INDEX, decode_tile, is_valid_walk, pack_states, tile_states,
};
use trellis_codec::{BitWidth, CODEBOOK_SCALE, Codebook, TILE_WEIGHTS};

fn gaussian_tile(rng: &mut StdRng, scale: f32) -> [f32; TILE_WEIGHTS] {
    std::array::from_fn(|_| rng.sample::<f32, _>(StandardNormal) * scale)
}

/// Everything a decoder can check about one encoded tile.
fn check_tile(tile: &EncodedTile, target: &[f32; TILE_WEIGHTS], bits: BitWidth, cb: Codebook) {
    let what = format!("K = {bits}, {cb:?}");
    assert_eq!(tile.words.len(), bits.tile_words(), "{what}");
    assert_eq!(tile_states(&tile.words, bits), tile.states, "{what}");
    assert_eq!(pack_states(&tile.states, bits), tile.words, "{what}");
    assert!(is_valid_walk(&tile.states, bits), "{what}");

    // The ring closes: state_0's high bits are state_255's low bits.
    let d0 = bits.code_bits(0);
    let overlap = (1u32 << (16 - d0)) - 1;
    assert_eq!(
        u32::from(tile.states[0]) >> d0,
        u32::from(tile.states[255]) & overlap,
        "{what}"
    );

    let decoded = decode_tile(&tile.words, bits, cb);
    for (i, (&v, &h)) in tile.values.iter().zip(&decoded).enumerate() {
        assert_eq!(v, h.to_f32(), "{what}: value {i}");
    }
    for (&i, &s) in POSITION_TO_TILE_INDEX.iter().zip(&tile.states) {
        assert_eq!(tile.values[usize::from(i)], cb.decode(s).to_f32(), "{what}");
    }

    let sse: f64 = decoded
        .iter()
        .zip(target)
        .map(|(&h, &x)| (h.to_f64() - f64::from(x)).powi(2))
        .sum();
    assert!(
        (sse - tile.squared_error).abs() <= 1e-12 * sse,
        "{what}: {} vs {sse}",
        tile.squared_error
    );
}

#[test]
fn round_trip_every_width_and_codebook() {
    let mut rng = StdRng::seed_from_u64(1);
    for bits in BitWidth::ALL {
        for cb in Codebook::ALL {
            let target = gaussian_tile(&mut rng, CODEBOOK_SCALE);
            check_tile(&encode_tile(&target, bits, cb), &target, bits, cb);
        }
    }
}

#[test]
fn degenerate_targets_still_close_the_ring() {
    let bits = BitWidth::from_f64(2.5).unwrap();
    // Zeros make many walks tie; huge values push every position to the codebook's extreme.
    for fill in [0.0, 1e4, -1e4] {
        for cb in Codebook::ALL {
            let target = [fill; TILE_WEIGHTS];
            check_tile(&encode_tile(&target, bits, cb), &target, bits, cb);
        }
    }
}

#[test]
fn parallel_batch_equals_single_tiles() {
    let mut rng = StdRng::seed_from_u64(2);
    let bits = BitWidth::integer(3).unwrap();
    let targets: Vec<_> = (0..6)
        .map(|_| gaussian_tile(&mut rng, CODEBOOK_SCALE))
        .collect();
    let batch = encode_tiles(&targets, bits, Codebook::Mcg);
    assert_eq!(batch.len(), targets.len());
    for (tile, target) in batch.iter().zip(&targets) {
        assert_eq!(*tile, encode_tile(target, bits, Codebook::Mcg));
    }
}

/// Trellis-coded quantization at 2 bits beats scalar Lloyd–Max (0.118) clearly; QTIP reports
/// ≈ 0.069 for its L = 16 trellis and the rate–distortion bound is 0.0625.
#[test]
fn two_bit_mse_on_unit_gaussian() {
    let bits = BitWidth::integer(2).unwrap();
    for cb in Codebook::ALL {
        let mut rng = StdRng::seed_from_u64(3);
        let table = cb.table_f32();
        let rms =
            (table.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / table.len() as f64).sqrt();
        let tiles = 8;
        let mut sse = 0.0;
        for _ in 0..tiles {
            let unit = gaussian_tile(&mut rng, 1.0);
            // Scaling the target by the codebook's RMS is scaling the codebook to unit RMS.
            let target = unit.map(|v| (f64::from(v) * rms) as f32);
            sse += encode_tile(&target, bits, cb).squared_error / (rms * rms);
        }
        let mse = sse / (tiles * TILE_WEIGHTS) as f64;
        assert!(mse < 0.085, "{cb:?}: MSE {mse}");
    }
}

#[test]
#[should_panic(expected = "finite targets")]
fn non_finite_target_is_rejected() {
    let mut target = [0.0; TILE_WEIGHTS];
    target[7] = f32::NAN;
    encode_tile(&target, BitWidth::integer(2).unwrap(), Codebook::Mul1);
}

/// A tile that some packed tile decodes to exactly is encoded with zero error: this ties the
/// encoder's position order, packing and codebook to the decoder's. (Not guaranteed by the
/// two-pass search in general: with duplicate codebook values, pass 1 could pick a zero-error
/// open walk whose wrap overlap admits no zero-error closed walk. It holds for these seeds and,
/// in a wider check, for 20 random tiles of every width and codebook.)
#[test]
fn decodable_tiles_are_reproduced_exactly() {
    let mut rng = StdRng::seed_from_u64(4);
    for bits in BitWidth::ALL {
        for cb in Codebook::ALL {
            let words: Vec<u16> = (0..bits.tile_words()).map(|_| rng.random()).collect();
            let target = decode_tile(&words, bits, cb).map(|h| h.to_f32());
            let tile = encode_tile(&target, bits, cb);
            assert_eq!(tile.squared_error, 0.0, "K = {bits}, {cb:?}");
            assert_eq!(tile.values, target, "K = {bits}, {cb:?}");
            check_tile(&tile, &target, bits, cb);
        }
    }
}

/// The quantizer's fast effort still returns valid closed walks whose packed words decode to
/// its values, within 2 % of the exhaustive search's squared error.
#[test]
fn fast_effort_is_valid_and_close_to_exact() {
    let mut rng = StdRng::seed_from_u64(31);
    let targets: Vec<[f32; TILE_WEIGHTS]> = (0..24)
        .map(|_| gaussian_tile(&mut rng, CODEBOOK_SCALE))
        .collect();
    for (k, cb) in [
        (2.0, Codebook::Mul1),
        (2.5, Codebook::Mul1),
        (4.0, Codebook::Mcg),
    ] {
        let bits = BitWidth::from_f64(k).unwrap();
        let fast = encode_tiles_with_effort(&targets, bits, cb, Effort::Fast);
        let exact = encode_tiles_with_effort(&targets, bits, cb, Effort::Exact);
        assert_eq!(exact, encode_tiles(&targets, bits, cb));
        for (tile, target) in fast.iter().zip(&targets) {
            check_tile(tile, target, bits, cb);
        }
        let sse = |v: &[EncodedTile]| v.iter().map(|t| t.squared_error).sum::<f64>();
        let (f, e) = (sse(&fast), sse(&exact));
        assert!(f <= 1.02 * e, "K={k}: fast {f} vs exact {e}");
    }
}

//! Mean squared error of the Viterbi encoder on i.i.d. unit Gaussian tiles, and its speed.
//!
//! Each codebook is scaled to unit RMS (the target is multiplied by the codebook's RMS before
//! encoding and the error divided back), so the numbers compare directly with rate–distortion
//! figures for a unit Gaussian source: D(R) = 2^(−2R), Lloyd–Max at 2 bits 0.118, QTIP's
//! L = 16 trellis ≈ 0.069.
//!
//! `cargo run --release -p trellis-codec --example encoder_mse [tiles]`

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use std::time::Instant;
use trellis_codec::encode::{encode_tile, encode_tiles};
use trellis_codec::{BitWidth, Codebook, TILE_WEIGHTS};

fn main() {
    let tiles: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("tile count"))
        .unwrap_or(64);
    let mut rng = StdRng::seed_from_u64(2024);
    let gaussian: Vec<[f32; TILE_WEIGHTS]> = (0..tiles)
        .map(|_| std::array::from_fn(|_| rng.sample(StandardNormal)))
        .collect();

    println!(
        "{tiles} tiles of i.i.d. N(0,1), codebook scaled to unit RMS; {} threads",
        rayon::current_num_threads()
    );
    println!(
        "{:<6} {:>5} {:>9} {:>9} {:>16} {:>16}",
        "code", "K", "MSE", "2^(-2K)", "tiles/s 1 core", "tiles/s all"
    );
    for cb in Codebook::ALL {
        let table = cb.table_f32();
        let rms =
            (table.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / table.len() as f64).sqrt();
        let scaled: Vec<[f32; TILE_WEIGHTS]> = gaussian
            .iter()
            .map(|t| t.map(|v| (f64::from(v) * rms) as f32))
            .collect();
        for bits in BitWidth::ALL {
            if !bits.is_integer() && cb != Codebook::Mul1 {
                continue;
            }
            // Warm the shared tables so neither timing includes building them.
            encode_tile(&scaled[0], bits, cb);

            let start = Instant::now();
            let serial: Vec<_> = scaled.iter().map(|t| encode_tile(t, bits, cb)).collect();
            let one_core = tiles as f64 / start.elapsed().as_secs_f64();

            let start = Instant::now();
            let parallel = encode_tiles(&scaled, bits, cb);
            let all_cores = tiles as f64 / start.elapsed().as_secs_f64();
            assert_eq!(serial, parallel);

            let sse: f64 = serial.iter().map(|t| t.squared_error).sum();
            let mse = sse / (rms * rms) / (tiles * TILE_WEIGHTS) as f64;
            println!(
                "{:<6} {:>5} {:>9.5} {:>9.5} {:>16.1} {:>16.1}",
                cb.name(),
                bits.to_string(),
                mse,
                (-2.0 * bits.as_f64()).exp2(),
                one_core,
                all_cores
            );
        }
    }
}

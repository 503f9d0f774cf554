//! The encoder's two efforts side by side on i.i.d. unit Gaussian tiles: mean squared error
//! (codebook scaled to unit RMS) and tiles per second on all cores.
//!
//! `cargo run --release -p trellis-codec --example encoder_effort [tiles]`

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use std::time::Instant;
use trellis_codec::encode::{Effort, encode_tiles_with_effort};
use trellis_codec::{BitWidth, Codebook, TILE_WEIGHTS};

fn main() {
    let tiles: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("tile count"))
        .unwrap_or(256);
    let mut rng = StdRng::seed_from_u64(7);
    let gaussian: Vec<[f32; TILE_WEIGHTS]> = (0..tiles)
        .map(|_| std::array::from_fn(|_| rng.sample(StandardNormal)))
        .collect();
    println!(
        "{tiles} tiles, {} threads\n{:<6} {:>5} {:>10} {:>10} {:>12} {:>12}",
        rayon::current_num_threads(),
        "code",
        "K",
        "MSE exact",
        "MSE fast",
        "exact t/s",
        "fast t/s"
    );
    for (cb, k) in [
        (Codebook::Mul1, 2.0),
        (Codebook::Mul1, 2.5),
        (Codebook::Mul1, 3.0),
        (Codebook::Mcg, 3.0),
        (Codebook::Mul1, 4.0),
        (Codebook::Mul1, 6.0),
        (Codebook::Mul1, 8.0),
    ] {
        let bits = BitWidth::from_f64(k).expect("a width");
        let table = cb.table_f32();
        let rms =
            (table.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / table.len() as f64).sqrt();
        let scaled: Vec<[f32; TILE_WEIGHTS]> = gaussian
            .iter()
            .map(|t| t.map(|v| (f64::from(v) * rms) as f32))
            .collect();
        let mut row = Vec::new();
        for effort in [Effort::Exact, Effort::Fast] {
            if std::env::var("ONLY").is_ok_and(|o| (o == "fast") != (effort == Effort::Fast)) {
                row.push((0.0, 0.0));
                continue;
            }
            encode_tiles_with_effort(&scaled[..1], bits, cb, effort);
            let start = Instant::now();
            let out = encode_tiles_with_effort(&scaled, bits, cb, effort);
            let rate = tiles as f64 / start.elapsed().as_secs_f64();
            let sse: f64 = out.iter().map(|t| t.squared_error).sum();
            row.push((sse / (rms * rms) / (tiles * TILE_WEIGHTS) as f64, rate));
        }
        println!(
            "{:<6} {:>5} {:>10.5} {:>10.5} {:>12.1} {:>12.1}",
            cb.name(),
            bits.to_string(),
            row[0].0,
            row[1].0,
            row[0].1,
            row[1].1
        );
    }
}

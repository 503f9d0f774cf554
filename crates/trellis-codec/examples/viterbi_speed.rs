//! Tiles per second of the quantizer's encoder ([`Effort::Fast`]) at one width, on Gaussian
//! tiles: the number to watch when working on the Viterbi step.
//!
//! `RAYON_NUM_THREADS=1 cargo run --release -p trellis-codec --example viterbi_speed [K] [tiles]`

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use std::time::Instant;
use trellis_codec::encode::{Effort, encode_tiles_with_effort};
use trellis_codec::{BitWidth, Codebook, TILE_WEIGHTS};

fn main() {
    let mut args = std::env::args().skip(1);
    let k: f64 = args.next().map_or(4.0, |a| a.parse().expect("K"));
    let tiles: usize = args.next().map_or(64, |a| a.parse().expect("tile count"));
    let bits = BitWidth::ALL
        .iter()
        .copied()
        .find(|b| b.as_f64() == k)
        .expect("a listed width");
    let mut rng = StdRng::seed_from_u64(7);
    let targets: Vec<[f32; TILE_WEIGHTS]> = (0..tiles)
        .map(|_| std::array::from_fn(|_| rng.sample(StandardNormal)))
        .collect();
    // Warm the tables.
    encode_tiles_with_effort(&targets[..1], bits, Codebook::Mul1, Effort::Fast);
    let start = Instant::now();
    let encoded = encode_tiles_with_effort(&targets, bits, Codebook::Mul1, Effort::Fast);
    let seconds = start.elapsed().as_secs_f64();
    let mse = encoded.iter().map(|t| t.squared_error).sum::<f64>() / (tiles * TILE_WEIGHTS) as f64;
    println!(
        "K={k} {tiles} tiles, {} threads: {:.1} tiles/s ({:.2} ms per tile per thread), mse {mse:.5}",
        rayon::current_num_threads(),
        tiles as f64 / seconds,
        seconds * 1e3 * rayon::current_num_threads() as f64 / tiles as f64
    );
}

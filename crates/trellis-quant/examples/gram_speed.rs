//! Speed of the Hessian capture's Gram product (`xᵀx`, upper triangle, f64 sums) on
//! calibration-shaped activations: one 1024-token row at the input widths of Gemma 3 270M's and
//! GLM-4.7-Flash's linears.
//!
//! `cargo run --release -p trellis-quant --example gram_speed [seconds]`

use std::time::Instant;
use trellis_quant::hessian::HessianAccumulator;

fn main() {
    let seconds: f64 = std::env::args()
        .nth(1)
        .map_or(2.0, |a| a.parse().expect("seconds"));
    let rows = 1024;
    for dim in [640, 1024, 2048] {
        let x: Vec<f32> = (0..rows * dim)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 300.0)
            .collect();
        let mut acc = HessianAccumulator::new(dim);
        acc.add(&x, rows);
        let (mut best, mut calls) = (f64::INFINITY, 0);
        let start = Instant::now();
        while calls < 3 || start.elapsed().as_secs_f64() < seconds {
            let t = Instant::now();
            acc.add(&x, rows);
            best = best.min(t.elapsed().as_secs_f64());
            calls += 1;
        }
        // Multiply-adds of the upper triangle, counted as two flops each.
        let flops = (dim * (dim + 1)) as f64 * rows as f64;
        println!(
            "dim {dim:>5}, {rows} rows: {:>7.2} ms  {:>6.1} GFLOP/s",
            best * 1e3,
            flops / best * 1e-9
        );
    }
}

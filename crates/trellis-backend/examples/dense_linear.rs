//! Throughput of the CPU backend's dense (bf16 / f16 / f32) linears on many rows, as the
//! quantizer's calibration forwards and dense models' prefill run them.
//!
//! ```text
//! cargo run --release -p trellis-backend --example dense_linear -- [rows] [seconds]
//! ```
//!
//! One line per (shape, dtype): best time per call and GFLOP/s (2·rows·in·out per call).

use half::{bf16, f16};
use std::sync::Arc;
use std::time::Instant;
use trellis_backend::cpu::{CpuLinear, DenseData};

/// (name, in, out): Gemma 3 270M's decoder linears and one GLM-4.7-Flash dense shape.
const SHAPES: [(&str, usize, usize); 4] = [
    ("gemma_q", 640, 1024),
    ("gemma_gate", 640, 2048),
    ("gemma_down", 2048, 640),
    ("glm_kv_b", 512, 4096),
];

fn main() {
    let mut args = std::env::args().skip(1);
    let rows: usize = args.next().map_or(1024, |a| a.parse().expect("rows"));
    let seconds: f64 = args.next().map_or(2.0, |a| a.parse().expect("seconds"));
    println!("{rows} rows, {} threads", rayon::current_num_threads());
    for (name, in_f, out_f) in SHAPES {
        let values: Vec<f32> = (0..in_f * out_f)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-3)
            .collect();
        let x: Vec<f32> = (0..rows * in_f)
            .map(|i| ((i * 104_729 % 997) as f32 - 498.0) * 1e-3)
            .collect();
        let mut out = vec![0f32; rows * out_f];
        for (dtype, weight) in [
            (
                "bf16",
                DenseData::BF16(
                    values
                        .iter()
                        .map(|&v| bf16::from_f32(v))
                        .collect::<Arc<[_]>>(),
                ),
            ),
            (
                "f16",
                DenseData::F16(
                    values
                        .iter()
                        .map(|&v| f16::from_f32(v))
                        .collect::<Arc<[_]>>(),
                ),
            ),
            ("f32", DenseData::F32(values.clone().into())),
        ] {
            let linear = CpuLinear::Dense {
                weight,
                bias: None,
                in_features: in_f,
                out_features: out_f,
            };
            linear.forward(&x, rows, &mut out);
            let (mut best, mut calls) = (f64::INFINITY, 0);
            let start = Instant::now();
            while calls < 3 || start.elapsed().as_secs_f64() < seconds {
                let t = Instant::now();
                linear.forward(&x, rows, &mut out);
                best = best.min(t.elapsed().as_secs_f64());
                calls += 1;
            }
            let flops = 2.0 * (rows * in_f * out_f) as f64;
            println!(
                "{name:<11} {dtype:<5} in {in_f:>5} out {out_f:>5}: {:>8.2} ms  {:>6.1} GFLOP/s",
                best * 1e3,
                flops / best * 1e-9
            );
        }
    }
}

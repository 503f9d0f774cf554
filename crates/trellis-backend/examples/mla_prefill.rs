//! Time MLA attention with GLM-4.7-Flash shapes (`kv_b` in f16, as EXL3 files store it): both
//! evaluations of one prefill chunk of `rows` tokens, or with `--decode` the absorbed decode of
//! one token after `rows` cached ones (best and median of 41 calls). `--cold N` cycles the
//! decode through N copies of `kv_b` (9.2 MB each), so that with N × 9.2 MB past the last-level
//! cache each call reads its weights from memory, as a model's 47 layers do. `--int8` holds
//! `kv_b` as `--kv-b-int8` does.
//!
//! `cargo run --release -p trellis-backend --example mla_prefill [--decode] [--cold N] [--int8] [rows...]`

use half::f16;
use rand::{Rng, SeedableRng, rngs::StdRng};
use std::time::Instant;
use trellis_backend::cpu::{
    CpuBackend, CpuBuffer, CpuMlaKvB, DenseData, Int8Matrix, KvBWeight, MlaMode,
};
use trellis_backend::{Backend, Batch, KvCacheLayout, KvDtype, MlaSpec, RopeSpec};

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let decode = args.first().is_some_and(|a| a == "--decode");
    if decode {
        args.remove(0);
    }
    let int8 = match args.iter().position(|a| a == "--int8") {
        Some(i) => {
            args.remove(i);
            true
        }
        None => false,
    };
    let copies = match args.iter().position(|a| a == "--cold") {
        Some(i) => {
            let n: usize = args
                .get(i + 1)
                .and_then(|v| v.parse().ok())
                .expect("--cold N");
            args.drain(i..i + 2);
            n.max(1)
        }
        None => 1,
    };
    let rows_list: Vec<usize> = args
        .iter()
        .map(|a| a.parse().expect("row counts"))
        .collect();
    let rows_list = if rows_list.is_empty() {
        vec![8, 32, 128, 512]
    } else {
        rows_list
    };
    let s = MlaSpec {
        heads: 20,
        qk_nope_dim: 192,
        qk_rope_dim: 64,
        v_head_dim: 256,
        kv_lora_rank: 512,
        softmax_scale: 1.0 / 16.0,
        latent_norm_eps: 1e-6,
    };
    let b = CpuBackend::new();
    let mut rng = StdRng::seed_from_u64(1);
    let per_head = s.qk_nope_dim + s.v_head_dim;
    let kv_bs: Vec<CpuMlaKvB> = (0..copies)
        .map(|_| {
            let w: Vec<f16> = (0..s.heads * per_head * s.kv_lora_rank)
                .map(|_| f16::from_f32(rng.random_range(-0.05..0.05)))
                .collect();
            let weight = if int8 {
                let wide: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
                KvBWeight::Int8(Int8Matrix::quantize(&wide, s.kv_lora_rank).expect("finite"))
            } else {
                KvBWeight::Dense(DenseData::F16(w.into()))
            };
            CpuMlaKvB {
                weight,
                rank: s.kv_lora_rank,
            }
        })
        .collect();
    let kv_b = &kv_bs[0];
    let rope = RopeSpec {
        inv_freq: (0..32)
            .map(|i| 1.0 / 1e6f32.powf(i as f32 / 32.0))
            .collect(),
        attention_scaling: 1.0,
        interleaved: true,
    };
    println!("threads {}", b.threads());
    if decode {
        println!("rows  decode_best_us  decode_median_us");
    } else {
        println!("rows  absorbed_ms  expanded_ms");
    }
    for rows in rows_list {
        let blocks = rows.div_ceil(16);
        let layout = KvCacheLayout {
            layers: 1,
            values_per_token: s.cache_width(),
            block_size: 16,
            num_blocks: blocks,
            dtype: KvDtype::F16,
        };
        let mut cache = b.alloc_kv_cache(&layout).unwrap();
        let tables: Vec<u32> = (0..blocks as u32).collect();
        let positions: Vec<u32> = (0..rows as u32).collect();
        let sequence = vec![0u32; rows];
        let batch = Batch {
            positions: &positions,
            sequence: &sequence,
            block_tables: &tables,
            blocks_per_sequence: blocks,
            block_size: 16,
        };
        let ckv = CpuBuffer(
            (0..rows * s.cache_width())
                .map(|_| rng.random_range(-1.0..1.0))
                .collect(),
        );
        b.mla_append(
            &ckv,
            &vec![1.0; s.kv_lora_rank],
            &rope,
            &s,
            &batch,
            &mut cache,
            0,
        );
        if decode {
            // The last position's query alone, against all `rows` cached ones.
            let batch = Batch {
                positions: &positions[rows - 1..],
                sequence: &sequence[rows - 1..],
                ..batch
            };
            let q0: Vec<f32> = (0..s.heads * s.qk_head_dim())
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let mut times = Vec::new();
            for it in 0..41 {
                let kv_b = &kv_bs[it % copies];
                let mut q = CpuBuffer(q0.clone());
                let mut out = CpuBuffer(vec![0.0; s.heads * s.v_head_dim]);
                let t = Instant::now();
                let mode = MlaMode::Absorbed;
                b.mla_attention_mode(mode, &mut q, kv_b, &rope, &s, &batch, &cache, 0, &mut out);
                times.push(t.elapsed().as_secs_f64() * 1e6);
            }
            times.sort_by(f64::total_cmp);
            println!("{rows:5}  {:13.1}  {:15.1}", times[0], times[20]);
            continue;
        }
        let q0: Vec<f32> = (0..rows * s.heads * s.qk_head_dim())
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let mut times = Vec::new();
        for mode in [MlaMode::Absorbed, MlaMode::Expanded] {
            let mut best = f64::INFINITY;
            for _ in 0..3 {
                let mut q = CpuBuffer(q0.clone());
                let mut out = CpuBuffer(vec![0.0; rows * s.heads * s.v_head_dim]);
                let t = Instant::now();
                b.mla_attention_mode(mode, &mut q, kv_b, &rope, &s, &batch, &cache, 0, &mut out);
                best = best.min(t.elapsed().as_secs_f64());
            }
            times.push(best * 1e3);
        }
        println!("{rows:4}  {:11.2}  {:11.2}", times[0], times[1]);
    }
}

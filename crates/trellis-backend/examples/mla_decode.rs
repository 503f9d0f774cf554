//! Time absorbed MLA decode (one token after `ctx` cached ones) with GLM-4.7-Flash shapes.
//!
//! `cargo run --release -p trellis-backend --example mla_decode [ctx...]`

use half::f16;
use rand::{Rng, SeedableRng, rngs::StdRng};
use std::time::Instant;
use trellis_backend::cpu::{CpuBackend, CpuBuffer, CpuMlaKvB, DenseData, MlaMode};
use trellis_backend::{Backend, Batch, KvCacheLayout, KvDtype, MlaSpec, RopeSpec};

fn main() {
    let rows_list: Vec<usize> = std::env::args()
        .skip(1)
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
    let kv_b = CpuMlaKvB {
        weight: DenseData::F16(
            (0..s.heads * per_head * s.kv_lora_rank)
                .map(|_| f16::from_f32(rng.random_range(-0.05..0.05)))
                .collect(),
        ),
        rank: s.kv_lora_rank,
    };
    let rope = RopeSpec {
        inv_freq: (0..32)
            .map(|i| 1.0 / 1e6f32.powf(i as f32 / 32.0))
            .collect(),
        attention_scaling: 1.0,
        interleaved: true,
    };
    println!("threads {}", b.threads());
    println!("ctx  absorbed_us (best, median of 41)");
    for ctx in rows_list {
        let blocks = ctx.div_ceil(16);
        let layout = KvCacheLayout {
            layers: 1,
            values_per_token: s.cache_width(),
            block_size: 16,
            num_blocks: blocks,
            dtype: KvDtype::F16,
        };
        let mut cache = b.alloc_kv_cache(&layout).unwrap();
        let tables: Vec<u32> = (0..blocks as u32).collect();
        let positions: Vec<u32> = (0..ctx as u32).collect();
        let sequence = vec![0u32; ctx];
        let all = Batch {
            positions: &positions,
            sequence: &sequence,
            block_tables: &tables,
            blocks_per_sequence: blocks,
            block_size: 16,
        };
        let ckv = CpuBuffer(
            (0..ctx * s.cache_width())
                .map(|_| rng.random_range(-1.0..1.0))
                .collect(),
        );
        b.mla_append(
            &ckv,
            &vec![1.0; s.kv_lora_rank],
            &rope,
            &s,
            &all,
            &mut cache,
            0,
        );
        let last = [ctx as u32 - 1];
        let batch = Batch {
            positions: &last,
            sequence: &[0],
            ..all
        };
        let q0: Vec<f32> = (0..s.heads * s.qk_head_dim())
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let mut times = Vec::new();
        for _ in 0..41 {
            let mut q = CpuBuffer(q0.clone());
            let mut out = CpuBuffer(vec![0.0; s.heads * s.v_head_dim]);
            let t = Instant::now();
            b.mla_attention_mode(
                MlaMode::Absorbed,
                &mut q,
                &kv_b,
                &rope,
                &s,
                &batch,
                &cache,
                0,
                &mut out,
            );
            times.push(t.elapsed().as_secs_f64() * 1e6);
        }
        times.sort_by(f64::total_cmp);
        println!("{ctx:5}  {:9.1}  {:9.1}", times[0], times[20]);
    }
}

//! The two evaluations of MLA attention (absorbed and expanded) agree on random inputs, and
//! both agree with a naive per-position expansion written here from the definition.

use half::f16;
use rand::{Rng, SeedableRng, rngs::StdRng};
use trellis_backend::cpu::{CpuBackend, CpuBuffer, CpuMlaKvB, DenseData, KvBWeight, MlaMode};
use trellis_backend::{Backend, Batch, KvCacheLayout, KvDtype, MlaSpec, RopeSpec};

fn spec() -> MlaSpec {
    MlaSpec {
        // Seven heads: the absorbed form's tasks take groups of heads (two groups a thread), so
        // with one to three threads the last group is shorter than the others.
        heads: 7,
        qk_nope_dim: 24,
        qk_rope_dim: 8,
        v_head_dim: 16,
        kv_lora_rank: 32,
        softmax_scale: 1.0 / 32f32.sqrt(),
        latent_norm_eps: 1e-6,
    }
}

fn random(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

#[test]
fn absorbed_and_expanded_agree_with_the_definition() {
    let s = spec();
    let b = CpuBackend::new();
    let mut rng = StdRng::seed_from_u64(7);
    let rows = 37;
    let per_head = s.qk_nope_dim + s.v_head_dim;
    let kv_b_f32 = random(&mut rng, s.heads * per_head * s.kv_lora_rank);
    let kv_b = CpuMlaKvB {
        weight: KvBWeight::Dense(DenseData::F16(
            kv_b_f32.iter().map(|&v| f16::from_f32(v)).collect(),
        )),
        rank: s.kv_lora_rank,
    };
    let kv_b_f32: Vec<f32> = kv_b_f32
        .iter()
        .map(|&v| f16::from_f32(v).to_f32())
        .collect();
    let rope = RopeSpec {
        inv_freq: (0..s.qk_rope_dim / 2)
            .map(|i| 1.0 / 1e4f32.powf(2.0 * i as f32 / s.qk_rope_dim as f32))
            .collect(),
        attention_scaling: 1.0,
        interleaved: true,
    };
    let layout = KvCacheLayout {
        layers: 1,
        values_per_token: s.cache_width(),
        block_size: 16,
        num_blocks: 4,
        dtype: KvDtype::F32,
    };
    let mut cache = b.alloc_kv_cache(&layout).unwrap();
    // Blocks deliberately out of order, as a paged cache may hand them out.
    let tables = [2u32, 0, 3, 1];
    let positions: Vec<u32> = (0..rows as u32).collect();
    let sequence = vec![0u32; rows];
    let batch = Batch {
        positions: &positions,
        sequence: &sequence,
        block_tables: &tables,
        blocks_per_sequence: 4,
        block_size: 16,
    };
    let ckv = CpuBuffer(random(&mut rng, rows * s.cache_width()));
    let norm = vec![1.0f32; s.kv_lora_rank];
    b.mla_append(&ckv, &norm, &rope, &s, &batch, &mut cache, 0);
    let q0 = random(&mut rng, rows * s.heads * s.qk_head_dim());
    let mut results = Vec::new();
    for mode in [MlaMode::Absorbed, MlaMode::Expanded] {
        let mut q = CpuBuffer(q0.clone());
        let mut out = CpuBuffer(vec![f32::NAN; rows * s.heads * s.v_head_dim]);
        b.mla_attention_mode(mode, &mut q, &kv_b, &rope, &s, &batch, &cache, 0, &mut out);
        results.push((out.0, q.0));
    }

    // Naive: expand keys/values per position from the cached latent and attend.
    let mut latent = vec![0.0f32; s.cache_width()];
    let rotated_q = &results[0].1;
    let mut max_err = 0.0f32;
    let mut max_val = 0.0f32;
    for i in 0..rows {
        for h in 0..s.heads {
            let qh = &rotated_q[(i * s.heads + h) * s.qk_head_dim()..][..s.qk_head_dim()];
            let mut scores = Vec::new();
            let mut values = Vec::new();
            for p in 0..=i {
                let slot = batch.slot(0, p as u32);
                let row = match &cache.data {
                    trellis_backend::cpu::KvData::F32(d) => {
                        &d[slot * s.cache_width()..(slot + 1) * s.cache_width()]
                    }
                    _ => unreachable!(),
                };
                latent.copy_from_slice(row);
                let kv = |r: usize| -> f32 {
                    (0..s.kv_lora_rank)
                        .map(|c| kv_b_f32[(h * per_head + r) * s.kv_lora_rank + c] * latent[c])
                        .sum()
                };
                let k_nope: Vec<f32> = (0..s.qk_nope_dim).map(kv).collect();
                let v: Vec<f32> = (0..s.v_head_dim).map(|d| kv(s.qk_nope_dim + d)).collect();
                let score: f32 = qh[..s.qk_nope_dim]
                    .iter()
                    .zip(&k_nope)
                    .map(|(a, b)| a * b)
                    .sum::<f32>()
                    + qh[s.qk_nope_dim..]
                        .iter()
                        .zip(&latent[s.kv_lora_rank..])
                        .map(|(a, b)| a * b)
                        .sum::<f32>();
                scores.push(score * s.softmax_scale);
                values.push(v);
            }
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = scores.iter().map(|x| (x - max).exp()).collect();
            let z: f32 = e.iter().sum();
            for d in 0..s.v_head_dim {
                let want: f32 = e.iter().zip(&values).map(|(p, v)| p / z * v[d]).sum();
                for (out, _) in &results {
                    let got = out[(i * s.heads + h) * s.v_head_dim + d];
                    assert!(
                        got.is_finite(),
                        "unwritten or NaN output at row {i} head {h}"
                    );
                    max_err = max_err.max((got - want).abs());
                }
                max_val = max_val.max(want.abs());
            }
        }
    }
    assert!(
        max_err <= 1e-5 * max_val.max(1.0),
        "max error {max_err} (max value {max_val})"
    );
}

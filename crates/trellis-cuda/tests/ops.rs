//! Every backend op on the GPU against the CPU backend, on seeded random inputs. Outputs are
//! poisoned with NaN before each op so that an unwritten element fails, and values written
//! past the op's output are caught by a NaN-filled tail. Run on a GPU machine with
//! `cargo test -p trellis-cuda --test ops -- --ignored --test-threads 1`.

mod common;

use common::*;
use rand::Rng;
use rand::seq::SliceRandom;
use trellis_backend::{
    AttentionSpec, Backend, Batch, GroupRanking, KvCacheLayout, KvDtype, MlaSpec, RopeSpec,
    RouterSpec, ScoringFunction,
};
use trellis_codec::{BitWidth, Codebook};
use trellis_cuda::CudaBackend;
use trellis_format::{DType, LinearWeights};
use trellis_testutil::random_trellis;

/// Linear-layer results differ from the CPU only by f32 summation order.
const LINEAR_TOL: f64 = 1e-4;
const ELEMENTWISE_TOL: f64 = 1e-5;
const ATTENTION_TOL: f64 = 1e-4;

fn assert_tail_untouched(what: &str, buf: &trellis_cuda::CudaBuffer, len: usize, spare: usize) {
    let all = read_gpu(buf, len + spare);
    assert!(
        all[len..].iter().all(|v| v.is_nan()),
        "{what}: the op wrote past its {len} output values"
    );
}

fn run_linear_case(
    what: &str,
    weights: &LinearWeights<'_>,
    in_f: usize,
    out_f: usize,
    rows_list: &[usize],
    seed: u64,
) -> f64 {
    let (c, g) = (cpu(), gpu());
    let cw = c.upload_linear("w", weights).unwrap();
    let gw = g.upload_linear("w", weights).unwrap();
    let mut worst: f64 = 0.0;
    let mut r = rng(seed);
    for &rows in rows_list {
        let x = uniform(&mut r, rows * in_f, 1.0);
        let cx = trellis_backend::cpu::CpuBuffer(x.clone());
        let mut cout = c.alloc(rows * out_f).unwrap();
        c.linear(&cw, &cx, rows, &mut cout);
        let gx = gpu_buffer(&x, 0);
        let spare = 64;
        let mut gout = poisoned(rows * out_f + spare);
        g.linear(&gw, &gx, rows, &mut gout);
        let got = read_gpu(&gout, rows * out_f);
        worst = worst.max(check(
            &format!("{what} rows {rows}"),
            &got,
            &cout.0[..rows * out_f],
            LINEAR_TOL,
        ));
        assert_tail_untouched(what, &gout, rows * out_f, spare);
    }
    worst
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn trellis_linear_every_codebook_and_width() {
    let mut r = rng(1);
    let mut summary = Vec::new();
    for cb in Codebook::ALL {
        for bits in BitWidth::ALL {
            if !bits.is_integer() && cb != Codebook::Mul1 {
                continue;
            }
            let mut worst: f64 = 0.0;
            // Unpadded, every row-tile height and a split reduction.
            let t = random_trellis(&mut r, 256, 384, bits, cb, false);
            worst = worst.max(run_linear_case(
                &format!("trellis {} K={bits} 256→384", cb.name()),
                &LinearWeights::Trellis(t),
                256,
                384,
                &[1, 3, 12, 17, 130],
                r.random(),
            ));
            // Padded on both sides (500 → 512 inputs, 576 → 640 outputs), with a bias.
            let t = random_trellis(&mut r, 500, 576, bits, cb, true);
            worst = worst.max(run_linear_case(
                &format!("trellis {} K={bits} 500→576 +bias", cb.name()),
                &LinearWeights::Trellis(t),
                500,
                576,
                &[1, 8, 33],
                r.random(),
            ));
            summary.push(format!("{} K={bits}: max rel {worst:.2e}", cb.name()));
        }
    }
    eprintln!("trellis linear summary:\n  {}", summary.join("\n  "));
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn trellis_linear_realistic_shapes() {
    let mut r = rng(2);
    let cases = [
        (2048, 1536, 4.0, Codebook::Mul1),
        (2048, 1536, 3.0, Codebook::Mcg),
        (4096, 512, 2.0, Codebook::Inst3),
        (1536, 2048, 2.5, Codebook::Mul1),
    ];
    for (in_f, out_f, bits, cb) in cases {
        let bits = BitWidth::from_f64(bits).unwrap();
        let t = random_trellis(&mut r, in_f, out_f, bits, cb, false);
        run_linear_case(
            &format!("trellis {} K={bits} {in_f}→{out_f}", cb.name()),
            &LinearWeights::Trellis(t),
            in_f,
            out_f,
            &[1, 5, 128],
            r.random(),
        );
    }
}

/// Each weight rounded once to f16: ≤ 2⁻¹¹ relative, and the products' errors mostly cancel.
const DEQUANTIZED_TOL: f64 = 2e-3;

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn dequantized_trellis_linears_match_the_trellis_product() {
    // This backend's own buffers throughout: it runs on its own stream.
    let (c, g) = (cpu(), gpu_dequantized());
    let mut attention_only = CudaBackend::new(0).unwrap();
    attention_only.set_dequantize(trellis_cuda::DequantizeSet::parse("attn").unwrap());
    let mut r = rng(31);
    let cases = [
        (256, 384, 3.0, Codebook::Mcg, false),
        (500, 576, 4.0, Codebook::Mul1, true),
        (2048, 1536, 2.5, Codebook::Mul1, false),
        (1536, 2048, 6.0, Codebook::Inst3, false),
    ];
    for (in_f, out_f, bits, cb, bias) in cases {
        let bits = BitWidth::from_f64(bits).unwrap();
        let weights = LinearWeights::Trellis(random_trellis(&mut r, in_f, out_f, bits, cb, bias));
        let name = "model.layers.1.self_attn.o_proj";
        let cw = c.upload_linear(name, &weights).unwrap();
        let gw = g.upload_linear(name, &weights).unwrap();
        let trellis_cuda::CudaLinear::Dense(d) = &gw else {
            panic!("{name} was not dequantized");
        };
        assert_eq!(d.dtype, trellis_cuda::DenseType::F16);
        assert_eq!(g.linear_bytes(&gw), Some((in_f * out_f * 2) as u64));
        // Names outside the chosen groups keep their trellis form.
        let kept = attention_only.upload_linear("model.layers.1.mlp.experts.0.up_proj", &weights);
        assert!(matches!(
            kept.unwrap(),
            trellis_cuda::CudaLinear::Trellis(_)
        ));
        for rows in [1, 7, 64] {
            let x = uniform(&mut r, rows * in_f, 1.0);
            let cx = trellis_backend::cpu::CpuBuffer(x.clone());
            let mut cout = c.alloc(rows * out_f).unwrap();
            c.linear(&cw, &cx, rows, &mut cout);
            let mut gx = g.alloc(rows * in_f).unwrap();
            g.write(&mut gx, &x);
            let spare = 64;
            let mut gout = g.alloc(rows * out_f + spare).unwrap();
            g.fill(&mut gout, f32::NAN, rows * out_f + spare);
            g.linear(&gw, &gx, rows, &mut gout);
            let mut got = vec![0.0; rows * out_f + spare];
            g.read(&gout, &mut got);
            let what = format!(
                "dequantized {} K={bits} {in_f}→{out_f} rows {rows}",
                cb.name()
            );
            check(
                &what,
                &got[..rows * out_f],
                &cout.0[..rows * out_f],
                DEQUANTIZED_TOL,
            );
            assert!(
                got[rows * out_f..].iter().all(|v| v.is_nan()),
                "{what}: the op wrote past its output"
            );
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn dense_linear_every_dtype() {
    let mut r = rng(3);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let (in_f, out_f) = (300, 200);
        let w = uniform(&mut r, in_f * out_f, 0.1);
        let b = uniform(&mut r, out_f, 0.5);
        let wb = float_bytes(&w, dtype);
        let bb = float_bytes(&b, DType::F32);
        let shape = [out_f, in_f];
        let bshape = [out_f];
        let weights = LinearWeights::Dense {
            weight: view("w", dtype, &shape, &wb),
            bias: Some(view("b", DType::F32, &bshape, &bb)),
        };
        run_linear_case(
            &format!("dense {dtype:?} {in_f}→{out_f}"),
            &weights,
            in_f,
            out_f,
            &[1, 3, 12, 17, 130],
            r.random(),
        );
    }
}

/// Begin the same step on both backends.
fn begin_both(tokens: &[u32], batch: &Batch<'_>) {
    cpu().begin_step(tokens, batch);
    gpu().begin_step(tokens, batch);
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn embed_every_dtype() {
    let mut r = rng(4);
    let (vocab, hidden) = (300, 96);
    let table = uniform(&mut r, vocab * hidden, 1.0);
    let tokens: Vec<u32> = (0..37).map(|_| r.random_range(0..vocab as u32)).collect();
    let positions: Vec<u32> = (0..tokens.len() as u32).collect();
    let sequence = vec![0u32; tokens.len()];
    let tables = [0u32];
    let batch = Batch {
        positions: &positions,
        sequence: &sequence,
        block_tables: &tables,
        blocks_per_sequence: 1,
        block_size: 64,
    };
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let bytes = float_bytes(&table, dtype);
        let shape = [vocab, hidden];
        let v = view("embed", dtype, &shape, &bytes);
        let ce = cpu().upload_embedding(&v).unwrap();
        let ge = gpu().upload_embedding(&v).unwrap();
        for scale in [1.0f32, 2.5] {
            begin_both(&tokens, &batch);
            let mut cout = cpu().alloc(tokens.len() * hidden).unwrap();
            cpu().embed(&ce, &tokens, scale, &mut cout);
            let mut gout = poisoned(tokens.len() * hidden);
            gpu().embed(&ge, &tokens, scale, &mut gout);
            check(
                &format!("embed {dtype:?} scale {scale}"),
                &read_gpu(&gout, tokens.len() * hidden),
                &cout.0,
                0.0,
            );
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn norms_and_elementwise() {
    let mut r = rng(5);
    for width in [512, 2055] {
        let rows = 7;
        let x = uniform(&mut r, rows * width, 3.0);
        let w = uniform(&mut r, width, 1.0);
        let (c, g) = (cpu(), gpu());
        let (cw, gw) = (c.upload_vector(&w).unwrap(), g.upload_vector(&w).unwrap());
        let cx = trellis_backend::cpu::CpuBuffer(x.clone());
        let mut cout = c.alloc(rows * width).unwrap();
        c.rms_norm(&cx, &cw, 1e-5, rows, &mut cout);
        let gx = gpu_buffer(&x, 0);
        let mut gout = poisoned(rows * width);
        g.rms_norm(&gx, &gw, 1e-5, rows, &mut gout);
        check(
            &format!("rms_norm width {width}"),
            &read_gpu(&gout, rows * width),
            &cout.0,
            ELEMENTWISE_TOL,
        );

        let mut cx = trellis_backend::cpu::CpuBuffer(x.clone());
        c.rms_norm_inplace(&mut cx, &cw, 1e-6, rows);
        let mut gx = gpu_buffer(&x, 0);
        g.rms_norm_inplace(&mut gx, &gw, 1e-6, rows);
        check(
            &format!("rms_norm_inplace width {width}"),
            &read_gpu(&gx, rows * width),
            &cx.0,
            ELEMENTWISE_TOL,
        );
    }

    let len = 10_007;
    let a = uniform(&mut r, len, 4.0);
    let b = uniform(&mut r, len, 4.0);
    for op in ["add", "silu_mul", "gelu_tanh_mul"] {
        let (c, g) = (cpu(), gpu());
        let mut ca = trellis_backend::cpu::CpuBuffer(a.clone());
        let cb = trellis_backend::cpu::CpuBuffer(b.clone());
        let mut ga = gpu_buffer(&a, 0);
        let gb = gpu_buffer(&b, 0);
        match op {
            "add" => {
                c.add(&mut ca, &cb, len);
                g.add(&mut ga, &gb, len);
            }
            "silu_mul" => {
                c.silu_mul(&mut ca, &cb, len);
                g.silu_mul(&mut ga, &gb, len);
            }
            _ => {
                c.gelu_tanh_mul(&mut ca, &cb, len);
                g.gelu_tanh_mul(&mut ga, &gb, len);
            }
        }
        check(op, &read_gpu(&ga, len), &ca.0, ELEMENTWISE_TOL);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn copy_rows_gathers_in_chunks() {
    let mut r = rng(6);
    let (rows, width) = (150, 70);
    let src = uniform(&mut r, rows * width, 1.0);
    let mut picks: Vec<u32> = (0..rows as u32).collect();
    picks.shuffle(&mut r);
    picks.truncate(100);
    let (c, g) = (cpu(), gpu());
    let cs = trellis_backend::cpu::CpuBuffer(src.clone());
    let mut cd = c.alloc(picks.len() * width).unwrap();
    c.copy_rows(&cs, width, &picks, &mut cd);
    let gs = gpu_buffer(&src, 0);
    let mut gd = poisoned(picks.len() * width + 32);
    g.copy_rows(&gs, width, &picks, &mut gd);
    check("copy_rows", &read_gpu(&gd, picks.len() * width), &cd.0, 0.0);
    assert_tail_untouched("copy_rows", &gd, picks.len() * width, 32);
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn argmax_rows_matches_the_host_choice() {
    let mut r = rng(11);
    let width = 151_936;
    let mut rows: Vec<Vec<f32>> = (0..6).map(|_| uniform(&mut r, width, 8.0)).collect();
    // Ties (the lowest index wins), a NaN first value and NaNs elsewhere (never chosen), an
    // all-NaN row (no choice), −∞ everywhere but one value, and signed zeros.
    rows[1][70_000] = 9.0;
    rows[1][1_000] = 9.0;
    rows[1][150_000] = 9.0;
    rows[2][0] = f32::NAN;
    rows[3][5] = f32::NAN;
    rows[3][6] = 100.0;
    rows[3][7] = f32::NAN;
    rows[4] = vec![f32::NAN; width];
    rows[5] = vec![f32::NEG_INFINITY; width];
    rows[5][123_456] = -0.0;
    let mut short = vec![0.0f32; 3];
    short[2] = 0.0;
    for (what, rows) in [("vocabulary rows", rows), ("three zeros", vec![short])] {
        let width = rows[0].len();
        let flat: Vec<f32> = rows.concat();
        let want: Vec<u32> = rows
            .iter()
            .map(|row| trellis_backend::argmax(row).unwrap_or(trellis_backend::NO_CHOICE))
            .collect();
        let mut from_cpu = vec![u32::MAX; rows.len()];
        cpu().argmax_rows(
            &trellis_backend::cpu::CpuBuffer(flat.clone()),
            width,
            &mut from_cpu,
        );
        assert_eq!(from_cpu, want, "{what}: CPU backend");
        // Twice: the launch leaves its tickets as it found them.
        let on_gpu = gpu_buffer(&flat, 64);
        for call in 0..2 {
            let mut from_gpu = vec![u32::MAX; rows.len()];
            gpu().argmax_rows(&on_gpu, width, &mut from_gpu);
            assert_eq!(from_gpu, want, "{what}: GPU, call {call}");
        }
    }
    assert_eq!(trellis_backend::argmax(&[f32::NAN; 4]), None);
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn rope_interleaved_and_neox() {
    let mut r = rng(7);
    let rows = 9;
    let positions: Vec<u32> = (0..rows as u32).map(|i| i * 611 + 3).collect();
    let sequence = vec![0u32; rows];
    let tables = [0u32];
    let batch = Batch {
        positions: &positions,
        sequence: &sequence,
        block_tables: &tables,
        blocks_per_sequence: 1,
        block_size: 1 << 16,
    };
    let tokens = vec![0u32; rows];
    for (interleaved, scaling, heads, head_dim, offset, half) in [
        (true, 1.0, 4, 256, 192, 32),
        (false, 1.2, 3, 128, 0, 64),
        (false, 1.0, 2, 96, 16, 24),
    ] {
        let spec = RopeSpec {
            inv_freq: (0..half)
                .map(|i| 10000f32.powf(-(2.0 * i as f32) / (2.0 * half as f32)))
                .collect(),
            attention_scaling: scaling,
            interleaved,
        };
        let x = uniform(&mut r, rows * heads * head_dim, 2.0);
        let (c, g) = (cpu(), gpu());
        let (cr, gr) = (c.upload_rope(&spec).unwrap(), g.upload_rope(&spec).unwrap());
        begin_both(&tokens, &batch);
        let mut cx = trellis_backend::cpu::CpuBuffer(x.clone());
        c.rope(&mut cx, &cr, heads, head_dim, offset, &batch);
        let mut gx = gpu_buffer(&x, 0);
        g.rope(&mut gx, &gr, heads, head_dim, offset, &batch);
        check(
            &format!("rope interleaved={interleaved} head_dim {head_dim} offset {offset}"),
            &read_gpu(&gx, x.len()),
            &cx.0,
            ELEMENTWISE_TOL,
        );
    }
}

/// Two sequences in shuffled cache blocks: a prefill chunk of both, then a step with one
/// decode row and a continuation chunk.
struct PagedSteps {
    tables: Vec<u32>,
    blocks_per_sequence: usize,
    block_size: usize,
    num_blocks: usize,
    steps: Vec<(Vec<u32>, Vec<u32>)>,
}

fn paged_steps(r: &mut impl Rng) -> PagedSteps {
    let (block_size, blocks_per_sequence) = (16, 6);
    let num_blocks = 2 * blocks_per_sequence;
    let mut tables: Vec<u32> = (0..num_blocks as u32).collect();
    tables.shuffle(r);
    let mut steps = Vec::new();
    // Step 1: sequence 0 positions 0..40, sequence 1 positions 0..25.
    let mut pos: Vec<u32> = (0..40).collect();
    pos.extend(0..25);
    let mut seq = vec![0u32; 40];
    seq.extend(vec![1u32; 25]);
    steps.push((pos, seq));
    // Step 2: sequence 1 positions 25..31, sequence 0 position 40.
    let mut pos: Vec<u32> = (25..31).collect();
    pos.push(40);
    let mut seq = vec![1u32; 6];
    seq.push(0);
    steps.push((pos, seq));
    PagedSteps {
        tables,
        blocks_per_sequence,
        block_size,
        num_blocks,
        steps,
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn gqa_attention_paged() {
    let mut r = rng(8);
    let specs = [
        AttentionSpec {
            heads: 8,
            kv_heads: 2,
            head_dim: 64,
            softmax_scale: 0.125,
            sliding_window: None,
            logit_softcap: None,
        },
        AttentionSpec {
            heads: 4,
            kv_heads: 4,
            head_dim: 128,
            softmax_scale: 0.09,
            sliding_window: Some(13),
            logit_softcap: Some(30.0),
        },
        AttentionSpec {
            heads: 6,
            kv_heads: 3,
            head_dim: 80,
            softmax_scale: 0.11,
            sliding_window: None,
            logit_softcap: None,
        },
    ];
    for spec in specs {
        for dtype in [KvDtype::F32, KvDtype::F16] {
            let p = paged_steps(&mut r);
            let (c, g) = (cpu(), gpu());
            let kv_width = spec.kv_heads * spec.head_dim;
            let layout = KvCacheLayout {
                layers: 2,
                values_per_token: 2 * kv_width,
                block_size: p.block_size,
                num_blocks: p.num_blocks,
                dtype,
            };
            let mut cc = c.alloc_kv_cache(&layout).unwrap();
            let mut gc = g.alloc_kv_cache(&layout).unwrap();
            for (si, (positions, sequence)) in p.steps.iter().enumerate() {
                let rows = positions.len();
                let batch = Batch {
                    positions,
                    sequence,
                    block_tables: &p.tables,
                    blocks_per_sequence: p.blocks_per_sequence,
                    block_size: p.block_size,
                };
                begin_both(&vec![0; rows], &batch);
                let k = uniform(&mut r, rows * kv_width, 1.0);
                let v = uniform(&mut r, rows * kv_width, 1.0);
                let q = uniform(&mut r, rows * spec.heads * spec.head_dim, 2.0);
                let (ck, cv, cq) = (
                    trellis_backend::cpu::CpuBuffer(k.clone()),
                    trellis_backend::cpu::CpuBuffer(v.clone()),
                    trellis_backend::cpu::CpuBuffer(q.clone()),
                );
                c.kv_append(&ck, &cv, &batch, &mut cc, 1);
                let mut cout = c.alloc(rows * spec.heads * spec.head_dim).unwrap();
                c.attention(&cq, &spec, &batch, &cc, 1, &mut cout);
                let (gk, gv, gq) = (gpu_buffer(&k, 0), gpu_buffer(&v, 0), gpu_buffer(&q, 0));
                g.kv_append(&gk, &gv, &batch, &mut gc, 1);
                let mut gout = poisoned(rows * spec.heads * spec.head_dim);
                g.attention(&gq, &spec, &batch, &gc, 1, &mut gout);
                check(
                    &format!(
                        "attention {dtype:?} heads {}/{} dim {} window {:?} cap {:?} step {si}",
                        spec.heads,
                        spec.kv_heads,
                        spec.head_dim,
                        spec.sliding_window,
                        spec.logit_softcap
                    ),
                    &read_gpu(&gout, cout.0.len()),
                    &cout.0,
                    ATTENTION_TOL,
                );
            }
        }
    }
}

/// MLA over two paged sequences (prefill chunk, then decode + continuation), for GLM's head
/// shapes, a small model's, and a head count past the context-split kernel's limit; and one
/// long-context decode row (many context splits).
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn mla_attention_paged() {
    let mut r = rng(9);
    let glm = MlaSpec {
        heads: 4,
        qk_nope_dim: 192,
        qk_rope_dim: 64,
        v_head_dim: 256,
        kv_lora_rank: 512,
        softmax_scale: 1.0 / 16.0,
        latent_norm_eps: 1e-6,
    };
    let specs = [
        glm.clone(),
        MlaSpec {
            heads: 20,
            ..glm.clone()
        },
        MlaSpec {
            heads: 40,
            qk_nope_dim: 64,
            qk_rope_dim: 32,
            v_head_dim: 64,
            kv_lora_rank: 256,
            softmax_scale: 0.1,
            latent_norm_eps: 1e-6,
        },
    ];
    for spec in &specs {
        for weight_dtype in [DType::F16, DType::BF16] {
            for dtype in [KvDtype::F32, KvDtype::F16] {
                let p = paged_steps(&mut r);
                mla_case(&mut r, spec, weight_dtype, dtype, &p);
            }
        }
    }
    // One sequence: a 3000-token prefill, then one decode row at position 3000.
    let mut positions: Vec<u32> = (0..3000).collect();
    let long = PagedSteps {
        tables: (0..188).rev().collect(),
        blocks_per_sequence: 188,
        block_size: 16,
        num_blocks: 188,
        steps: vec![
            (std::mem::take(&mut positions), vec![0; 3000]),
            (vec![3000], vec![0]),
        ],
    };
    mla_case(
        &mut r,
        &MlaSpec { heads: 20, ..glm },
        DType::F16,
        KvDtype::F16,
        &long,
    );
}

fn mla_case(
    r: &mut rand::rngs::StdRng,
    spec: &MlaSpec,
    weight_dtype: DType,
    dtype: KvDtype,
    p: &PagedSteps,
) {
    let half = spec.qk_rope_dim / 2;
    let rope = RopeSpec {
        inv_freq: (0..half)
            .map(|i| 1e6f32.powf(-(2.0 * i as f32) / spec.qk_rope_dim as f32))
            .collect(),
        attention_scaling: 1.0,
        interleaved: true,
    };
    let kv_b_rows = spec.heads * (spec.qk_nope_dim + spec.v_head_dim);
    let kv_b = uniform(r, kv_b_rows * spec.kv_lora_rank, 0.08);
    let norm = (0..spec.kv_lora_rank)
        .map(|_| r.random_range(0.5f32..1.5))
        .collect::<Vec<_>>();
    let (c, g) = (cpu(), gpu());
    let bytes = float_bytes(&kv_b, weight_dtype);
    let shape = [kv_b_rows, spec.kv_lora_rank];
    let weights = LinearWeights::Dense {
        weight: view("kv_b", weight_dtype, &shape, &bytes),
        bias: None,
    };
    let (ckv_b, gkv_b) = (
        c.upload_mla_kv_b(&weights, spec).unwrap(),
        g.upload_mla_kv_b(&weights, spec).unwrap(),
    );
    let (cnorm, gnorm) = (
        c.upload_vector(&norm).unwrap(),
        g.upload_vector(&norm).unwrap(),
    );
    let (crope, grope) = (c.upload_rope(&rope).unwrap(), g.upload_rope(&rope).unwrap());
    let layout = KvCacheLayout {
        layers: 3,
        values_per_token: spec.cache_width(),
        block_size: p.block_size,
        num_blocks: p.num_blocks,
        dtype,
    };
    let mut cc = c.alloc_kv_cache(&layout).unwrap();
    let mut gc = g.alloc_kv_cache(&layout).unwrap();
    let qw = spec.heads * spec.qk_head_dim();
    let ow = spec.heads * spec.v_head_dim;
    for (si, (positions, sequence)) in p.steps.iter().enumerate() {
        let rows = positions.len();
        let batch = Batch {
            positions,
            sequence,
            block_tables: &p.tables,
            blocks_per_sequence: p.blocks_per_sequence,
            block_size: p.block_size,
        };
        begin_both(&vec![0; rows], &batch);
        let ckv = uniform(r, rows * spec.cache_width(), 1.0);
        let q = uniform(r, rows * qw, 1.0);
        let cckv = trellis_backend::cpu::CpuBuffer(ckv.clone());
        let mut cq = trellis_backend::cpu::CpuBuffer(q.clone());
        c.mla_append(&cckv, &cnorm, &crope, spec, &batch, &mut cc, 2);
        let gckv = gpu_buffer(&ckv, 0);
        if rows > 512 {
            // A long prefill only fills the cache (attention over it on the CPU is slow).
            g.mla_append(&gckv, &gnorm, &grope, spec, &batch, &mut gc, 2);
            continue;
        }
        let mut cout = c.alloc(rows * ow).unwrap();
        c.mla_attention(&mut cq, &ckv_b, &crope, spec, &batch, &cc, 2, &mut cout);
        let mut gq = gpu_buffer(&q, 0);
        let mut gout = poisoned(rows * ow);
        // Odd steps take the fused form (the append folded into the absorb launch where the
        // decode kernels apply), even ones the two ops: both against the CPU's two ops.
        if si % 2 == 1 {
            g.mla_append_attention(
                &gckv, &gnorm, &mut gq, &gkv_b, &grope, spec, &batch, &mut gc, 2, &mut gout,
            );
        } else {
            g.mla_append(&gckv, &gnorm, &grope, spec, &batch, &mut gc, 2);
            g.mla_attention(&mut gq, &gkv_b, &grope, spec, &batch, &gc, 2, &mut gout);
        }
        let what = format!(
            "mla {} heads rank {} {weight_dtype:?} kv_b, {dtype:?} cache, step {si} ({rows} rows)",
            spec.heads, spec.kv_lora_rank
        );
        check(
            &format!("{what} out"),
            &read_gpu(&gout, rows * ow),
            &cout.0,
            ATTENTION_TOL,
        );
        check(
            &format!("{what} rotated q"),
            &read_gpu(&gq, rows * qw),
            &cq.0,
            ELEMENTWISE_TOL,
        );
    }
}

fn router_weights(r: &mut impl Rng, experts: usize, hidden: usize) -> (Vec<u8>, [usize; 2]) {
    let gate = uniform_any(r, experts * hidden, 0.2);
    (float_bytes(&gate, DType::F32), [experts, hidden])
}

fn uniform_any(r: &mut impl Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| r.random_range(-scale..scale)).collect()
}

/// A router input with a NaN (a broken model or input) makes every logit NaN: both forms of
/// the selection (one warp for sigmoid scores, the block for softmax) must still choose
/// top_k distinct real experts, as an out-of-range id would index past the expert tables.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn moe_route_survives_nan_inputs() {
    let mut r = rng(12);
    let hidden = 256;
    for (experts, top_k, scoring) in [
        (64, 4, ScoringFunction::Sigmoid),
        (16, 2, ScoringFunction::Softmax),
    ] {
        let spec = RouterSpec {
            num_experts: experts,
            top_k,
            scoring,
            n_group: 1,
            topk_group: 1,
            group_ranking: GroupRanking::Max,
            normalize: true,
            scaling: 1.0,
        };
        let (bytes, shape) = router_weights(&mut r, experts, hidden);
        let gate = LinearWeights::Dense {
            weight: view("gate", DType::F32, &shape, &bytes),
            bias: None,
        };
        let bias = uniform_any(&mut r, experts, 0.05);
        let g = gpu();
        let gr = g.upload_router(&gate, Some(&bias), &spec).unwrap();
        for rows in [1usize, 3] {
            let mut x = uniform_any(&mut r, rows * hidden, 1.0);
            for row in x.chunks_exact_mut(hidden) {
                row[7] = f32::NAN;
            }
            let mut groute = g.alloc_routing(rows, top_k).unwrap();
            g.moe_route(&gr, &gpu_buffer(&x, 0), rows, &mut groute);
            let (ids, _) = g.read_routing(&groute, rows);
            for row in ids.chunks_exact(top_k) {
                let mut seen = row.to_vec();
                seen.sort_unstable();
                seen.dedup();
                assert!(
                    seen.len() == top_k && seen.iter().all(|&e| (e as usize) < experts),
                    "{scoring:?}, {rows} rows: ids {row:?} of {experts} experts"
                );
            }
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn moe_route_every_rule() {
    let mut r = rng(10);
    let hidden = 259; // not a multiple of 8: exercises the reference's tail
    let specs = [
        (
            RouterSpec {
                num_experts: 64,
                top_k: 4,
                scoring: ScoringFunction::Sigmoid,
                n_group: 1,
                topk_group: 1,
                group_ranking: GroupRanking::TopTwoSum,
                normalize: true,
                scaling: 1.8,
            },
            true,
            None,
        ),
        (
            RouterSpec {
                num_experts: 16,
                top_k: 2,
                scoring: ScoringFunction::Softmax,
                n_group: 1,
                topk_group: 1,
                group_ranking: GroupRanking::Max,
                normalize: false,
                scaling: 1.0,
            },
            false,
            None,
        ),
        (
            RouterSpec {
                num_experts: 64,
                top_k: 6,
                scoring: ScoringFunction::Sigmoid,
                n_group: 8,
                topk_group: 3,
                group_ranking: GroupRanking::TopTwoSum,
                normalize: true,
                scaling: 2.5,
            },
            true,
            None,
        ),
        (
            RouterSpec {
                num_experts: 32,
                top_k: 4,
                scoring: ScoringFunction::Softmax,
                n_group: 4,
                topk_group: 2,
                group_ranking: GroupRanking::Max,
                normalize: true,
                scaling: 1.0,
            },
            false,
            None,
        ),
        // Four distinct gate rows over 48 experts and no bias: the top 8 are decided by ties
        // (the lowest id wins).
        (
            RouterSpec {
                num_experts: 48,
                top_k: 8,
                scoring: ScoringFunction::Sigmoid,
                n_group: 1,
                topk_group: 1,
                group_ranking: GroupRanking::Max,
                normalize: true,
                scaling: 1.0,
            },
            false,
            Some(4),
        ),
    ];
    for (spec, with_bias, distinct_rows) in specs {
        let (mut bytes, shape) = router_weights(&mut r, spec.num_experts, hidden);
        if let Some(distinct) = distinct_rows {
            let row = 4 * hidden;
            for e in distinct..spec.num_experts {
                let src = (e % distinct) * row;
                bytes.copy_within(src..src + row, e * row);
            }
        }
        let gate = LinearWeights::Dense {
            weight: view("gate", DType::F32, &shape, &bytes),
            bias: None,
        };
        let bias = with_bias.then(|| uniform_any(&mut r, spec.num_experts, 0.05));
        let (c, g) = (cpu(), gpu());
        let cr = c.upload_router(&gate, bias.as_deref(), &spec).unwrap();
        let gr = g.upload_router(&gate, bias.as_deref(), &spec).unwrap();
        for rows in [1, 17, 130] {
            let x = uniform_any(&mut r, rows * hidden, 1.0);
            let mut croute = c.alloc_routing(rows, spec.top_k).unwrap();
            c.moe_route(
                &cr,
                &trellis_backend::cpu::CpuBuffer(x.clone()),
                rows,
                &mut croute,
            );
            let mut groute = g.alloc_routing(rows, spec.top_k).unwrap();
            g.moe_route(&gr, &gpu_buffer(&x, 0), rows, &mut groute);
            let (cids, cw) = c.read_routing(&croute, rows);
            let (gids, gw) = g.read_routing(&groute, rows);
            assert_eq!(
                gids, cids,
                "route ids, {} experts top {} groups {}/{}, rows {rows}",
                spec.num_experts, spec.top_k, spec.n_group, spec.topk_group
            );
            check(
                &format!(
                    "route weights {} experts top {} rows {rows}",
                    spec.num_experts, spec.top_k
                ),
                &gw,
                &cw,
                1e-5,
            );
        }
    }
}

/// Experts of mixed widths and codebooks (or dense), routed identically on both backends.
fn experts_case(
    what: &str,
    dense: Option<DType>,
    experts: usize,
    hidden: usize,
    inter: usize,
    seed: u64,
) {
    let mut r = rng(seed);
    let (c, g) = (cpu(), gpu());
    let widths = [4.0, 3.0, 2.5, 2.0, 6.0, 3.5];
    let mut cpu_experts = Vec::new();
    let mut gpu_experts = Vec::new();
    let mut dense_store = Vec::new();
    for e in 0..experts {
        let mut make = |in_f: usize,
                        out_f: usize,
                        r: &mut rand::rngs::StdRng|
         -> (trellis_backend::cpu::CpuLinear, trellis_cuda::CudaLinear) {
            match dense {
                None => {
                    let bits = BitWidth::from_f64(widths[e % widths.len()]).unwrap();
                    let cb = if bits.is_integer() {
                        Codebook::ALL[e % 3]
                    } else {
                        Codebook::Mul1
                    };
                    let t = random_trellis(r, in_f, out_f, bits, cb, false);
                    let w = LinearWeights::Trellis(t);
                    (
                        c.upload_linear("expert", &w).unwrap(),
                        g.upload_linear("expert", &w).unwrap(),
                    )
                }
                Some(dtype) => {
                    let values = uniform(r, in_f * out_f, 0.08);
                    let bytes = float_bytes(&values, dtype);
                    dense_store.push(bytes.clone());
                    let shape = [out_f, in_f];
                    let w = LinearWeights::Dense {
                        weight: view("expert", dtype, &shape, &bytes),
                        bias: None,
                    };
                    (
                        c.upload_linear("expert", &w).unwrap(),
                        g.upload_linear("expert", &w).unwrap(),
                    )
                }
            }
        };
        let (cg, gg) = make(hidden, inter, &mut r);
        let (cu, gu) = make(hidden, inter, &mut r);
        let (cd, gd) = make(inter, hidden, &mut r);
        cpu_experts.push((cg, cu, cd));
        gpu_experts.push((gg, gu, gd));
    }
    let cexp = c.upload_experts(cpu_experts).unwrap();
    let gexp = g.upload_experts(gpu_experts).unwrap();
    let spec = RouterSpec {
        num_experts: experts,
        top_k: 4,
        scoring: ScoringFunction::Sigmoid,
        n_group: 1,
        topk_group: 1,
        group_ranking: GroupRanking::TopTwoSum,
        normalize: true,
        scaling: 1.8,
    };
    let (bytes, shape) = router_weights(&mut r, experts, hidden);
    let gate = LinearWeights::Dense {
        weight: view("gate", DType::F32, &shape, &bytes),
        bias: None,
    };
    let cr = c.upload_router(&gate, None, &spec).unwrap();
    let gr = g.upload_router(&gate, None, &spec).unwrap();
    for rows in [1, 3, 17, 130] {
        let x = uniform(&mut r, rows * hidden, 1.0);
        let cx = trellis_backend::cpu::CpuBuffer(x.clone());
        let gx = gpu_buffer(&x, 0);
        let mut croute = c.alloc_routing(rows, 4).unwrap();
        let mut groute = g.alloc_routing(rows, 4).unwrap();
        c.moe_route(&cr, &cx, rows, &mut croute);
        g.moe_route(&gr, &gx, rows, &mut groute);
        assert_eq!(
            g.read_routing(&groute, rows).0,
            c.read_routing(&croute, rows).0,
            "{what}: routing differs"
        );
        let mut cout = c.alloc(rows * hidden).unwrap();
        c.moe_experts(&cexp, &cx, rows, &croute, &mut cout);
        let mut gout = poisoned(rows * hidden + 16);
        g.moe_experts(&gexp, &gx, rows, &groute, &mut gout);
        check(
            &format!("{what} rows {rows}"),
            &read_gpu(&gout, rows * hidden),
            &cout.0,
            LINEAR_TOL,
        );
        assert_tail_untouched(what, &gout, rows * hidden, 16);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn moe_experts_trellis_mixed_widths() {
    experts_case("moe trellis 16×(256→384)", None, 16, 256, 384, 11);
    experts_case("moe trellis padded 16×(256→320)", None, 16, 256, 320, 12);
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn moe_experts_dense() {
    experts_case("moe dense bf16", Some(DType::BF16), 8, 192, 160, 13);
    experts_case("moe dense f32", Some(DType::F32), 8, 192, 160, 14);
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn write_read_round_trip() {
    let mut r = rng(15);
    let v = uniform(&mut r, 1000, 5.0);
    let b = gpu_buffer(&v, 24);
    assert_eq!(read_gpu(&b, 1000), v);
    assert!(read_gpu(&b, 1024)[1000..].iter().all(|x| x.is_nan()));
}

/// `rms_norm_linears` (RMSNorm fused into one launch of one or two trellis weights) and
/// `linears` (the same launch without the norm), and their composite fallbacks (dense weights,
/// three weights), against the CPU's `rms_norm` + `linear`.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn fused_norm_linears() {
    let mut r = rng(20);
    let (c, g) = (cpu(), gpu());
    // (in, [outs], bits, codebooks): GLM's q_a + kv_a pair, its q_b, a padded pair with a bias.
    let cases: [(usize, &[usize], f64); 4] = [
        (2048, &[768, 576], 3.0),
        (768, &[5120], 4.0),
        (500, &[300, 130], 2.5),
        (256, &[384], 2.0),
    ];
    for (ci, (in_f, outs, bits)) in cases.into_iter().enumerate() {
        let bits = BitWidth::from_f64(bits).unwrap();
        let norm = (0..in_f)
            .map(|_| r.random_range(0.5f32..1.5))
            .collect::<Vec<_>>();
        let (cn, gn) = (
            c.upload_vector(&norm).unwrap(),
            g.upload_vector(&norm).unwrap(),
        );
        let weights: Vec<_> = outs
            .iter()
            .enumerate()
            .map(|(i, &o)| {
                let cb = Codebook::ALL[(ci + i) % 3];
                let cb = if bits.is_integer() {
                    cb
                } else {
                    Codebook::Mul1
                };
                LinearWeights::Trellis(random_trellis(&mut r, in_f, o, bits, cb, ci == 2))
            })
            .collect();
        let cw: Vec<_> = weights
            .iter()
            .map(|w| c.upload_linear("w", w).unwrap())
            .collect();
        let gw: Vec<_> = weights
            .iter()
            .map(|w| g.upload_linear("w", w).unwrap())
            .collect();
        for rows in [1usize, 3, 12, 17, 40] {
            let x = uniform(&mut r, rows * in_f, 2.0);
            let cx = trellis_backend::cpu::CpuBuffer(x.clone());
            let gx = gpu_buffer(&x, 0);
            let what = format!("{in_f}→{outs:?} K={bits} rows {rows}");
            compare_products(
                &format!("norm+linears {what}"),
                (&cw, &gw),
                outs,
                rows,
                |pairs| {
                    let mut ch = c.alloc(rows * in_f).unwrap();
                    c.rms_norm_linears(&cx, &cn, 1e-5, rows, &mut ch, pairs)
                },
                |pairs| {
                    let mut gh = g.alloc(rows * in_f).unwrap();
                    g.rms_norm_linears(&gx, &gn, 1e-5, rows, &mut gh, pairs)
                },
            );
            // The same products without the norm: `linears` (one launch for a pair).
            compare_products(
                &format!("linears {what}"),
                (&cw, &gw),
                outs,
                rows,
                |pairs| c.linears(&cx, rows, pairs),
                |pairs| g.linears(&gx, rows, pairs),
            );
        }
    }
    // Fallbacks: a dense weight, and three trellis weights (more than one launch takes).
    let in_f = 192;
    let norm = uniform(&mut r, in_f, 1.0);
    let (cn, gn) = (
        c.upload_vector(&norm).unwrap(),
        g.upload_vector(&norm).unwrap(),
    );
    let dense = float_bytes(&uniform(&mut r, 96 * in_f, 0.1), DType::F16);
    let dshape = [96, in_f];
    let weights = [
        LinearWeights::Dense {
            weight: view("d", DType::F16, &dshape, &dense),
            bias: None,
        },
        LinearWeights::Trellis(random_trellis(
            &mut r,
            in_f,
            200,
            BitWidth::from_f64(3.0).unwrap(),
            Codebook::Mul1,
            false,
        )),
        LinearWeights::Trellis(random_trellis(
            &mut r,
            in_f,
            72,
            BitWidth::from_f64(4.0).unwrap(),
            Codebook::Mcg,
            false,
        )),
    ];
    let outs = [96usize, 200, 72];
    let cw: Vec<_> = weights
        .iter()
        .map(|w| c.upload_linear("w", w).unwrap())
        .collect();
    let gw: Vec<_> = weights
        .iter()
        .map(|w| g.upload_linear("w", w).unwrap())
        .collect();
    for (range, what) in [(0..1, "dense"), (1..3, "trellis pair"), (0..3, "three")] {
        let rows = 5;
        let x = uniform(&mut r, rows * in_f, 2.0);
        let cx = trellis_backend::cpu::CpuBuffer(x.clone());
        let gx = gpu_buffer(&x, 0);
        let weights = (&cw[range.clone()], &gw[range.clone()]);
        compare_products(
            &format!("norm+linears fallback {what}"),
            weights,
            &outs[range.clone()],
            rows,
            |pairs| {
                let mut ch = c.alloc(rows * in_f).unwrap();
                c.rms_norm_linears(&cx, &cn, 1e-6, rows, &mut ch, pairs)
            },
            |pairs| {
                let mut gh = g.alloc(rows * in_f).unwrap();
                g.rms_norm_linears(&gx, &gn, 1e-6, rows, &mut gh, pairs)
            },
        );
        compare_products(
            &format!("linears fallback {what}"),
            weights,
            &outs[range.clone()],
            rows,
            |pairs| c.linears(&cx, rows, pairs),
            |pairs| g.linears(&gx, rows, pairs),
        );
    }
}

/// The same products of several weights on both backends (`cpu_op` and `gpu_op` get the
/// (weight, output) pairs), every output compared; the GPU's outputs are poisoned, with 32
/// values past their ends that must stay untouched.
fn compare_products(
    what: &str,
    (cw, gw): (
        &[trellis_backend::cpu::CpuLinear],
        &[trellis_cuda::CudaLinear],
    ),
    outs: &[usize],
    rows: usize,
    cpu_op: impl FnOnce(
        &mut [(
            &trellis_backend::cpu::CpuLinear,
            &mut trellis_backend::cpu::CpuBuffer,
        )],
    ),
    gpu_op: impl FnOnce(&mut [(&trellis_cuda::CudaLinear, &mut trellis_cuda::CudaBuffer)]),
) {
    let spare = 32;
    let mut couts: Vec<_> = outs
        .iter()
        .map(|&o| cpu().alloc(rows * o).unwrap())
        .collect();
    cpu_op(&mut cw.iter().zip(couts.iter_mut()).collect::<Vec<_>>());
    let mut gouts: Vec<_> = outs.iter().map(|&o| poisoned(rows * o + spare)).collect();
    gpu_op(&mut gw.iter().zip(gouts.iter_mut()).collect::<Vec<_>>());
    for (i, &o) in outs.iter().enumerate() {
        let what = format!("{what} output {i}");
        check(
            &what,
            &read_gpu(&gouts[i], rows * o),
            &couts[i].0,
            LINEAR_TOL,
        );
        assert_tail_untouched(&what, &gouts[i], rows * o, spare);
    }
}

/// `linear_add` (the residual added in the trellis launch's output stage) against the CPU's
/// `linear` + `add`, and the dense fallback.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn fused_linear_add() {
    let mut r = rng(21);
    let (c, g) = (cpu(), gpu());
    let dense = float_bytes(&uniform(&mut r, 160 * 300, 0.1), DType::BF16);
    let dshape = [160, 300];
    let cases = [
        (
            5120,
            2048,
            LinearWeights::Trellis(random_trellis(
                &mut r,
                5120,
                2048,
                BitWidth::from_f64(3.0).unwrap(),
                Codebook::Mul1,
                false,
            )),
        ),
        (
            300,
            200,
            LinearWeights::Trellis(random_trellis(
                &mut r,
                300,
                200,
                BitWidth::from_f64(2.5).unwrap(),
                Codebook::Mul1,
                true,
            )),
        ),
        (
            300,
            160,
            LinearWeights::Dense {
                weight: view("d", DType::BF16, &dshape, &dense),
                bias: None,
            },
        ),
    ];
    for (in_f, out_f, w) in &cases {
        let (cw, gw) = (
            c.upload_linear("w", w).unwrap(),
            g.upload_linear("w", w).unwrap(),
        );
        for rows in [1usize, 4, 19] {
            let x = uniform(&mut r, rows * in_f, 1.0);
            let res = uniform(&mut r, rows * out_f, 3.0);
            let mut cres = trellis_backend::cpu::CpuBuffer(res.clone());
            let mut ctmp = c.alloc(rows * out_f).unwrap();
            c.linear_add(
                &cw,
                &trellis_backend::cpu::CpuBuffer(x.clone()),
                rows,
                *out_f,
                &mut ctmp,
                &mut cres,
            );
            let spare = 16;
            let mut gres = gpu_buffer(&res, spare);
            let mut gtmp = g.alloc(rows * out_f).unwrap();
            g.linear_add(&gw, &gpu_buffer(&x, 0), rows, *out_f, &mut gtmp, &mut gres);
            let what = format!("linear_add {in_f}→{out_f} rows {rows}");
            check(&what, &read_gpu(&gres, rows * out_f), &cres.0, LINEAR_TOL);
            assert_tail_untouched(&what, &gres, rows * out_f, spare);
        }
    }
}

/// `moe_block` (norm fused into routing, routing + grouping in one launch, gate and up in one
/// launch, the shared expert run as one more expert, the residual added by the combine)
/// against the CPU's composition of rms_norm, moe_route, moe_experts, the shared MLP and adds;
/// and the fallbacks (a shared expert of another width, dense experts).
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn fused_moe_block() {
    moe_block_case(
        "moe block 16×(256→384) + shared",
        16,
        256,
        384,
        Some(384),
        false,
        30,
    );
    moe_block_case(
        "moe block 8×(512→256), no shared",
        8,
        512,
        256,
        None,
        false,
        31,
    );
    moe_block_case(
        "moe block shared of another width",
        8,
        256,
        128,
        Some(256),
        false,
        32,
    );
    moe_block_case("moe block dense experts", 8, 192, 160, Some(160), true, 33);
}

#[allow(clippy::too_many_arguments)]
fn moe_block_case(
    what: &str,
    experts: usize,
    hidden: usize,
    inter: usize,
    shared_inter: Option<usize>,
    dense: bool,
    seed: u64,
) {
    use trellis_backend::{GatedMlp, MoeScratch};
    let mut r = rng(seed);
    let (c, g) = (cpu(), gpu());
    let widths = [4.0, 3.0, 2.5, 2.0, 6.0, 3.5];
    let mut store = Vec::new();
    let mut make = |in_f: usize,
                    out_f: usize,
                    i: usize,
                    r: &mut rand::rngs::StdRng|
     -> (trellis_backend::cpu::CpuLinear, trellis_cuda::CudaLinear) {
        if dense {
            let bytes = float_bytes(&uniform(r, in_f * out_f, 0.08), DType::F16);
            store.push(bytes.clone());
            let shape = [out_f, in_f];
            let w = LinearWeights::Dense {
                weight: view("expert", DType::F16, &shape, &bytes),
                bias: None,
            };
            return (
                c.upload_linear("expert", &w).unwrap(),
                g.upload_linear("expert", &w).unwrap(),
            );
        }
        let bits = BitWidth::from_f64(widths[i % widths.len()]).unwrap();
        let cb = if bits.is_integer() {
            Codebook::ALL[i % 3]
        } else {
            Codebook::Mul1
        };
        let w = LinearWeights::Trellis(random_trellis(r, in_f, out_f, bits, cb, false));
        (
            c.upload_linear("expert", &w).unwrap(),
            g.upload_linear("expert", &w).unwrap(),
        )
    };
    let mut cpu_experts = Vec::new();
    let mut gpu_experts = Vec::new();
    for e in 0..experts {
        let (cg, gg) = make(hidden, inter, e, &mut r);
        let (cu, gu) = make(hidden, inter, e + 1, &mut r);
        let (cd, gd) = make(inter, hidden, e + 2, &mut r);
        cpu_experts.push((cg, cu, cd));
        gpu_experts.push((gg, gu, gd));
    }
    let shared = shared_inter.map(|si| {
        let (cg, gg) = make(hidden, si, 1, &mut r);
        let (cu, gu) = make(hidden, si, 4, &mut r);
        let (cd, gd) = make(si, hidden, 3, &mut r);
        ((cg, cu, cd), (gg, gu, gd), si)
    });
    let cexp = c.upload_experts(cpu_experts).unwrap();
    let gexp = g.upload_experts(gpu_experts).unwrap();
    let spec = RouterSpec {
        num_experts: experts,
        top_k: 4,
        scoring: ScoringFunction::Sigmoid,
        n_group: 1,
        topk_group: 1,
        group_ranking: GroupRanking::TopTwoSum,
        normalize: true,
        scaling: 1.8,
    };
    let (bytes, shape) = router_weights(&mut r, experts, hidden);
    let gate = LinearWeights::Dense {
        weight: view("gate", DType::F32, &shape, &bytes),
        bias: None,
    };
    let bias = uniform_any(&mut r, experts, 0.05);
    let cr = c.upload_router(&gate, Some(&bias), &spec).unwrap();
    let gr = g.upload_router(&gate, Some(&bias), &spec).unwrap();
    let norm = (0..hidden)
        .map(|_| r.random_range(0.5f32..1.5))
        .collect::<Vec<_>>();
    let (cn, gn) = (
        c.upload_vector(&norm).unwrap(),
        g.upload_vector(&norm).unwrap(),
    );
    let width = inter.max(shared_inter.unwrap_or(0));
    let cshared = shared
        .as_ref()
        .map(|(cl, _, si)| GatedMlp::<trellis_backend::cpu::CpuBackend> {
            gate: &cl.0,
            up: &cl.1,
            down: &cl.2,
            intermediate: *si,
        });
    let gshared = shared
        .as_ref()
        .map(|(_, gl, si)| GatedMlp::<trellis_cuda::CudaBackend> {
            gate: &gl.0,
            up: &gl.1,
            down: &gl.2,
            intermediate: *si,
        });
    for rows in [1usize, 3, 12, 17, 130] {
        let x = uniform(&mut r, rows * hidden, 2.0);
        let mut cx = trellis_backend::cpu::CpuBuffer(x.clone());
        let mut croute = c.alloc_routing(rows, 4).unwrap();
        let mut cbufs: Vec<_> = [hidden, hidden, hidden, width, width]
            .iter()
            .map(|&w| c.alloc(rows * w).unwrap())
            .collect();
        let [ch, cout, cso, cgate, cup] = &mut cbufs[..] else {
            unreachable!()
        };
        c.moe_block(
            &mut cx,
            &cn,
            1e-5,
            rows,
            hidden,
            &cr,
            &cexp,
            cshared.as_ref(),
            &mut croute,
            MoeScratch {
                h: ch,
                out: cout,
                shared_out: cso,
                gate: cgate,
                up: cup,
            },
        );
        let spare = 16;
        let mut gx = gpu_buffer(&x, spare);
        let mut groute = g.alloc_routing(rows, 4).unwrap();
        let mut gbufs: Vec<_> = [hidden, hidden, hidden, width, width]
            .iter()
            .map(|&w| g.alloc(rows * w).unwrap())
            .collect();
        let [gh, gout, gso, ggate, gup] = &mut gbufs[..] else {
            unreachable!()
        };
        g.moe_block(
            &mut gx,
            &gn,
            1e-5,
            rows,
            hidden,
            &gr,
            &gexp,
            gshared.as_ref(),
            &mut groute,
            MoeScratch {
                h: gh,
                out: gout,
                shared_out: gso,
                gate: ggate,
                up: gup,
            },
        );
        assert_eq!(
            g.read_routing(&groute, rows).0,
            c.read_routing(&croute, rows).0,
            "{what}: routing differs (rows {rows})"
        );
        let label = format!("{what} rows {rows}");
        check(&label, &read_gpu(&gx, rows * hidden), &cx.0, LINEAR_TOL);
        assert_tail_untouched(&label, &gx, rows * hidden, spare);
    }
}

/// A decode step recorded as a CUDA graph and replayed computes what the direct launches
/// compute: the same random ops run through `run_step` at changing positions (crossing
/// position buckets) against the CPU.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn run_step_replays_recorded_steps() {
    use trellis_backend::StepKey;
    let mut r = rng(40);
    let (c, g) = (cpu(), gpu());
    let spec = MlaSpec {
        heads: 20,
        qk_nope_dim: 192,
        qk_rope_dim: 64,
        v_head_dim: 256,
        kv_lora_rank: 512,
        softmax_scale: 1.0 / 16.0,
        latent_norm_eps: 1e-6,
    };
    let half = spec.qk_rope_dim / 2;
    let rope = RopeSpec {
        inv_freq: (0..half)
            .map(|i| 1e4f32.powf(-(2.0 * i as f32) / spec.qk_rope_dim as f32))
            .collect(),
        attention_scaling: 1.0,
        interleaved: true,
    };
    let kv_b_rows = spec.heads * (spec.qk_nope_dim + spec.v_head_dim);
    let kv_b = float_bytes(
        &uniform(&mut r, kv_b_rows * spec.kv_lora_rank, 0.08),
        DType::F16,
    );
    let shape = [kv_b_rows, spec.kv_lora_rank];
    let weights = LinearWeights::Dense {
        weight: view("kv_b", DType::F16, &shape, &kv_b),
        bias: None,
    };
    let (ckv_b, gkv_b) = (
        c.upload_mla_kv_b(&weights, &spec).unwrap(),
        g.upload_mla_kv_b(&weights, &spec).unwrap(),
    );
    let norm: Vec<f32> = (0..512).map(|_| r.random_range(0.5f32..1.5)).collect();
    let (cnorm, gnorm) = (
        c.upload_vector(&norm).unwrap(),
        g.upload_vector(&norm).unwrap(),
    );
    let (crope, grope) = (c.upload_rope(&rope).unwrap(), g.upload_rope(&rope).unwrap());
    let o_w = LinearWeights::Trellis(random_trellis(
        &mut r,
        spec.heads * spec.v_head_dim,
        256,
        BitWidth::from_f64(3.0).unwrap(),
        Codebook::Mul1,
        false,
    ));
    let (co, go) = (
        c.upload_linear("o", &o_w).unwrap(),
        g.upload_linear("o", &o_w).unwrap(),
    );
    let layout = KvCacheLayout {
        layers: 1,
        values_per_token: spec.cache_width(),
        block_size: 16,
        num_blocks: 8,
        dtype: KvDtype::F16,
    };
    let tables: Vec<u32> = (0..8).rev().collect();
    let mut cc = c.alloc_kv_cache(&layout).unwrap();
    let mut gc = g.alloc_kv_cache(&layout).unwrap();
    let qw = spec.heads * spec.qk_head_dim();
    let ow = spec.heads * spec.v_head_dim;
    // Fixed device buffers, as a model's workspace: inputs are written before each step.
    let mut gckv = g.alloc(spec.cache_width()).unwrap();
    let mut gq = g.alloc(qw).unwrap();
    let mut gattn = g.alloc(ow).unwrap();
    let mut gtmp = g.alloc(256).unwrap();
    let mut gx = g.alloc(256).unwrap();
    let recorded_before = g.recorded_steps();
    for pos in 0..100u32 {
        let positions = [pos];
        let batch = Batch {
            positions: &positions,
            sequence: &[0],
            block_tables: &tables,
            blocks_per_sequence: 8,
            block_size: 16,
        };
        let ckv = uniform(&mut r, spec.cache_width(), 1.0);
        let q = uniform(&mut r, qw, 1.0);
        let x = uniform(&mut r, 256, 1.0);
        // CPU reference.
        c.begin_step(&[0], &batch);
        let mut cq = trellis_backend::cpu::CpuBuffer(q.clone());
        c.mla_append(
            &trellis_backend::cpu::CpuBuffer(ckv.clone()),
            &cnorm,
            &crope,
            &spec,
            &batch,
            &mut cc,
            0,
        );
        let mut cattn = c.alloc(ow).unwrap();
        c.mla_attention(&mut cq, &ckv_b, &crope, &spec, &batch, &cc, 0, &mut cattn);
        let mut cx = trellis_backend::cpu::CpuBuffer(x.clone());
        let mut ctmp = c.alloc(256).unwrap();
        c.linear_add(&co, &cattn, 1, 256, &mut ctmp, &mut cx);
        // GPU through run_step.
        g.write(&mut gckv, &ckv);
        g.write(&mut gq, &q);
        g.write(&mut gx, &x);
        let key = StepKey {
            tokens: &[0],
            batch: &batch,
            logit_rows: &[0],
        };
        g.run_step(&key, &mut || -> Result<(), ()> {
            g.begin_step(&[0], &batch);
            g.mla_append(&gckv, &gnorm, &grope, &spec, &batch, &mut gc, 0);
            g.mla_attention(&mut gq, &gkv_b, &grope, &spec, &batch, &gc, 0, &mut gattn);
            g.linear_add(&go, &gattn, 1, 256, &mut gtmp, &mut gx);
            Ok(())
        })
        .unwrap();
        check(
            &format!("run_step position {pos}"),
            &read_gpu(&gx, 256),
            &cx.0,
            ATTENTION_TOL,
        );
    }
    let recorded = g.recorded_steps() - recorded_before;
    eprintln!("run_step: {recorded} recorded step graphs over 100 positions");
    assert!(
        recorded >= 3 || !g.graphs_enabled(),
        "only {recorded} steps were recorded as graphs"
    );
}

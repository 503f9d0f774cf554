//! Timings on the GPU (not a correctness test): trellis linears of realistic shapes, a dense
//! GEMV for comparison, GLM-4.7-Flash-shaped MoE and MLA ops, one full-size GLM decoder layer
//! at batch 1, and the tiny GLM fixture end to end. Device time from CUDA events, median of
//! several runs of many back-to-back calls. Run with `--ignored --nocapture`.

mod common;

use common::*;
use rand::Rng;
use rand::rngs::StdRng;
use std::cell::RefCell;
use trellis_backend::{
    Backend, Batch, GatedMlp, GroupRanking, KvCacheLayout, KvDtype, MlaSpec, MoeScratch, RopeSpec,
    RouterSpec, ScoringFunction, StepKey,
};
use trellis_codec::{BitWidth, Codebook};
use trellis_cuda::{
    CudaBackend, CudaBuffer, CudaExperts, CudaKvCache, CudaLinear, CudaMlaKvB, CudaRope,
    CudaRouter, CudaRouting, CudaVector,
};
use trellis_format::{DType, LinearWeights};
use trellis_testutil::random_trellis;

const CALLS: usize = 50;
const RUNS: usize = 5;

/// Median over RUNS of the mean device time of CALLS back-to-back calls, in µs.
fn time_us(g: &CudaBackend, mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    g.synchronize();
    let mut runs: Vec<f64> = (0..RUNS)
        .map(|_| {
            let ms = g
                .time_ms(|| {
                    for _ in 0..CALLS {
                        f();
                    }
                })
                .expect("CUDA events");
            f64::from(ms) * 1000.0 / CALLS as f64
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[RUNS / 2]
}

fn trellis_linear(
    r: &mut StdRng,
    in_f: usize,
    out_f: usize,
    bits: f64,
    cb: Codebook,
) -> (CudaLinear, usize) {
    let t = random_trellis(r, in_f, out_f, BitWidth::from_f64(bits).unwrap(), cb, false);
    let bytes = t.storage_bytes();
    (
        gpu()
            .upload_linear("bench", &LinearWeights::Trellis(t))
            .unwrap(),
        bytes,
    )
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn op_timings() {
    let g = gpu();
    let mut r = rng(100);
    let mut table = vec![format!("{:<46} {:>10} {:>10}", "op", "µs", "GB/s")];
    let mut row = |name: String, us: f64, bytes: Option<usize>| {
        let gbs = bytes.map_or(String::from("-"), |b| format!("{:.0}", b as f64 / us / 1e3));
        let line = format!("{name:<46} {us:>10.1} {gbs:>10}");
        eprintln!("{line}");
        table.push(line);
    };

    // The floor: one launch of a one-element kernel.
    let mut tiny = g.alloc(1).unwrap();
    let us = time_us(g, || g.fill(&mut tiny, 1.0, 1));
    row("empty kernel (launch floor)".into(), us, None);

    // Trellis linears: x [rows, in] → [rows, out].
    let shapes = [
        (2048, 1536),
        (1536, 2048),
        (2048, 5120),
        (4096, 14336),
        (14336, 4096),
    ];
    for (in_f, out_f) in shapes {
        for (bits, cb) in [
            (3.0, Codebook::Mul1),
            (4.0, Codebook::Mul1),
            (4.0, Codebook::Mcg),
            (2.5, Codebook::Mul1),
        ] {
            if in_f * out_f > 40_000_000 && bits == 2.5 {
                continue;
            }
            let (w, bytes) = trellis_linear(&mut r, in_f, out_f, bits, cb);
            for rows in [1usize, 2, 4, 8, 16, 128] {
                if rows > 1 && !(in_f == 4096 && bits == 4.0 && cb == Codebook::Mul1) {
                    continue;
                }
                let x = gpu_buffer(&uniform(&mut r, rows * in_f, 1.0), 0);
                let mut out = g.alloc(rows * out_f).unwrap();
                let us = time_us(g, || g.linear(&w, &x, rows, &mut out));
                row(
                    format!("trellis {} K={bits} {in_f}x{out_f} rows {rows}", cb.name()),
                    us,
                    Some(bytes),
                );
            }
        }
    }

    // Dense f16 GEMV of the same size, for comparison.
    for (in_f, out_f) in [(4096usize, 14336usize), (2048, 1536)] {
        let values = uniform(&mut r, in_f * out_f, 0.05);
        let bytes = float_bytes(&values, DType::F16);
        let shape = [out_f, in_f];
        let w = g
            .upload_linear(
                "dense",
                &LinearWeights::Dense {
                    weight: view("dense", DType::F16, &shape, &bytes),
                    bias: None,
                },
            )
            .unwrap();
        let x = gpu_buffer(&uniform(&mut r, in_f, 1.0), 0);
        let mut out = g.alloc(out_f).unwrap();
        let us = time_us(g, || g.linear(&w, &x, 1, &mut out));
        row(
            format!("dense f16 {in_f}x{out_f} rows 1"),
            us,
            Some(bytes.len()),
        );
    }

    let layer = GlmLayer::new(&mut r, 3.0);
    let us = time_us(g, || layer.route_only(1));
    row("GLM MoE route (64 experts) rows 1".into(), us, None);
    for rows in [1usize, 4] {
        let us = time_us(g, || layer.route_and_experts(rows));
        row(
            format!("GLM MoE route+experts (64x, K=3) rows {rows}"),
            us,
            Some(layer.expert_bytes_per_token * rows.min(16)),
        );
    }
    for ctx in [1024usize, 8192] {
        let mut cache = layer.filled_cache(ctx);
        let us = time_us(g, || layer.attention_only(&mut cache, ctx));
        row(
            format!("GLM MLA append+attention ctx {ctx} rows 1"),
            us,
            None,
        );
        let ops_us = time_us(g, || layer.decode_layer_ops(&mut cache, ctx));
        row(
            format!("GLM MoE layer decode, separate ops ctx {ctx}"),
            ops_us,
            Some(layer.layer_bytes),
        );
        let fused_us = time_us(g, || layer.decode_layer(&mut cache, ctx));
        row(
            format!("GLM MoE layer decode, fused ops ctx {ctx}"),
            fused_us,
            Some(layer.layer_bytes),
        );
        let us = time_us(g, || layer.decode_layer_graph(&mut cache, ctx));
        row(
            format!("GLM full MoE layer decode ctx {ctx} (K=3, graph)"),
            us,
            Some(layer.layer_bytes),
        );
        if ctx == 1024 {
            let head_us = time_us(g, || layer.head());
            let token_us = 47.0 * us + head_us;
            row(
                "GLM lm_head 2048x154880 K=6".into(),
                head_us,
                Some(layer.head_bytes),
            );
            row(
                format!(
                    "GLM projected 47-layer token ctx {ctx} ({:.0} tok/s)",
                    1e6 / token_us
                ),
                token_us,
                None,
            );
        }
    }
    let variant = if std::env::var_os(trellis_cuda::UNFUSED_ENV).is_some() {
        "three-launch trellis linears".to_string()
    } else {
        "fused trellis linears".to_string()
    };
    let waves = std::env::var(trellis_cuda::SPLIT_WAVES_ENV).unwrap_or_else(|_| "2".into());
    eprintln!(
        "\nop timings, {variant}, tensor-core split waves {waves} (CUDA events, median of {RUNS} runs of {CALLS} calls):\n{}\nend of op timings",
        table.join("\n")
    );
}

/// Activations of the synthetic layer.
struct Buffers {
    x: CudaBuffer,
    h: CudaBuffer,
    q_latent: CudaBuffer,
    q: CudaBuffer,
    ckv: CudaBuffer,
    attn: CudaBuffer,
    out: CudaBuffer,
    shared_out: CudaBuffer,
    gate: CudaBuffer,
    up: CudaBuffer,
    logits: CudaBuffer,
    routing: CudaRouting,
}

/// One GLM-4.7-Flash MoE decoder layer at full size with random trellis weights.
struct GlmLayer {
    input_norm: CudaVector,
    q_a: CudaLinear,
    q_norm: CudaVector,
    q_b: CudaLinear,
    kv_a: CudaLinear,
    kv_norm: CudaVector,
    kv_b: CudaMlaKvB,
    o: CudaLinear,
    router: CudaRouter,
    experts: CudaExperts,
    shared: [CudaLinear; 3],
    head: CudaLinear,
    rope: CudaRope,
    spec: MlaSpec,
    prefill_latents: CudaBuffer,
    bufs: RefCell<Buffers>,
    expert_bytes_per_token: usize,
    layer_bytes: usize,
    head_bytes: usize,
}

const HIDDEN: usize = 2048;
const VOCAB: usize = 154_880;
const BLOCK: usize = 64;

impl GlmLayer {
    fn new(r: &mut StdRng, bits: f64) -> GlmLayer {
        let g = gpu();
        let spec = MlaSpec {
            heads: 20,
            qk_nope_dim: 192,
            qk_rope_dim: 64,
            v_head_dim: 256,
            kv_lora_rank: 512,
            softmax_scale: 1.0 / 16.0,
            latent_norm_eps: 1e-6,
        };
        let mut bytes = 0;
        let mut lin = |r: &mut StdRng, i, o| {
            let (w, n) = trellis_linear(r, i, o, bits, Codebook::Mul1);
            bytes += n;
            w
        };
        let q_a = lin(r, HIDDEN, 768);
        let q_b = lin(r, 768, 20 * 256);
        let kv_a = lin(r, HIDDEN, 576);
        let o = lin(r, 20 * 256, HIDDEN);
        let shared = [
            lin(r, HIDDEN, 1536),
            lin(r, HIDDEN, 1536),
            lin(r, 1536, HIDDEN),
        ];
        let kv_b_rows = 20 * (192 + 256);
        let kv_b_bytes = float_bytes(&uniform(r, kv_b_rows * 512, 0.05), DType::F16);
        let kv_b_shape = [kv_b_rows, 512];
        let kv_b = g
            .upload_mla_kv_b(
                &LinearWeights::Dense {
                    weight: view("kv_b", DType::F16, &kv_b_shape, &kv_b_bytes),
                    bias: None,
                },
                &spec,
            )
            .unwrap();
        let mut expert_list = Vec::new();
        let mut one_expert = 0;
        for _ in 0..64 {
            let (a, n1) = trellis_linear(r, HIDDEN, 1536, bits, Codebook::Mul1);
            let (b, n2) = trellis_linear(r, HIDDEN, 1536, bits, Codebook::Mul1);
            let (c, n3) = trellis_linear(r, 1536, HIDDEN, bits, Codebook::Mul1);
            one_expert = n1 + n2 + n3;
            expert_list.push((a, b, c));
        }
        let experts = g.upload_experts(expert_list).unwrap();
        let router_spec = RouterSpec {
            num_experts: 64,
            top_k: 4,
            scoring: ScoringFunction::Sigmoid,
            n_group: 1,
            topk_group: 1,
            group_ranking: GroupRanking::TopTwoSum,
            normalize: true,
            scaling: 1.8,
        };
        let gate_bytes = float_bytes(&uniform(r, 64 * HIDDEN, 0.05), DType::F16);
        let gate_shape = [64, HIDDEN];
        let bias = uniform(r, 64, 0.01);
        let router = g
            .upload_router(
                &LinearWeights::Dense {
                    weight: view("gate", DType::F16, &gate_shape, &gate_bytes),
                    bias: None,
                },
                Some(&bias),
                &router_spec,
            )
            .unwrap();
        let (head, head_bytes) = trellis_linear(r, HIDDEN, VOCAB, 6.0, Codebook::Mul1);
        let rope = g
            .upload_rope(&RopeSpec {
                inv_freq: (0..32)
                    .map(|i| 1e6f32.powf(-(2.0 * i as f32) / 64.0))
                    .collect(),
                attention_scaling: 1.0,
                interleaved: true,
            })
            .unwrap();
        let norm = |n: usize, r: &mut StdRng| {
            g.upload_vector(
                &(0..n)
                    .map(|_| r.random_range(0.5f32..1.5))
                    .collect::<Vec<_>>(),
            )
            .unwrap()
        };
        let rows = 8;
        let layer_bytes = bytes + kv_b_bytes.len() + gate_bytes.len() + 4 * one_expert;
        let bufs = Buffers {
            x: gpu_buffer(&uniform(r, rows * HIDDEN, 1.0), 0),
            h: gpu_buffer(&uniform(r, rows * HIDDEN, 1.0), 0),
            q_latent: g.alloc(rows * 768).unwrap(),
            q: gpu_buffer(&uniform(r, rows * 20 * 256, 1.0), 0),
            ckv: gpu_buffer(&uniform(r, rows * 576, 1.0), 0),
            attn: g.alloc(rows * 20 * 256).unwrap(),
            out: g.alloc(rows * HIDDEN).unwrap(),
            shared_out: g.alloc(rows * HIDDEN).unwrap(),
            gate: g.alloc(rows * 1536).unwrap(),
            up: g.alloc(rows * 1536).unwrap(),
            logits: g.alloc(VOCAB).unwrap(),
            routing: g.alloc_routing(rows, 4).unwrap(),
        };
        GlmLayer {
            input_norm: norm(HIDDEN, r),
            q_norm: norm(768, r),
            kv_norm: norm(512, r),
            q_a,
            q_b,
            kv_a,
            kv_b,
            o,
            router,
            experts,
            shared,
            head,
            rope,
            spec,
            prefill_latents: gpu_buffer(&uniform(r, 8192 * 576, 1.0), 0),
            bufs: RefCell::new(bufs),
            expert_bytes_per_token: 4 * one_expert,
            layer_bytes,
            head_bytes,
        }
    }

    fn layout(ctx: usize) -> KvCacheLayout {
        KvCacheLayout {
            layers: 1,
            values_per_token: 576,
            block_size: BLOCK,
            num_blocks: ctx.div_ceil(BLOCK) + 1,
            dtype: KvDtype::F16,
        }
    }

    /// A cache holding `ctx` positions of random latents; leaves the step at position `ctx`.
    fn filled_cache(&self, ctx: usize) -> CudaKvCache {
        let g = gpu();
        let layout = Self::layout(ctx);
        let mut cache = g.alloc_kv_cache(&layout).unwrap();
        let tables: Vec<u32> = (0..layout.num_blocks as u32).collect();
        let positions: Vec<u32> = (0..ctx as u32).collect();
        let sequence = vec![0u32; ctx];
        let batch = Batch {
            positions: &positions,
            sequence: &sequence,
            block_tables: &tables,
            blocks_per_sequence: layout.num_blocks,
            block_size: BLOCK,
        };
        g.begin_step(&vec![0; ctx], &batch);
        g.mla_append(
            &self.prefill_latents,
            &self.kv_norm,
            &self.rope,
            &self.spec,
            &batch,
            &mut cache,
            0,
        );
        let pos = [ctx as u32];
        let batch = Batch {
            positions: &pos,
            sequence: &[0],
            block_tables: &tables,
            blocks_per_sequence: layout.num_blocks,
            block_size: BLOCK,
        };
        g.begin_step(&[0], &batch);
        cache
    }

    fn attention_step(&self, b: &mut Buffers, cache: &mut CudaKvCache, ctx: usize) {
        let g = gpu();
        let layout = Self::layout(ctx);
        let tables: Vec<u32> = (0..layout.num_blocks as u32).collect();
        let pos = [ctx as u32];
        let batch = Batch {
            positions: &pos,
            sequence: &[0],
            block_tables: &tables,
            blocks_per_sequence: layout.num_blocks,
            block_size: BLOCK,
        };
        g.mla_append(
            &b.ckv,
            &self.kv_norm,
            &self.rope,
            &self.spec,
            &batch,
            cache,
            0,
        );
        g.mla_attention(
            &mut b.q,
            &self.kv_b,
            &self.rope,
            &self.spec,
            &batch,
            cache,
            0,
            &mut b.attn,
        );
    }

    fn attention_only(&self, cache: &mut CudaKvCache, ctx: usize) {
        let mut b = self.bufs.borrow_mut();
        self.attention_step(&mut b, cache, ctx);
    }

    fn route_only(&self, rows: usize) {
        let b = &mut *self.bufs.borrow_mut();
        gpu().moe_route(&self.router, &b.h, rows, &mut b.routing);
    }

    fn route_and_experts(&self, rows: usize) {
        let g = gpu();
        let b = &mut *self.bufs.borrow_mut();
        g.moe_route(&self.router, &b.h, rows, &mut b.routing);
        g.moe_experts(&self.experts, &b.h, rows, &b.routing, &mut b.out);
    }

    /// One decode layer as the model runs it (fused ops).
    fn decode_layer(&self, cache: &mut CudaKvCache, ctx: usize) {
        let g = gpu();
        let b = &mut *self.bufs.borrow_mut();
        let Buffers {
            x,
            h,
            q_latent,
            q,
            ckv,
            ..
        } = b;
        g.rms_norm_linears(
            x,
            &self.input_norm,
            1e-5,
            1,
            h,
            &mut [(&self.q_a, q_latent), (&self.kv_a, ckv)],
        );
        g.rms_norm_linears(q_latent, &self.q_norm, 1e-6, 1, h, &mut [(&self.q_b, q)]);
        self.attention_step(b, cache, ctx);
        g.linear_add(&self.o, &b.attn, 1, HIDDEN, &mut b.out, &mut b.x);
        let shared = GatedMlp {
            gate: &self.shared[0],
            up: &self.shared[1],
            down: &self.shared[2],
            intermediate: 1536,
        };
        g.moe_block(
            &mut b.x,
            &self.input_norm,
            1e-5,
            1,
            HIDDEN,
            &self.router,
            &self.experts,
            Some(&shared),
            &mut b.routing,
            MoeScratch {
                h: &mut b.h,
                out: &mut b.out,
                shared_out: &mut b.shared_out,
                gate: &mut b.gate,
                up: &mut b.up,
            },
        );
    }

    /// The same layer recorded once as a graph and replayed (as a decode step is).
    fn decode_layer_graph(&self, cache: &mut CudaKvCache, ctx: usize) {
        let layout = Self::layout(ctx);
        let tables: Vec<u32> = (0..layout.num_blocks as u32).collect();
        let pos = [ctx as u32];
        let batch = Batch {
            positions: &pos,
            sequence: &[0],
            block_tables: &tables,
            blocks_per_sequence: layout.num_blocks,
            block_size: BLOCK,
        };
        let key = StepKey {
            tokens: &[0],
            batch: &batch,
            logit_rows: &[],
        };
        gpu()
            .run_step(&key, &mut || -> Result<(), ()> {
                self.decode_layer(cache, ctx);
                Ok(())
            })
            .unwrap();
    }

    /// The layer as the separate ops of the first CUDA backend (before fusion).
    fn decode_layer_ops(&self, cache: &mut CudaKvCache, ctx: usize) {
        let g = gpu();
        let b = &mut *self.bufs.borrow_mut();
        g.rms_norm(&b.x, &self.input_norm, 1e-5, 1, &mut b.h);
        g.linear(&self.q_a, &b.h, 1, &mut b.q_latent);
        g.rms_norm_inplace(&mut b.q_latent, &self.q_norm, 1e-6, 1);
        g.linear(&self.q_b, &b.q_latent, 1, &mut b.q);
        g.linear(&self.kv_a, &b.h, 1, &mut b.ckv);
        self.attention_step(b, cache, ctx);
        g.linear(&self.o, &b.attn, 1, &mut b.out);
        g.add(&mut b.x, &b.out, HIDDEN);
        g.rms_norm(&b.x, &self.input_norm, 1e-5, 1, &mut b.h);
        g.moe_route(&self.router, &b.h, 1, &mut b.routing);
        g.moe_experts(&self.experts, &b.h, 1, &b.routing, &mut b.out);
        g.linear(&self.shared[0], &b.h, 1, &mut b.gate);
        g.linear(&self.shared[1], &b.h, 1, &mut b.up);
        g.silu_mul(&mut b.gate, &b.up, 1536);
        g.linear(&self.shared[2], &b.gate, 1, &mut b.shared_out);
        g.add(&mut b.out, &b.shared_out, HIDDEN);
        g.add(&mut b.x, &b.out, HIDDEN);
    }

    fn head(&self) {
        let b = &mut *self.bufs.borrow_mut();
        gpu().linear(&self.head, &b.h, 1, &mut b.logits);
    }
}

/// The tiny GLM fixture end to end on the GPU: wall time of a prefill forward and of decode
/// steps, each including `begin_step`'s copies and reading the logits back.
#[test]
#[ignore = "needs an NVIDIA GPU and the GLM fixtures"]
fn glm_tiny_forward_timing() {
    use std::time::Instant;
    use trellis_models::{CausalLm, LoadOptions};
    let g = gpu();
    let name = "glm4-moe-lite-tiny-2.5bpw";
    let dir = trellis_format::ModelDir::open(&trellis_testutil::fixture(&format!("exl3/{name}")))
        .expect("model dir opens");
    let options = LoadOptions {
        max_rows: 128,
        max_logit_rows: 1,
    };
    let mut model: Box<dyn CausalLm<CudaBackend>> =
        trellis_models::load(&dir, g, &options, &mut |_, _, _| {}).expect("model loads");
    let vocab = model.info().vocab_size;
    let layout = model.kv_layout(1024, 16, KvDtype::F16);
    let mut cache = g.alloc_kv_cache(&layout).unwrap();
    let tables: Vec<u32> = (0..layout.num_blocks as u32).collect();
    let mut logits = vec![0.0; vocab];
    let mut prefill =
        |n: usize, model: &mut Box<dyn CausalLm<CudaBackend>>, cache: &mut CudaKvCache| {
            let ids: Vec<u32> = (0..n as u32).map(|i| (i * 37) % vocab as u32).collect();
            let positions: Vec<u32> = (0..n as u32).collect();
            let sequence = vec![0u32; n];
            let batch = Batch {
                positions: &positions,
                sequence: &sequence,
                block_tables: &tables,
                blocks_per_sequence: layout.num_blocks,
                block_size: 16,
            };
            let t = Instant::now();
            model
                .forward(g, &ids, &batch, cache, &[n as u32 - 1], None)
                .unwrap();
            model.read_logits(g, &mut logits);
            t.elapsed().as_secs_f64() * 1e6
        };
    for _ in 0..3 {
        prefill(128, &mut model, &mut cache);
    }
    let prefill_us = prefill(128, &mut model, &mut cache);
    let steps = 64;
    let t = Instant::now();
    for j in 0..steps {
        let pos = [(128 + j) as u32];
        let batch = Batch {
            positions: &pos,
            sequence: &[0],
            block_tables: &tables,
            blocks_per_sequence: layout.num_blocks,
            block_size: 16,
        };
        model
            .forward(g, &[(j * 11) as u32], &batch, &mut cache, &[0], None)
            .unwrap();
        model.read_logits(g, &mut logits);
    }
    let decode_us = t.elapsed().as_secs_f64() * 1e6 / steps as f64;
    assert!(logits.iter().all(|v| v.is_finite()));
    eprintln!(
        "GLM tiny ({name}) on {}: prefill 128 tokens {prefill_us:.0} µs, decode {decode_us:.0} µs/token ({:.0} tok/s)",
        g.device_name(),
        1e6 / decode_us
    );
}

/// Per-kernel device time of one full-size GLM MoE layer decode (needs TRELLIS_CUDA_PROFILE=1,
/// which times each launch separately).
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn glm_layer_profile() {
    let g = gpu();
    if std::env::var_os(trellis_cuda::PROFILE_ENV).is_none() {
        eprintln!("set {} to profile", trellis_cuda::PROFILE_ENV);
        return;
    }
    let mut r = rng(101);
    let layer = GlmLayer::new(&mut r, 3.0);
    for ctx in [1024usize, 8192] {
        let mut cache = layer.filled_cache(ctx);
        for _ in 0..3 {
            layer.decode_layer(&mut cache, ctx);
        }
        g.synchronize();
        let _ = g.kernel_profile();
        let runs = 20;
        for _ in 0..runs {
            layer.decode_layer(&mut cache, ctx);
        }
        let profile = g.kernel_profile();
        let total: f64 = profile.iter().map(|p| p.2).sum();
        let mut lines = vec![format!(
            "GLM MoE layer decode ctx {ctx}, per layer: {:.1} µs of kernels in {} launches",
            total / runs as f64,
            profile.iter().map(|p| p.1).sum::<usize>() / runs
        )];
        for (name, calls, us) in profile {
            lines.push(format!(
                "  {name:<28} {:>4} launches {:>8.1} µs",
                calls / runs,
                us / runs as f64
            ));
        }
        eprintln!("{}", lines.join("\n"));
    }
}

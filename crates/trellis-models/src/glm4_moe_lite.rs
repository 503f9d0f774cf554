//! GLM-4.7-Flash (`glm4_moe_lite`) and the DeepSeek-V2/V3 family: multi-head latent
//! attention over a compressed KV cache, and a mixture of experts with a shared expert.
//!
//! Per decoder layer (pre-norm):
//!
//! ```text
//! h = RMSNorm(x)
//! q = q_b(RMSNorm(q_a(h)))        (or q_proj(h) when q_lora_rank is null)
//! c, k_rope = kv_a(h)             → cache [RMSNorm(c) ‖ RoPE(k_rope)]   (576 values per token)
//! x = x + o_proj(MLA(q, cache))   (absorbed: queries meet the latent, kv_b folded in)
//! h = RMSNorm(x)
//! x = x + (dense MLP(h) below first_k_dense_replace, else Σ_top-k w_e·expert_e(h) + shared(h))
//! ```
//! then `logits = lm_head(RMSNorm(x))`.

use crate::rope::{rope_spec, yarn_mscale};
use crate::{
    CausalLm, Layerwise, LoadOptions, ModelError, ModelInfo, Observer, Progress, Result, Tap,
    check_layer_index, check_layerwise_rows, no_layer_loaded,
};
use trellis_backend::{
    Backend, Batch, GatedMlp, GroupRanking, MlaSpec, MoeScratch, RouterSpec, ScoringFunction,
};
use trellis_format::{
    DType, LinearWeights, MlaMoeConfig, ModelConfig, ModelDir, RopeScaling, ScoringFunc,
    TensorStore, TopkMethod,
};

/// eps of `q_a_layernorm` and `kv_a_layernorm`: the reference builds them with the RMSNorm
/// default rather than the config's `rms_norm_eps`.
const LATENT_NORM_EPS: f32 = 1e-6;

/// Dense tensor types accepted for norms and embeddings.
const FLOATS: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// A gated MLP: `down(silu(gate(x)) ⊙ up(x))`.
struct Mlp<B: Backend> {
    gate: B::Linear,
    up: B::Linear,
    down: B::Linear,
    intermediate: usize,
}

enum QueryProjection<B: Backend> {
    /// `q_b(RMSNorm(q_a(h)))`.
    LowRank {
        a: B::Linear,
        norm: B::Vector,
        b: B::Linear,
    },
    /// `q_proj(h)`.
    Direct(B::Linear),
}

struct Attention<B: Backend> {
    query: QueryProjection<B>,
    kv_a: B::Linear,
    kv_norm: B::Vector,
    kv_b: B::MlaKvB,
    o: B::Linear,
}

struct Moe<B: Backend> {
    router: B::Router,
    experts: B::Experts,
    shared: Option<Mlp<B>>,
}

enum FeedForward<B: Backend> {
    Dense(Mlp<B>),
    Moe(Moe<B>),
}

struct Layer<B: Backend> {
    input_norm: B::Vector,
    post_attention_norm: B::Vector,
    attention: Attention<B>,
    ffn: FeedForward<B>,
}

/// Activation buffers, sized at load for `max_rows` rows.
struct Workspace<B: Backend> {
    x: B::Buffer,
    h: B::Buffer,
    q_latent: B::Buffer,
    /// Scratch of the query latent's norm (`rms_norm_linears`).
    q_latent_normed: B::Buffer,
    q: B::Buffer,
    ckv: B::Buffer,
    attn: B::Buffer,
    out: B::Buffer,
    shared_out: B::Buffer,
    gate: B::Buffer,
    up: B::Buffer,
    routing: B::Routing,
    head_in: B::Buffer,
    logits: B::Buffer,
    logit_rows: usize,
}

pub struct Glm4MoeLite<B: Backend> {
    info: ModelInfo,
    /// The parsed config, kept so that a layerwise model can load layers later.
    config: MlaMoeConfig,
    router: RouterSpec,
    hidden: usize,
    eps: f32,
    mla: MlaSpec,
    embed: B::Embedding,
    rope: B::Rope,
    /// Every decoder layer; a layerwise model holds only the one it has loaded.
    layers: Vec<Layer<B>>,
    final_norm: B::Vector,
    /// `None` in a layerwise model, which never computes logits.
    lm_head: Option<B::Linear>,
    options: LoadOptions,
    ws: Workspace<B>,
}

fn norm_weight<B: Backend>(
    b: &B,
    store: &TensorStore,
    name: &str,
    dim: usize,
) -> Result<B::Vector> {
    let t = store.expect(name, &FLOATS, &[dim])?;
    Ok(b.upload_vector(&t.to_f32()?)?)
}

fn linear<'s>(
    store: &'s TensorStore,
    prefix: &str,
    in_f: usize,
    out_f: usize,
) -> Result<LinearWeights<'s>> {
    Ok(store.linear(prefix, in_f, out_f)?)
}

fn upload<B: Backend>(
    b: &B,
    w: &LinearWeights<'_>,
    name: &str,
    bytes: &mut u64,
) -> Result<B::Linear> {
    let uploaded = b.upload_linear(name, w)?;
    *bytes += b
        .linear_bytes(&uploaded)
        .unwrap_or(w.storage_bytes() as u64);
    Ok(uploaded)
}

fn load_mlp<B: Backend>(
    b: &B,
    store: &TensorStore,
    prefix: &str,
    hidden: usize,
    inter: usize,
    bytes: &mut u64,
) -> Result<Mlp<B>> {
    let gate = linear(store, &format!("{prefix}.gate_proj"), hidden, inter)?;
    let up = linear(store, &format!("{prefix}.up_proj"), hidden, inter)?;
    let down = linear(store, &format!("{prefix}.down_proj"), inter, hidden)?;
    Ok(Mlp {
        gate: upload(b, &gate, &format!("{prefix}.gate_proj"), bytes)?,
        up: upload(b, &up, &format!("{prefix}.up_proj"), bytes)?,
        down: upload(b, &down, &format!("{prefix}.down_proj"), bytes)?,
        intermediate: inter,
    })
}

fn router_spec(cfg: &MlaMoeConfig) -> RouterSpec {
    RouterSpec {
        num_experts: cfg.n_routed_experts,
        top_k: cfg.num_experts_per_tok,
        scoring: match cfg.scoring_func {
            ScoringFunc::Sigmoid => ScoringFunction::Sigmoid,
            ScoringFunc::Softmax => ScoringFunction::Softmax,
        },
        n_group: if cfg.topk_method == TopkMethod::Greedy {
            1
        } else {
            cfg.n_group.max(1)
        },
        topk_group: if cfg.topk_method == TopkMethod::Greedy {
            1
        } else {
            cfg.topk_group.max(1)
        },
        group_ranking: if cfg.topk_method == TopkMethod::NoauxTc {
            GroupRanking::TopTwoSum
        } else {
            GroupRanking::Max
        },
        normalize: cfg.norm_topk_prob,
        scaling: cfg.routed_scaling_factor as f32,
    }
}

impl<B: Backend> Layer<B> {
    /// Load decoder layer `l`; also returns the bytes one decode step reads from it.
    fn load(
        b: &B,
        store: &TensorStore,
        cfg: &MlaMoeConfig,
        mla: &MlaSpec,
        router: &RouterSpec,
        l: usize,
    ) -> Result<(Self, u64)> {
        let hidden = cfg.hidden_size;
        let heads = cfg.num_attention_heads;
        let qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim;
        let p = format!("model.layers.{l}");
        let mut layer_bytes = 0u64;
        let input_norm = norm_weight(b, store, &format!("{p}.input_layernorm.weight"), hidden)?;
        let post_attention_norm = norm_weight(
            b,
            store,
            &format!("{p}.post_attention_layernorm.weight"),
            hidden,
        )?;
        let query = match cfg.q_lora_rank {
            Some(rank) => {
                let a = linear(store, &format!("{p}.self_attn.q_a_proj"), hidden, rank)?;
                let bw = linear(store, &format!("{p}.self_attn.q_b_proj"), rank, heads * qk)?;
                QueryProjection::LowRank {
                    a: upload(b, &a, &format!("{p}.self_attn.q_a_proj"), &mut layer_bytes)?,
                    norm: norm_weight(
                        b,
                        store,
                        &format!("{p}.self_attn.q_a_layernorm.weight"),
                        rank,
                    )?,
                    b: upload(b, &bw, &format!("{p}.self_attn.q_b_proj"), &mut layer_bytes)?,
                }
            }
            None => {
                let q = linear(store, &format!("{p}.self_attn.q_proj"), hidden, heads * qk)?;
                QueryProjection::Direct(upload(
                    b,
                    &q,
                    &format!("{p}.self_attn.q_proj"),
                    &mut layer_bytes,
                )?)
            }
        };
        let kv_a = linear(
            store,
            &format!("{p}.self_attn.kv_a_proj_with_mqa"),
            hidden,
            mla.cache_width(),
        )?;
        let kv_b = linear(
            store,
            &format!("{p}.self_attn.kv_b_proj"),
            cfg.kv_lora_rank,
            heads * (cfg.qk_nope_head_dim + cfg.v_head_dim),
        )?;
        let kv_b_held = b.upload_mla_kv_b(&kv_b, mla)?;
        layer_bytes += b
            .mla_kv_b_bytes(&kv_b_held)
            .unwrap_or(kv_b.storage_bytes() as u64);
        let o = linear(
            store,
            &format!("{p}.self_attn.o_proj"),
            heads * cfg.v_head_dim,
            hidden,
        )?;
        let attention = Attention {
            query,
            kv_a: upload(
                b,
                &kv_a,
                &format!("{p}.self_attn.kv_a_proj_with_mqa"),
                &mut layer_bytes,
            )?,
            kv_norm: norm_weight(
                b,
                store,
                &format!("{p}.self_attn.kv_a_layernorm.weight"),
                cfg.kv_lora_rank,
            )?,
            kv_b: kv_b_held,
            o: upload(b, &o, &format!("{p}.self_attn.o_proj"), &mut layer_bytes)?,
        };
        let ffn = if cfg.is_moe_layer(l) {
            let gate = linear(
                store,
                &format!("{p}.mlp.gate"),
                hidden,
                cfg.n_routed_experts,
            )?;
            layer_bytes += gate.storage_bytes() as u64;
            let bias = match store.try_get(&format!("{p}.mlp.gate.e_score_correction_bias")) {
                Some(t) => {
                    t.check(&FLOATS, &[cfg.n_routed_experts])?;
                    Some(t.to_f32()?)
                }
                None if cfg.topk_method == TopkMethod::NoauxTc => {
                    return Err(ModelError::Invalid(format!(
                        "{}: tensor {p}.mlp.gate.e_score_correction_bias is missing (topk_method noaux_tc selects experts with it)",
                        store.dir().display()
                    )));
                }
                None => None,
            };
            let mut experts = Vec::with_capacity(cfg.n_routed_experts);
            let mut expert_bytes = 0u64;
            for e in 0..cfg.n_routed_experts {
                let m = load_mlp(
                    b,
                    store,
                    &format!("{p}.mlp.experts.{e}"),
                    hidden,
                    cfg.moe_intermediate_size,
                    &mut expert_bytes,
                )?;
                experts.push((m.gate, m.up, m.down));
            }
            layer_bytes +=
                expert_bytes * cfg.num_experts_per_tok as u64 / cfg.n_routed_experts as u64;
            let shared = if cfg.n_shared_experts > 0 {
                Some(load_mlp(
                    b,
                    store,
                    &format!("{p}.mlp.shared_experts"),
                    hidden,
                    cfg.moe_intermediate_size * cfg.n_shared_experts,
                    &mut layer_bytes,
                )?)
            } else {
                None
            };
            FeedForward::Moe(Moe {
                router: b.upload_router(&gate, bias.as_deref(), router)?,
                experts: b.upload_experts(experts)?,
                shared,
            })
        } else {
            FeedForward::Dense(load_mlp(
                b,
                store,
                &format!("{p}.mlp"),
                hidden,
                cfg.intermediate_size,
                &mut layer_bytes,
            )?)
        };
        Ok((
            Layer {
                input_norm,
                post_attention_norm,
                attention,
                ffn,
            },
            layer_bytes,
        ))
    }

    /// `ws.x ← layer(ws.x)` for the tokens of `batch`, with the latent cache in layer
    /// `cache_layer`; the expert choices of an MoE layer are left in `ws.routing`.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        b: &B,
        ws: &mut Workspace<B>,
        rope: &B::Rope,
        mla: &MlaSpec,
        (hidden, eps): (usize, f32),
        batch: &Batch<'_>,
        cache: &mut B::KvCache,
        cache_layer: usize,
    ) {
        let n = batch.rows();
        // Attention block: h = RMSNorm(x) feeds the query and latent projections.
        let attn = &self.attention;
        match &attn.query {
            QueryProjection::LowRank {
                a, norm, b: q_b, ..
            } => {
                b.rms_norm_linears(
                    &ws.x,
                    &self.input_norm,
                    eps,
                    n,
                    &mut ws.h,
                    &mut [(a, &mut ws.q_latent), (&attn.kv_a, &mut ws.ckv)],
                );
                // q = q_b(RMSNorm(q_a(h))).
                b.rms_norm_linears(
                    &ws.q_latent,
                    norm,
                    LATENT_NORM_EPS,
                    n,
                    &mut ws.q_latent_normed,
                    &mut [(q_b, &mut ws.q)],
                );
            }
            QueryProjection::Direct(q) => b.rms_norm_linears(
                &ws.x,
                &self.input_norm,
                eps,
                n,
                &mut ws.h,
                &mut [(q, &mut ws.q), (&attn.kv_a, &mut ws.ckv)],
            ),
        }
        // The latent of this step's tokens joins the cache, then every head attends over it.
        b.mla_append_attention(
            &ws.ckv,
            &attn.kv_norm,
            &mut ws.q,
            &attn.kv_b,
            rope,
            mla,
            batch,
            cache,
            cache_layer,
            &mut ws.attn,
        );
        // x += o_proj(attention).
        b.linear_add(&attn.o, &ws.attn, n, hidden, &mut ws.out, &mut ws.x);

        // Feed-forward block on h = RMSNorm(x), added to x.
        match &self.ffn {
            FeedForward::Dense(mlp) => {
                b.rms_norm_linears(
                    &ws.x,
                    &self.post_attention_norm,
                    eps,
                    n,
                    &mut ws.h,
                    &mut [(&mlp.gate, &mut ws.gate), (&mlp.up, &mut ws.up)],
                );
                b.silu_mul(&mut ws.gate, &ws.up, n * mlp.intermediate);
                b.linear_add(&mlp.down, &ws.gate, n, hidden, &mut ws.out, &mut ws.x);
            }
            FeedForward::Moe(moe) => {
                let shared = moe.shared.as_ref().map(|m| GatedMlp {
                    gate: &m.gate,
                    up: &m.up,
                    down: &m.down,
                    intermediate: m.intermediate,
                });
                b.moe_block(
                    &mut ws.x,
                    &self.post_attention_norm,
                    eps,
                    n,
                    hidden,
                    &moe.router,
                    &moe.experts,
                    shared.as_ref(),
                    &mut ws.routing,
                    MoeScratch {
                        h: &mut ws.h,
                        out: &mut ws.out,
                        shared_out: &mut ws.shared_out,
                        gate: &mut ws.gate,
                        up: &mut ws.up,
                    },
                );
            }
        }
    }
}

impl<B: Backend> Glm4MoeLite<B> {
    pub fn load(
        dir: &ModelDir,
        cfg: &MlaMoeConfig,
        b: &B,
        options: &LoadOptions,
        progress: Progress<'_>,
    ) -> Result<Self> {
        Self::load_with(dir, cfg, b, options, progress, true)
    }

    /// A layerwise model (see [`Layerwise`]): everything but the decoder layers and the head.
    pub fn load_layerwise(dir: &ModelDir, b: &B, options: &LoadOptions) -> Result<Self> {
        let ModelConfig::MlaMoe(cfg) = &dir.config else {
            return Err(ModelError::Invalid(format!(
                "{}: not an MLA config",
                dir.path.display()
            )));
        };
        Self::load_with(dir, cfg, b, options, &mut |_, _, _| {}, false)
    }

    fn load_with(
        dir: &ModelDir,
        cfg: &MlaMoeConfig,
        b: &B,
        options: &LoadOptions,
        progress: Progress<'_>,
        all_layers: bool,
    ) -> Result<Self> {
        let store = &dir.tensors;
        let hidden = cfg.hidden_size;
        let heads = cfg.num_attention_heads;
        let qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim;
        let mut softmax_scale = 1.0 / (qk as f64).sqrt();
        // DeepSeek's YaRN also sharpens the softmax by mscale(mscale_all_dim)².
        if let RopeScaling::Yarn {
            factor,
            mscale_all_dim,
            ..
        } = cfg.rope.scaling
            && mscale_all_dim != 0.0
        {
            let m = yarn_mscale(factor, mscale_all_dim);
            softmax_scale *= m * m;
        }
        let mla = MlaSpec {
            heads,
            qk_nope_dim: cfg.qk_nope_head_dim,
            qk_rope_dim: cfg.qk_rope_head_dim,
            v_head_dim: cfg.v_head_dim,
            kv_lora_rank: cfg.kv_lora_rank,
            softmax_scale: softmax_scale as f32,
            latent_norm_eps: LATENT_NORM_EPS,
        };
        if all_layers
            && cfg.tie_word_embeddings
            && !store.contains("lm_head.weight")
            && !store.contains("lm_head.trellis")
        {
            return Err(ModelError::Unsupported(
                "tied embeddings are not supported for MLA models".into(),
            ));
        }
        let total = cfg.num_hidden_layers + 2;
        progress(0, total, "embeddings");
        let mut bytes_per_token = 0u64;
        let embed_view = store.expect(
            "model.embed_tokens.weight",
            &FLOATS,
            &[cfg.vocab_size, hidden],
        )?;
        bytes_per_token += (embed_view.bytes.len() / cfg.vocab_size) as u64;
        let embed = b.upload_embedding(&embed_view)?;
        let rope = b.upload_rope(&rope_spec(
            &cfg.rope,
            cfg.qk_rope_head_dim,
            cfg.rope_interleave,
        ))?;
        let router = router_spec(cfg);

        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in (0..cfg.num_hidden_layers).filter(|_| all_layers) {
            progress(l + 1, total, "decoder layers");
            let (layer, layer_bytes) = Layer::load(b, store, cfg, &mla, &router, l)?;
            bytes_per_token += layer_bytes;
            store.release_mapped_pages();
            layers.push(layer);
        }
        progress(total - 1, total, "head");
        let final_norm = norm_weight(b, store, "model.norm.weight", hidden)?;
        let lm_head = if all_layers {
            let head = linear(store, "lm_head", hidden, cfg.vocab_size)?;
            Some(upload(b, &head, "lm_head", &mut bytes_per_token)?)
        } else {
            None
        };
        progress(total, total, "done");

        let rows = options.max_rows.max(1);
        let logit_rows = options.max_logit_rows.clamp(1, rows);
        let q_rank = cfg.q_lora_rank.unwrap_or(0);
        let ffn_width = cfg
            .intermediate_size
            .max(cfg.moe_intermediate_size * cfg.n_shared_experts.max(1));
        let ws = Workspace {
            x: b.alloc(rows * hidden)?,
            h: b.alloc(rows * hidden)?,
            q_latent: b.alloc(rows * q_rank.max(1))?,
            q_latent_normed: b.alloc(rows * q_rank.max(1))?,
            q: b.alloc(rows * heads * qk)?,
            ckv: b.alloc(rows * mla.cache_width())?,
            attn: b.alloc(rows * heads * cfg.v_head_dim)?,
            out: b.alloc(rows * hidden)?,
            shared_out: b.alloc(rows * hidden)?,
            gate: b.alloc(rows * ffn_width)?,
            up: b.alloc(rows * ffn_width)?,
            routing: b.alloc_routing(rows, cfg.num_experts_per_tok)?,
            head_in: b.alloc(logit_rows * hidden)?,
            logits: b.alloc(logit_rows * cfg.vocab_size)?,
            logit_rows: 0,
        };
        let info = ModelInfo {
            architecture: cfg.class_name.clone(),
            vocab_size: cfg.vocab_size,
            hidden_size: hidden,
            num_layers: cfg.num_hidden_layers,
            max_position_embeddings: cfg.max_position_embeddings,
            kv_values_per_token: mla.cache_width(),
            bytes_per_token,
        };
        Ok(Glm4MoeLite {
            info,
            config: cfg.clone(),
            router,
            hidden,
            eps: cfg.rms_norm_eps as f32,
            mla,
            embed,
            rope,
            layers,
            final_norm,
            lm_head,
            options: LoadOptions {
                max_rows: rows,
                max_logit_rows: logit_rows,
            },
            ws,
        })
    }
}

/// Copy `rows × width` values off the backend for an observer.
fn host_copy<B: Backend>(b: &B, buf: &B::Buffer, len: usize) -> Vec<f32> {
    let mut v = vec![0.0; len];
    b.read(buf, &mut v);
    v
}

impl<B: Backend> CausalLm<B> for Glm4MoeLite<B> {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn forward(
        &mut self,
        b: &B,
        tokens: &[u32],
        batch: &Batch<'_>,
        cache: &mut B::KvCache,
        logit_rows: &[u32],
        mut observer: Observer<'_>,
    ) -> Result<()> {
        let n = tokens.len();
        if n == 0 || n > self.options.max_rows || batch.rows() != n {
            return Err(ModelError::Invalid(format!(
                "forward of {n} tokens with {} batch rows (at most {} rows per pass)",
                batch.rows(),
                self.options.max_rows
            )));
        }
        if logit_rows.len() > self.options.max_logit_rows
            || logit_rows.iter().any(|&r| r as usize >= n)
        {
            return Err(ModelError::Invalid(format!(
                "logits requested for rows {logit_rows:?} of {n} (at most {} rows)",
                self.options.max_logit_rows
            )));
        }
        let (hidden, eps, mla) = (self.hidden, self.eps, &self.mla);
        let ws = &mut self.ws;
        b.begin_step(tokens, batch);
        b.embed(&self.embed, tokens, 1.0, &mut ws.x);

        let Some(lm_head) = &self.lm_head else {
            return Err(ModelError::Invalid(
                "a layerwise model has no output head; run it layer by layer".into(),
            ));
        };
        for (l, layer) in self.layers.iter().enumerate() {
            layer.forward(b, ws, &self.rope, mla, (hidden, eps), batch, cache, l);
            if let Some(obs) = observer.as_mut() {
                if let FeedForward::Moe(_) = layer.ffn {
                    let (ids, weights) = b.read_routing(&ws.routing, n);
                    obs(Tap::Routing {
                        layer: l,
                        ids: &ids,
                        weights: &weights,
                    });
                }
                obs(Tap::Hidden {
                    layer: l,
                    values: &host_copy(b, &ws.x, n * hidden),
                });
            }
        }

        b.rms_norm(&ws.x, &self.final_norm, eps, n, &mut ws.h);
        if let Some(obs) = observer.as_mut() {
            obs(Tap::FinalNorm {
                values: &host_copy(b, &ws.h, n * hidden),
            });
        }
        b.copy_rows(&ws.h, hidden, logit_rows, &mut ws.head_in);
        ws.logit_rows = logit_rows.len();
        if !logit_rows.is_empty() {
            b.linear(lm_head, &ws.head_in, logit_rows.len(), &mut ws.logits);
        }
        Ok(())
    }

    fn read_logits(&self, b: &B, dst: &mut [f32]) {
        let len = self.ws.logit_rows * self.info.vocab_size;
        b.read(&self.ws.logits, &mut dst[..len]);
    }

    fn greedy_tokens(&self, b: &B, dst: &mut [u32]) -> bool {
        let rows = dst.len().min(self.ws.logit_rows);
        b.argmax_rows(&self.ws.logits, self.info.vocab_size, &mut dst[..rows]);
        true
    }
}

impl<B: Backend> Layerwise<B> for Glm4MoeLite<B> {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn embed(&mut self, b: &B, tokens: &[u32], hidden: &mut [f32]) -> Result<()> {
        check_layerwise_rows(
            tokens.len(),
            hidden.len(),
            self.hidden,
            self.options.max_rows,
        )?;
        b.embed(&self.embed, tokens, 1.0, &mut self.ws.x);
        b.read(&self.ws.x, hidden);
        Ok(())
    }

    fn load_layer(&mut self, b: &B, store: &TensorStore, layer: usize) -> Result<()> {
        check_layer_index(layer, self.config.num_hidden_layers)?;
        self.layers.clear();
        let (loaded, _) = Layer::load(b, store, &self.config, &self.mla, &self.router, layer)?;
        self.layers.push(loaded);
        Ok(())
    }

    fn forward_layer(
        &mut self,
        b: &B,
        hidden: &mut [f32],
        batch: &Batch<'_>,
        cache: &mut B::KvCache,
    ) -> Result<()> {
        check_layerwise_rows(
            batch.rows(),
            hidden.len(),
            self.hidden,
            self.options.max_rows,
        )?;
        let layer = self.layers.first().ok_or_else(no_layer_loaded)?;
        b.write(&mut self.ws.x, hidden);
        b.begin_step(&[], batch);
        layer.forward(
            b,
            &mut self.ws,
            &self.rope,
            &self.mla,
            (self.hidden, self.eps),
            batch,
            cache,
            0,
        );
        b.read(&self.ws.x, hidden);
        Ok(())
    }

    fn final_norm(&mut self, b: &B, hidden: &[f32], out: &mut [f32]) -> Result<()> {
        let rows = hidden.len() / self.hidden;
        check_layerwise_rows(rows, hidden.len(), self.hidden, self.options.max_rows)?;
        b.write(&mut self.ws.x, hidden);
        b.rms_norm(&self.ws.x, &self.final_norm, self.eps, rows, &mut self.ws.h);
        b.read(&self.ws.h, &mut out[..hidden.len()]);
        Ok(())
    }
}

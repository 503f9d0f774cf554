//! The Llama family — Llama, Mistral, Qwen2/2.5, Qwen3 — and Qwen3-MoE: pre-norm decoders
//! with grouped-query attention over a K/V cache and a gated MLP or a mixture of experts.
//!
//! Per decoder layer:
//!
//! ```text
//! h = RMSNorm(x)
//! q, k, v = h·W_q (+b), h·W_k (+b), h·W_v (+b)    (biases: Qwen2, or `attention_bias`)
//! q, k = RMSNorm_head(q), RMSNorm_head(k)         (Qwen3, Qwen3-MoE)
//! q, k = RoPE(q), RoPE(k)                         (NeoX halves; llama3 / linear / YaRN scaling)
//! cache ← k, v                                    (2·kv_heads·head_dim values per token)
//! x = x + o_proj(softmax(q·kᵀ/√head_dim) · v)     (causal; the last `sliding_window`
//!                                                   positions only on sliding layers)
//! h = RMSNorm(x)
//! x = x + down(silu(gate(h)) ⊙ up(h))             (dense layers)
//! x = x + Σ_top-k w_e · expert_e(h)               (Qwen3-MoE sparse layers: softmax router,
//!                                                   weights renormalised if norm_topk_prob)
//! ```
//! then `logits = lm_head(RMSNorm(x))`, where a tied `lm_head` is the embedding table.
//!
//! Sliding-window layers store every position in the paged cache and attend through the
//! window mask: the cache is one pool of blocks whose slots all layers share, so keeping only
//! the window would need a per-layer cache layout, which the backends do not have yet.

use crate::blocks::{
    Activation, AttentionBiases, AttentionBuffers, Mlp, QkNormStyle, SelfAttention, Weights,
    check_forward, host_copy,
};
use crate::rope::rope_spec;
use crate::{
    CausalLm, Layerwise, LoadOptions, ModelError, ModelInfo, Observer, Progress, Result, Tap,
    check_layer_index, check_layerwise_rows, no_layer_loaded,
};
use trellis_backend::{AttentionSpec, Backend, Batch, GroupRanking, RouterSpec, ScoringFunction};
use trellis_format::{
    LayerAttention, LlamaConfig, ModelConfig, ModelDir, Qwen3MoeConfig, RopeConfig, TensorStore,
};

/// The routed experts of one sparse layer.
struct Moe<B: Backend> {
    router: B::Router,
    experts: B::Experts,
}

enum FeedForward<B: Backend> {
    Dense(Mlp<B>),
    Moe(Moe<B>),
}

struct Layer<B: Backend> {
    input_norm: B::Vector,
    attention: SelfAttention<B>,
    post_attention_norm: B::Vector,
    ffn: FeedForward<B>,
}

/// Activation buffers, sized at load for `max_rows` rows.
struct Workspace<B: Backend> {
    x: B::Buffer,
    h: B::Buffer,
    attention: AttentionBuffers<B>,
    gate: B::Buffer,
    up: B::Buffer,
    ffn_out: B::Buffer,
    /// Expert choices of a sparse layer (a one-expert placeholder in dense models).
    routing: B::Routing,
    head_in: B::Buffer,
    logits: B::Buffer,
    logit_rows: usize,
}

/// A loaded Llama-family or Qwen3-MoE model.
pub struct Llama<B: Backend> {
    info: ModelInfo,
    /// The parsed config, kept so that a layerwise model can load layers later.
    config: ModelConfig,
    activation: Activation,
    hidden: usize,
    eps: f32,
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

/// The experts of a Qwen3-MoE config.
struct MoeShape<'c> {
    num_experts: usize,
    top_k: usize,
    intermediate: usize,
    normalize: bool,
    config: &'c Qwen3MoeConfig,
}

/// What the decoder needs from either config type.
struct Shape<'c> {
    class_name: &'c str,
    vocab: usize,
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    intermediate: usize,
    eps: f64,
    rope: &'c RopeConfig,
    tied: bool,
    biases: AttentionBiases,
    mlp_bias: bool,
    qk_norm: bool,
    sliding_window: Option<usize>,
    layer_types: &'c [LayerAttention],
    max_positions: usize,
    activation: &'c str,
    moe: Option<MoeShape<'c>>,
}

impl<'c> Shape<'c> {
    /// The shape of a Llama-family or Qwen3-MoE config.
    fn of(config: &'c ModelConfig) -> Self {
        match config {
            ModelConfig::Llama(cfg) => Shape::of_llama(cfg),
            ModelConfig::Qwen3Moe(cfg) => Shape::of_qwen3_moe(cfg),
            _ => unreachable!("a Llama model is built from a Llama or Qwen3-MoE config"),
        }
    }

    fn of_llama(cfg: &'c LlamaConfig) -> Self {
        Shape {
            class_name: &cfg.class_name,
            vocab: cfg.vocab_size,
            hidden: cfg.hidden_size,
            layers: cfg.num_hidden_layers,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            intermediate: cfg.intermediate_size,
            eps: cfg.rms_norm_eps,
            rope: &cfg.rope,
            tied: cfg.tie_word_embeddings,
            biases: AttentionBiases {
                qkv: cfg.qkv_bias,
                o: cfg.o_bias,
            },
            mlp_bias: cfg.mlp_bias,
            qk_norm: cfg.qk_norm,
            sliding_window: cfg.sliding_window,
            layer_types: &cfg.layer_types,
            max_positions: cfg.max_position_embeddings,
            activation: &cfg.hidden_act,
            moe: None,
        }
    }

    fn of_qwen3_moe(cfg: &'c Qwen3MoeConfig) -> Self {
        Shape {
            class_name: &cfg.class_name,
            vocab: cfg.vocab_size,
            hidden: cfg.hidden_size,
            layers: cfg.num_hidden_layers,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            intermediate: cfg.intermediate_size,
            eps: cfg.rms_norm_eps,
            rope: &cfg.rope,
            tied: cfg.tie_word_embeddings,
            biases: AttentionBiases {
                qkv: cfg.attention_bias,
                o: cfg.attention_bias,
            },
            mlp_bias: false,
            qk_norm: true,
            sliding_window: cfg.sliding_window,
            layer_types: &cfg.layer_types,
            max_positions: cfg.max_position_embeddings,
            activation: &cfg.hidden_act,
            moe: Some(MoeShape {
                num_experts: cfg.num_experts,
                top_k: cfg.num_experts_per_tok,
                intermediate: cfg.moe_intermediate_size,
                normalize: cfg.norm_topk_prob,
                config: cfg,
            }),
        }
    }

    fn is_moe_layer(&self, layer: usize) -> bool {
        self.moe
            .as_ref()
            .is_some_and(|m| m.config.is_moe_layer(layer))
    }

    /// The attention rule of layer `layer`: causal, windowed on sliding layers.
    fn attention_spec(&self, layer: usize) -> AttentionSpec {
        let sliding = self.layer_types.get(layer) == Some(&LayerAttention::Sliding);
        AttentionSpec {
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            softmax_scale: 1.0 / (self.head_dim as f32).sqrt(),
            sliding_window: if sliding { self.sliding_window } else { None },
            logit_softcap: None,
        }
    }
}

/// Rotated dims per head: `head_dim · partial_rotary_factor`, truncated as transformers does.
pub(crate) fn rotary_dim(head_dim: usize, rope: &RopeConfig, what: &str) -> Result<usize> {
    let dim = (head_dim as f64 * rope.partial_rotary_factor) as usize;
    if dim == 0 || !dim.is_multiple_of(2) {
        return Err(ModelError::Unsupported(format!(
            "{what}: partial_rotary_factor {} of head_dim {head_dim} gives {dim} rotated dims; \
             an even, non-zero count is needed",
            rope.partial_rotary_factor
        )));
    }
    Ok(dim)
}

impl<B: Backend> Llama<B> {
    /// Load a Llama, Mistral, Qwen2 or Qwen3 model.
    pub fn load(
        dir: &ModelDir,
        cfg: &LlamaConfig,
        b: &B,
        options: &LoadOptions,
        progress: Progress<'_>,
    ) -> Result<Self> {
        let config = ModelConfig::Llama(cfg.clone());
        Self::load_config(dir, config, b, options, progress, LayerLoading::All)
    }

    /// Load a Qwen3-MoE model.
    pub fn load_qwen3_moe(
        dir: &ModelDir,
        cfg: &Qwen3MoeConfig,
        b: &B,
        options: &LoadOptions,
        progress: Progress<'_>,
    ) -> Result<Self> {
        let config = ModelConfig::Qwen3Moe(cfg.clone());
        Self::load_config(dir, config, b, options, progress, LayerLoading::All)
    }

    /// A layerwise model (see [`Layerwise`]): everything but the decoder layers and the head.
    pub fn load_layerwise(dir: &ModelDir, b: &B, options: &LoadOptions) -> Result<Self> {
        Self::load_config(
            dir,
            dir.config.clone(),
            b,
            options,
            &mut |_, _, _| {},
            LayerLoading::None,
        )
    }

    fn load_config(
        dir: &ModelDir,
        config: ModelConfig,
        b: &B,
        options: &LoadOptions,
        progress: Progress<'_>,
        loading: LayerLoading,
    ) -> Result<Self> {
        let s = &Shape::of(&config);
        let store = &dir.tensors;
        let what = format!("{} ({})", s.class_name, store.dir().display());
        let activation = Activation::from_config(s.activation, &what)?;
        if s.moe.is_some() && activation != Activation::Silu {
            return Err(ModelError::Unsupported(format!(
                "{what}: experts are evaluated with SiLU, but hidden_act is `{}`",
                s.activation
            )));
        }
        let (hidden, eps) = (s.hidden, s.eps as f32);
        let mut w = Weights::new(b, store);
        let total = s.layers + 2;
        progress(0, total, "embeddings");
        let embed_table = w.embedding_table("model.embed_tokens.weight", s.vocab, hidden)?;
        let embed = b.upload_embedding(&embed_table)?;
        let rope = b.upload_rope(&rope_spec(
            s.rope,
            rotary_dim(s.head_dim, s.rope, &what)?,
            false,
        ))?;
        let mut layers = Vec::with_capacity(s.layers);
        if loading == LayerLoading::All {
            for l in 0..s.layers {
                progress(l + 1, total, "decoder layers");
                layers.push(Layer::load(&mut w, s, activation, l, l)?);
                store.release_mapped_pages();
            }
        }
        progress(total - 1, total, "head");
        let final_norm = w.vector("model.norm.weight", hidden)?;
        let lm_head = match loading {
            LayerLoading::All => Some(w.lm_head("lm_head", &embed_table, s.tied)?),
            LayerLoading::None => None,
        };
        progress(total, total, "done");

        let rows = options.max_rows.max(1);
        let logit_rows = options.max_logit_rows.clamp(1, rows);
        let ffn_width = s
            .intermediate
            .max(s.moe.as_ref().map_or(0, |m| m.intermediate));
        let ws = Workspace {
            x: b.alloc(rows * hidden)?,
            h: b.alloc(rows * hidden)?,
            attention: AttentionBuffers::alloc(b, rows, hidden, &s.attention_spec(0))?,
            gate: b.alloc(rows * ffn_width)?,
            up: b.alloc(rows * ffn_width)?,
            ffn_out: b.alloc(rows * hidden)?,
            routing: b.alloc_routing(rows, s.moe.as_ref().map_or(1, |m| m.top_k))?,
            head_in: b.alloc(logit_rows * hidden)?,
            logits: b.alloc(logit_rows * s.vocab)?,
            logit_rows: 0,
        };
        let info = ModelInfo {
            architecture: s.class_name.to_string(),
            vocab_size: s.vocab,
            hidden_size: hidden,
            num_layers: s.layers,
            max_position_embeddings: s.max_positions,
            kv_values_per_token: 2 * s.kv_heads * s.head_dim,
            bytes_per_token: w.bytes_per_token,
        };
        Ok(Llama {
            info,
            config: config.clone(),
            activation,
            hidden,
            eps,
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

/// Which decoder layers a load uploads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LayerLoading {
    All,
    /// None: a layerwise model loads them one at a time.
    None,
}

impl<B: Backend> Layer<B> {
    /// Load decoder layer `l`, whose keys and values go to cache layer `cache_layer`.
    fn load(
        w: &mut Weights<'_, B>,
        s: &Shape<'_>,
        activation: Activation,
        l: usize,
        cache_layer: usize,
    ) -> Result<Self> {
        let hidden = s.hidden;
        let p = format!("model.layers.{l}");
        let qk_norm = s.qk_norm.then_some(QkNormStyle {
            eps: s.eps as f32,
            plus_one: false,
        });
        let attention = SelfAttention::load(
            w,
            &format!("{p}.self_attn"),
            cache_layer,
            hidden,
            s.attention_spec(l),
            s.biases,
            qk_norm,
        )?;
        let ffn = match &s.moe {
            Some(moe) if s.is_moe_layer(l) => {
                FeedForward::Moe(load_moe(w, &format!("{p}.mlp"), hidden, moe)?)
            }
            _ => FeedForward::Dense(Mlp::load(
                w,
                &format!("{p}.mlp"),
                hidden,
                s.intermediate,
                s.mlp_bias,
                activation,
            )?),
        };
        Ok(Layer {
            input_norm: w.vector(&format!("{p}.input_layernorm.weight"), hidden)?,
            attention,
            post_attention_norm: w
                .vector(&format!("{p}.post_attention_layernorm.weight"), hidden)?,
            ffn,
        })
    }

    /// `ws.x ← layer(ws.x)` for the tokens of `batch`; `l` labels observer taps.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        b: &B,
        ws: &mut Workspace<B>,
        rope: &B::Rope,
        (hidden, eps): (usize, f32),
        batch: &Batch<'_>,
        cache: &mut B::KvCache,
        l: usize,
        observer: &mut Observer<'_>,
    ) {
        let n = batch.rows();
        // x = x + Attention(RMSNorm(x))
        b.rms_norm(&ws.x, &self.input_norm, eps, n, &mut ws.h);
        self.attention
            .forward(b, &ws.h, rope, batch, cache, &mut ws.attention);
        b.add(&mut ws.x, &ws.attention.out, n * hidden);

        // x = x + FeedForward(RMSNorm(x))
        b.rms_norm(&ws.x, &self.post_attention_norm, eps, n, &mut ws.h);
        match &self.ffn {
            FeedForward::Dense(mlp) => {
                mlp.forward(b, &ws.h, n, &mut ws.gate, &mut ws.up, &mut ws.ffn_out)
            }
            FeedForward::Moe(moe) => {
                b.moe_route(&moe.router, &ws.h, n, &mut ws.routing);
                if let Some(obs) = observer.as_mut() {
                    let (ids, weights) = b.read_routing(&ws.routing, n);
                    obs(Tap::Routing {
                        layer: l,
                        ids: &ids,
                        weights: &weights,
                    });
                }
                b.moe_experts(&moe.experts, &ws.h, n, &ws.routing, &mut ws.ffn_out);
            }
        }
        b.add(&mut ws.x, &ws.ffn_out, n * hidden);
        if let Some(obs) = observer.as_mut() {
            obs(Tap::Hidden {
                layer: l,
                values: &host_copy(b, &ws.x, n * hidden),
            });
        }
    }
}

/// A sparse layer's router `{prefix}.gate` and experts `{prefix}.experts.{e}.*`. A token
/// reads top_k of the experts, so they count top_k / num_experts of their bytes per token.
fn load_moe<B: Backend>(
    w: &mut Weights<'_, B>,
    prefix: &str,
    hidden: usize,
    moe: &MoeShape<'_>,
) -> Result<Moe<B>> {
    let gate = w.linear_weights(
        &format!("{prefix}.gate"),
        hidden,
        moe.num_experts,
        crate::blocks::Bias::None,
    )?;
    w.bytes_per_token += gate.storage_bytes() as u64;
    let router = w.backend.upload_router(
        &gate,
        None,
        &RouterSpec {
            num_experts: moe.num_experts,
            top_k: moe.top_k,
            scoring: ScoringFunction::Softmax,
            n_group: 1,
            topk_group: 1,
            group_ranking: GroupRanking::Max,
            normalize: moe.normalize,
            scaling: 1.0,
        },
    )?;
    let before = w.bytes_per_token;
    let mut experts = Vec::with_capacity(moe.num_experts);
    for e in 0..moe.num_experts {
        let m = Mlp::load(
            w,
            &format!("{prefix}.experts.{e}"),
            hidden,
            moe.intermediate,
            false,
            Activation::Silu,
        )?;
        experts.push((m.gate, m.up, m.down));
    }
    let expert_bytes = w.bytes_per_token - before;
    w.bytes_per_token = before + expert_bytes * moe.top_k as u64 / moe.num_experts as u64;
    Ok(Moe {
        router,
        experts: w.backend.upload_experts(experts)?,
    })
}

impl<B: Backend> CausalLm<B> for Llama<B> {
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
        check_forward(
            n,
            batch,
            logit_rows,
            self.options.max_rows,
            self.options.max_logit_rows,
        )?;
        let (hidden, eps) = (self.hidden, self.eps);
        let ws = &mut self.ws;
        b.begin_step(tokens, batch);
        b.embed(&self.embed, tokens, 1.0, &mut ws.x);

        let Some(lm_head) = &self.lm_head else {
            return Err(ModelError::Invalid(
                "a layerwise model has no output head; run it layer by layer".into(),
            ));
        };
        for (l, layer) in self.layers.iter().enumerate() {
            layer.forward(
                b,
                ws,
                &self.rope,
                (hidden, eps),
                batch,
                cache,
                l,
                &mut observer,
            );
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

impl<B: Backend> Layerwise<B> for Llama<B> {
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
        let s = Shape::of(&self.config);
        check_layer_index(layer, s.layers)?;
        self.layers.clear();
        let mut w = Weights::new(b, store);
        self.layers
            .push(Layer::load(&mut w, &s, self.activation, layer, 0)?);
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
            (self.hidden, self.eps),
            batch,
            cache,
            0,
            &mut None,
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

//! Gemma 3 (text): interleaved local (sliding-window) and global attention layers, each kind
//! with its own RoPE, four (1 + w) RMSNorms per layer, q/k norms and a GeGLU MLP.
//!
//! ```text
//! x = embed(tokens) · √hidden                      (the scale rounded to the table's dtype)
//! per layer (every norm is x̂ · (1 + w)):
//!   h = RMSNorm(x)
//!   q, k, v = h·W_q, h·W_k, h·W_v;  q, k = RMSNorm_head(q), RMSNorm_head(k)
//!   q, k = RoPE_local(q, k) on sliding layers, RoPE_global(q, k) on global layers
//!   x = x + RMSNorm(o_proj(softmax(q·kᵀ / √query_pre_attn_scalar) · v))
//!                                                  (local layers see the last `sliding_window`)
//!   h = RMSNorm(x)
//!   x = x + RMSNorm(down(gelu_tanh(gate(h)) ⊙ up(h)))
//! logits = cap · tanh(lm_head(RMSNorm(x)) / cap)   (cap = final_logit_softcapping, if set)
//! ```
//! `lm_head` is the embedding table unless the directory stores one. Local layers keep every
//! position in the cache and mask to the window, as the Llama family's sliding layers do.
//!
//! `attn_logit_softcapping` is parsed but not applied, as in transformers' Gemma 3 (which
//! keeps the field from Gemma 2 but replaced the attention softcap with the q/k norms). The
//! final softcap is applied whenever configured, also for `Gemma3ForConditionalGeneration`
//! (whose transformers class skips it; released configs leave it null).

use crate::blocks::{
    Activation, AttentionBiases, AttentionBuffers, Mlp, QkNormStyle, SelfAttention, Weights,
    check_forward, embedding_scale_in, host_copy,
};
use crate::llama::rotary_dim;
use crate::rope::rope_spec;
use crate::{
    CausalLm, Layerwise, LoadOptions, ModelError, ModelInfo, Observer, Progress, Result, Tap,
    check_layer_index, check_layerwise_rows, no_layer_loaded,
};
use trellis_backend::{AttentionSpec, Backend, Batch};
use trellis_format::{Gemma3Config, LayerAttention, ModelConfig, ModelDir, TensorStore};

/// Where a checkpoint keeps the text decoder: `Gemma3ForCausalLM` under `model.`; the
/// multimodal `Gemma3ForConditionalGeneration` under `language_model.model.` (released
/// checkpoints) or `model.language_model.` (as transformers 5 saves it).
const DECODER_PREFIXES: [&str; 3] = ["model.", "language_model.model.", "model.language_model."];

struct Layer<B: Backend> {
    input_norm: B::Vector,
    attention: SelfAttention<B>,
    /// Sliding-window layers use the local RoPE, global layers the global one.
    local: bool,
    post_attention_norm: B::Vector,
    pre_feedforward_norm: B::Vector,
    mlp: Mlp<B>,
    post_feedforward_norm: B::Vector,
}

/// Activation buffers, sized at load for `max_rows` rows.
struct Workspace<B: Backend> {
    x: B::Buffer,
    h: B::Buffer,
    attention: AttentionBuffers<B>,
    gate: B::Buffer,
    up: B::Buffer,
    ffn_out: B::Buffer,
    head_in: B::Buffer,
    logits: B::Buffer,
    logit_rows: usize,
}

pub struct Gemma3<B: Backend> {
    info: ModelInfo,
    /// The parsed config, kept so that a layerwise model can load layers later.
    config: Gemma3Config,
    activation: Activation,
    /// Where the decoder's tensors live (see [`DECODER_PREFIXES`]).
    prefix: &'static str,
    hidden: usize,
    eps: f32,
    embed: B::Embedding,
    embed_scale: f32,
    rope_local: B::Rope,
    rope_global: B::Rope,
    /// Every decoder layer; a layerwise model holds only the one it has loaded.
    layers: Vec<Layer<B>>,
    final_norm: B::Vector,
    /// `None` in a layerwise model, which never computes logits.
    lm_head: Option<B::Linear>,
    final_logit_softcap: Option<f32>,
    options: LoadOptions,
    ws: Workspace<B>,
}

/// The prefix of the decoder's tensors in `store`.
fn decoder_prefix(store: &TensorStore) -> Result<&'static str> {
    DECODER_PREFIXES
        .into_iter()
        .find(|p| store.contains(&format!("{p}embed_tokens.weight")))
        .ok_or_else(|| {
            ModelError::Invalid(format!(
                "{}: no embedding table found (looked for {})",
                store.dir().display(),
                DECODER_PREFIXES
                    .map(|p| format!("{p}embed_tokens.weight"))
                    .join(", ")
            ))
        })
}

impl<B: Backend> Layer<B> {
    /// Load decoder layer `l` (under `prefix`), whose keys and values go to cache layer
    /// `cache_layer`.
    fn load(
        w: &mut Weights<'_, B>,
        cfg: &Gemma3Config,
        prefix: &str,
        activation: Activation,
        l: usize,
        cache_layer: usize,
    ) -> Result<Self> {
        let hidden = cfg.hidden_size;
        let p = format!("{prefix}layers.{l}");
        let local = cfg.layer_types[l] == LayerAttention::Sliding;
        let spec = AttentionSpec {
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            softmax_scale: cfg.query_pre_attn_scalar.powf(-0.5) as f32,
            sliding_window: local.then_some(cfg.sliding_window),
            logit_softcap: None,
        };
        let biases = AttentionBiases {
            qkv: cfg.attention_bias,
            o: cfg.attention_bias,
        };
        let qk_norm = Some(QkNormStyle {
            eps: cfg.rms_norm_eps as f32,
            plus_one: true,
        });
        let norm = |w: &Weights<'_, B>, name: &str| {
            w.vector_plus_one(&format!("{p}.{name}.weight"), hidden)
        };
        Ok(Layer {
            input_norm: norm(w, "input_layernorm")?,
            post_attention_norm: norm(w, "post_attention_layernorm")?,
            pre_feedforward_norm: norm(w, "pre_feedforward_layernorm")?,
            post_feedforward_norm: norm(w, "post_feedforward_layernorm")?,
            attention: SelfAttention::load(
                w,
                &format!("{p}.self_attn"),
                cache_layer,
                hidden,
                spec,
                biases,
                qk_norm,
            )?,
            local,
            mlp: Mlp::load(
                w,
                &format!("{p}.mlp"),
                hidden,
                cfg.intermediate_size,
                false,
                activation,
            )?,
        })
    }

    /// `ws.x ← layer(ws.x)` for the tokens of `batch`.
    fn forward(
        &self,
        b: &B,
        ws: &mut Workspace<B>,
        (rope_local, rope_global): (&B::Rope, &B::Rope),
        (hidden, eps): (usize, f32),
        batch: &Batch<'_>,
        cache: &mut B::KvCache,
    ) {
        let n = batch.rows();
        // x = x + RMSNorm(Attention(RMSNorm(x)))
        let rope = if self.local { rope_local } else { rope_global };
        b.rms_norm(&ws.x, &self.input_norm, eps, n, &mut ws.h);
        self.attention
            .forward(b, &ws.h, rope, batch, cache, &mut ws.attention);
        b.rms_norm(
            &ws.attention.out,
            &self.post_attention_norm,
            eps,
            n,
            &mut ws.h,
        );
        b.add(&mut ws.x, &ws.h, n * hidden);

        // x = x + RMSNorm(MLP(RMSNorm(x)))
        b.rms_norm(&ws.x, &self.pre_feedforward_norm, eps, n, &mut ws.h);
        self.mlp
            .forward(b, &ws.h, n, &mut ws.gate, &mut ws.up, &mut ws.ffn_out);
        b.rms_norm(&ws.ffn_out, &self.post_feedforward_norm, eps, n, &mut ws.h);
        b.add(&mut ws.x, &ws.h, n * hidden);
    }
}

impl<B: Backend> Gemma3<B> {
    pub fn load(
        dir: &ModelDir,
        cfg: &Gemma3Config,
        b: &B,
        options: &LoadOptions,
        progress: Progress<'_>,
    ) -> Result<Self> {
        Self::load_with(dir, cfg, b, options, progress, true)
    }

    /// A layerwise model (see [`Layerwise`]): everything but the decoder layers and the head.
    pub fn load_layerwise(dir: &ModelDir, b: &B, options: &LoadOptions) -> Result<Self> {
        let ModelConfig::Gemma3(cfg) = &dir.config else {
            return Err(ModelError::Invalid(format!(
                "{}: not a Gemma 3 config",
                dir.path.display()
            )));
        };
        Self::load_with(dir, cfg, b, options, &mut |_, _, _| {}, false)
    }

    fn load_with(
        dir: &ModelDir,
        cfg: &Gemma3Config,
        b: &B,
        options: &LoadOptions,
        progress: Progress<'_>,
        all_layers: bool,
    ) -> Result<Self> {
        let store = &dir.tensors;
        let what = format!("{} ({})", cfg.class_name, store.dir().display());
        let activation = Activation::from_config(&cfg.hidden_activation, &what)?;
        let (hidden, eps) = (cfg.hidden_size, cfg.rms_norm_eps as f32);
        let prefix = decoder_prefix(store)?;
        let mut w = Weights::new(b, store);
        let total = cfg.num_hidden_layers + 2;
        progress(0, total, "embeddings");
        let embed_table = w.embedding_table(
            &format!("{prefix}embed_tokens.weight"),
            cfg.vocab_size,
            hidden,
        )?;
        let embed_scale = embedding_scale_in(embed_table.dtype, hidden);
        let embed = b.upload_embedding(&embed_table)?;
        let rope_dim = |rope| rotary_dim(cfg.head_dim, rope, &what);
        let rope_local = b.upload_rope(&rope_spec(
            &cfg.rope_local,
            rope_dim(&cfg.rope_local)?,
            false,
        ))?;
        let rope_global = b.upload_rope(&rope_spec(
            &cfg.rope_global,
            rope_dim(&cfg.rope_global)?,
            false,
        ))?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        if all_layers {
            for l in 0..cfg.num_hidden_layers {
                progress(l + 1, total, "decoder layers");
                layers.push(Layer::load(&mut w, cfg, prefix, activation, l, l)?);
                store.release_mapped_pages();
            }
        }
        progress(total - 1, total, "head");
        let final_norm = w.vector_plus_one(&format!("{prefix}norm.weight"), hidden)?;
        let head_name = if prefix == "language_model.model." {
            "language_model.lm_head"
        } else {
            "lm_head"
        };
        let lm_head = if all_layers {
            Some(w.lm_head(head_name, &embed_table, cfg.tie_word_embeddings)?)
        } else {
            None
        };
        progress(total, total, "done");

        let rows = options.max_rows.max(1);
        let logit_rows = options.max_logit_rows.clamp(1, rows);
        // Every layer has the same head counts and sizes.
        let spec = AttentionSpec {
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            softmax_scale: 1.0,
            sliding_window: None,
            logit_softcap: None,
        };
        let ws = Workspace {
            x: b.alloc(rows * hidden)?,
            h: b.alloc(rows * hidden)?,
            attention: AttentionBuffers::alloc(b, rows, hidden, &spec)?,
            gate: b.alloc(rows * cfg.intermediate_size)?,
            up: b.alloc(rows * cfg.intermediate_size)?,
            ffn_out: b.alloc(rows * hidden)?,
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
            kv_values_per_token: 2 * cfg.num_key_value_heads * cfg.head_dim,
            bytes_per_token: w.bytes_per_token,
        };
        Ok(Gemma3 {
            info,
            config: cfg.clone(),
            activation,
            prefix,
            hidden,
            eps,
            embed,
            embed_scale,
            rope_local,
            rope_global,
            layers,
            final_norm,
            lm_head,
            final_logit_softcap: cfg.final_logit_softcapping.map(|c| c as f32),
            options: LoadOptions {
                max_rows: rows,
                max_logit_rows: logit_rows,
            },
            ws,
        })
    }
}

impl<B: Backend> CausalLm<B> for Gemma3<B> {
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
        b.embed(&self.embed, tokens, self.embed_scale, &mut ws.x);

        let Some(lm_head) = &self.lm_head else {
            return Err(ModelError::Invalid(
                "a layerwise model has no output head; run it layer by layer".into(),
            ));
        };
        for (l, layer) in self.layers.iter().enumerate() {
            layer.forward(
                b,
                ws,
                (&self.rope_local, &self.rope_global),
                (hidden, eps),
                batch,
                cache,
            );
            if let Some(obs) = observer.as_mut() {
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

    /// The logits, soft-capped here on the host: the cap is one elementwise tanh over the few
    /// rows read, which no backend op provides.
    fn read_logits(&self, b: &B, dst: &mut [f32]) {
        let len = self.ws.logit_rows * self.info.vocab_size;
        b.read(&self.ws.logits, &mut dst[..len]);
        if let Some(cap) = self.final_logit_softcap {
            for v in &mut dst[..len] {
                *v = (*v / cap).tanh() * cap;
            }
        }
    }
}

impl<B: Backend> Layerwise<B> for Gemma3<B> {
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
        b.embed(&self.embed, tokens, self.embed_scale, &mut self.ws.x);
        b.read(&self.ws.x, hidden);
        Ok(())
    }

    fn load_layer(&mut self, b: &B, store: &TensorStore, layer: usize) -> Result<()> {
        check_layer_index(layer, self.config.num_hidden_layers)?;
        self.layers.clear();
        let mut w = Weights::new(b, store);
        self.layers.push(Layer::load(
            &mut w,
            &self.config,
            self.prefix,
            self.activation,
            layer,
            0,
        )?);
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
            (&self.rope_local, &self.rope_global),
            (self.hidden, self.eps),
            batch,
            cache,
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

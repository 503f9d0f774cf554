//! Building blocks of the grouped-query-attention models (the Llama family, Qwen3-MoE,
//! Gemma 3): loading weights with their byte counts, the self-attention block over the paged
//! KV cache, and the gated MLP.

use crate::{ModelError, Result};
use half::{bf16, f16};
use trellis_backend::{AttentionSpec, Backend, Batch};
use trellis_format::{DType, LinearWeights, TensorStore, TensorView};

/// Dense tensor types accepted for norms and embeddings.
pub(crate) const FLOATS: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Uploads a model's tensors to the backend, summing the bytes one decode step reads.
pub(crate) struct Weights<'a, B: Backend> {
    pub backend: &'a B,
    pub store: &'a TensorStore,
    /// Bytes of weights one decode step at batch 1 reads (embedding row, every linear, the
    /// experts a token is routed to on average).
    pub bytes_per_token: u64,
}

impl<'a, B: Backend> Weights<'a, B> {
    pub fn new(backend: &'a B, store: &'a TensorStore) -> Self {
        Weights {
            backend,
            store,
            bytes_per_token: 0,
        }
    }

    /// A norm weight or other small vector of `dim` values.
    pub fn vector(&self, name: &str, dim: usize) -> Result<B::Vector> {
        let t = self.store.expect(name, &FLOATS, &[dim])?;
        Ok(self.backend.upload_vector(&t.to_f32()?)?)
    }

    /// A norm weight `w` stored as an offset from one (Gemma's `x̂ · (1 + w)`), uploaded as
    /// `1 + w` so that the plain RMSNorm op applies it.
    pub fn vector_plus_one(&self, name: &str, dim: usize) -> Result<B::Vector> {
        let t = self.store.expect(name, &FLOATS, &[dim])?;
        let values: Vec<f32> = t.to_f32()?.iter().map(|w| 1.0 + w).collect();
        Ok(self.backend.upload_vector(&values)?)
    }

    /// The weights of linear `prefix`, unuploaded.
    pub fn linear_weights(
        &self,
        prefix: &str,
        in_features: usize,
        out_features: usize,
        bias: Bias,
    ) -> Result<LinearWeights<'a>> {
        let w = self.store.linear(prefix, in_features, out_features)?;
        let has_bias = match &w {
            LinearWeights::Trellis(t) => t.bias.is_some(),
            LinearWeights::Dense { bias, .. } => bias.is_some(),
        };
        if bias == Bias::Expected && !has_bias {
            return Err(ModelError::Invalid(format!(
                "{}: linear {prefix} has no bias, but the config gives it one",
                self.store.dir().display()
            )));
        }
        Ok(w)
    }

    /// Upload linear weights, counting them as read once per decode step.
    pub fn upload(&mut self, name: &str, w: &LinearWeights<'_>) -> Result<B::Linear> {
        let uploaded = self.backend.upload_linear(name, w)?;
        self.bytes_per_token += self
            .backend
            .linear_bytes(&uploaded)
            .unwrap_or(w.storage_bytes() as u64);
        Ok(uploaded)
    }

    /// Load and upload linear `prefix`.
    pub fn linear(
        &mut self,
        prefix: &str,
        in_features: usize,
        out_features: usize,
        bias: Bias,
    ) -> Result<B::Linear> {
        let w = self.linear_weights(prefix, in_features, out_features, bias)?;
        self.upload(prefix, &w)
    }

    /// The token embedding table `[vocab, hidden]`, counted as one row read per token.
    pub fn embedding_table(
        &mut self,
        name: &str,
        vocab: usize,
        hidden: usize,
    ) -> Result<TensorView<'a>> {
        let table = self.store.expect(name, &FLOATS, &[vocab, hidden])?;
        self.bytes_per_token += (table.bytes.len() / vocab) as u64;
        Ok(table)
    }

    /// The output head: `lm_head` when the directory has one (an EXL3 conversion writes a
    /// quantized head even for tied models), else the embedding table when tied, whose
    /// `[vocab, hidden]` layout already is a linear's `[out, in]`.
    pub fn lm_head(
        &mut self,
        name: &str,
        embedding: &TensorView<'_>,
        tied: bool,
    ) -> Result<B::Linear> {
        let [vocab, hidden] = embedding.shape[..] else {
            unreachable!("the embedding table was checked to be 2-D")
        };
        let has_head = self.store.contains(&format!("{name}.weight"))
            || self.store.contains(&format!("{name}.trellis"));
        if tied && !has_head {
            let w = LinearWeights::Dense {
                weight: *embedding,
                bias: None,
            };
            return self.upload(name, &w);
        }
        self.linear(name, hidden, vocab, Bias::None)
    }
}

/// Whether the config says a linear has a bias. A bias found in the file is used either way;
/// one the config promises must be there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Bias {
    None,
    Expected,
}

impl Bias {
    pub fn from(expected: bool) -> Bias {
        if expected { Bias::Expected } else { Bias::None }
    }
}

/// `√hidden` rounded to the embedding's storage type: transformers' Gemma multiplies the
/// looked-up rows by the scale cast to the table's dtype (`Gemma3TextScaledWordEmbedding`).
pub(crate) fn embedding_scale_in(dtype: DType, hidden: usize) -> f32 {
    let scale = (hidden as f64).sqrt() as f32;
    match dtype {
        DType::BF16 => bf16::from_f32(scale).to_f32(),
        DType::F16 => f16::from_f32(scale).to_f32(),
        _ => scale,
    }
}

/// How a model's per-head q/k norms are stored.
#[derive(Clone, Copy, Debug)]
pub(crate) struct QkNormStyle {
    pub eps: f32,
    /// The weights are offsets from one (Gemma), uploaded as `1 + w`.
    pub plus_one: bool,
}

/// Per-head RMSNorm of queries and keys before RoPE (Qwen3, Gemma 3).
pub(crate) struct QkNorm<B: Backend> {
    pub q: B::Vector,
    pub k: B::Vector,
    pub eps: f32,
}

/// Causal grouped-query self-attention of one layer:
///
/// ```text
/// q, k, v = h·W_q (+b_q), h·W_k (+b_k), h·W_v (+b_v)
/// q, k    = RMSNorm per head (when the model has q/k norms)
/// q, k    = RoPE(q), RoPE(k)                  (the first rope.dim() dims of each head)
/// cache  ← k, v
/// out     = softmax(q·kᵀ · scale over the visible window) · v · W_o (+b_o)
/// ```
pub(crate) struct SelfAttention<B: Backend> {
    pub layer: usize,
    pub q: B::Linear,
    pub k: B::Linear,
    pub v: B::Linear,
    pub o: B::Linear,
    pub qk_norm: Option<QkNorm<B>>,
    pub spec: AttentionSpec,
}

/// Which projections carry biases.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AttentionBiases {
    pub qkv: bool,
    pub o: bool,
}

impl<B: Backend> SelfAttention<B> {
    /// Load `{prefix}.{q,k,v,o}_proj`, and `{prefix}.{q,k}_norm` when the model has them.
    pub fn load(
        w: &mut Weights<'_, B>,
        prefix: &str,
        layer: usize,
        hidden: usize,
        spec: AttentionSpec,
        biases: AttentionBiases,
        qk_norm: Option<QkNormStyle>,
    ) -> Result<Self> {
        let (q_width, kv_width) = (spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim);
        let qkv_bias = Bias::from(biases.qkv);
        let qk_norm = match qk_norm {
            Some(QkNormStyle { eps, plus_one }) => {
                let load = |name: &str| {
                    let name = format!("{prefix}.{name}.weight");
                    if plus_one {
                        w.vector_plus_one(&name, spec.head_dim)
                    } else {
                        w.vector(&name, spec.head_dim)
                    }
                };
                Some(QkNorm {
                    q: load("q_norm")?,
                    k: load("k_norm")?,
                    eps,
                })
            }
            None => None,
        };
        Ok(SelfAttention {
            layer,
            q: w.linear(&format!("{prefix}.q_proj"), hidden, q_width, qkv_bias)?,
            k: w.linear(&format!("{prefix}.k_proj"), hidden, kv_width, qkv_bias)?,
            v: w.linear(&format!("{prefix}.v_proj"), hidden, kv_width, qkv_bias)?,
            o: w.linear(
                &format!("{prefix}.o_proj"),
                q_width,
                hidden,
                Bias::from(biases.o),
            )?,
            qk_norm,
            spec,
        })
    }

    /// `bufs.out = attention(h)` for the tokens of `batch`, appending their keys and values
    /// to this layer's cache.
    pub fn forward(
        &self,
        b: &B,
        h: &B::Buffer,
        rope: &B::Rope,
        batch: &Batch<'_>,
        cache: &mut B::KvCache,
        bufs: &mut AttentionBuffers<B>,
    ) {
        let n = batch.rows();
        let (heads, kv_heads, head_dim) = (self.spec.heads, self.spec.kv_heads, self.spec.head_dim);
        b.linears(
            h,
            n,
            &mut [
                (&self.q, &mut bufs.q),
                (&self.k, &mut bufs.k),
                (&self.v, &mut bufs.v),
            ],
        );
        if let Some(norm) = &self.qk_norm {
            b.rms_norm_inplace(&mut bufs.q, &norm.q, norm.eps, n * heads);
            b.rms_norm_inplace(&mut bufs.k, &norm.k, norm.eps, n * kv_heads);
        }
        b.rope(&mut bufs.q, rope, heads, head_dim, 0, batch);
        b.rope(&mut bufs.k, rope, kv_heads, head_dim, 0, batch);
        b.kv_append(&bufs.k, &bufs.v, batch, cache, self.layer);
        b.attention(
            &bufs.q,
            &self.spec,
            batch,
            cache,
            self.layer,
            &mut bufs.attn,
        );
        b.linear(&self.o, &bufs.attn, n, &mut bufs.out);
    }
}

/// Activations of the attention block, sized at load.
pub(crate) struct AttentionBuffers<B: Backend> {
    pub q: B::Buffer,
    pub k: B::Buffer,
    pub v: B::Buffer,
    /// Attention output per head, `[rows, heads·head_dim]`.
    pub attn: B::Buffer,
    /// The block's output, `[rows, hidden]`.
    pub out: B::Buffer,
}

impl<B: Backend> AttentionBuffers<B> {
    pub fn alloc(b: &B, rows: usize, hidden: usize, spec: &AttentionSpec) -> Result<Self> {
        let (q_width, kv_width) = (spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim);
        Ok(AttentionBuffers {
            q: b.alloc(rows * q_width)?,
            k: b.alloc(rows * kv_width)?,
            v: b.alloc(rows * kv_width)?,
            attn: b.alloc(rows * q_width)?,
            out: b.alloc(rows * hidden)?,
        })
    }
}

/// The gate's activation in a gated MLP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Activation {
    /// SwiGLU (`silu`).
    Silu,
    /// GeGLU with the tanh approximation (`gelu_pytorch_tanh`).
    GeluTanh,
}

impl Activation {
    /// The activation a config's `hidden_act` / `hidden_activation` names.
    pub fn from_config(name: &str, what: &str) -> Result<Activation> {
        match name {
            "silu" | "swish" => Ok(Activation::Silu),
            "gelu_pytorch_tanh" | "gelu_tanh" => Ok(Activation::GeluTanh),
            other => Err(ModelError::Unsupported(format!(
                "{what}: activation `{other}` is not supported (supported: silu, gelu_pytorch_tanh)"
            ))),
        }
    }
}

/// A gated MLP: `down(act(gate(x)) ⊙ up(x))`.
pub(crate) struct Mlp<B: Backend> {
    pub gate: B::Linear,
    pub up: B::Linear,
    pub down: B::Linear,
    pub intermediate: usize,
    pub activation: Activation,
}

impl<B: Backend> Mlp<B> {
    pub fn load(
        w: &mut Weights<'_, B>,
        prefix: &str,
        hidden: usize,
        intermediate: usize,
        bias: bool,
        activation: Activation,
    ) -> Result<Self> {
        let bias = Bias::from(bias);
        Ok(Mlp {
            gate: w.linear(&format!("{prefix}.gate_proj"), hidden, intermediate, bias)?,
            up: w.linear(&format!("{prefix}.up_proj"), hidden, intermediate, bias)?,
            down: w.linear(&format!("{prefix}.down_proj"), intermediate, hidden, bias)?,
            intermediate,
            activation,
        })
    }

    /// `out = down(act(gate(x)) ⊙ up(x))`; `gate` and `up` are scratch `[rows, intermediate]`.
    pub fn forward(
        &self,
        b: &B,
        x: &B::Buffer,
        rows: usize,
        gate: &mut B::Buffer,
        up: &mut B::Buffer,
        out: &mut B::Buffer,
    ) {
        b.linears(x, rows, &mut [(&self.gate, gate), (&self.up, up)]);
        let len = rows * self.intermediate;
        match self.activation {
            Activation::Silu => b.silu_mul(gate, up, len),
            Activation::GeluTanh => b.gelu_tanh_mul(gate, up, len),
        }
        b.linear(&self.down, gate, rows, out);
    }
}

/// Copy `len` values off the backend for an observer.
pub(crate) fn host_copy<B: Backend>(b: &B, buf: &B::Buffer, len: usize) -> Vec<f32> {
    let mut v = vec![0.0; len];
    b.read(buf, &mut v);
    v
}

/// Check a forward pass's arguments against the sizes fixed at load.
pub(crate) fn check_forward(
    tokens: usize,
    batch: &Batch<'_>,
    logit_rows: &[u32],
    max_rows: usize,
    max_logit_rows: usize,
) -> Result<()> {
    if tokens == 0 || tokens > max_rows || batch.rows() != tokens {
        return Err(ModelError::Invalid(format!(
            "forward of {tokens} tokens with {} batch rows (at most {max_rows} rows per pass)",
            batch.rows(),
        )));
    }
    if logit_rows.len() > max_logit_rows || logit_rows.iter().any(|&r| r as usize >= tokens) {
        return Err(ModelError::Invalid(format!(
            "logits requested for rows {logit_rows:?} of {tokens} (at most {max_logit_rows} rows)",
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedding_scale_is_rounded_to_the_table_dtype() {
        // Gemma 3 4B: √2560 = 50.596…, which bfloat16 holds as 50.5.
        assert_eq!(embedding_scale_in(DType::BF16, 2560), 50.5);
        assert_eq!(embedding_scale_in(DType::F16, 2560), 50.59375);
        assert_eq!(embedding_scale_in(DType::F32, 2560), 2560f32.sqrt());
        assert_eq!(embedding_scale_in(DType::BF16, 64), 8.0);
    }
}

//! The compute layer: a small set of fused operations that every model is written in, and
//! the CPU implementation of them.
//!
//! A backend owns its memory. Weights are uploaded once at load into backend handles
//! ([`Backend::Linear`], [`Backend::Vector`], …); activations live in [`Backend::Buffer`]s that
//! the model allocates once for its largest batch; the KV cache is one pool of fixed-size blocks
//! addressed through per-sequence block tables. Ops take handles and sizes and never allocate,
//! so one decode step is a fixed sequence of op calls over fixed buffers — the shape a CUDA
//! graph capture needs, and the reason the CPU path allocates nothing per token.
//!
//! Every op works on `rows` tokens at once: a prefill chunk of one sequence, or one token of
//! each of several sequences in a batched decode step. [`Batch`] says, per token, its position
//! and sequence, and where each sequence's cache blocks are.

pub mod cpu;
mod spec;

pub use spec::{
    AttentionSpec, Batch, GroupRanking, KvCacheLayout, KvDtype, MlaSpec, RopeSpec, RouterSpec,
    ScoringFunction,
};

use trellis_format::{LinearWeights, TensorView};

/// Why an op or an upload could not be done.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{tensor}: {reason}")]
    Weight { tensor: String, reason: String },
    #[error("unsupported on the {backend} backend: {what}")]
    Unsupported { backend: &'static str, what: String },
    #[error("out of memory allocating {bytes} bytes for {what}")]
    OutOfMemory { what: String, bytes: usize },
    #[error(transparent)]
    Format(#[from] trellis_format::FormatError),
}

pub type Result<T, E = BackendError> = std::result::Result<T, E>;

/// The greedy token of a row of logits: the index of the largest value, the lowest on ties.
/// NaN never wins and +∞ does; `None` when no value is above −∞ (no finite logit to choose).
pub fn argmax(values: &[f32]) -> Option<u32> {
    let max = max_value(values);
    if max == f32::NEG_INFINITY {
        return None;
    }
    values.iter().position(|&v| v == max).map(|i| i as u32)
}

/// What [`Backend::argmax_rows`] writes for a row with no finite logit ([`argmax`]'s `None`).
pub const NO_CHOICE: u32 = u32::MAX;

/// Width of the independent accumulators in [`max_value`], so that it vectorises.
const MAX_LANES: usize = 16;

/// The largest value, ignoring NaN; −∞ when there is none.
pub fn max_value(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; MAX_LANES];
    let chunks = values.chunks_exact(MAX_LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            // `>` is false for NaN, so NaN never becomes the maximum.
            *lane = if v > *lane { v } else { *lane };
        }
    }
    let mut max = f32::NEG_INFINITY;
    for &v in lanes.iter().chain(tail) {
        max = if v > max { v } else { max };
    }
    max
}

/// What fixes the sequence of ops of one forward pass besides the model itself: the step's
/// tokens and batch layout and the rows whose logits are computed. A backend that records a
/// step's ops (a CUDA graph) replays the recording only for steps whose key matches in the
/// ways that change the recorded work (row count, block-table shape, logit rows, …); values
/// that kernels read from device memory (token ids, positions, block ids) may differ.
#[derive(Clone, Copy, Debug)]
pub struct StepKey<'a> {
    pub tokens: &'a [u32],
    pub batch: &'a Batch<'a>,
    pub logit_rows: &'a [u32],
}

/// A gated MLP `down(silu(gate(x)) ⊙ up(x))` as handed to fused ops.
pub struct GatedMlp<'a, B: Backend + ?Sized> {
    pub gate: &'a B::Linear,
    pub up: &'a B::Linear,
    pub down: &'a B::Linear,
    pub intermediate: usize,
}

/// Buffers a fused MoE block may use as scratch (each `[rows, width]` as named); their contents
/// afterwards are unspecified.
pub struct MoeScratch<'a, B: Backend + ?Sized> {
    /// `[rows, hidden]`: the normalised input.
    pub h: &'a mut B::Buffer,
    /// `[rows, hidden]`: the routed experts' sum.
    pub out: &'a mut B::Buffer,
    /// `[rows, hidden]`: the shared expert's output.
    pub shared_out: &'a mut B::Buffer,
    /// `[rows, shared intermediate]` each.
    pub gate: &'a mut B::Buffer,
    pub up: &'a mut B::Buffer,
}

/// The fused operations models are written in.
///
/// Shapes: activations are row-major `[rows, width]` f32; `rows` ≤ the rows the buffer was
/// allocated for. Inputs and outputs of one op are distinct buffers unless the op says it
/// works in place.
pub trait Backend {
    /// Activations and scratch, f32.
    type Buffer;
    /// A linear layer: EXL3 trellis (decoded on the fly) or dense f32/f16/bf16.
    type Linear;
    /// A small f32 vector (norm weights, biases, router bias).
    type Vector;
    /// A token embedding table.
    type Embedding;
    /// Rotary embedding frequencies.
    type Rope;
    /// MoE router: gate weight, selection bias and routing rule.
    type Router;
    /// Routed experts of one MoE layer (gated MLPs).
    type Experts;
    /// Per-token expert choices and weights produced by [`Backend::moe_route`].
    type Routing;
    /// MLA `kv_b_proj` prepared for absorbed attention.
    type MlaKvB;
    /// Paged KV cache of all layers.
    type KvCache;

    fn name(&self) -> &'static str;

    /// Bytes the backend could still allocate (host RAM for the CPU, device memory for a GPU),
    /// used to size the KV cache when the user does not; `None` when unknown.
    fn free_memory(&self) -> Option<u64> {
        None
    }

    /// Memory read bandwidth in bytes per second, measured now by streaming a buffer much
    /// larger than the caches (the denominator of roofline figures); `None` when unsupported.
    fn measure_read_bandwidth(&self) -> Option<f64> {
        None
    }

    /// Peak memory this backend has held (device memory for a GPU); `None` for the CPU, whose
    /// memory is the process's resident set.
    fn peak_memory(&self) -> Option<u64> {
        None
    }

    // ---- uploads and allocation (load time) -------------------------------------------
    fn upload_linear(&self, name: &str, weights: &LinearWeights<'_>) -> Result<Self::Linear>;
    /// Weight bytes one product with `w` reads where the backend holds the linear in another
    /// form than the file's (a dequantized trellis linear); `None`: the file's bytes.
    fn linear_bytes(&self, _w: &Self::Linear) -> Option<u64> {
        None
    }
    fn upload_vector(&self, values: &[f32]) -> Result<Self::Vector>;
    fn upload_embedding(&self, table: &TensorView<'_>) -> Result<Self::Embedding>;
    fn upload_rope(&self, spec: &RopeSpec) -> Result<Self::Rope>;
    fn upload_router(
        &self,
        gate: &LinearWeights<'_>,
        selection_bias: Option<&[f32]>,
        spec: &RouterSpec,
    ) -> Result<Self::Router>;
    /// `experts[e] = (gate_proj, up_proj, down_proj)`.
    fn upload_experts(
        &self,
        experts: Vec<(Self::Linear, Self::Linear, Self::Linear)>,
    ) -> Result<Self::Experts>;
    /// `kv_b_proj` weight `[heads·(qk_nope + v), kv_lora_rank]` (HF orientation).
    fn upload_mla_kv_b(&self, weights: &LinearWeights<'_>, spec: &MlaSpec) -> Result<Self::MlaKvB>;
    /// Bytes one decode step reads from `kv_b` where the backend holds it in another form than
    /// the file's (`--kv-b-int8`); `None`: the file's bytes.
    fn mla_kv_b_bytes(&self, _kv_b: &Self::MlaKvB) -> Option<u64> {
        None
    }
    fn alloc(&self, len: usize) -> Result<Self::Buffer>;
    fn alloc_routing(&self, rows: usize, top_k: usize) -> Result<Self::Routing>;
    fn alloc_kv_cache(&self, layout: &KvCacheLayout) -> Result<Self::KvCache>;

    // ---- host transfers ----------------------------------------------------------------
    fn write(&self, dst: &mut Self::Buffer, src: &[f32]);
    fn read(&self, src: &Self::Buffer, dst: &mut [f32]);
    /// `dst[r]` = [`argmax`] of row r of `src` (rows of `width` values), or [`NO_CHOICE`], for
    /// the first `dst.len()` rows: greedy decoding reads back one id per row, not the row.
    fn argmax_rows(&self, src: &Self::Buffer, width: usize, dst: &mut [u32]);
    /// Expert ids and weights of the first `rows` tokens (`rows × top_k` each).
    fn read_routing(&self, routing: &Self::Routing, rows: usize) -> (Vec<u32>, Vec<f32>);

    // ---- ops -----------------------------------------------------------------------------
    /// Make one forward pass's inputs (token ids, positions, sequences, block tables) visible
    /// to the ops that follow. Called once per forward pass before any op; a device backend
    /// copies them into buffers it owns (the only host-to-device traffic of a step), the CPU
    /// backend reads them in place.
    fn begin_step(&self, tokens: &[u32], batch: &Batch<'_>);
    /// `out[i] = table[tokens[i]] · scale`.
    fn embed(&self, table: &Self::Embedding, tokens: &[u32], scale: f32, out: &mut Self::Buffer);
    /// Row-wise `out = x / rms(x) · weight` over rows of `weight.len()` values.
    fn rms_norm(
        &self,
        x: &Self::Buffer,
        weight: &Self::Vector,
        eps: f32,
        rows: usize,
        out: &mut Self::Buffer,
    );
    /// In-place RMSNorm of `rows` consecutive vectors of `weight.len()` values (per-head norms).
    fn rms_norm_inplace(&self, x: &mut Self::Buffer, weight: &Self::Vector, eps: f32, rows: usize);
    /// `out = x · W (+ bias)` for `rows` rows.
    fn linear(&self, w: &Self::Linear, x: &Self::Buffer, rows: usize, out: &mut Self::Buffer);
    /// `dst[j] = src[rows[j]]` for rows of `width` values.
    fn copy_rows(&self, src: &Self::Buffer, width: usize, rows: &[u32], dst: &mut Self::Buffer);
    /// `x += y` over the first `len` values.
    fn add(&self, x: &mut Self::Buffer, y: &Self::Buffer, len: usize);
    /// `gate = silu(gate) ⊙ up` over the first `len` values.
    fn silu_mul(&self, gate: &mut Self::Buffer, up: &Self::Buffer, len: usize);
    /// `gate = gelu_tanh(gate) ⊙ up` over the first `len` values.
    fn gelu_tanh_mul(&self, gate: &mut Self::Buffer, up: &Self::Buffer, len: usize);
    /// Rotate dims `offset .. offset + rope.dim()` of each of `heads` heads (stride `head_dim`)
    /// of every token, at that token's position.
    fn rope(
        &self,
        x: &mut Self::Buffer,
        rope: &Self::Rope,
        heads: usize,
        head_dim: usize,
        offset: usize,
        batch: &Batch<'_>,
    );

    /// Write each token's key and value rows into its cache slot (`k`, `v`: `[rows, kv_heads·head_dim]`).
    fn kv_append(
        &self,
        k: &Self::Buffer,
        v: &Self::Buffer,
        batch: &Batch<'_>,
        cache: &mut Self::KvCache,
        layer: usize,
    );
    /// Causal GQA attention of each token over its sequence's cache (including itself).
    fn attention(
        &self,
        q: &Self::Buffer,
        spec: &AttentionSpec,
        batch: &Batch<'_>,
        cache: &Self::KvCache,
        layer: usize,
        out: &mut Self::Buffer,
    );

    /// MLA: from `kv_a_proj_with_mqa` output `[rows, kv_lora_rank + rope]`, RMS-normalise the
    /// latent, rotate the shared rope key, and write both into the latent cache.
    #[allow(clippy::too_many_arguments)]
    fn mla_append(
        &self,
        ckv: &Self::Buffer,
        kv_norm: &Self::Vector,
        rope: &Self::Rope,
        spec: &MlaSpec,
        batch: &Batch<'_>,
        cache: &mut Self::KvCache,
        layer: usize,
    );
    /// MLA attention over the latent cache. `q` is `[rows, heads·(qk_nope + qk_rope)]`
    /// (rope part unrotated; rotated in place); `out` is `[rows, heads·v_head_dim]`.
    #[allow(clippy::too_many_arguments)]
    fn mla_attention(
        &self,
        q: &mut Self::Buffer,
        kv_b: &Self::MlaKvB,
        rope: &Self::Rope,
        spec: &MlaSpec,
        batch: &Batch<'_>,
        cache: &Self::KvCache,
        layer: usize,
        out: &mut Self::Buffer,
    );

    /// [`Backend::mla_append`] then [`Backend::mla_attention`] — the step's latent rows
    /// written, then attended over — which a backend may do in fewer launches.
    #[allow(clippy::too_many_arguments)]
    fn mla_append_attention(
        &self,
        ckv: &Self::Buffer,
        kv_norm: &Self::Vector,
        q: &mut Self::Buffer,
        kv_b: &Self::MlaKvB,
        rope: &Self::Rope,
        spec: &MlaSpec,
        batch: &Batch<'_>,
        cache: &mut Self::KvCache,
        layer: usize,
        out: &mut Self::Buffer,
    ) {
        self.mla_append(ckv, kv_norm, rope, spec, batch, cache, layer);
        self.mla_attention(q, kv_b, rope, spec, batch, cache, layer, out);
    }

    /// Choose experts and their weights for each token.
    fn moe_route(
        &self,
        router: &Self::Router,
        x: &Self::Buffer,
        rows: usize,
        routing: &mut Self::Routing,
    );
    /// `out = Σ_j weight_j · expert_j(x)` over each token's chosen experts (overwrites `out`).
    fn moe_experts(
        &self,
        experts: &Self::Experts,
        x: &Self::Buffer,
        rows: usize,
        routing: &Self::Routing,
        out: &mut Self::Buffer,
    );

    // ---- whole steps and fused ops (defaults in terms of the ops above) -------------------

    /// Run one forward pass: `step` enqueues its ops (starting with [`Backend::begin_step`] of
    /// `key`'s tokens and batch) and reads nothing back; results are read after this returns.
    /// A device backend may record the ops it sees for a key and later replay the recording:
    /// `step` is still called (so its host-side bookkeeping and checks run) but its ops then
    /// enqueue nothing, so `step` must enqueue the same ops for equal keys and must not read
    /// results on the host. An error from `step` is returned and nothing of that step runs
    /// after it. The default just runs `step`.
    fn run_step<E>(
        &self,
        key: &StepKey<'_>,
        step: &mut dyn FnMut() -> Result<(), E>,
    ) -> Result<(), E> {
        let _ = key;
        step()
    }

    /// `h = RMSNorm(x)·norm` (rows of `norm`'s width), then `out_i = h · W_i` for each pair of
    /// `linears` (all reading `h`). `h` is scratch: a backend that fuses the norm into the
    /// products may leave it unwritten.
    fn rms_norm_linears(
        &self,
        x: &Self::Buffer,
        norm: &Self::Vector,
        eps: f32,
        rows: usize,
        h: &mut Self::Buffer,
        linears: &mut [(&Self::Linear, &mut Self::Buffer)],
    ) {
        self.rms_norm(x, norm, eps, rows, h);
        self.linears(h, rows, linears);
    }

    /// `out_i = x · W_i` for each pair of `linears` (all reading `x`): a layer's products of
    /// one input (q, k and v; gate and up) as one op, which a backend may run together.
    fn linears(
        &self,
        x: &Self::Buffer,
        rows: usize,
        linears: &mut [(&Self::Linear, &mut Self::Buffer)],
    ) {
        for (w, out) in linears.iter_mut() {
            self.linear(w, x, rows, out);
        }
    }

    /// `residual += x · W` (`out_features` values per row); `tmp` (`[rows, out_features]`) is
    /// scratch.
    fn linear_add(
        &self,
        w: &Self::Linear,
        x: &Self::Buffer,
        rows: usize,
        out_features: usize,
        tmp: &mut Self::Buffer,
        residual: &mut Self::Buffer,
    ) {
        self.linear(w, x, rows, tmp);
        self.add(residual, tmp, rows * out_features);
    }

    /// A whole MoE feed-forward block with its residual: `h = RMSNorm(x)·norm`, route `h`
    /// (the choices are left in `routing`), then
    /// `x += Σ_j weight_j · expert_j(h) + shared(h)` (experts in ascending id order, the shared
    /// expert's output added to their sum before the residual). `hidden` is `x`'s row width.
    #[allow(clippy::too_many_arguments)]
    fn moe_block(
        &self,
        x: &mut Self::Buffer,
        norm: &Self::Vector,
        eps: f32,
        rows: usize,
        hidden: usize,
        router: &Self::Router,
        experts: &Self::Experts,
        shared: Option<&GatedMlp<'_, Self>>,
        routing: &mut Self::Routing,
        scratch: MoeScratch<'_, Self>,
    ) {
        let MoeScratch {
            h,
            out,
            shared_out,
            gate,
            up,
        } = scratch;
        self.rms_norm(x, norm, eps, rows, h);
        self.moe_route(router, h, rows, routing);
        self.moe_experts(experts, h, rows, routing, out);
        if let Some(mlp) = shared {
            self.linear(mlp.gate, h, rows, gate);
            self.linear(mlp.up, h, rows, up);
            self.silu_mul(gate, up, rows * mlp.intermediate);
            self.linear(mlp.down, gate, rows, shared_out);
            self.add(out, shared_out, rows * hidden);
        }
        self.add(x, out, rows * hidden);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_largest_and_never_nan() {
        assert_eq!(argmax(&[1.0, 3.0, -2.0, 3.0]), Some(1));
        assert_eq!(argmax(&[1.0, f32::NAN, 3.0, 3.0]), Some(2));
        assert_eq!(argmax(&[f32::NAN, 5.0, 7.0]), Some(2));
        assert_eq!(argmax(&[f32::NEG_INFINITY, -0.0, 0.0]), Some(1));
        assert_eq!(argmax(&[2.0, f32::INFINITY, f32::INFINITY]), Some(1));
        assert_eq!(argmax(&[f32::NAN, f32::NEG_INFINITY]), None);
        assert_eq!(argmax(&[]), None);
        let long: Vec<f32> = (0..100).map(|i| ((i * 37) % 101) as f32).collect();
        assert_eq!(argmax(&long), Some(30)); // 30 · 37 = 1110 = 100 (mod 101)
    }

    #[test]
    fn cpu_argmax_rows_takes_each_row() {
        let cpu = cpu::CpuBackend::new();
        let nan = f32::NAN;
        let values = cpu::CpuBuffer(vec![
            0.5, 2.0, 1.0, 9.0, -1.0, 9.0, 0.0, 0.0, 0.0, nan, nan, nan,
        ]);
        let mut ids = [7; 2];
        cpu.argmax_rows(&values, 3, &mut ids);
        assert_eq!(ids, [1, 0]);
        let mut all = [7; 4];
        cpu.argmax_rows(&values, 3, &mut all);
        assert_eq!(all, [1, 0, 0, NO_CHOICE]);
    }
}

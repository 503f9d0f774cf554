//! Hessian capture: a [`Backend`] that runs every op on the CPU backend and, while capturing,
//! adds `xᵀx` of the inputs of chosen linears to their input group's accumulator.
//!
//! The model code is unchanged: the quantizer tags linear names before a layer is loaded
//! ([`CaptureBackend::set_tags`]); the upload of a tagged linear remembers its tag, and
//! [`Backend::linear`] feeds the input rows to the tag's accumulator. Linears that share an
//! input share a group, and only one of them (the tag's `capture` flag) records it.
//!
//! Mixture-of-experts blocks are evaluated here rather than by the CPU backend so that, while
//! capturing, every calibration token reaches every expert (as ExLlamaV3's
//! `calibration_all_experts`): the experts' shared input is recorded once, and each expert's
//! `down_proj` input is its activation over all tokens. The block's output still uses the
//! router's choices, so the hidden states that flow on are the model's.

use crate::hessian::HessianAccumulator;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use trellis_backend::cpu::{
    CpuBackend, CpuBuffer, CpuEmbedding, CpuKvCache, CpuLinear, CpuMlaKvB, CpuRouter, CpuRouting,
    DenseData, silu_mul,
};
use trellis_backend::{
    AttentionSpec, Backend, Batch, KvCacheLayout, MlaSpec, Result, RopeSpec, RouterSpec,
};
use trellis_format::{LinearWeights, TensorView};

/// Where a linear's input goes while capturing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CaptureTag {
    /// The input group (one Hessian per group).
    pub group: usize,
    /// Whether this linear records the group's input (one member per group does).
    pub capture: bool,
    /// Its output only flows into the layer's output (an MLP's or expert's `down_proj`): a
    /// capture pass, whose layer output is thrown away, records its input and skips it.
    pub ends_layer: bool,
}

/// A linear on the CPU backend with its capture tag.
pub struct CaptureLinear {
    pub inner: CpuLinear,
    pub tag: Option<CaptureTag>,
}

/// Routed experts, evaluated by [`CaptureBackend::moe_experts`].
pub struct CaptureExperts {
    pub experts: Vec<(CaptureLinear, CaptureLinear, CaptureLinear)>,
}

/// The CPU backend with Hessian capture.
pub struct CaptureBackend {
    cpu: CpuBackend,
    tags: RefCell<HashMap<String, CaptureTag>>,
    accumulators: RefCell<HashMap<usize, HessianAccumulator>>,
    capturing: Cell<bool>,
    dense_trellis: Cell<bool>,
}

impl Default for CaptureBackend {
    fn default() -> Self {
        CaptureBackend::new()
    }
}

impl CaptureBackend {
    pub fn new() -> CaptureBackend {
        CaptureBackend {
            cpu: CpuBackend::new(),
            tags: RefCell::new(HashMap::new()),
            accumulators: RefCell::new(HashMap::new()),
            capturing: Cell::new(false),
            dense_trellis: Cell::new(false),
        }
    }

    /// Tags for the linears uploaded from now on, by name; also starts empty accumulators for
    /// their groups, of the given input widths.
    pub fn set_tags(&self, tags: HashMap<String, CaptureTag>, group_widths: &[(usize, usize)]) {
        *self.tags.borrow_mut() = tags;
        let mut acc = self.accumulators.borrow_mut();
        acc.clear();
        for &(group, width) in group_widths {
            acc.insert(group, HessianAccumulator::new(width));
        }
    }

    /// Turn recording on or off (off: a plain CPU backend). While on, the layer's output is
    /// not computed (see [`CaptureTag::ends_layer`]).
    pub fn set_capturing(&self, on: bool) {
        self.capturing.set(on);
    }

    /// Upload trellis linears from now on as their exact dense f32 weights. The quantizer runs
    /// each quantized layer over all calibration rows (1024 tokens a call), where a dense
    /// matrix product is 1.6–2.5× faster than decoding the trellis inside the product
    /// (`dense_linear` vs `trellis_gemv` examples), and exact rather than int8-approximate; the
    /// cost is the layer's weights in f32 while it runs.
    pub fn set_dense_trellis(&self, on: bool) {
        self.dense_trellis.set(on);
    }

    /// Whether a capture pass skips this linear's output.
    fn skips_output(&self, tag: Option<CaptureTag>) -> bool {
        self.capturing.get() && tag.is_some_and(|t| t.ends_layer)
    }

    /// The accumulators recorded since [`CaptureBackend::set_tags`], by group.
    pub fn take_accumulators(&self) -> HashMap<usize, HessianAccumulator> {
        std::mem::take(&mut *self.accumulators.borrow_mut())
    }

    fn record(&self, tag: Option<CaptureTag>, x: &[f32], rows: usize) {
        if !self.capturing.get() {
            return;
        }
        if let Some(CaptureTag {
            group,
            capture: true,
            ..
        }) = tag
            && let Some(acc) = self.accumulators.borrow_mut().get_mut(&group)
        {
            let width = acc.dim();
            acc.add(&x[..rows * width], rows);
        }
    }
}

impl Backend for CaptureBackend {
    type Buffer = CpuBuffer;
    type Linear = CaptureLinear;
    type Vector = Vec<f32>;
    type Embedding = CpuEmbedding;
    type Rope = RopeSpec;
    type Router = CpuRouter;
    type Experts = CaptureExperts;
    type Routing = CpuRouting;
    type MlaKvB = CpuMlaKvB;
    type KvCache = CpuKvCache;

    fn name(&self) -> &'static str {
        "cpu (capturing)"
    }

    fn upload_linear(&self, name: &str, weights: &LinearWeights<'_>) -> Result<CaptureLinear> {
        let inner = match weights {
            LinearWeights::Trellis(t) if self.dense_trellis.get() => CpuLinear::Dense {
                weight: DenseData::F32(t.dequantize_transposed().into()),
                bias: t
                    .bias
                    .as_ref()
                    .map(|b| b[..t.out_features].iter().map(|v| v.to_f32()).collect()),
                in_features: t.in_features,
                out_features: t.out_features,
            },
            _ => self.cpu.upload_linear(name, weights)?,
        };
        Ok(CaptureLinear {
            inner,
            tag: self.tags.borrow().get(name).copied(),
        })
    }

    fn upload_vector(&self, values: &[f32]) -> Result<Vec<f32>> {
        self.cpu.upload_vector(values)
    }

    fn upload_embedding(&self, table: &TensorView<'_>) -> Result<CpuEmbedding> {
        self.cpu.upload_embedding(table)
    }

    fn upload_rope(&self, spec: &RopeSpec) -> Result<RopeSpec> {
        self.cpu.upload_rope(spec)
    }

    fn upload_router(
        &self,
        gate: &LinearWeights<'_>,
        selection_bias: Option<&[f32]>,
        spec: &RouterSpec,
    ) -> Result<CpuRouter> {
        self.cpu.upload_router(gate, selection_bias, spec)
    }

    fn upload_experts(
        &self,
        experts: Vec<(CaptureLinear, CaptureLinear, CaptureLinear)>,
    ) -> Result<CaptureExperts> {
        Ok(CaptureExperts { experts })
    }

    fn upload_mla_kv_b(&self, weights: &LinearWeights<'_>, spec: &MlaSpec) -> Result<CpuMlaKvB> {
        self.cpu.upload_mla_kv_b(weights, spec)
    }

    fn alloc(&self, len: usize) -> Result<CpuBuffer> {
        self.cpu.alloc(len)
    }

    fn alloc_routing(&self, rows: usize, top_k: usize) -> Result<CpuRouting> {
        self.cpu.alloc_routing(rows, top_k)
    }

    fn alloc_kv_cache(&self, layout: &KvCacheLayout) -> Result<CpuKvCache> {
        self.cpu.alloc_kv_cache(layout)
    }

    fn write(&self, dst: &mut CpuBuffer, src: &[f32]) {
        self.cpu.write(dst, src)
    }

    fn read(&self, src: &CpuBuffer, dst: &mut [f32]) {
        self.cpu.read(src, dst)
    }

    fn argmax_rows(&self, src: &CpuBuffer, width: usize, dst: &mut [u32]) {
        self.cpu.argmax_rows(src, width, dst)
    }

    fn read_routing(&self, routing: &CpuRouting, rows: usize) -> (Vec<u32>, Vec<f32>) {
        self.cpu.read_routing(routing, rows)
    }

    fn begin_step(&self, tokens: &[u32], batch: &Batch<'_>) {
        self.cpu.begin_step(tokens, batch)
    }

    fn embed(&self, table: &CpuEmbedding, tokens: &[u32], scale: f32, out: &mut CpuBuffer) {
        self.cpu.embed(table, tokens, scale, out)
    }

    fn rms_norm(&self, x: &CpuBuffer, w: &Vec<f32>, eps: f32, rows: usize, out: &mut CpuBuffer) {
        self.cpu.rms_norm(x, w, eps, rows, out)
    }

    fn rms_norm_inplace(&self, x: &mut CpuBuffer, w: &Vec<f32>, eps: f32, rows: usize) {
        self.cpu.rms_norm_inplace(x, w, eps, rows)
    }

    fn linear(&self, w: &CaptureLinear, x: &CpuBuffer, rows: usize, out: &mut CpuBuffer) {
        self.record(w.tag, &x.0, rows);
        if self.skips_output(w.tag) {
            out.0[..rows * w.inner.out_features()].fill(0.0);
            return;
        }
        self.cpu.linear(&w.inner, x, rows, out)
    }

    fn copy_rows(&self, src: &CpuBuffer, width: usize, rows: &[u32], dst: &mut CpuBuffer) {
        self.cpu.copy_rows(src, width, rows, dst)
    }

    fn add(&self, x: &mut CpuBuffer, y: &CpuBuffer, len: usize) {
        self.cpu.add(x, y, len)
    }

    fn silu_mul(&self, gate: &mut CpuBuffer, up: &CpuBuffer, len: usize) {
        self.cpu.silu_mul(gate, up, len)
    }

    fn gelu_tanh_mul(&self, gate: &mut CpuBuffer, up: &CpuBuffer, len: usize) {
        self.cpu.gelu_tanh_mul(gate, up, len)
    }

    fn rope(
        &self,
        x: &mut CpuBuffer,
        rope: &RopeSpec,
        heads: usize,
        head_dim: usize,
        offset: usize,
        batch: &Batch<'_>,
    ) {
        self.cpu.rope(x, rope, heads, head_dim, offset, batch)
    }

    fn kv_append(
        &self,
        k: &CpuBuffer,
        v: &CpuBuffer,
        batch: &Batch<'_>,
        cache: &mut CpuKvCache,
        layer: usize,
    ) {
        self.cpu.kv_append(k, v, batch, cache, layer)
    }

    fn attention(
        &self,
        q: &CpuBuffer,
        spec: &AttentionSpec,
        batch: &Batch<'_>,
        cache: &CpuKvCache,
        layer: usize,
        out: &mut CpuBuffer,
    ) {
        self.cpu.attention(q, spec, batch, cache, layer, out)
    }

    fn mla_append(
        &self,
        ckv: &CpuBuffer,
        kv_norm: &Vec<f32>,
        rope: &RopeSpec,
        spec: &MlaSpec,
        batch: &Batch<'_>,
        cache: &mut CpuKvCache,
        layer: usize,
    ) {
        self.cpu
            .mla_append(ckv, kv_norm, rope, spec, batch, cache, layer)
    }

    fn mla_attention(
        &self,
        q: &mut CpuBuffer,
        kv_b: &CpuMlaKvB,
        rope: &RopeSpec,
        spec: &MlaSpec,
        batch: &Batch<'_>,
        cache: &CpuKvCache,
        layer: usize,
        out: &mut CpuBuffer,
    ) {
        self.cpu
            .mla_attention(q, kv_b, rope, spec, batch, cache, layer, out)
    }

    fn moe_route(&self, router: &CpuRouter, x: &CpuBuffer, rows: usize, routing: &mut CpuRouting) {
        self.cpu.moe_route(router, x, rows, routing)
    }

    /// `out = Σ_j weight_j · expert_j(x)` over each token's chosen experts; while capturing,
    /// every expert also runs on every token to record its `down_proj` input.
    fn moe_experts(
        &self,
        experts: &CaptureExperts,
        x: &CpuBuffer,
        rows: usize,
        routing: &CpuRouting,
        out: &mut CpuBuffer,
    ) {
        let Some((first_gate, _, _)) = experts.experts.first() else {
            return;
        };
        let hidden = first_gate.inner.in_features();
        let inter = first_gate.inner.out_features();
        let x = &x.0[..rows * hidden];
        self.record(first_gate.tag, x, rows);
        let out = &mut out.0[..rows * hidden];
        out.fill(0.0);
        let capturing = self.capturing.get();
        let k = routing.top_k;
        let mut gathered = vec![0.0f32; rows * hidden];
        let mut gate = vec![0.0f32; rows * inter];
        let mut up = vec![0.0f32; rows * inter];
        let mut act = vec![0.0f32; rows * inter];
        let mut down = vec![0.0f32; rows * hidden];
        for (e, (w_gate, w_up, w_down)) in experts.experts.iter().enumerate() {
            let chosen: Vec<(usize, f32)> = (0..rows)
                .flat_map(|r| (0..k).map(move |j| (r, j)))
                .filter(|&(r, j)| routing.ids[r * k + j] as usize == e)
                .map(|(r, j)| (r, routing.weights[r * k + j]))
                .collect();
            let record_down = capturing && w_down.tag.is_some_and(|t| t.capture);
            if record_down {
                // Every token through this expert: its activation is the down input.
                w_gate.inner.forward(x, rows, &mut gate);
                w_up.inner.forward(x, rows, &mut up);
                silu_mul(&mut gate, &up);
                self.record(w_down.tag, &gate, rows);
                for (c, &(r, _)) in chosen.iter().enumerate() {
                    act[c * inter..(c + 1) * inter]
                        .copy_from_slice(&gate[r * inter..(r + 1) * inter]);
                }
            } else {
                if chosen.is_empty() {
                    continue;
                }
                for (c, &(r, _)) in chosen.iter().enumerate() {
                    gathered[c * hidden..(c + 1) * hidden]
                        .copy_from_slice(&x[r * hidden..(r + 1) * hidden]);
                }
                let count = chosen.len();
                w_gate.inner.forward(&gathered, count, &mut gate);
                w_up.inner.forward(&gathered, count, &mut up);
                silu_mul(&mut gate[..count * inter], &up[..count * inter]);
                act[..count * inter].copy_from_slice(&gate[..count * inter]);
            }
            let count = chosen.len();
            if count == 0 || self.skips_output(w_down.tag) {
                continue;
            }
            w_down.inner.forward(&act, count, &mut down);
            for (c, &(r, weight)) in chosen.iter().enumerate() {
                for (o, &d) in out[r * hidden..(r + 1) * hidden]
                    .iter_mut()
                    .zip(&down[c * hidden..(c + 1) * hidden])
                {
                    *o += weight * d;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use trellis_codec::linear::TrellisLinear;
    use trellis_codec::{BitWidth, Codebook};

    fn random_trellis(rng: &mut StdRng, in_f: usize, out_f: usize) -> TrellisLinear<'static> {
        let bits = BitWidth::from_f64(4.0).expect("a width");
        trellis_testutil::random_trellis(rng, in_f, out_f, bits, Codebook::Mul1, true)
    }

    fn inputs(rng: &mut StdRng, len: usize) -> CpuBuffer {
        CpuBuffer((0..len).map(|_| rng.random_range(-2.0f32..2.0)).collect())
    }

    #[test]
    fn dense_trellis_uploads_run_the_exact_layer() {
        let mut rng = StdRng::seed_from_u64(3);
        let (in_f, out_f, rows) = (300, 200, 40);
        let t = random_trellis(&mut rng, in_f, out_f);
        let backend = CaptureBackend::new();
        backend.set_dense_trellis(true);
        let dense = backend
            .upload_linear("w", &LinearWeights::Trellis(t.clone()))
            .expect("upload");
        backend.set_dense_trellis(false);
        assert!(matches!(dense.inner, CpuLinear::Dense { .. }));
        let x = inputs(&mut rng, rows * in_f);
        let mut y = CpuBuffer(vec![0.0; rows * out_f]);
        backend.linear(&dense, &x, rows, &mut y);
        // NaN or infinity never passes max_abs_rel.
        let err = trellis_testutil::max_abs_rel(&y.0, &t.apply(&x.0, rows));
        assert!(err <= 1e-5, "max error {err:.3e} × max|y|");
    }

    #[test]
    fn capture_records_a_layer_end_and_skips_its_product() {
        let mut rng = StdRng::seed_from_u64(4);
        let (in_f, out_f, rows) = (128, 128, 24);
        let t = random_trellis(&mut rng, in_f, out_f);
        let backend = CaptureBackend::new();
        let tag = CaptureTag {
            group: 7,
            capture: true,
            ends_layer: true,
        };
        backend.set_tags(HashMap::from([("down".to_string(), tag)]), &[(7, in_f)]);
        let w = backend
            .upload_linear("down", &LinearWeights::Trellis(t))
            .expect("upload");
        let x = inputs(&mut rng, rows * in_f);
        let mut y = CpuBuffer(vec![1.0; rows * out_f]);
        backend.linear(&w, &x, rows, &mut y);
        assert!(y.0.iter().all(|&v| v != 0.0), "computed when not capturing");
        let computed = y.0.clone();

        backend.set_capturing(true);
        backend.linear(&w, &x, rows, &mut y);
        backend.set_capturing(false);
        assert!(
            y.0.iter().all(|&v| v == 0.0),
            "a capture pass skips a layer end"
        );
        let acc = backend.take_accumulators();
        assert_eq!(acc[&7].rows(), rows as u64, "the input is still recorded");

        backend.linear(&w, &x, rows, &mut y);
        assert_eq!(y.0, computed);
    }
}

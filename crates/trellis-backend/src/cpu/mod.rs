//! The CPU backend: plain f32 arithmetic, multi-threaded with rayon over all cores.
//!
//! Weights are copied out of the memory map into backend-owned memory at upload (so the
//! map can be dropped after load and resident memory stays ≈ the file size); EXL3 linears
//! keep their packed trellis words and decode tiles inside the product.

mod attention;
mod kv;
mod linear;
pub mod matmul;
mod moe;
mod ops;
pub mod profile;
mod scratch;
pub mod simd;
pub mod trellis_kernels;

pub use attention::{Int8Matrix, KvBWeight, MlaKvB as CpuMlaKvB, MlaMode, cheaper_mode};
pub use kv::{CpuKvCache, KvData};
pub use linear::{CpuLinear, DenseData};
pub use moe::{CpuExperts, CpuRouter, CpuRouting};
pub use ops::silu_mul;

use crate::spec::{AttentionSpec, Batch, KvCacheLayout, MlaSpec, RopeSpec, RouterSpec};
use crate::{Backend, BackendError, GatedMlp, MoeScratch, Result};
use half::bf16;
use std::sync::Mutex;
use trellis_format::{DType, LinearWeights, TensorView};

/// Activations on the CPU.
pub struct CpuBuffer(pub Vec<f32>);

/// An embedding table, kept in its stored precision.
pub struct CpuEmbedding {
    pub table: DenseData,
    pub vocab: usize,
    pub hidden: usize,
}

/// The CPU backend. Ops run on rayon's global pool: size it once per process with
/// [`set_threads`] (the default is one thread per core).
pub struct CpuBackend {
    /// Dense tensors already copied, by where their bytes live in the model file: a tied
    /// output head then shares the embedding table instead of holding a second copy. Only
    /// uploads (at load) touch it.
    uploaded_dense: Mutex<Vec<UploadedDense>>,
    /// Hold MLA's `kv_b_proj` as [`Int8Matrix`] instead of the file's precision.
    kv_b_int8: bool,
}

struct UploadedDense {
    bytes: (usize, usize),
    data: DenseData,
}

impl CpuBackend {
    pub fn new() -> CpuBackend {
        CpuBackend {
            uploaded_dense: Mutex::new(Vec::new()),
            kv_b_int8: false,
        }
    }

    /// A tensor's values in its own precision, shared with an earlier upload of the same bytes.
    fn dense_data(&self, view: &TensorView<'_>) -> Result<DenseData> {
        let key = (view.bytes.as_ptr() as usize, view.bytes.len());
        let mut uploaded = self
            .uploaded_dense
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // The address alone could belong to an earlier, since unmapped file.
        if let Some(found) = uploaded
            .iter()
            .find(|u| u.bytes == key && u.data.as_bytes() == view.bytes)
        {
            return Ok(found.data.clone());
        }
        let data = copy_dense(view)?;
        uploaded.push(UploadedDense {
            bytes: key,
            data: data.clone(),
        });
        Ok(data)
    }

    /// Round MLA's `kv_b_proj` to int8 at load (set before loading a model): half the
    /// memory of f16 and of the bytes each decode step reads from it, for results that
    /// differ from the file's weights by the rounding (see [`Int8Matrix`]).
    pub fn set_kv_b_int8(&mut self, on: bool) {
        self.kv_b_int8 = on;
    }

    pub fn threads(&self) -> usize {
        rayon::current_num_threads()
    }

    /// [`Backend::mla_attention`] evaluated the given way instead of the automatic choice
    /// (for tests and measurements). `Expanded` needs every row in one sequence.
    #[allow(clippy::too_many_arguments)]
    pub fn mla_attention_mode(
        &self,
        mode: MlaMode,
        q: &mut CpuBuffer,
        kv_b: &CpuMlaKvB,
        rope: &RopeSpec,
        spec: &MlaSpec,
        batch: &Batch<'_>,
        cache: &CpuKvCache,
        layer: usize,
        out: &mut CpuBuffer,
    ) {
        attention::mla_attention_with(
            mode, &mut q.0, kv_b, rope, spec, batch, cache, layer, &mut out.0,
        );
    }
}

impl Drop for CpuBackend {
    fn drop(&mut self) {
        if profile::enabled() {
            eprint!("{}", profile::report());
        }
    }
}

impl Default for CpuBackend {
    fn default() -> Self {
        CpuBackend::new()
    }
}

/// Which thread will call the CPU ops once the pool exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpsThread {
    /// The thread sizing the pool (a command's main thread, which loads and runs the model):
    /// it becomes one of the pool's workers, so an op's parallel region starts and joins on
    /// it without handing the work to the pool and sleeping until the pool is done (~10–20 µs
    /// a region on the AMD EPYC dev box, and a decode step of GLM runs ~330 regions).
    This,
    /// Another thread (a server's engine thread, or several): every worker is the pool's own.
    /// A pool worker that never yields to rayon would hold back any work handed to it.
    Other,
}

/// Size the global thread pool used by CPU ops (0 = one thread per core). Must be called
/// before any op runs; later calls fail because the pool already exists.
pub fn set_threads(threads: usize, ops_thread: OpsThread) -> Result<()> {
    let builder = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("trellis-cpu-{i}"));
    let builder = match ops_thread {
        OpsThread::This => builder.use_current_thread(),
        OpsThread::Other => builder,
    };
    builder
        .build_global()
        .map_err(|e| BackendError::Unsupported {
            backend: "cpu",
            what: format!("thread pool of {threads} threads: {e}"),
        })
}

/// Bytes per second of a streaming read of a `bytes`-sized buffer on every pool thread
/// (best of three passes after one warm-up), the way decode streams weights.
pub fn measure_read_bandwidth(bytes: usize) -> f64 {
    use rayon::prelude::*;
    let words = bytes / 8;
    let buffer: Vec<u64> = (0..words as u64).collect();
    let chunk = words
        .div_ceil(rayon::current_num_threads() * 4)
        .max(1 << 16);
    let mut best = f64::INFINITY;
    for pass in 0..4 {
        let start = std::time::Instant::now();
        let sum: u64 = buffer
            .par_chunks(chunk)
            .map(|c| c.iter().fold(0u64, |a, &b| a.wrapping_add(b)))
            .reduce(|| 0, u64::wrapping_add);
        let seconds = start.elapsed().as_secs_f64();
        std::hint::black_box(sum);
        if pass > 0 {
            best = best.min(seconds);
        }
    }
    (words * 8) as f64 / best
}

/// Copy a tensor's values into owned storage of the same precision.
fn copy_dense(view: &TensorView<'_>) -> Result<DenseData> {
    let weight_err = |reason: String| BackendError::Weight {
        tensor: view.name.to_string(),
        reason,
    };
    Ok(match view.dtype {
        DType::F32 => DenseData::F32(view.to_f32()?.into()),
        DType::F16 => DenseData::F16(view.as_f16()?.into_owned().into()),
        DType::BF16 => DenseData::BF16(
            view.bytes
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]))
                .collect(),
        ),
        other => return Err(weight_err(format!("dtype {other:?} is not a float type"))),
    })
}

impl Backend for CpuBackend {
    type Buffer = CpuBuffer;
    type Linear = CpuLinear;
    type Vector = Vec<f32>;
    type Embedding = CpuEmbedding;
    type Rope = RopeSpec;
    type Router = CpuRouter;
    type Experts = CpuExperts;
    type Routing = CpuRouting;
    type MlaKvB = CpuMlaKvB;
    type KvCache = CpuKvCache;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn measure_read_bandwidth(&self) -> Option<f64> {
        Some(measure_read_bandwidth(1 << 30))
    }

    fn free_memory(&self) -> Option<u64> {
        let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
        let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    fn upload_linear(&self, name: &str, weights: &LinearWeights<'_>) -> Result<CpuLinear> {
        Ok(match weights {
            LinearWeights::Trellis(t) => CpuLinear::trellis(t),
            LinearWeights::Dense { weight, bias } => {
                let [out_features, in_features] = weight.shape[..] else {
                    return Err(BackendError::Weight {
                        tensor: name.to_string(),
                        reason: format!("expected a 2-D weight, got shape {:?}", weight.shape),
                    });
                };
                CpuLinear::Dense {
                    weight: self.dense_data(weight)?,
                    bias: bias.as_ref().map(|b| b.to_f32()).transpose()?,
                    in_features,
                    out_features,
                }
            }
        })
    }

    fn upload_vector(&self, values: &[f32]) -> Result<Vec<f32>> {
        Ok(values.to_vec())
    }

    fn upload_embedding(&self, table: &TensorView<'_>) -> Result<CpuEmbedding> {
        let [vocab, hidden] = table.shape[..] else {
            return Err(BackendError::Weight {
                tensor: table.name.to_string(),
                reason: format!("expected [vocab, hidden], got {:?}", table.shape),
            });
        };
        Ok(CpuEmbedding {
            table: self.dense_data(table)?,
            vocab,
            hidden,
        })
    }

    fn upload_rope(&self, spec: &RopeSpec) -> Result<RopeSpec> {
        Ok(spec.clone())
    }

    fn upload_router(
        &self,
        gate: &LinearWeights<'_>,
        selection_bias: Option<&[f32]>,
        spec: &RouterSpec,
    ) -> Result<CpuRouter> {
        let name = "router";
        let LinearWeights::Dense { weight, .. } = gate else {
            return Err(BackendError::Unsupported {
                backend: "cpu",
                what: "a trellis-quantized MoE router".into(),
            });
        };
        let [experts, hidden] = weight.shape[..] else {
            return Err(BackendError::Weight {
                tensor: weight.name.to_string(),
                reason: format!("expected [experts, hidden], got {:?}", weight.shape),
            });
        };
        if experts != spec.num_experts
            || spec.top_k > experts
            || spec.n_group == 0
            || spec.n_group > 64
            || experts % spec.n_group != 0
            || spec.topk_group > spec.n_group
        {
            return Err(BackendError::Weight {
                tensor: name.into(),
                reason: format!(
                    "routing of {} experts (top {}, {} groups, top {} groups) does not fit a gate of {experts} experts",
                    spec.num_experts, spec.top_k, spec.n_group, spec.topk_group
                ),
            });
        }
        if let Some(b) = selection_bias.filter(|b| b.len() != experts) {
            return Err(BackendError::Weight {
                tensor: name.into(),
                reason: format!(
                    "selection bias has {} values for {experts} experts",
                    b.len()
                ),
            });
        }
        Ok(CpuRouter {
            gate: copy_dense(weight)?,
            hidden,
            selection_bias: selection_bias.map(<[f32]>::to_vec),
            spec: spec.clone(),
        })
    }

    fn upload_experts(
        &self,
        experts: Vec<(CpuLinear, CpuLinear, CpuLinear)>,
    ) -> Result<CpuExperts> {
        Ok(CpuExperts { experts })
    }

    fn upload_mla_kv_b(&self, weights: &LinearWeights<'_>, spec: &MlaSpec) -> Result<CpuMlaKvB> {
        let LinearWeights::Dense { weight, .. } = weights else {
            return Err(BackendError::Unsupported {
                backend: "cpu",
                what: "a trellis-quantized kv_b_proj (absorbed MLA needs its rows)".into(),
            });
        };
        let expected = [
            spec.heads * (spec.qk_nope_dim + spec.v_head_dim),
            spec.kv_lora_rank,
        ];
        if weight.shape != &expected[..] {
            return Err(BackendError::Weight {
                tensor: weight.name.to_string(),
                reason: format!("expected shape {expected:?}, got {:?}", weight.shape),
            });
        }
        let weight = if self.kv_b_int8 {
            let values = weight.to_f32()?;
            KvBWeight::Int8(
                Int8Matrix::quantize(&values, spec.kv_lora_rank).ok_or_else(|| {
                    BackendError::Weight {
                        tensor: weight.name.to_string(),
                        reason: "holds NaN or infinite values, which int8 cannot represent \
                                 (--kv-b-int8)"
                            .into(),
                    }
                })?,
            )
        } else {
            // Kept in its stored precision: the absorbed products read all of it every
            // decode step (9 MB a layer in f16), so its width is memory traffic; the kernels
            // widen it exactly in registers.
            KvBWeight::Dense(self.dense_data(weight)?)
        };
        Ok(CpuMlaKvB {
            weight,
            rank: spec.kv_lora_rank,
        })
    }

    fn mla_kv_b_bytes(&self, kv_b: &CpuMlaKvB) -> Option<u64> {
        Some(kv_b.bytes() as u64)
    }

    fn alloc(&self, len: usize) -> Result<CpuBuffer> {
        Ok(CpuBuffer(vec![0.0; len]))
    }

    fn alloc_routing(&self, rows: usize, top_k: usize) -> Result<CpuRouting> {
        Ok(CpuRouting {
            top_k,
            ids: vec![0; rows * top_k],
            weights: vec![0.0; rows * top_k],
        })
    }

    fn alloc_kv_cache(&self, layout: &KvCacheLayout) -> Result<CpuKvCache> {
        Ok(CpuKvCache::new(layout))
    }

    fn write(&self, dst: &mut CpuBuffer, src: &[f32]) {
        dst.0[..src.len()].copy_from_slice(src);
    }

    fn read(&self, src: &CpuBuffer, dst: &mut [f32]) {
        dst.copy_from_slice(&src.0[..dst.len()]);
    }

    fn argmax_rows(&self, src: &CpuBuffer, width: usize, dst: &mut [u32]) {
        for (row, id) in src.0.chunks(width.max(1)).zip(dst.iter_mut()) {
            *id = crate::argmax(row).unwrap_or(crate::NO_CHOICE);
        }
    }

    fn read_routing(&self, routing: &CpuRouting, rows: usize) -> (Vec<u32>, Vec<f32>) {
        let n = rows * routing.top_k;
        (routing.ids[..n].to_vec(), routing.weights[..n].to_vec())
    }

    fn begin_step(&self, _tokens: &[u32], _batch: &Batch<'_>) {}

    fn embed(&self, table: &CpuEmbedding, tokens: &[u32], scale: f32, out: &mut CpuBuffer) {
        profile::timed(profile::EMBED, 0, 0, tokens.len(), || {
            ops::embed(
                &table.table,
                table.hidden,
                tokens,
                scale,
                &mut out.0[..tokens.len() * table.hidden],
            )
        });
    }

    fn rms_norm(
        &self,
        x: &CpuBuffer,
        weight: &Vec<f32>,
        eps: f32,
        rows: usize,
        out: &mut CpuBuffer,
    ) {
        profile::timed(profile::RMS_NORM, weight.len(), 0, rows, || {
            ops::rms_norm(&x.0, weight, eps, rows, &mut out.0)
        });
    }

    fn rms_norm_inplace(&self, x: &mut CpuBuffer, weight: &Vec<f32>, eps: f32, rows: usize) {
        ops::rms_norm_inplace(&mut x.0, weight, eps, rows);
    }

    fn linear(&self, w: &CpuLinear, x: &CpuBuffer, rows: usize, out: &mut CpuBuffer) {
        profile::timed(
            profile::LINEAR,
            w.in_features(),
            w.out_features(),
            rows,
            || w.forward(&x.0, rows, &mut out.0),
        );
    }

    fn copy_rows(&self, src: &CpuBuffer, width: usize, rows: &[u32], dst: &mut CpuBuffer) {
        for (j, &r) in rows.iter().enumerate() {
            let r = r as usize;
            dst.0[j * width..(j + 1) * width].copy_from_slice(&src.0[r * width..(r + 1) * width]);
        }
    }

    fn add(&self, x: &mut CpuBuffer, y: &CpuBuffer, len: usize) {
        ops::add(&mut x.0[..len], &y.0[..len]);
    }

    fn silu_mul(&self, gate: &mut CpuBuffer, up: &CpuBuffer, len: usize) {
        ops::silu_mul(&mut gate.0[..len], &up.0[..len]);
    }

    fn gelu_tanh_mul(&self, gate: &mut CpuBuffer, up: &CpuBuffer, len: usize) {
        ops::gelu_tanh_mul(&mut gate.0[..len], &up.0[..len]);
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
        ops::rope(
            &mut x.0[..batch.rows() * heads * head_dim],
            rope,
            heads,
            head_dim,
            offset,
            batch,
        );
    }

    fn kv_append(
        &self,
        k: &CpuBuffer,
        v: &CpuBuffer,
        batch: &Batch<'_>,
        cache: &mut CpuKvCache,
        layer: usize,
    ) {
        attention::kv_append(&k.0, &v.0, batch, cache, layer);
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
        attention::attention(&q.0, spec, batch, cache, layer, &mut out.0);
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
        profile::timed(profile::MLA_APPEND, 0, 0, batch.rows(), || {
            attention::mla_append(&ckv.0, kv_norm, rope, spec, batch, cache, layer)
        });
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
        profile::timed(profile::MLA_ATTENTION, 0, 0, batch.rows(), || {
            attention::mla_attention(&mut q.0, kv_b, rope, spec, batch, cache, layer, &mut out.0)
        });
    }

    fn moe_route(&self, router: &CpuRouter, x: &CpuBuffer, rows: usize, routing: &mut CpuRouting) {
        profile::timed(profile::MOE_ROUTE, 0, 0, rows, || {
            moe::route(router, &x.0, rows, routing)
        });
    }

    fn linears(&self, x: &CpuBuffer, rows: usize, linears: &mut [(&CpuLinear, &mut CpuBuffer)]) {
        fn trellis(l: &CpuLinear) -> Option<&trellis_kernels::PackedTrellis> {
            match l {
                CpuLinear::Trellis(p) => Some(p),
                CpuLinear::Dense { .. } => None,
            }
        }
        // One token through several trellis linears: one parallel region for all of them.
        if rows == 1
            && linears.len() > 1
            && linears.len() <= trellis_kernels::MAX_BATCH
            && linears.iter().all(|(l, _)| trellis(l).is_some())
        {
            let (n, width) = (linears.len(), linears[0].0.in_features());
            profile::timed(profile::LINEAR_BATCH, width, linears.len(), rows, || {
                let mut outs: [&mut [f32]; trellis_kernels::MAX_BATCH] =
                    std::array::from_fn(|_| Default::default());
                let mut packed: [Option<&trellis_kernels::PackedTrellis>;
                    trellis_kernels::MAX_BATCH] = [None; trellis_kernels::MAX_BATCH];
                for ((o, p), (l, buf)) in outs.iter_mut().zip(&mut packed).zip(linears.iter_mut()) {
                    *o = &mut buf.0[..];
                    *p = trellis(l);
                }
                let x: &[f32] = &x.0[..width];
                trellis_kernels::gemv_batch_into(
                    n,
                    |j| (packed[j].expect("all trellis"), x),
                    &mut outs[..n],
                );
            });
            return;
        }
        for (w, out) in linears.iter_mut() {
            self.linear(w, x, rows, out);
        }
    }

    fn moe_block(
        &self,
        x: &mut CpuBuffer,
        norm: &Vec<f32>,
        eps: f32,
        rows: usize,
        hidden: usize,
        router: &CpuRouter,
        experts: &CpuExperts,
        shared: Option<&GatedMlp<'_, Self>>,
        routing: &mut CpuRouting,
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
        // All experts' products of a phase (gates and ups, then downs) in one parallel region:
        // fused GEMVs for one token, per-expert GEMMs over their tokens for several.
        let members = shared.map(|m| [m.gate, m.up, m.down]);
        let fused = profile::timed(profile::MOE_BLOCK, 0, 0, rows, || {
            if rows == 1 {
                moe::block_decode(experts, members, &h.0, hidden, routing, &mut out.0)
            } else {
                moe::block_batched(experts, members, &h.0, rows, hidden, routing, &mut out.0)
            }
        });
        if !fused {
            self.moe_experts(experts, h, rows, routing, out);
            if let Some(mlp) = shared {
                self.linear(mlp.gate, h, rows, gate);
                self.linear(mlp.up, h, rows, up);
                self.silu_mul(gate, up, rows * mlp.intermediate);
                self.linear(mlp.down, gate, rows, shared_out);
                self.add(out, shared_out, rows * hidden);
            }
        }
        self.add(x, out, rows * hidden);
    }

    fn moe_experts(
        &self,
        experts: &CpuExperts,
        x: &CpuBuffer,
        rows: usize,
        routing: &CpuRouting,
        out: &mut CpuBuffer,
    ) {
        let hidden = experts
            .experts
            .first()
            .map_or(0, |(g, _, _)| g.in_features());
        profile::timed(profile::MOE_EXPERTS, 0, 0, rows, || {
            moe::experts(experts, &x.0, rows, hidden, routing, &mut out.0)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::sync::Arc;

    fn view<'a>(name: &'a str, shape: &'a [usize], bytes: &'a [u8]) -> TensorView<'a> {
        TensorView {
            name,
            dtype: DType::BF16,
            shape,
            bytes,
            file: Path::new("model.safetensors"),
        }
    }

    fn table_of(data: &DenseData) -> &Arc<[bf16]> {
        match data {
            DenseData::BF16(table) => table,
            _ => panic!("stored precision changed"),
        }
    }

    /// Products of one input as one op (`linears`) equal the separate products bit for bit:
    /// the batched region for one token (with a bias, and linears of different widths) and the
    /// fallbacks for several tokens and for a dense member.
    #[test]
    fn linears_of_one_input_match_separate_products() {
        use rand::{SeedableRng, rngs::StdRng};
        use trellis_codec::{BitWidth, Codebook};
        use trellis_testutil::random_trellis;

        let mut rng = StdRng::seed_from_u64(17);
        let in_f = 256;
        let mut trellis = |out_f: usize, bias: bool| -> CpuLinear {
            let bits = BitWidth::integer(4).unwrap();
            CpuLinear::trellis(&random_trellis(
                &mut rng,
                in_f,
                out_f,
                bits,
                Codebook::Mul1,
                bias,
            ))
        };
        let linears = [trellis(384, true), trellis(128, false), trellis(128, true)];
        let dense = CpuLinear::Dense {
            weight: DenseData::F32((0..in_f * 64).map(|i| (i % 13) as f32 * 0.01).collect()),
            bias: None,
            in_features: in_f,
            out_features: 64,
        };
        let backend = CpuBackend::new();
        for rows in [1, 3] {
            let x = CpuBuffer(
                (0..rows * in_f)
                    .map(|i| ((i * 7) % 11) as f32 - 5.0)
                    .collect(),
            );
            let members: Vec<&CpuLinear> = linears.iter().chain([&dense]).collect();
            for set in [&members[..3], &members[..]] {
                let mut separate: Vec<CpuBuffer> = set
                    .iter()
                    .map(|l| CpuBuffer(vec![0.0; rows * l.out_features()]))
                    .collect();
                for (l, out) in set.iter().zip(&mut separate) {
                    backend.linear(l, &x, rows, out);
                }
                let mut together: Vec<CpuBuffer> = set
                    .iter()
                    .map(|l| CpuBuffer(vec![f32::NAN; rows * l.out_features()]))
                    .collect();
                let mut pairs: Vec<(&CpuLinear, &mut CpuBuffer)> =
                    set.iter().copied().zip(together.iter_mut()).collect();
                backend.linears(&x, rows, &mut pairs);
                for (i, (a, b)) in separate.iter().zip(&together).enumerate() {
                    assert!(a.0.iter().all(|v| v.is_finite()), "rows {rows} member {i}");
                    assert_eq!(a.0, b.0, "rows {rows}, {} members: member {i}", set.len());
                }
            }
        }
    }

    /// A tied head is the embedding's own table; equal bytes elsewhere are not mistaken for it.
    #[test]
    fn a_tied_head_shares_the_embedding_table() {
        let backend = CpuBackend::new();
        let shape = [3, 2];
        let bytes: Vec<u8> = (0..12).collect();
        let embedding = backend
            .upload_embedding(&view("embed", &shape, &bytes))
            .unwrap();
        let head = LinearWeights::Dense {
            weight: view("embed", &shape, &bytes),
            bias: None,
        };
        let CpuLinear::Dense { weight, .. } = backend.upload_linear("lm_head", &head).unwrap()
        else {
            panic!("a dense head")
        };
        assert!(Arc::ptr_eq(table_of(&embedding.table), table_of(&weight)));
        // Same values at another address: a copy of its own.
        let copy = bytes.clone();
        let other = backend
            .upload_embedding(&view("other", &shape, &copy))
            .unwrap();
        assert!(!Arc::ptr_eq(
            table_of(&embedding.table),
            table_of(&other.table)
        ));
        assert_eq!(table_of(&other.table)[..], table_of(&embedding.table)[..]);
    }
}

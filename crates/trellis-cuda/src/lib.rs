//! The CUDA backend: every [`Backend`] op as kernels enqueued on one stream of one GPU.
//!
//! * The CUDA driver and NVRTC are loaded at run time, so this crate builds and links without
//!   a CUDA toolkit; [`CudaBackend::new`] returns an error (never panics) when no driver, no
//!   NVRTC or no GPU is present.
//! * Kernels are the CUDA C sources in `kernels/`, embedded in the binary and compiled by
//!   NVRTC for the device's architecture at creation (cached on disk, see [`KERNEL_CACHE_ENV`]).
//! * Weights are uploaded once: EXL3 linears keep their packed trellis words (decoded inside
//!   the product), dense tensors keep their stored precision.
//! * Ops only enqueue work on the stream; the host waits only where it reads results
//!   ([`Backend::read`], [`Backend::read_routing`]). Per step, [`Backend::begin_step`] copies
//!   the token ids, positions, sequence ids and block tables into device buffers that the ops
//!   read. Scratch areas are allocated on first use and reused (grown only when a larger shape
//!   appears), so a steady decode loop allocates nothing.

mod attention;
mod device;
mod linear;
mod memory;
mod moe;
mod ops;

pub use attention::{CudaKvCache, CudaMlaKvB};
pub use device::{
    KERNEL_CACHE_ENV, PROFILE_ENV, SPLIT_WAVES_ENV, SYNC_ENV, UNFUSED_ENV, compile_kernels,
    kernel_source,
};
pub use linear::{CudaLinear, DenseType, DenseWeights, TrellisWeights};
pub use moe::{CudaExperts, CudaRouter, CudaRouting};
pub use ops::CudaRope;

use device::Device;
use linear::{DenseTensor, linear_forward, upload_dense, upload_trellis};
use memory::{DeviceMem, Scratch, StepInputs, StepView, check_len};
use std::sync::{Mutex, MutexGuard};
use trellis_backend::{
    AttentionSpec, Backend, BackendError, Batch, KvCacheLayout, MlaSpec, Result, RopeSpec,
    RouterSpec,
};
use trellis_format::{LinearWeights, TensorView};

/// Activations and scratch: f32 on the device.
pub struct CudaBuffer {
    mem: DeviceMem<f32>,
    len: usize,
}

impl CudaBuffer {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn ptr(&self) -> u64 {
        self.mem.ptr
    }
}

/// A small f32 vector on the device (norm weights, biases).
pub struct CudaVector {
    mem: DeviceMem<f32>,
    len: usize,
}

/// A token embedding table in its stored precision.
pub struct CudaEmbedding {
    table: DenseTensor,
    vocab: usize,
    hidden: usize,
}

/// The CUDA backend of one GPU.
pub struct CudaBackend {
    dev: Device,
    step: Mutex<StepInputs>,
    scratch: Mutex<Scratch>,
}

impl CudaBackend {
    /// Open GPU `device_index`, compile (or load) the kernels. Fails with a clear error when
    /// the driver, NVRTC or the device is missing.
    pub fn new(device_index: usize) -> Result<CudaBackend> {
        Ok(CudaBackend {
            dev: Device::open(device_index)?,
            step: Mutex::new(StepInputs::new()),
            scratch: Mutex::new(Scratch::new()),
        })
    }

    /// The GPU's name as the driver reports it.
    pub fn device_name(&self) -> &str {
        &self.dev.name
    }

    pub fn compute_capability(&self) -> (i32, i32) {
        self.dev.compute_capability
    }

    pub fn multiprocessors(&self) -> usize {
        self.dev.sm_count
    }

    /// Wait for every enqueued op (for timing); panics if one of them failed.
    pub fn synchronize(&self) {
        self.dev.synchronize();
    }

    /// Per-kernel launch counts and device time (µs) since the last call, largest first, when
    /// the backend was created with [`PROFILE_ENV`] set; empty otherwise.
    pub fn kernel_profile(&self) -> Vec<(&'static str, usize, f64)> {
        let Some(profile) = &self.dev.profile else {
            return Vec::new();
        };
        let mut totals = profile.lock().expect("profile");
        let mut rows: Vec<_> = totals.drain().map(|(k, (n, us))| (k, n, us)).collect();
        rows.sort_by(|a, b| b.2.total_cmp(&a.2));
        rows
    }

    /// Device time in milliseconds of the work `enqueue` puts on the stream, measured with
    /// CUDA events (the host does not wait between the ops it enqueues).
    pub fn time_ms(&self, enqueue: impl FnOnce()) -> Result<f32> {
        use cudarc::driver::sys::CUevent_flags;
        let err = |e: cudarc::driver::DriverError| device::cuda_error(format!("CUDA event: {e}"));
        let start = self
            .dev
            .ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(err)?;
        let end = self
            .dev
            .ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(err)?;
        start.record(&self.dev.stream).map_err(err)?;
        enqueue();
        end.record(&self.dev.stream).map_err(err)?;
        start.elapsed_ms(&end).map_err(err)
    }

    fn step_view(&self) -> StepView {
        self.step
            .lock()
            .expect("step inputs")
            .view(&self.dev)
            .expect("an op that reads the step's tokens or positions ran before begin_step")
    }

    fn scratch(&self) -> MutexGuard<'_, Scratch> {
        self.scratch.lock().expect("scratch")
    }

    fn check_batch(&self, batch: &Batch<'_>, step: &StepView) {
        assert_eq!(
            batch.rows(),
            step.rows,
            "op called with a batch of {} rows after begin_step with {}",
            batch.rows(),
            step.rows
        );
    }
}

fn weight_error(name: &str, reason: String) -> BackendError {
    BackendError::Weight {
        tensor: name.to_string(),
        reason,
    }
}

impl Backend for CudaBackend {
    type Buffer = CudaBuffer;
    type Linear = CudaLinear;
    type Vector = CudaVector;
    type Embedding = CudaEmbedding;
    type Rope = CudaRope;
    type Router = CudaRouter;
    type Experts = CudaExperts;
    type Routing = CudaRouting;
    type MlaKvB = CudaMlaKvB;
    type KvCache = CudaKvCache;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn free_memory(&self) -> Option<u64> {
        let (free, _total) = self.dev.ctx.mem_get_info().ok()?;
        Some(free as u64)
    }

    fn measure_read_bandwidth(&self) -> Option<f64> {
        // A device-to-device copy of a buffer far larger than L2 (60 MB on an H200) streams
        // both directions; bytes read plus bytes written over the copy's device time.
        const BYTES: usize = 1 << 30;
        let stream = &self.dev.stream;
        let src = stream.alloc_zeros::<u8>(BYTES).ok()?;
        let mut dst = stream.alloc_zeros::<u8>(BYTES).ok()?;
        let mut best = f32::INFINITY;
        for pass in 0..4 {
            let ms = self
                .time_ms(|| {
                    if let Err(e) = stream.memcpy_dtod(&src, &mut dst) {
                        panic!("CUDA device-to-device copy failed: {e}");
                    }
                })
                .ok()?;
            if pass > 0 {
                best = best.min(ms);
            }
        }
        Some(2.0 * BYTES as f64 / (f64::from(best) * 1e-3))
    }

    fn peak_memory(&self) -> Option<u64> {
        Some(self.dev.memory.peak())
    }

    fn upload_linear(&self, name: &str, weights: &LinearWeights<'_>) -> Result<CudaLinear> {
        Ok(match weights {
            LinearWeights::Trellis(t) => CudaLinear::Trellis(upload_trellis(&self.dev, name, t)?),
            LinearWeights::Dense { weight, bias } => {
                CudaLinear::Dense(upload_dense(&self.dev, name, weight, bias.as_ref())?)
            }
        })
    }

    fn upload_vector(&self, values: &[f32]) -> Result<CudaVector> {
        Ok(CudaVector {
            mem: DeviceMem::from_host(&self.dev, values, "vector")?,
            len: values.len(),
        })
    }

    fn upload_embedding(&self, table: &TensorView<'_>) -> Result<CudaEmbedding> {
        let [vocab, hidden] = table.shape[..] else {
            return Err(weight_error(
                table.name,
                format!("expected [vocab, hidden], got {:?}", table.shape),
            ));
        };
        Ok(CudaEmbedding {
            table: DenseTensor::upload(&self.dev, table)?,
            vocab,
            hidden,
        })
    }

    fn upload_rope(&self, spec: &RopeSpec) -> Result<CudaRope> {
        Ok(CudaRope {
            inv_freq: DeviceMem::from_host(&self.dev, &spec.inv_freq, "rope frequencies")?,
            half: spec.inv_freq.len(),
            scaling: spec.attention_scaling,
            interleaved: spec.interleaved,
        })
    }

    fn upload_router(
        &self,
        gate: &LinearWeights<'_>,
        selection_bias: Option<&[f32]>,
        spec: &RouterSpec,
    ) -> Result<CudaRouter> {
        moe::upload_router(&self.dev, gate, selection_bias, spec)
    }

    fn upload_experts(
        &self,
        experts: Vec<(CudaLinear, CudaLinear, CudaLinear)>,
    ) -> Result<CudaExperts> {
        moe::upload_experts(&self.dev, experts)
    }

    fn upload_mla_kv_b(&self, weights: &LinearWeights<'_>, spec: &MlaSpec) -> Result<CudaMlaKvB> {
        attention::upload_mla_kv_b(&self.dev, weights, spec)
    }

    fn alloc(&self, len: usize) -> Result<CudaBuffer> {
        Ok(CudaBuffer {
            mem: DeviceMem::zeroed(&self.dev, len, "activation buffer")?,
            len,
        })
    }

    fn alloc_routing(&self, rows: usize, top_k: usize) -> Result<CudaRouting> {
        moe::alloc_routing(&self.dev, rows, top_k)
    }

    fn alloc_kv_cache(&self, layout: &KvCacheLayout) -> Result<CudaKvCache> {
        CudaKvCache::new(&self.dev, layout)
    }

    fn write(&self, dst: &mut CudaBuffer, src: &[f32]) {
        assert!(
            src.len() <= dst.len,
            "write of {} values into a buffer of {}",
            src.len(),
            dst.len
        );
        dst.mem.write(&self.dev, src);
    }

    fn read(&self, src: &CudaBuffer, dst: &mut [f32]) {
        assert!(
            dst.len() <= src.len,
            "read of {} values from a buffer of {}",
            dst.len(),
            src.len
        );
        src.mem.read(&self.dev, dst);
    }

    fn read_routing(&self, routing: &CudaRouting, rows: usize) -> (Vec<u32>, Vec<f32>) {
        let n = rows * routing.top_k;
        let mut ids = vec![0u32; n];
        let mut weights = vec![0f32; n];
        routing.ids.read(&self.dev, &mut ids);
        routing.weights.read(&self.dev, &mut weights);
        (ids, weights)
    }

    fn begin_step(&self, tokens: &[u32], batch: &Batch<'_>) {
        self.step
            .lock()
            .expect("step inputs")
            .upload(&self.dev, tokens, batch);
    }

    fn embed(&self, table: &CudaEmbedding, tokens: &[u32], scale: f32, out: &mut CudaBuffer) {
        let step = self.step_view();
        assert_eq!(
            tokens.len(),
            step.rows,
            "embed of {} tokens after begin_step with {} (embed reads the step's token ids)",
            tokens.len(),
            step.rows
        );
        debug_assert!(tokens.iter().all(|&t| (t as usize) < table.vocab));
        ops::embed(
            &self.dev,
            table.table.mem.ptr,
            table.table.dtype,
            step.tokens,
            step.rows,
            table.hidden,
            scale,
            out.ptr(),
        );
    }

    fn rms_norm(
        &self,
        x: &CudaBuffer,
        weight: &CudaVector,
        eps: f32,
        rows: usize,
        out: &mut CudaBuffer,
    ) {
        ops::rms_norm(
            &self.dev,
            x.ptr(),
            weight.mem.ptr,
            eps,
            rows,
            weight.len,
            out.ptr(),
        );
    }

    fn rms_norm_inplace(&self, x: &mut CudaBuffer, weight: &CudaVector, eps: f32, rows: usize) {
        ops::rms_norm(
            &self.dev,
            x.ptr(),
            weight.mem.ptr,
            eps,
            rows,
            weight.len,
            x.ptr(),
        );
    }

    fn linear(&self, w: &CudaLinear, x: &CudaBuffer, rows: usize, out: &mut CudaBuffer) {
        debug_assert!(check_len("linear input", x.len, rows * w.in_features()).is_ok());
        debug_assert!(check_len("linear output", out.len, rows * w.out_features()).is_ok());
        linear_forward(&self.dev, &mut self.scratch(), w, x.ptr(), rows, out.ptr());
    }

    fn copy_rows(&self, src: &CudaBuffer, width: usize, rows: &[u32], dst: &mut CudaBuffer) {
        ops::copy_rows(&self.dev, src.ptr(), width, rows, dst.ptr());
    }

    fn add(&self, x: &mut CudaBuffer, y: &CudaBuffer, len: usize) {
        ops::add(&self.dev, x.ptr(), y.ptr(), len);
    }

    fn silu_mul(&self, gate: &mut CudaBuffer, up: &CudaBuffer, len: usize) {
        ops::silu_mul(&self.dev, gate.ptr(), up.ptr(), len);
    }

    fn gelu_tanh_mul(&self, gate: &mut CudaBuffer, up: &CudaBuffer, len: usize) {
        ops::gelu_tanh_mul(&self.dev, gate.ptr(), up.ptr(), len);
    }

    fn rope(
        &self,
        x: &mut CudaBuffer,
        rope: &CudaRope,
        heads: usize,
        head_dim: usize,
        offset: usize,
        batch: &Batch<'_>,
    ) {
        let step = self.step_view();
        self.check_batch(batch, &step);
        ops::rope(
            &self.dev,
            x.ptr(),
            rope,
            heads,
            head_dim,
            offset,
            step.positions,
            step.rows,
        );
    }

    fn kv_append(
        &self,
        k: &CudaBuffer,
        v: &CudaBuffer,
        batch: &Batch<'_>,
        cache: &mut CudaKvCache,
        layer: usize,
    ) {
        let step = self.step_view();
        self.check_batch(batch, &step);
        attention::kv_append(&self.dev, k.ptr(), v.ptr(), &step, cache, layer);
    }

    fn attention(
        &self,
        q: &CudaBuffer,
        spec: &AttentionSpec,
        batch: &Batch<'_>,
        cache: &CudaKvCache,
        layer: usize,
        out: &mut CudaBuffer,
    ) {
        let step = self.step_view();
        self.check_batch(batch, &step);
        attention::attention(&self.dev, q.ptr(), spec, &step, cache, layer, out.ptr());
    }

    fn mla_append(
        &self,
        ckv: &CudaBuffer,
        kv_norm: &CudaVector,
        rope: &CudaRope,
        spec: &MlaSpec,
        batch: &Batch<'_>,
        cache: &mut CudaKvCache,
        layer: usize,
    ) {
        let step = self.step_view();
        self.check_batch(batch, &step);
        attention::mla_append(
            &self.dev,
            ckv.ptr(),
            kv_norm.mem.ptr,
            rope,
            spec,
            &step,
            cache,
            layer,
        );
    }

    fn mla_attention(
        &self,
        q: &mut CudaBuffer,
        kv_b: &CudaMlaKvB,
        rope: &CudaRope,
        spec: &MlaSpec,
        batch: &Batch<'_>,
        cache: &CudaKvCache,
        layer: usize,
        out: &mut CudaBuffer,
    ) {
        let step = self.step_view();
        self.check_batch(batch, &step);
        let max_position = batch.positions.iter().copied().max().unwrap_or(0) as usize;
        attention::mla_attention(
            &self.dev,
            &mut self.scratch(),
            max_position,
            q.ptr(),
            kv_b,
            rope,
            spec,
            &step,
            cache,
            layer,
            out.ptr(),
        );
    }

    fn moe_route(
        &self,
        router: &CudaRouter,
        x: &CudaBuffer,
        rows: usize,
        routing: &mut CudaRouting,
    ) {
        moe::route(&self.dev, router, x.ptr(), rows, routing);
    }

    fn moe_experts(
        &self,
        experts: &CudaExperts,
        x: &CudaBuffer,
        rows: usize,
        routing: &CudaRouting,
        out: &mut CudaBuffer,
    ) {
        moe::experts_forward(
            &self.dev,
            &mut self.scratch(),
            experts,
            x.ptr(),
            rows,
            routing,
            out.ptr(),
        );
    }
}

impl CudaBackend {
    /// Fill the first `len` values of a buffer with `value` on the device (tests poison
    /// outputs with NaN this way).
    pub fn fill(&self, buf: &mut CudaBuffer, value: f32, len: usize) {
        assert!(
            len <= buf.len,
            "fill of {len} values in a buffer of {}",
            buf.len
        );
        ops::fill(&self.dev, buf.ptr(), value, len);
    }
}

//! The CUDA backend: every [`Backend`] op as kernels enqueued on one stream of one GPU.
//!
//! * The CUDA driver and NVRTC are loaded at run time, so this crate builds and links without
//!   a CUDA toolkit; [`CudaBackend::new`] returns an error (never panics) when no driver, no
//!   NVRTC or no GPU is present.
//! * Kernels are the CUDA C sources in `kernels/`, embedded in the binary and compiled by
//!   NVRTC for the device's architecture at creation (cached on disk, see [`KERNEL_CACHE_ENV`]).
//! * Weights are uploaded once: EXL3 linears keep their packed trellis words (decoded inside
//!   the product), dense tensors keep their stored precision; [`DequantizeSet`] chooses linears
//!   to decode once into dense f16 instead.
//! * Ops only enqueue work on the stream; the host waits only where it reads results
//!   ([`Backend::read`], [`Backend::read_routing`]). Per step, [`Backend::begin_step`] copies
//!   the token ids, positions, sequence ids and block tables into device buffers that the ops
//!   read. Scratch areas are allocated on first use and reused (grown only when a larger shape
//!   appears), so a steady decode loop allocates nothing.

mod attention;
mod dequantize;
mod device;
mod encode;
mod linear;
mod memory;
mod moe;
mod ops;
mod trace;

pub use attention::{CudaKvCache, CudaMlaKvB};
pub use dequantize::DequantizeSet;
pub use device::{
    GRAPH_ENV, KERNEL_CACHE_ENV, MLA_MIN_TILES_ENV, PROFILE_ENV, SPLIT_WAVES_ENV, SYNC_ENV,
    UNFUSED_ENV, compile_kernels, compile_kernels_with, kernel_names, kernel_source,
};
pub use encode::CudaTileSearch;
pub use linear::{CudaLinear, DenseType, DenseWeights, TrellisWeights};
pub use moe::{CudaExperts, CudaRouter, CudaRouting};
pub use ops::CudaRope;
pub use trace::TRACE_ENV;

use cudarc::driver::CudaGraph;
use device::Device;
use linear::{
    DenseTensor, RowMap, TrellisJob, TrellisTarget, linear_forward, trellis_launch, upload_dense,
    upload_trellis, upload_trellis_dequantized,
};
use memory::{DeviceMem, Scratch, StepInputs, StepView, check_len};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use trellis_backend::{
    AttentionSpec, Backend, BackendError, Batch, GatedMlp, KvCacheLayout, MlaSpec, MoeScratch,
    Result, RopeSpec, RouterSpec, StepKey,
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
    /// Recorded steps by key (see [`Backend::run_step`]).
    graphs: Mutex<HashMap<GraphKey, GraphEntry>>,
    /// `run_step` uploaded this step's inputs already: the model's `begin_step` is a no-op.
    inputs_preloaded: AtomicBool,
    /// Trellis linears decoded into dense f16 at upload (`--dequantize`).
    dequantize: DequantizeSet,
}

/// Steps of at most this many rows are recorded as graphs (decode steps; prefill chunks are
/// long enough that launch costs do not matter).
const GRAPH_MAX_ROWS: usize = 16;

/// What the recorded work of a step depends on besides device memory contents.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct GraphKey {
    rows: usize,
    block_tables: usize,
    blocks_per_sequence: usize,
    block_size: usize,
    logit_rows: Vec<u32>,
    /// The MLA context split is sized from this bucket of the step's largest position.
    position_bucket: usize,
}

impl GraphKey {
    fn new(key: &StepKey<'_>) -> GraphKey {
        let batch = key.batch;
        let max_position = batch.positions.iter().copied().max().unwrap_or(0) as usize;
        GraphKey {
            rows: batch.rows(),
            block_tables: batch.block_tables.len(),
            blocks_per_sequence: batch.blocks_per_sequence,
            block_size: batch.block_size,
            logit_rows: key.logit_rows.to_vec(),
            position_bucket: attention::position_bucket(max_position),
        }
    }
}

/// A recorded step, replayable while no device allocation was freed after `generation`.
struct Recorded {
    graph: CudaGraph,
    generation: u64,
}

// SAFETY: a graph is only used (launched, dropped) under the backend's `graphs` mutex, one
// thread at a time, which is all the driver asks of graph objects; its stream handle is the
// backend's own, shared by every op.
unsafe impl Send for Recorded {}

enum GraphEntry {
    /// Run directly once: its scratch areas have their sizes, so it can be recorded next time.
    Seen,
    Recorded(Recorded),
}

#[derive(Clone, Copy)]
enum StepAction {
    Direct,
    Record,
    Replay,
}

impl CudaBackend {
    /// Open GPU `device_index`, compile (or load) the kernels. Fails with a clear error when
    /// the driver, NVRTC or the device is missing.
    pub fn new(device_index: usize) -> Result<CudaBackend> {
        Ok(CudaBackend {
            dev: Device::open(device_index)?,
            step: Mutex::new(StepInputs::new()),
            scratch: Mutex::new(Scratch::new()),
            graphs: Mutex::new(HashMap::new()),
            inputs_preloaded: AtomicBool::new(false),
            dequantize: DequantizeSet::NONE,
        })
    }

    /// Decode the trellis linears of `set` into dense f16 weights when they are uploaded
    /// (set before loading a model; see [`DequantizeSet`]).
    pub fn set_dequantize(&mut self, set: DequantizeSet) {
        self.dequantize = set;
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

    /// Record the ops `step` enqueues into a graph (nothing runs). `Ok(None)` when the
    /// recording failed or asked for an allocation; `Err` when `step` failed.
    fn record<E>(&self, step: &mut dyn FnMut() -> Result<(), E>) -> Result<Option<CudaGraph>, E> {
        use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
        let stream = &self.dev.stream;
        if stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .is_err()
        {
            return Ok(None);
        }
        self.dev.capture.set_capturing(true);
        let result = step();
        self.dev.capture.set_capturing(false);
        let graph = stream.end_capture(CUgraphInstantiate_flags(0));
        let broken = self.dev.capture.take_broken();
        result?;
        match graph {
            Ok(Some(graph)) if !broken => Ok(Some(graph)),
            _ => Ok(None),
        }
    }

    /// Whether decode steps are recorded as graphs (off with `TRELLIS_CUDA_GRAPH=0`, and while
    /// profiling or synchronising after each launch).
    pub fn graphs_enabled(&self) -> bool {
        self.dev.graphs
    }

    /// Steps recorded as graphs so far (for tests).
    pub fn recorded_steps(&self) -> usize {
        self.graphs
            .lock()
            .expect("graphs")
            .values()
            .filter(|e| matches!(e, GraphEntry::Recorded(_)))
            .count()
    }

    fn step_view(&self) -> StepView {
        self.step
            .lock()
            .expect("step inputs")
            .view(&self.dev)
            .expect("an op that reads the step's tokens or positions ran before begin_step")
    }

    /// MLA attention of the step, after appending its latent rows when `append` is given.
    #[allow(clippy::too_many_arguments)]
    fn attend_mla(
        &self,
        append: Option<attention::MlaAppend>,
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
            append,
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

impl Drop for CudaBackend {
    /// With [`PROFILE_ENV`] set, the per-kernel totals not yet taken by `kernel_profile` go to
    /// stderr (so a profiled `trellis bench` run reports where its device time went).
    fn drop(&mut self) {
        if let Some(trace) = &self.dev.trace
            && self.dev.stream.synchronize().is_ok()
        {
            eprint!("{}", trace.report(&self.dev.stream));
        }
        if self.dev.profile.is_none() {
            return;
        }
        let rows = self.kernel_profile();
        if rows.is_empty() {
            return;
        }
        let total: f64 = rows.iter().map(|r| r.2).sum();
        let mut text = format!(
            "CUDA kernel profile (device µs, each launch timed alone): {total:.0} µs in total\n"
        );
        for (name, calls, us) in rows {
            text.push_str(&format!(
                "  {name:<28} {calls:>8} launches {us:>12.0} µs {:>6.1} %\n",
                100.0 * us / total.max(1e-9)
            ));
        }
        eprint!("{text}");
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
            LinearWeights::Trellis(t) if self.dequantize.covers(name) => {
                CudaLinear::Dense(upload_trellis_dequantized(&self.dev, name, t)?)
            }
            LinearWeights::Trellis(t) => CudaLinear::Trellis(upload_trellis(&self.dev, name, t)?),
            LinearWeights::Dense { weight, bias } => {
                CudaLinear::Dense(upload_dense(&self.dev, name, weight, bias.as_ref())?)
            }
        })
    }

    fn linear_bytes(&self, w: &CudaLinear) -> Option<u64> {
        match w {
            CudaLinear::Dense(d) if !self.dequantize.is_empty() => {
                Some((d.in_features * d.out_features * d.dtype.size()) as u64)
            }
            _ => None,
        }
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

    fn argmax_rows(&self, src: &CudaBuffer, width: usize, dst: &mut [u32]) {
        let rows = dst.len();
        if rows == 0 {
            return;
        }
        assert!(
            rows * width <= src.len,
            "argmax over {rows} rows of {width} in a buffer of {}",
            src.len
        );
        let mut scratch = self.scratch();
        let ids = scratch.argmax_ids.ensure(&self.dev, rows);
        let parts = scratch
            .argmax_parts
            .ensure(&self.dev, rows * ops::ARGMAX_SCRATCH_PER_ROW);
        ops::argmax_rows(&self.dev, src.ptr(), width, rows, ids, parts);
        scratch
            .argmax_ids
            .get()
            .expect("allocated by ensure")
            .read(&self.dev, dst);
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
        let mut step = self.step.lock().expect("step inputs");
        if self.inputs_preloaded.load(Ordering::Acquire) {
            // run_step uploaded these inputs before recording or replaying the step.
            assert_eq!(
                step.rows(),
                batch.rows(),
                "begin_step inside run_step with a different batch"
            );
            return;
        }
        step.upload(&self.dev, tokens, batch);
    }

    fn run_step<E>(
        &self,
        key: &StepKey<'_>,
        step: &mut dyn FnMut() -> Result<(), E>,
    ) -> Result<(), E> {
        if let Some(trace) = &self.dev.trace {
            trace.begin_step();
        }
        let rows = key.tokens.len();
        if !self.dev.graphs || rows == 0 || rows > GRAPH_MAX_ROWS || key.batch.rows() != rows {
            return step();
        }
        self.begin_step(key.tokens, key.batch);
        let gkey = GraphKey::new(key);
        let mut graphs = self.graphs.lock().expect("graphs");
        let generation = self.dev.memory.generation();
        let action = match graphs.get(&gkey) {
            None => StepAction::Direct,
            Some(GraphEntry::Recorded(r)) if r.generation == generation => StepAction::Replay,
            // Seen, or recorded before an allocation was freed (addresses may have moved).
            Some(_) => StepAction::Record,
        };
        self.inputs_preloaded.store(true, Ordering::Release);
        let result = match action {
            StepAction::Direct => {
                let r = step();
                if r.is_ok() {
                    graphs.insert(gkey, GraphEntry::Seen);
                }
                r
            }
            StepAction::Replay => {
                // The graph goes first and the host's walk through the step (launches
                // suppressed: only its checks and bookkeeping run) overlaps the GPU's work
                // instead of delaying it (≈ 0.1 ms a token). The walk cannot fail where the
                // recorded one, with the same key, succeeded.
                if let Some(GraphEntry::Recorded(rec)) = graphs.get(&gkey)
                    && let Err(e) = rec.graph.launch()
                {
                    panic!("CUDA graph launch failed: {e}");
                }
                self.dev.capture.set_replaying(true);
                let r = step();
                self.dev.capture.set_replaying(false);
                r
            }
            StepAction::Record => match self.record(step) {
                Ok(Some(graph)) => {
                    if let Err(e) = graph.launch() {
                        panic!("CUDA graph launch failed: {e}");
                    }
                    graphs.insert(gkey, GraphEntry::Recorded(Recorded { graph, generation }));
                    Ok(())
                }
                Ok(None) => {
                    // Not recordable this time (a scratch area had to grow): run it directly.
                    graphs.insert(gkey, GraphEntry::Seen);
                    step()
                }
                Err(e) => {
                    graphs.remove(&gkey);
                    Err(e)
                }
            },
        };
        self.inputs_preloaded.store(false, Ordering::Release);
        result
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
        self.attend_mla(None, q, kv_b, rope, spec, batch, cache, layer, out);
    }

    fn mla_append_attention(
        &self,
        ckv: &CudaBuffer,
        kv_norm: &CudaVector,
        q: &mut CudaBuffer,
        kv_b: &CudaMlaKvB,
        rope: &CudaRope,
        spec: &MlaSpec,
        batch: &Batch<'_>,
        cache: &mut CudaKvCache,
        layer: usize,
        out: &mut CudaBuffer,
    ) {
        let append = attention::MlaAppend {
            ckv: ckv.ptr(),
            kv_norm: kv_norm.mem.ptr,
        };
        self.attend_mla(Some(append), q, kv_b, rope, spec, batch, cache, layer, out);
    }

    fn moe_route(
        &self,
        router: &CudaRouter,
        x: &CudaBuffer,
        rows: usize,
        routing: &mut CudaRouting,
    ) {
        moe::route(
            &self.dev,
            &mut self.scratch(),
            router,
            x.ptr(),
            rows,
            routing,
        );
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

    /// One launch where the weights allow (up to two trellis weights of one input width: a
    /// dense block's gate and up, the shared expert's); otherwise a launch per product.
    fn linears(&self, x: &CudaBuffer, rows: usize, linears: &mut [(&CudaLinear, &mut CudaBuffer)]) {
        match self.fused_targets(linears) {
            Some((targets, n)) => {
                let in_stride = targets[0].shape.in_features;
                self.launch_targets(x, in_stride, rows, &targets[..n], None, false);
            }
            None => {
                for (w, out) in linears.iter_mut() {
                    self.linear(w, x, rows, out);
                }
            }
        }
    }

    fn rms_norm_linears(
        &self,
        x: &CudaBuffer,
        norm: &CudaVector,
        eps: f32,
        rows: usize,
        h: &mut CudaBuffer,
        linears: &mut [(&CudaLinear, &mut CudaBuffer)],
    ) {
        match self.fused_targets(linears) {
            Some((targets, n)) if targets[0].shape.in_features == norm.len => {
                let folded = Some((norm.mem.ptr, eps));
                self.launch_targets(x, norm.len, rows, &targets[..n], folded, false);
            }
            _ => {
                self.rms_norm(x, norm, eps, rows, h);
                self.linears(h, rows, linears);
            }
        }
    }

    fn linear_add(
        &self,
        w: &CudaLinear,
        x: &CudaBuffer,
        rows: usize,
        out_features: usize,
        tmp: &mut CudaBuffer,
        residual: &mut CudaBuffer,
    ) {
        match w {
            CudaLinear::Trellis(t) if !self.dev.unfused_linear => {
                debug_assert_eq!(t.shape.out_features, out_features);
                let target = [TrellisTarget::of(t, residual.ptr())];
                self.launch_targets(x, t.shape.in_features, rows, &target, None, true);
            }
            _ => {
                self.linear(w, x, rows, tmp);
                self.add(residual, tmp, rows * out_features);
            }
        }
    }

    fn moe_block(
        &self,
        x: &mut CudaBuffer,
        norm: &CudaVector,
        eps: f32,
        rows: usize,
        hidden: usize,
        router: &CudaRouter,
        experts: &CudaExperts,
        shared: Option<&GatedMlp<'_, Self>>,
        routing: &mut CudaRouting,
        scratch: MoeScratch<'_, Self>,
    ) {
        let fused = norm.len == hidden
            && moe::moe_block(
                &self.dev,
                &mut self.scratch(),
                x.ptr(),
                (norm.mem.ptr, eps),
                scratch.h.ptr(),
                rows,
                router,
                experts,
                shared,
                routing,
            );
        if fused {
            return;
        }
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
            self.linears(h, rows, &mut [(mlp.gate, gate), (mlp.up, up)]);
            self.silu_mul(gate, up, rows * mlp.intermediate);
            self.linear(mlp.down, gate, rows, shared_out);
            self.add(out, shared_out, rows * hidden);
        }
        self.add(x, out, rows * hidden);
    }
}

impl CudaBackend {
    /// One trellis launch of `targets` (all reading `x`, rows `in_stride` apart), with the
    /// RMSNorm `norm` (weights, eps) folded into its input stage when given; with `add_into`
    /// each product is added to what its output already holds instead of replacing it.
    fn launch_targets(
        &self,
        x: &CudaBuffer,
        in_stride: usize,
        rows: usize,
        targets: &[TrellisTarget],
        norm: Option<(u64, f32)>,
        add_into: bool,
    ) {
        let map = RowMap::plain_trellis(&self.dev, rows);
        trellis_launch(
            &self.dev,
            &mut self.scratch(),
            &TrellisJob {
                map: &map,
                x: x.ptr(),
                in_stride,
                x_up: 0,
                norm,
                residual: add_into,
                targets,
                combine: None,
                tiles_settled: false,
            },
        );
    }

    /// The trellis targets of `linears` if one fused launch can serve them all.
    fn fused_targets(
        &self,
        linears: &[(&CudaLinear, &mut CudaBuffer)],
    ) -> Option<([TrellisTarget; linear::MAX_TARGETS], usize)> {
        if self.dev.unfused_linear || linears.is_empty() || linears.len() > linear::MAX_TARGETS {
            return None;
        }
        let mut targets = [None; linear::MAX_TARGETS];
        for (slot, (w, out)) in targets.iter_mut().zip(linears) {
            let CudaLinear::Trellis(t) = w else {
                return None;
            };
            *slot = Some(TrellisTarget::of(t, out.ptr()));
        }
        let first = targets[0].expect("at least one");
        let all = targets.map(|t| t.unwrap_or(first));
        linear::can_share_launch(&all[..linears.len()]).then_some((all, linears.len()))
    }

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

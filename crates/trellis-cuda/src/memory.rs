//! Device memory owned by the backend: typed allocations with their raw addresses, the
//! per-step input buffers filled by `begin_step`, and the op scratch areas.
//!
//! Kernels receive raw device addresses. Every allocation is kept alive by its owner (a
//! handle, the step buffers, the scratch) for as long as work using it can be enqueued; freeing
//! is stream-ordered (`cuMemFreeAsync` on the one stream), so a replaced scratch area is only
//! released after the kernels queued before it.

use crate::device::{Device, cuda_error};
use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr, ValidAsZeroBits};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use trellis_backend::{BackendError, Batch, Result};

/// Bytes of device memory this backend holds now and at most (its own allocations only).
#[derive(Default)]
pub(crate) struct MemoryCounter {
    current: AtomicU64,
    peak: AtomicU64,
    /// Count of frees: a recorded graph holds raw addresses, so it is only replayed while no
    /// allocation has been released since it was recorded.
    frees: AtomicU64,
}

impl MemoryCounter {
    /// Frees so far (see `frees`).
    pub fn generation(&self) -> u64 {
        self.frees.load(Ordering::Acquire)
    }

    fn add(&self, bytes: u64) {
        let now = self.current.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    fn sub(&self, bytes: u64) {
        self.current.fetch_sub(bytes, Ordering::Relaxed);
        self.frees.fetch_add(1, Ordering::AcqRel);
    }

    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

/// An allocation and its device address.
pub(crate) struct DeviceMem<T> {
    mem: CudaSlice<T>,
    pub ptr: u64,
    counter: Arc<MemoryCounter>,
}

impl<T> Drop for DeviceMem<T> {
    fn drop(&mut self) {
        self.counter
            .sub((self.mem.len() * std::mem::size_of::<T>()) as u64);
    }
}

impl<T: DeviceRepr + ValidAsZeroBits> DeviceMem<T> {
    /// `len` zeroed elements (at least one, so that the address is never null).
    pub fn zeroed(dev: &Device, len: usize, what: &str) -> Result<DeviceMem<T>> {
        let mem = dev
            .stream
            .alloc_zeros::<T>(len.max(1))
            .map_err(|e| oom(what, len * std::mem::size_of::<T>(), e))?;
        Ok(DeviceMem::wrap(dev, mem))
    }
}

impl<T: DeviceRepr> DeviceMem<T> {
    pub fn from_host(dev: &Device, values: &[T], what: &str) -> Result<DeviceMem<T>> {
        if values.is_empty() {
            // SAFETY: one element of scratch that nothing reads; it only gives a valid address.
            let mem = unsafe { dev.stream.alloc::<T>(1) }
                .map_err(|e| oom(what, std::mem::size_of::<T>(), e))?;
            return Ok(DeviceMem::wrap(dev, mem));
        }
        let mem = dev
            .stream
            .clone_htod(values)
            .map_err(|e| oom(what, std::mem::size_of_val(values), e))?;
        Ok(DeviceMem::wrap(dev, mem))
    }

    fn wrap(dev: &Device, mem: CudaSlice<T>) -> DeviceMem<T> {
        let ptr = {
            let (ptr, _sync) = mem.device_ptr(&dev.stream);
            ptr
        };
        dev.memory
            .add((mem.len() * std::mem::size_of::<T>()) as u64);
        DeviceMem {
            mem,
            ptr,
            counter: dev.memory.clone(),
        }
    }

    pub fn len(&self) -> usize {
        self.mem.len()
    }

    /// Copy `src` into the first `src.len()` elements.
    pub fn write(&mut self, dev: &Device, src: &[T]) {
        if src.is_empty() {
            return;
        }
        let mut dst = self.mem.slice_mut(..src.len());
        if let Err(e) = dev.stream.memcpy_htod(src, &mut dst) {
            panic!("CUDA host-to-device copy failed: {e}");
        }
    }

    /// Copy the first `dst.len()` elements into `dst` and wait for them.
    pub fn read(&self, dev: &Device, dst: &mut [T]) {
        if dst.is_empty() {
            return;
        }
        let src = self.mem.slice(..dst.len());
        if let Err(e) = dev.stream.memcpy_dtoh(&src, dst) {
            panic!(
                "CUDA device-to-host copy failed: {e} (set TRELLIS_CUDA_SYNC=1 to find a failing kernel)"
            );
        }
        dev.synchronize();
    }
}

fn oom(what: &str, bytes: usize, e: impl std::fmt::Display) -> BackendError {
    BackendError::OutOfMemory {
        what: format!("{what} on the GPU ({e})"),
        bytes,
    }
}

/// A device array that grows on demand (only while the largest shapes are first seen).
pub(crate) struct Growable<T> {
    mem: Option<DeviceMem<T>>,
    what: &'static str,
}

impl<T: DeviceRepr + ValidAsZeroBits> Growable<T> {
    pub const fn new(what: &'static str) -> Growable<T> {
        Growable { mem: None, what }
    }

    /// Address of at least `len` elements; contents are unspecified after growth.
    pub fn ensure(&mut self, dev: &Device, len: usize) -> u64 {
        if self.mem.as_ref().is_none_or(|m| m.len() < len) && dev.capture.is_capturing() {
            // No allocation inside a recording: the recording is dropped and the step run
            // directly, which grows the area; the address returned here is never used.
            dev.capture.mark_broken();
            return self.mem.as_ref().map_or(0, |m| m.ptr);
        }
        match self.try_ensure(dev, len) {
            Ok(m) => m.ptr,
            Err(e) => panic!("CUDA scratch allocation failed: {e}"),
        }
    }

    /// At least `len` elements (contents unspecified after growth), or the allocation's error.
    /// Not for use inside a graph recording (see [`Growable::ensure`]).
    pub fn try_ensure(&mut self, dev: &Device, len: usize) -> Result<&mut DeviceMem<T>> {
        if self.mem.as_ref().is_none_or(|m| m.len() < len) {
            // Grow by half again so that slowly rising sizes do not reallocate every call.
            let old = self.mem.as_ref().map_or(0, DeviceMem::len);
            let new_len = len.max(old + old / 2);
            self.mem = None;
            self.mem = Some(DeviceMem::zeroed(dev, new_len, self.what)?);
        }
        Ok(self.mem.as_mut().expect("allocated above"))
    }

    pub fn get(&mut self) -> Option<&mut DeviceMem<T>> {
        self.mem.as_mut()
    }
}

/// The step's inputs on the device, written by `begin_step` with one copy: token ids,
/// positions, sequence ids and block tables packed back to back.
pub(crate) struct StepInputs {
    packed: Growable<u32>,
    host: Vec<u32>,
    /// Offsets (in values) of the positions, sequence ids and block tables in `packed`.
    offsets: [usize; 3],
    rows: usize,
    blocks_per_sequence: usize,
    block_size: usize,
    ready: bool,
}

impl StepInputs {
    pub const fn new() -> StepInputs {
        StepInputs {
            packed: Growable::new("step inputs"),
            host: Vec::new(),
            offsets: [0; 3],
            rows: 0,
            blocks_per_sequence: 0,
            block_size: 0,
            ready: false,
        }
    }

    /// Rows of the inputs last uploaded.
    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn upload(&mut self, dev: &Device, tokens: &[u32], batch: &Batch<'_>) {
        self.host.clear();
        self.host.extend_from_slice(tokens);
        self.offsets[0] = self.host.len();
        self.host.extend_from_slice(batch.positions);
        self.offsets[1] = self.host.len();
        self.host.extend_from_slice(batch.sequence);
        self.offsets[2] = self.host.len();
        self.host.extend_from_slice(batch.block_tables);
        self.packed.ensure(dev, self.host.len().max(1));
        self.packed.get().expect("ensured").write(dev, &self.host);
        self.rows = batch.rows();
        self.blocks_per_sequence = batch.blocks_per_sequence;
        self.block_size = batch.block_size;
        self.ready = true;
    }

    /// Device addresses of this step's inputs, or `None` before the first `begin_step`.
    pub fn view(&mut self, dev: &Device) -> Option<StepView> {
        if !self.ready {
            return None;
        }
        let base = self.packed.ensure(dev, 1);
        let at = |offset: usize| base + 4 * offset as u64;
        Some(StepView {
            tokens: base,
            positions: at(self.offsets[0]),
            sequence: at(self.offsets[1]),
            block_tables: at(self.offsets[2]),
            rows: self.rows,
            blocks_per_sequence: self.blocks_per_sequence,
            block_size: self.block_size,
        })
    }
}

/// Addresses of the step inputs, copied out for one op.
#[derive(Clone, Copy)]
pub(crate) struct StepView {
    pub tokens: u64,
    pub positions: u64,
    pub sequence: u64,
    pub block_tables: u64,
    pub rows: usize,
    pub blocks_per_sequence: usize,
    pub block_size: usize,
}

/// Scratch areas of the ops, each grown to the largest size asked for.
pub(crate) struct Scratch {
    /// Trellis linear: Hadamard-transformed inputs `[rows, k_pad]`.
    pub xh: Growable<f32>,
    /// Trellis linear: split-k partial products `[splits, rows, n_pad]`.
    pub partial: Growable<f32>,
    /// Trellis linear: per (row tile, column block) count of finished splits; always zero
    /// between launches (the last split resets it).
    pub tickets: Growable<u32>,
    /// MoE routing: logits `[rows, experts]` and per-token tickets (+1 for the launch).
    pub route_logits: Growable<f32>,
    pub route_tickets: Growable<u32>,
    /// MoE: per pair source token, expert, and the pair index of each routing entry.
    pub pair_src: Growable<i32>,
    pub pair_desc: Growable<i32>,
    pub pair_of: Growable<i32>,
    /// MoE: row tiles `(expert, first pair, pairs)`.
    pub tiles: Growable<i32>,
    /// MoE: gathered gate / up / down outputs per pair.
    pub moe_gate: Growable<f32>,
    pub moe_up: Growable<f32>,
    pub moe_down: Growable<f32>,
    /// MLA: absorbed queries and attention outputs in latent space `[rows, heads, rank]`.
    pub q_lat: Growable<f32>,
    pub o_lat: Growable<f32>,
    /// MLA decode: per split (max, sum) and unnormalised accumulators of every head.
    pub mla_ml: Growable<f32>,
    pub mla_acc: Growable<f32>,
    /// Greedy decoding: the id chosen in each row of logits.
    pub argmax_ids: Growable<u32>,
    /// Greedy decoding: each row's per-block candidates and ticket (see `ops::argmax_rows`).
    pub argmax_parts: Growable<u32>,
}

impl Scratch {
    pub const fn new() -> Scratch {
        Scratch {
            xh: Growable::new("trellis input transform"),
            partial: Growable::new("trellis partial sums"),
            tickets: Growable::new("trellis split tickets"),
            route_logits: Growable::new("MoE router logits"),
            route_tickets: Growable::new("MoE routing tickets"),
            pair_src: Growable::new("MoE pair tokens"),
            pair_desc: Growable::new("MoE pair experts"),
            pair_of: Growable::new("MoE routing pairs"),
            tiles: Growable::new("MoE row tiles"),
            moe_gate: Growable::new("MoE gate outputs"),
            moe_up: Growable::new("MoE up outputs"),
            moe_down: Growable::new("MoE down outputs"),
            q_lat: Growable::new("MLA latent queries"),
            o_lat: Growable::new("MLA latent outputs"),
            mla_ml: Growable::new("MLA split softmax states"),
            mla_acc: Growable::new("MLA split accumulators"),
            argmax_ids: Growable::new("greedy token ids"),
            argmax_parts: Growable::new("greedy choice candidates"),
        }
    }
}

pub(crate) fn check_len(what: &str, have: usize, need: usize) -> Result<()> {
    if have < need {
        return Err(cuda_error(format!("{what}: {have} values, need {need}")));
    }
    Ok(())
}

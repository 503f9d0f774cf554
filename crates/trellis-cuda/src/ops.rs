//! Launch wrappers of the elementwise and row-wise kernels.

use crate::device::{Args, Device, Grid};
use crate::linear::DenseType;

const THREADS: u32 = 256;

fn to_i32(v: usize) -> i32 {
    i32::try_from(v).expect("size fits the kernels' 32-bit ints")
}

fn stride_grid(dev: &Device, n: usize) -> Grid {
    Grid::new((dev.stride_blocks(n, THREADS as usize), 1, 1), THREADS)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn embed(
    dev: &Device,
    table: u64,
    dtype: DenseType,
    tokens: u64,
    rows: usize,
    hidden: usize,
    scale: f32,
    out: u64,
) {
    let k = &dev.kernels;
    let kernel = match dtype {
        DenseType::F32 => &k.embed_f32,
        DenseType::F16 => &k.embed_f16,
        DenseType::BF16 => &k.embed_bf16,
    };
    let mut args = Args::new();
    args.arg(table)
        .arg(tokens)
        .arg(to_i32(rows))
        .arg(to_i32(hidden))
        .arg(scale)
        .arg(out);
    dev.launch(kernel, stride_grid(dev, rows * hidden), &mut args);
}

/// Row-wise RMSNorm of `rows` rows of `width` values; `out` may be `x`.
pub(crate) fn rms_norm(
    dev: &Device,
    x: u64,
    weight: u64,
    eps: f32,
    rows: usize,
    width: usize,
    out: u64,
) {
    if rows == 0 {
        return;
    }
    let mut args = Args::new();
    args.arg(x).arg(weight).arg(eps).arg(to_i32(width)).arg(out);
    let threads = if width >= 1024 { 512 } else { 256 };
    dev.launch(
        &dev.kernels.rms_norm,
        Grid::new((rows, 1, 1), threads),
        &mut args,
    );
}

pub(crate) fn add(dev: &Device, x: u64, y: u64, len: usize) {
    if len == 0 {
        return;
    }
    let mut args = Args::new();
    args.arg(x).arg(y).arg(len as u64);
    dev.launch(&dev.kernels.add_inplace, stride_grid(dev, len), &mut args);
}

pub(crate) fn silu_mul(dev: &Device, gate: u64, up: u64, len: usize) {
    if len == 0 {
        return;
    }
    let mut args = Args::new();
    args.arg(gate).arg(up).arg(len as u64);
    dev.launch(&dev.kernels.silu_mul, stride_grid(dev, len), &mut args);
}

pub(crate) fn gelu_tanh_mul(dev: &Device, gate: u64, up: u64, len: usize) {
    if len == 0 {
        return;
    }
    let mut args = Args::new();
    args.arg(gate).arg(up).arg(len as u64);
    dev.launch(&dev.kernels.gelu_tanh_mul, stride_grid(dev, len), &mut args);
}

/// Row list of the `copy_rows` kernel (mirrors `RowList` in `kernels/elementwise.cu`).
#[repr(C)]
#[derive(Clone, Copy)]
struct RowList {
    count: i32,
    rows: [i32; ROW_LIST_CAPACITY],
}
const ROW_LIST_CAPACITY: usize = 64;
// SAFETY: plain `repr(C)` data whose layout matches the kernel's struct.
unsafe impl cudarc::driver::DeviceRepr for RowList {}

/// `dst[j] = src[rows[j]]`; the indices travel as kernel parameters, 64 per launch.
pub(crate) fn copy_rows(dev: &Device, src: u64, width: usize, rows: &[u32], dst: u64) {
    for (chunk_index, chunk) in rows.chunks(ROW_LIST_CAPACITY).enumerate() {
        let mut list = RowList {
            count: to_i32(chunk.len()),
            rows: [0; ROW_LIST_CAPACITY],
        };
        for (slot, &r) in list.rows.iter_mut().zip(chunk) {
            *slot = i32::try_from(r).expect("row index fits i32");
        }
        let mut args = Args::new();
        args.arg(src)
            .arg(dst)
            .arg(to_i32(width))
            .arg_struct(&list)
            .arg(to_i32(chunk_index * ROW_LIST_CAPACITY));
        dev.launch(
            &dev.kernels.copy_rows,
            Grid::new((width.div_ceil(THREADS as usize), chunk.len(), 1), THREADS),
            &mut args,
        );
    }
}

/// Parts per row of `argmax_rows` at most (`ARGMAX_MAX_PARTS` in `kernels/elementwise.cu`),
/// and the scratch values each row needs: the parts' values and indices, and a ticket.
pub(crate) const ARGMAX_MAX_PARTS: usize = 64;
pub(crate) const ARGMAX_SCRATCH_PER_ROW: usize = 2 * ARGMAX_MAX_PARTS + 1;
/// Threads per block of `argmax_rows`, and about how many values each thread scans.
const ARGMAX_THREADS: u32 = 256;
const ARGMAX_VALUES_PER_THREAD: usize = 16;

/// `ids[r]` = the greedy choice of row r of `src` (`rows` rows of `width` values); `parts` is
/// `rows × ARGMAX_SCRATCH_PER_ROW` zeroed values (the kernel leaves them zeroed).
pub(crate) fn argmax_rows(dev: &Device, src: u64, width: usize, rows: usize, ids: u64, parts: u64) {
    let per_part = ARGMAX_THREADS as usize * ARGMAX_VALUES_PER_THREAD;
    let blocks = width.div_ceil(per_part).clamp(1, ARGMAX_MAX_PARTS);
    // Rows go in the grid's y, which holds at most 65,535.
    for first in (0..rows).step_by(65_535) {
        let count = (rows - first).min(65_535);
        let mut args = Args::new();
        args.arg(src + 4 * (first * width) as u64)
            .arg(to_i32(width))
            .arg(ids + 4 * first as u64)
            .arg(parts + 4 * (first * ARGMAX_SCRATCH_PER_ROW) as u64);
        dev.launch(
            &dev.kernels.argmax_rows,
            Grid::new((blocks, count, 1), ARGMAX_THREADS),
            &mut args,
        );
    }
}

/// Rope parameters on the device.
pub struct CudaRope {
    pub(crate) inv_freq: crate::memory::DeviceMem<f32>,
    pub(crate) half: usize,
    pub(crate) scaling: f32,
    pub(crate) interleaved: bool,
}

impl CudaRope {
    /// Rotated dims per head.
    pub fn dim(&self) -> usize {
        2 * self.half
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn rope(
    dev: &Device,
    x: u64,
    rope: &CudaRope,
    heads: usize,
    head_dim: usize,
    offset: usize,
    positions: u64,
    rows: usize,
) {
    let n = rows * heads * rope.half;
    if n == 0 {
        return;
    }
    let mut args = Args::new();
    args.arg(x)
        .arg(rope.inv_freq.ptr)
        .arg(to_i32(rope.half))
        .arg(rope.scaling)
        .arg(i32::from(rope.interleaved))
        .arg(to_i32(heads))
        .arg(to_i32(head_dim))
        .arg(to_i32(offset))
        .arg(positions)
        .arg(to_i32(rows));
    dev.launch(&dev.kernels.rope, stride_grid(dev, n), &mut args);
}

pub(crate) fn fill(dev: &Device, x: u64, value: f32, len: usize) {
    if len == 0 {
        return;
    }
    let mut args = Args::new();
    args.arg(x).arg(value).arg(len as u64);
    dev.launch(&dev.kernels.fill_f32, stride_grid(dev, len), &mut args);
}

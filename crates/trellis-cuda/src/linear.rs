//! Linear layers on the device: EXL3 trellis weights kept packed and decoded inside the
//! product, and dense f32/f16/bf16 weights. The same launches serve a plain layer (rows
//! 0..n, one weight) and the experts of an MoE layer (pairs sorted by expert, each row tile
//! with its expert's weight), through device-side descriptor tables.

use crate::device::{Args, Device, Grid, Kernel, TILE_ROWS, cuda_error};
use crate::memory::{DeviceMem, Scratch};
use cudarc::driver::DeviceRepr;
use trellis_backend::{BackendError, Result};
use trellis_codec::{BitWidth, Codebook, TrellisLinear};
use trellis_format::{DType, TensorView};

/// Device view of one trellis weight (mirrors `TrellisDesc` in `kernels/trellis.cu`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct TrellisDesc {
    pub words: u64,
    pub suh: u64,
    pub svh: u64,
    pub bias: u64,
    pub bits_x2: i32,
    pub codebook: i32,
    pub reserved: [i32; 2],
}
// SAFETY: plain `repr(C)` data whose layout matches the kernel's struct.
unsafe impl DeviceRepr for TrellisDesc {}

/// Device view of one dense weight (mirrors `DenseDesc` in `kernels/dense.cu`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct DenseDesc {
    pub weight: u64,
    pub bias: u64,
}
// SAFETY: plain `repr(C)` data whose layout matches the kernel's struct.
unsafe impl DeviceRepr for DenseDesc {}

/// Element type of a dense tensor on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenseType {
    F32,
    F16,
    BF16,
}

impl DenseType {
    /// Bytes per value.
    pub fn size(self) -> usize {
        match self {
            DenseType::F32 => 4,
            DenseType::F16 | DenseType::BF16 => 2,
        }
    }

    pub fn of(view: &TensorView<'_>) -> Result<DenseType> {
        match view.dtype {
            DType::F32 => Ok(DenseType::F32),
            DType::F16 => Ok(DenseType::F16),
            DType::BF16 => Ok(DenseType::BF16),
            other => Err(BackendError::Weight {
                tensor: view.name.to_string(),
                reason: format!("dtype {other:?} is not a float type"),
            }),
        }
    }
}

/// A dense tensor uploaded in its stored precision.
pub(crate) struct DenseTensor {
    pub mem: DeviceMem<u8>,
    pub dtype: DenseType,
}

impl DenseTensor {
    pub fn upload(dev: &Device, view: &TensorView<'_>) -> Result<DenseTensor> {
        let dtype = DenseType::of(view)?;
        Ok(DenseTensor {
            mem: DeviceMem::from_host(dev, view.bytes, view.name)?,
            dtype,
        })
    }
}

fn codebook_index(cb: Codebook) -> i32 {
    match cb {
        Codebook::Inst3 => 0,
        Codebook::Mcg => 1,
        Codebook::Mul1 => 2,
    }
}

fn bits_x2(bits: BitWidth) -> i32 {
    (bits.as_f64() * 2.0) as i32
}

/// Padded shape of a trellis layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TrellisShape {
    pub in_features: usize,
    pub out_features: usize,
    pub k_pad: usize,
    pub n_pad: usize,
}

pub struct TrellisWeights {
    _words: DeviceMem<u16>,
    _suh: DeviceMem<u16>,
    _svh: DeviceMem<u16>,
    _bias: Option<DeviceMem<u16>>,
    pub(crate) desc: TrellisDesc,
    /// A one-entry descriptor table for plain calls.
    pub(crate) table: DeviceMem<TrellisDesc>,
    pub(crate) shape: TrellisShape,
    pub bits: BitWidth,
    pub codebook: Codebook,
}

pub struct DenseWeights {
    _weight: DenseTensor,
    _bias: Option<DeviceMem<f32>>,
    pub(crate) desc: DenseDesc,
    pub(crate) table: DeviceMem<DenseDesc>,
    pub dtype: DenseType,
    pub in_features: usize,
    pub out_features: usize,
}

/// A linear layer on the GPU.
pub enum CudaLinear {
    Trellis(TrellisWeights),
    Dense(DenseWeights),
}

impl CudaLinear {
    pub fn in_features(&self) -> usize {
        match self {
            CudaLinear::Trellis(t) => t.shape.in_features,
            CudaLinear::Dense(d) => d.in_features,
        }
    }

    pub fn out_features(&self) -> usize {
        match self {
            CudaLinear::Trellis(t) => t.shape.out_features,
            CudaLinear::Dense(d) => d.out_features,
        }
    }
}

fn f16_bits(values: &[half::f16]) -> Vec<u16> {
    values.iter().map(|v| v.to_bits()).collect()
}

pub(crate) fn upload_trellis(
    dev: &Device,
    name: &str,
    t: &TrellisLinear<'_>,
) -> Result<TrellisWeights> {
    let words = DeviceMem::from_host(dev, &t.trellis, name)?;
    let suh = DeviceMem::from_host(dev, &f16_bits(&t.suh), name)?;
    let svh = DeviceMem::from_host(dev, &f16_bits(&t.svh), name)?;
    let bias = match &t.bias {
        Some(b) => Some(DeviceMem::from_host(dev, &f16_bits(b), name)?),
        None => None,
    };
    let desc = TrellisDesc {
        words: words.ptr,
        suh: suh.ptr,
        svh: svh.ptr,
        bias: bias.as_ref().map_or(0, |b| b.ptr),
        bits_x2: bits_x2(t.bits),
        codebook: codebook_index(t.codebook),
        reserved: [0; 2],
    };
    let table = DeviceMem::from_host(dev, &[desc], name)?;
    Ok(TrellisWeights {
        _words: words,
        _suh: suh,
        _svh: svh,
        _bias: bias,
        desc,
        table,
        shape: TrellisShape {
            in_features: t.in_features,
            out_features: t.out_features,
            k_pad: t.k_padded,
            n_pad: t.n_padded,
        },
        bits: t.bits,
        codebook: t.codebook,
    })
}

/// `values` as little-endian f16 bytes, or `None` if one of them does not fit f16's range.
/// In parallel: a dequantized model converts tens of billions of values at load.
fn f16_bytes(values: &[f32]) -> Option<Vec<u8>> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    let mut bytes = vec![0u8; 2 * values.len()];
    let fits = bytes
        .par_chunks_mut(2 * CHUNK)
        .zip(values.par_chunks(CHUNK))
        .all(|(out, chunk)| {
            let mut fits = true;
            for (o, &v) in out.chunks_exact_mut(2).zip(chunk) {
                let h = half::f16::from_f32(v);
                fits &= h.is_finite() || !v.is_finite();
                o.copy_from_slice(&h.to_le_bytes());
            }
            fits
        });
    fits.then_some(bytes)
}

/// A trellis linear decoded once into dense f16 `[out, in]` weights (`--dequantize`). Falls
/// back to f32 for a tensor whose values do not fit f16's range, so nothing turns infinite.
pub(crate) fn upload_trellis_dequantized(
    dev: &Device,
    name: &str,
    t: &TrellisLinear<'_>,
) -> Result<DenseWeights> {
    let weight = t.dequantize_transposed();
    let (bytes, dtype) = match f16_bytes(&weight) {
        Some(bytes) => (bytes, DenseType::F16),
        None => (
            weight.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DenseType::F32,
        ),
    };
    drop(weight);
    let tensor = DenseTensor {
        mem: DeviceMem::from_host(dev, &bytes, name)?,
        dtype,
    };
    drop(bytes);
    let bias = match &t.bias {
        Some(b) => {
            let values: Vec<f32> = b[..t.out_features].iter().map(|v| v.to_f32()).collect();
            Some(DeviceMem::from_host(dev, &values, name)?)
        }
        None => None,
    };
    dense_weights(dev, name, tensor, bias, t.in_features, t.out_features)
}

pub(crate) fn upload_dense(
    dev: &Device,
    name: &str,
    weight: &TensorView<'_>,
    bias: Option<&TensorView<'_>>,
) -> Result<DenseWeights> {
    let [out_features, in_features] = weight.shape[..] else {
        return Err(BackendError::Weight {
            tensor: name.to_string(),
            reason: format!("expected a 2-D weight, got shape {:?}", weight.shape),
        });
    };
    let tensor = DenseTensor::upload(dev, weight)?;
    let bias = match bias {
        Some(b) => {
            let values = b.to_f32()?;
            if values.len() != out_features {
                return Err(BackendError::Weight {
                    tensor: b.name.to_string(),
                    reason: format!("bias of {} values for {out_features} outputs", values.len()),
                });
            }
            Some(DeviceMem::from_host(dev, &values, b.name)?)
        }
        None => None,
    };
    dense_weights(dev, name, tensor, bias, in_features, out_features)
}

fn dense_weights(
    dev: &Device,
    name: &str,
    tensor: DenseTensor,
    bias: Option<DeviceMem<f32>>,
    in_features: usize,
    out_features: usize,
) -> Result<DenseWeights> {
    let desc = DenseDesc {
        weight: tensor.mem.ptr,
        bias: bias.as_ref().map_or(0, |b| b.ptr),
    };
    let table = DeviceMem::from_host(dev, &[desc], name)?;
    Ok(DenseWeights {
        dtype: tensor.dtype,
        _weight: tensor,
        _bias: bias,
        desc,
        table,
        in_features,
        out_features,
    })
}

/// Which rows a linear launch works on.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowMap {
    /// Rows computed (output rows).
    pub rows: usize,
    /// Row tile height (one of `TILE_ROWS`).
    pub tile_rows: usize,
    /// Device `(desc, first row, rows)` triples, or 0 for implicit tiles of descriptor 0.
    pub tiles: u64,
    /// Number of tiles (the grid's y extent).
    pub num_tiles: usize,
    /// Device descriptor index per row, or 0 for descriptor 0 everywhere.
    pub row_desc: u64,
    /// Device input row per output row, or 0 for the identity.
    pub src_rows: u64,
}

impl RowMap {
    /// Rows 0..rows of one weight.
    pub fn plain(rows: usize) -> RowMap {
        RowMap::plain_tiles(rows, tile_rows_for(rows))
    }

    /// Rows 0..rows of one trellis weight (tensor-core tiles for many rows).
    pub fn plain_trellis(dev: &Device, rows: usize) -> RowMap {
        RowMap::plain_tiles(rows, trellis_tile_rows(dev, rows))
    }

    fn plain_tiles(rows: usize, tile_rows: usize) -> RowMap {
        RowMap {
            rows,
            tile_rows,
            tiles: 0,
            num_tiles: rows.div_ceil(tile_rows),
            row_desc: 0,
            src_rows: 0,
        }
    }
}

/// Row tile height of the tensor-core trellis kernel (`trellis_mma_tm64`).
pub(crate) const MMA_TILE_ROWS: usize = 64;
/// Most rows of a tile of the 16-row tensor-core trellis kernel (`trellis_mma_tm16`).
const MMA16_TILE_ROWS: usize = 16;
/// Tiles of fewer rows keep the SIMT kernels. On the H200 (4096 × 14336, K=4, µs, SIMT / MMA):
/// 1 row 42.3 / 53.4 (whole decode 149 / 134 tok/s), 2 rows 46.4 / 57.8, 4 rows 58.7 / 59.4,
/// 8 rows 80.4 / 63.5; 16 rows took 143.8 in the 64-row kernel.
const MMA16_MIN_ROWS: usize = 8;
/// Without the 16-row kernel, row groups at least this tall use the 64-row tensor-core kernel
/// (its cost per weight tile is the decode, whatever the rows; below this the SIMT tiles of up
/// to 8 rows keep more blocks per SM).
const MMA_MIN_ROWS: usize = 9;

/// The tile height of trellis launches over row groups of about `rows` rows: the tensor-core
/// kernel's 64 for tall groups (prefill), else one of `TILE_ROWS`.
pub(crate) fn trellis_tile_rows(dev: &Device, rows: usize) -> usize {
    // With the 16-row tensor-core kernel, groups of up to 16 rows take one of its tiles.
    let min_rows = if dev.mma16 {
        MMA16_TILE_ROWS + 1
    } else {
        MMA_MIN_ROWS
    };
    if dev.mma && !dev.unfused_linear && rows >= min_rows {
        MMA_TILE_ROWS
    } else {
        tile_rows_for(rows)
    }
}

/// The tile height for row groups of about `rows` rows.
pub(crate) fn tile_rows_for(rows: usize) -> usize {
    TILE_ROWS
        .iter()
        .copied()
        .find(|&tm| tm >= rows)
        .unwrap_or(TILE_ROWS[TILE_ROWS.len() - 1])
}

fn tile_kernel(kernels: &[Kernel], tile_rows: usize) -> &Kernel {
    let i = TILE_ROWS
        .iter()
        .position(|&tm| tm == tile_rows)
        .expect("tile height is one of TILE_ROWS");
    &kernels[i]
}

/// k-tiles staged per matmul iteration and threads per block (`MM_KTILES`, `MM_THREADS`).
const MM_KTILES: usize = 8;
const MM_THREADS: u32 = 256;
/// Shared-memory words per staged k-tile in the single-launch kernels (`MM_TILE_WORDS`).
const MM_TILE_WORDS: usize = 8 * 64;
/// Word buffers of each warp of `trellis_row_tm1`, and the most batches a block of it covers
/// (`ROW_BUFFERS`, `ROW_MAX_BATCHES`; longer k-ranges take `trellis_linear_tm1`).
const ROW_BUFFERS: usize = 2;
const ROW_MAX_BATCHES: usize = 16;

/// Activations in and out of a linear launch: device addresses and row strides (in values).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Io {
    pub x: u64,
    pub in_stride: usize,
    pub out: u64,
    pub out_stride: usize,
}

fn to_i32(v: usize) -> i32 {
    i32::try_from(v).expect("size fits the kernels' 32-bit ints")
}

/// One output of a trellis launch (mirrors `LinearOut` in `kernels/trellis.cu`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct LinearOutArgs {
    descs: u64,
    out: u64,
    partial: u64,
    n_pad: i32,
    out_features: i32,
    out_stride: i32,
    col_blocks: i32,
}

/// Most weights one trellis launch serves (`LIN_MAX_OUT`).
pub(crate) const MAX_TARGETS: usize = 2;

/// Parameters of `trellis_linear_tm*` (mirrors `LinearArgs` in `kernels/trellis.cu`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct LinearArgs {
    tiles: u64,
    src_rows: u64,
    x: u64,
    x_up: u64,
    norm_w: u64,
    tickets: u64,
    o: [LinearOutArgs; MAX_TARGETS],
    rows: i32,
    in_stride: i32,
    in_features: i32,
    k_pad: i32,
    ktiles_per_split: i32,
    splits: i32,
    residual: i32,
    outputs: i32,
    tiles_settled: i32,
    eps: f32,
    combine: MoeCombineArgs,
}

/// Mirrors `MoeCombineArgs` in `kernels/trellis.cu` (all zero: no combine).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct MoeCombineArgs {
    pair_of: u64,
    weights: u64,
    out: u64,
    tickets: u64,
    top_k: i32,
    has_shared: i32,
    residual: i32,
    reserved: i32,
}
// SAFETY: plain `repr(C)` data whose layout matches the kernel's struct (8-byte pointers
// first, then 4-byte fields, as both compilers lay them out).
unsafe impl DeviceRepr for LinearArgs {}

/// One weight of a trellis launch and where its output goes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TrellisTarget {
    /// Device descriptor table (indexed by the row tiles' descriptors).
    pub table: u64,
    pub shape: TrellisShape,
    pub out: u64,
    pub out_stride: usize,
    /// The widest code of the table's descriptors (2 × bits per weight).
    pub max_bits_x2: i32,
}

impl TrellisTarget {
    pub fn of(t: &TrellisWeights, out: u64) -> TrellisTarget {
        TrellisTarget {
            table: t.table.ptr,
            shape: t.shape,
            out,
            out_stride: t.shape.out_features,
            max_bits_x2: t.desc.bits_x2,
        }
    }
}

/// A trellis launch: one or two weights over the same input rows, with optional fused input
/// (RMSNorm or gated activation) and output (residual add) stages.
pub(crate) struct TrellisJob<'a> {
    pub map: &'a RowMap,
    pub x: u64,
    pub in_stride: usize,
    /// Non-zero: the input is `silu(x) ⊙ x_up` (same layout as `x`).
    pub x_up: u64,
    /// The input is `RMSNorm(x)·weight` with this (weight, eps).
    pub norm: Option<(u64, f32)>,
    /// `out += y` instead of `out = y`.
    pub residual: bool,
    pub targets: &'a [TrellisTarget],
    /// The MoE combine to fold into this launch (the experts' down projection of one token).
    pub combine: Option<MoeCombine>,
    /// The map's row tiles were written before the previous launch began (the experts' down
    /// launch follows gate+up, which waited for the routing): the blocks may read them and
    /// request their first weights before waiting for the previous launch.
    pub tiles_settled: bool,
}

/// `out (+)= Σ_j weights[j] · y[pair_of[j]] (+ y[pair_of[top_k]], the shared expert)` over the
/// launch's output rows `y`, for one token whose pairs each fill one row tile.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MoeCombine {
    pub pair_of: u64,
    pub weights: u64,
    pub top_k: usize,
    pub has_shared: bool,
    pub residual: bool,
    pub out: u64,
}

/// `out = x · W` for trellis weights described by the device table `table`. With `x_up`
/// non-zero the input is `silu(x) ⊙ x_up` (same layout as `x`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn trellis_forward(
    dev: &Device,
    scratch: &mut Scratch,
    table: u64,
    shape: TrellisShape,
    max_bits_x2: i32,
    map: &RowMap,
    io: Io,
    x_up: u64,
) {
    if map.rows == 0 {
        return;
    }
    if dev.unfused_linear {
        let x = if x_up != 0 {
            // The three-launch path has no fused activation: apply it in place first.
            crate::ops::silu_mul(dev, io.x, x_up, map.rows * io.in_stride);
            io.x
        } else {
            io.x
        };
        trellis_forward_unfused(dev, scratch, table, shape, max_bits_x2, map, Io { x, ..io });
        return;
    }
    trellis_launch(
        dev,
        scratch,
        &TrellisJob {
            map,
            x: io.x,
            in_stride: io.in_stride,
            x_up,
            norm: None,
            residual: false,
            targets: &[TrellisTarget {
                table,
                shape,
                out: io.out,
                out_stride: io.out_stride,
                max_bits_x2,
            }],
            combine: None,
            tiles_settled: false,
        },
    );
}

/// Whether [`trellis_launch`] can serve these weights together: at most [`MAX_TARGETS`], all
/// reading the same inputs.
pub(crate) fn can_share_launch(targets: &[TrellisTarget]) -> bool {
    (1..=MAX_TARGETS).contains(&targets.len())
        && targets.iter().all(|t| {
            t.shape.in_features == targets[0].shape.in_features
                && t.shape.k_pad == targets[0].shape.k_pad
        })
}

/// Blocks of a SIMT trellis launch that fit on one SM at once: the minimum each kernel's
/// `__launch_bounds__` fits its registers to (`kernels/trellis.cu`). None for the tensor-core
/// kernels: splitting their 64-row tiles further to even out waves measured slower (prefill).
fn simt_blocks_per_sm(tile_rows: usize, mma: bool) -> Option<usize> {
    match (mma, tile_rows) {
        (true, _) => None,
        (false, 1 | 2) => Some(3),
        (false, 4 | 8) => Some(2),
        _ => Some(1),
    }
}

/// How a launch of `base_blocks` blocks splits its `tiles_k` k-tiles: `(k-tiles per split,
/// splits)`, whole staging batches each, the last split taking what is left.
///
/// SIMT launches, whose `resident` blocks per wave are known, take the split of least modelled
/// time: waves × (batches of a block + one batch of fixed cost: first loads, ticket, finish),
/// fewer splits on ties. That fills the GPU, never runs a short last wave (the GLM lm_head's
/// 1,210 column blocks in waves of 396 ran a fourth wave of 22 blocks as long as the others;
/// two halves of the reduction took it from 207 to 182 µs), and gives o_proj two batches a
/// block (40 batches over 16 column blocks: 20 splits, where aiming for about `wanted_blocks`
/// blocks gave 14 of three). Tensor-core launches split until the grid has about
/// `wanted_blocks` blocks (evening out their waves measured slower for prefill).
fn split_reduction(
    base_blocks: usize,
    tiles_k: usize,
    wanted_blocks: usize,
    resident: Option<usize>,
) -> (usize, usize) {
    let base_blocks = base_blocks.max(1);
    let batches = (tiles_k / MM_KTILES).max(1);
    // `splits` cut into whole batches: (k-tiles per split, splits left non-empty).
    let shape = |splits: usize| {
        let per_split = tiles_k.div_ceil(splits).next_multiple_of(MM_KTILES);
        (per_split, tiles_k.div_ceil(per_split))
    };
    let Some(resident) = resident else {
        return shape(wanted_blocks.div_ceil(base_blocks).clamp(1, batches));
    };
    let cost = |(per_split, splits): (usize, usize)| {
        (base_blocks * splits).div_ceil(resident) * (per_split / MM_KTILES + 1)
    };
    (1..=batches)
        .map(shape)
        .min_by_key(|&candidate| cost(candidate))
        .unwrap_or((tiles_k, 1))
}

/// The single-launch trellis linear (see `trellis_linear_tm*` in `kernels/trellis.cu`).
///
/// Returns whether the job's `combine` was folded in; it is only when the launch has one weight
/// and every row tile holds one row (then each is one (token, expert) pair and all are used).
pub(crate) fn trellis_launch(dev: &Device, scratch: &mut Scratch, job: &TrellisJob<'_>) -> bool {
    let map = job.map;
    if map.rows == 0 {
        return false;
    }
    assert!(
        can_share_launch(job.targets),
        "trellis launch of {} weights with different inputs",
        job.targets.len()
    );
    let first = job.targets[0].shape;
    let (in_features, k_pad) = (first.in_features, first.k_pad);
    let rows = map.rows;
    let tiles_k = k_pad / 16;
    let column_blocks: usize = job.targets.iter().map(|t| t.shape.n_pad / 128).sum();
    // Split the reduction in whole Hadamard blocks (see `split_reduction`). Grouped launches
    // (MoE) reserve tiles that stay empty; count the ones the rows fill at least.
    let busy_tiles = if map.tiles != 0 {
        map.rows.div_ceil(map.tile_rows).min(map.num_tiles)
    } else {
        map.num_tiles
    };
    let base_blocks = column_blocks * busy_tiles;
    let mma = map.tile_rows == MMA_TILE_ROWS
        || (dev.mma16 && (MMA16_MIN_ROWS..=MMA16_TILE_ROWS).contains(&map.tile_rows));
    let resident = simt_blocks_per_sm(map.tile_rows, mma).map(|b| b * dev.sm_count);
    let (ktiles_per_split, splits) = split_reduction(
        base_blocks,
        tiles_k,
        dev.split_waves * dev.sm_count,
        resident,
    );
    let n_pad_total: usize = job.targets.iter().map(|t| t.shape.n_pad).sum();
    let partial = if splits > 1 {
        scratch.partial.ensure(dev, splits * rows * n_pad_total)
    } else {
        0
    };
    let combine = job
        .combine
        .filter(|_| job.targets.len() == 1 && map.tile_rows == 1 && map.num_tiles == map.rows);
    // The combine's per-column-block tickets follow the split tickets.
    let split_tickets = map.num_tiles * column_blocks;
    let tickets = scratch.tickets.ensure(
        dev,
        split_tickets + if combine.is_some() { column_blocks } else { 0 },
    );

    let mut args = LinearArgs {
        tiles: map.tiles,
        src_rows: map.src_rows,
        x: job.x,
        x_up: job.x_up,
        norm_w: job.norm.map_or(0, |(w, _)| w),
        tickets,
        rows: to_i32(rows),
        in_stride: to_i32(job.in_stride),
        in_features: to_i32(in_features),
        k_pad: to_i32(k_pad),
        ktiles_per_split: to_i32(ktiles_per_split),
        splits: to_i32(splits),
        residual: i32::from(job.residual),
        outputs: to_i32(job.targets.len()),
        tiles_settled: i32::from(job.tiles_settled && map.tiles != 0),
        eps: job.norm.map_or(0.0, |(_, eps)| eps),
        combine: combine.map_or_else(MoeCombineArgs::default, |c| MoeCombineArgs {
            pair_of: c.pair_of,
            weights: c.weights,
            out: c.out,
            tickets: tickets + 4 * split_tickets as u64,
            top_k: to_i32(c.top_k),
            has_shared: i32::from(c.has_shared),
            residual: i32::from(c.residual),
            reserved: 0,
        }),
        ..LinearArgs::default()
    };
    let mut partial_offset = 0usize;
    for (slot, t) in args.o.iter_mut().zip(job.targets) {
        *slot = LinearOutArgs {
            descs: t.table,
            out: t.out,
            partial: if partial != 0 {
                partial + 4 * partial_offset as u64
            } else {
                0
            },
            n_pad: to_i32(t.shape.n_pad),
            out_features: to_i32(t.shape.out_features),
            out_stride: to_i32(t.out_stride),
            col_blocks: to_i32(t.shape.n_pad / 128),
        };
        partial_offset += splits * rows * t.shape.n_pad;
    }

    // Staged words: MM_KTILES k-tiles at a constant stride of `MM_TILE_WORDS` (any width).
    let words_bytes = MM_KTILES * MM_TILE_WORDS * 4;
    let mut launch = Args::new();
    launch.arg_struct(&args);
    if map.tile_rows == MMA_TILE_ROWS {
        // Inputs staged as fp16 hi + lo rows of 136 values (aliased by the 64 × 128 products).
        let x_bytes = (2 * MMA_TILE_ROWS * 136 * 2).max(MMA_TILE_ROWS * 128 * 4);
        dev.launch(
            &dev.kernels.trellis_mma_tm64,
            Grid::new((column_blocks, map.num_tiles, splits), MM_THREADS)
                .shared(words_bytes + x_bytes),
            &mut launch,
        );
        return combine.is_some();
    }
    if dev.mma16 && (MMA16_MIN_ROWS..=MMA16_TILE_ROWS).contains(&map.tile_rows) {
        // As above with 16-row fp16 hi + lo inputs (tiles of 8–16 rows: batched decode).
        let x_bytes = (2 * MMA16_TILE_ROWS * 136 * 2).max(MMA16_TILE_ROWS * 128 * 4);
        dev.launch(
            &dev.kernels.trellis_mma_tm16,
            Grid::new((column_blocks, map.num_tiles, splits), MM_THREADS)
                .shared(words_bytes + x_bytes),
            &mut launch,
        );
        return combine.is_some();
    }
    if dev.row_pipe && map.tile_rows == 1 && ktiles_per_split <= ROW_MAX_BATCHES * MM_KTILES {
        // Each warp's staged words, then the products and the finish's scratch (128 floats
        // each), then the block's transformed inputs.
        let batches = ktiles_per_split / MM_KTILES;
        let max_bits_x2 = job
            .targets
            .iter()
            .map(|t| t.max_bits_x2)
            .max()
            .unwrap_or(16);
        let tile_stride = if max_bits_x2 <= 8 { 32 } else { 64 };
        let bytes = 8 * ROW_BUFFERS * MM_KTILES * tile_stride * 4 + 2 * 128 * 4 + batches * 128 * 4;
        dev.launch(
            &dev.kernels.trellis_row_tm1,
            Grid::new((column_blocks, map.num_tiles, splits), MM_THREADS).shared(bytes),
            &mut launch,
        );
        return combine.is_some();
    }
    let x_bytes = 2 * map.tile_rows * 128 * 4;
    dev.launch(
        tile_kernel(&dev.kernels.trellis_linear, map.tile_rows),
        Grid::new((column_blocks, map.num_tiles, splits), MM_THREADS).shared(words_bytes + x_bytes),
        &mut launch,
    );
    combine.is_some()
}

/// The three-launch form: input transform, split products, output transform.
fn trellis_forward_unfused(
    dev: &Device,
    scratch: &mut Scratch,
    table: u64,
    shape: TrellisShape,
    max_bits_x2: i32,
    map: &RowMap,
    io: Io,
) {
    let TrellisShape {
        in_features,
        out_features,
        k_pad,
        n_pad,
    } = shape;
    let rows = map.rows;
    let tiles_k = k_pad / 16;
    let column_blocks = n_pad / 128;
    // Split the reduction until the grid covers the GPU about twice, keeping ≥ 4 k-tiles each.
    let base_blocks = column_blocks * map.num_tiles;
    let wanted = (2 * dev.sm_count).div_ceil(base_blocks.max(1));
    let max_splits = (tiles_k / 4).max(1);
    let ktiles_per_split = tiles_k.div_ceil(wanted.clamp(1, max_splits));
    let splits = tiles_k.div_ceil(ktiles_per_split);

    let xh = scratch.xh.ensure(dev, rows * k_pad);
    let partial = scratch.partial.ensure(dev, splits * rows * n_pad);
    let k = &dev.kernels;

    let warps_per_block = 4;
    let mut args = Args::new();
    args.arg(table)
        .arg(map.row_desc)
        .arg(map.src_rows)
        .arg(io.x)
        .arg(to_i32(io.in_stride))
        .arg(to_i32(in_features))
        .arg(to_i32(k_pad))
        .arg(xh);
    dev.launch(
        &k.trellis_prep,
        Grid::new(((k_pad / 128).div_ceil(warps_per_block), rows, 1), 128),
        &mut args,
    );

    let words_bytes = MM_KTILES * 8 * 4 * (max_bits_x2 as usize) * 4;
    let x_bytes = map.tile_rows * MM_KTILES * 16 * 4;
    let mut args = Args::new();
    args.arg(table)
        .arg(map.tiles)
        .arg(to_i32(rows))
        .arg(xh)
        .arg(to_i32(k_pad))
        .arg(to_i32(n_pad))
        .arg(to_i32(ktiles_per_split))
        .arg(partial);
    dev.launch(
        tile_kernel(&k.trellis_matmul, map.tile_rows),
        Grid::new((column_blocks, map.num_tiles, splits), MM_THREADS).shared(words_bytes + x_bytes),
        &mut args,
    );

    let mut args = Args::new();
    args.arg(table)
        .arg(map.row_desc)
        .arg(partial)
        .arg(to_i32(splits))
        .arg(to_i32(rows))
        .arg(to_i32(n_pad))
        .arg(to_i32(out_features))
        .arg(to_i32(io.out_stride))
        .arg(io.out);
    dev.launch(
        &k.trellis_finish,
        Grid::new(((n_pad / 128).div_ceil(warps_per_block), rows, 1), 128),
        &mut args,
    );
}

/// `out = x · Wᵀ (+ bias)` for dense weights described by the device table `table`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn dense_forward(
    dev: &Device,
    table: u64,
    dtype: DenseType,
    in_features: usize,
    out_features: usize,
    map: &RowMap,
    io: Io,
) {
    if map.rows == 0 {
        return;
    }
    let k = &dev.kernels;
    let family = match dtype {
        DenseType::F32 => &k.dense_matmul_f32,
        DenseType::F16 => &k.dense_matmul_f16,
        DenseType::BF16 => &k.dense_matmul_bf16,
    };
    let warps_per_block = 8;
    let mut args = Args::new();
    args.arg(table)
        .arg(map.tiles)
        .arg(to_i32(map.rows))
        .arg(map.src_rows)
        .arg(io.x)
        .arg(to_i32(io.in_stride))
        .arg(to_i32(in_features))
        .arg(to_i32(out_features))
        .arg(io.out)
        .arg(to_i32(io.out_stride));
    dev.launch(
        tile_kernel(family, map.tile_rows),
        Grid::new(
            (out_features.div_ceil(warps_per_block), map.num_tiles, 1),
            32 * warps_per_block as u32,
        ),
        &mut args,
    );
}

/// A plain (non-grouped) linear call.
pub(crate) fn linear_forward(
    dev: &Device,
    scratch: &mut Scratch,
    w: &CudaLinear,
    x: u64,
    rows: usize,
    out: u64,
) {
    match w {
        CudaLinear::Trellis(t) => trellis_forward(
            dev,
            scratch,
            t.table.ptr,
            t.shape,
            t.desc.bits_x2,
            &RowMap::plain_trellis(dev, rows),
            Io {
                x,
                in_stride: t.shape.in_features,
                out,
                out_stride: t.shape.out_features,
            },
            0,
        ),
        CudaLinear::Dense(d) => dense_forward(
            dev,
            d.table.ptr,
            d.dtype,
            d.in_features,
            d.out_features,
            &RowMap::plain(rows),
            Io {
                x,
                in_stride: d.in_features,
                out,
                out_stride: d.out_features,
            },
        ),
    }
}

pub(crate) fn unsupported(what: impl Into<String>) -> BackendError {
    cuda_error(what.into())
}

#[cfg(test)]
mod tests {
    use super::{MM_KTILES, split_reduction};
    use trellis_codec::BitWidth;
    use trellis_codec::tile::{position_to_row_col, tile_states};

    #[test]
    fn split_reduction_covers_the_gpu_and_weighs_the_last_wave() {
        // H200: 132 SMs, three one-row blocks each, two waves wanted (the default).
        let (wanted, resident) = (2 * 132, Some(3 * 132));
        // GLM decode, one wave each: experts' gate+up (5 row tiles × 24 column blocks) and
        // down (5 × 16), o_proj (16 column blocks over 5,120 inputs), q_a + kv_a (11), q_b (40
        // over 768 inputs).
        assert_eq!(split_reduction(24 * 5, 128, wanted, resident), (48, 3));
        assert_eq!(split_reduction(16 * 5, 96, wanted, resident), (24, 4));
        assert_eq!(split_reduction(16, 320, wanted, resident), (16, 20));
        assert_eq!(split_reduction(11, 128, wanted, resident), (8, 16));
        assert_eq!(split_reduction(40, 48, wanted, resident), (8, 6));
        // GLM's lm_head: 1,210 column blocks would leave a fourth wave of 22 blocks.
        assert_eq!(split_reduction(1210, 128, wanted, resident), (64, 2));
        // A launch that fills its waves exactly stays whole; tensor-core launches split to
        // about `wanted` blocks.
        assert_eq!(split_reduction(792, 128, wanted, resident), (128, 1));
        assert_eq!(split_reduction(1210, 128, wanted, None), (128, 1));
        assert_eq!(split_reduction(24, 128, wanted, None), (16, 8));
        for base in [1, 7, 100, 396, 397, 1210, 5000] {
            for tiles_k in [8, 16, 96, 128, 320, 1024] {
                for resident in [resident, None] {
                    let (per_split, splits) = split_reduction(base, tiles_k, wanted, resident);
                    assert_eq!(per_split % MM_KTILES, 0, "{base} × {tiles_k}");
                    assert!(per_split * splits >= tiles_k && per_split * (splits - 1) < tiles_k);
                    assert!(splits <= (tiles_k / MM_KTILES).max(1), "{base} × {tiles_k}");
                }
            }
        }
    }

    /// The matmul kernel's per-lane state extraction (`plan` in `trellis_matmul_body`),
    /// transcribed: lane L, slot j reads words i0, i1 of the tile and funnel-shifts by s.
    fn kernel_state(words_u32: &[u32], bits_x2: i32, lane: i32, j: i32) -> u16 {
        let stream_end = |t: i32| {
            let whole = bits_x2 >> 1;
            if bits_x2 & 1 == 1 {
                (t + 1) * whole + ((t + 1) >> 1)
            } else {
                (t + 1) * whole
            }
        };
        let nw = 4 * bits_x2;
        let ring = 128 * bits_x2;
        let t = 8 * lane + j;
        let b0 = stream_end(t) + ring - 16;
        let i0 = (b0 >> 5) % nw;
        let i1 = ((b0 + 15) >> 5) % nw;
        let shift = 31 - ((b0 + 15) & 31);
        let hi = u64::from(words_u32[i0 as usize]);
        let lo = u64::from(words_u32[i1 as usize]);
        ((((hi << 32) | lo) >> shift) & 0xFFFF) as u16
    }

    /// The fused kernels' window extraction (`lane_plan_init` / `decode_tile8`), transcribed:
    /// each half of a lane's eight states comes from one 64-bit window of three words.
    fn kernel_window_states(words_u32: &[u32], bits_x2: i32, lane: i32) -> [u16; 8] {
        let stream_end = |t: i32| {
            let whole = bits_x2 >> 1;
            if bits_x2 & 1 == 1 {
                (t + 1) * whole + ((t + 1) >> 1)
            } else {
                (t + 1) * whole
            }
        };
        let nw = (4 * bits_x2) as usize;
        let ring = 128 * bits_x2;
        let funnel_l = |lo: u32, hi: u32, sh: i32| -> u32 {
            ((((u64::from(hi)) << 32) | u64::from(lo)) << (sh & 31) >> 32) as u32
        };
        let funnel_rc = |lo: u32, hi: u32, sh: i32| -> u32 {
            ((((u64::from(hi)) << 32) | u64::from(lo)) >> sh.min(32)) as u32
        };
        let mut out = [0u16; 8];
        for h in 0..2 {
            let t0 = 8 * lane + 4 * h;
            let start = (stream_end(t0) - 16 + ring) % ring;
            let w0 = (start >> 5) as usize;
            let (a, b, c) = (
                words_u32[w0],
                words_u32[(w0 + 1) % nw],
                words_u32[(w0 + 2) % nw],
            );
            let off = start & 31;
            let hi = funnel_l(b, a, off);
            let lo = funnel_l(c, b, off);
            for i in 0..4 {
                let sh = 32 - (stream_end(i) - stream_end(0));
                out[(4 * h + i) as usize] = (funnel_rc(lo, hi, sh) >> 16) as u16;
            }
        }
        out
    }

    #[test]
    fn f16_bytes_round_once_and_refuse_what_overflows() {
        let values: Vec<f32> = (0..200_000)
            .map(|i| (i as f32 * 0.37).sin() * 3.0)
            .collect();
        let bytes = super::f16_bytes(&values).expect("all in range");
        assert_eq!(bytes.len(), 2 * values.len());
        for (pair, &v) in bytes.chunks_exact(2).zip(&values) {
            assert_eq!(
                u16::from_le_bytes([pair[0], pair[1]]),
                half::f16::from_f32(v).to_bits()
            );
        }
        let mut big = values.clone();
        big[123_456] = 1e5;
        assert!(super::f16_bytes(&big).is_none());
    }

    #[test]
    fn kernel_window_extraction_matches_the_codec() {
        let mut seed = 0x0fed_cba9_8765_4321u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for bits in BitWidth::ALL {
            for _ in 0..4 {
                let words: Vec<u16> = (0..bits.tile_words()).map(|_| next() as u16).collect();
                let u32s: Vec<u32> = words
                    .chunks_exact(2)
                    .map(|p| u32::from(p[0]) | (u32::from(p[1]) << 16))
                    .collect();
                let states = tile_states(&words, bits);
                let bits_x2 = (bits.as_f64() * 2.0) as i32;
                for lane in 0..32 {
                    let got = kernel_window_states(&u32s, bits_x2, lane);
                    for (j, &state) in got.iter().enumerate() {
                        assert_eq!(
                            state,
                            states[8 * lane as usize + j],
                            "K = {bits}, lane {lane}, slot {j}"
                        );
                    }
                }
            }
        }
    }

    /// `codebook_pair`'s arithmetic (fp16 FMA on 0x6400 + byte sum for mul1, one fp16 addition
    /// of the halves for 3INST/mcg), evaluated exactly and rounded once, equals the codec's
    /// decode for every state.
    #[test]
    fn kernel_pair_codebooks_match_the_codec() {
        use half::f16;
        use trellis_codec::Codebook;
        for state in 0..=u16::MAX {
            let s = u32::from(state);
            let x = s.wrapping_mul(0x83DC_D12D);
            let byte_sum: u32 = x.to_le_bytes().iter().map(|&b| u32::from(b)).sum();
            let h = f16::from_bits((0x6400 + byte_sum) as u16).to_f64();
            let mul1 = f16::from_f64(
                h * f16::from_bits(0x1EEE).to_f64() + f16::from_bits(0xC931).to_f64(),
            );
            assert_eq!(
                mul1.to_bits(),
                Codebook::Mul1.decode(state).to_bits(),
                "mul1 {state}"
            );
            for (cb, mult, add) in [
                (Codebook::Inst3, 89_226_354u32, 64_248_484u32),
                (Codebook::Mcg, 0xCBAC_1FED, 0),
            ] {
                let x = (s.wrapping_mul(mult).wrapping_add(add) & 0x8FFF_8FFF) ^ 0x3B60_3B60;
                let lo = f16::from_bits(x as u16).to_f64();
                let hi = f16::from_bits((x >> 16) as u16).to_f64();
                let w = f16::from_f64(lo + hi);
                assert_eq!(
                    w.to_bits(),
                    cb.decode(state).to_bits(),
                    "{} {state}",
                    cb.name()
                );
            }
        }
    }

    #[test]
    fn kernel_state_extraction_matches_the_codec() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for bits in BitWidth::ALL {
            let words: Vec<u16> = (0..bits.tile_words()).map(|_| next() as u16).collect();
            let u32s: Vec<u32> = words
                .chunks_exact(2)
                .map(|p| u32::from(p[0]) | (u32::from(p[1]) << 16))
                .collect();
            let states = tile_states(&words, bits);
            let bits_x2 = (bits.as_f64() * 2.0) as i32;
            for lane in 0..32 {
                for j in 0..8 {
                    let t = (8 * lane + j) as usize;
                    assert_eq!(
                        kernel_state(&u32s, bits_x2, lane, j),
                        states[t],
                        "K = {bits}, lane {lane}, slot {j}"
                    );
                    // The kernel's (row, column) of slot j of lane L.
                    let r0 = 2 * (lane as usize % 4);
                    let row = r0 + (j as usize & 1) + 8 * ((j as usize >> 1) & 1);
                    let col = lane as usize / 4 + 8 * (j as usize >> 2);
                    assert_eq!(position_to_row_col(t), (row, col));
                }
            }
        }
    }
}

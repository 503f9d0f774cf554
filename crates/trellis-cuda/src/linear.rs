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
        let tile_rows = tile_rows_for(rows);
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
    let TrellisShape {
        in_features,
        out_features,
        k_pad,
        n_pad,
    } = shape;
    let rows = map.rows;
    let tiles_k = k_pad / 16;
    let column_blocks = n_pad / 128;
    // Split the reduction (in whole Hadamard blocks) until the grid covers the GPU
    // `split_waves` times.
    let base_blocks = column_blocks * map.num_tiles;
    let wanted = (dev.split_waves * dev.sm_count)
        .div_ceil(base_blocks.max(1))
        .clamp(1, tiles_k / MM_KTILES);
    let ktiles_per_split = tiles_k.div_ceil(wanted).next_multiple_of(MM_KTILES);
    let splits = tiles_k.div_ceil(ktiles_per_split);
    let partial = if splits > 1 {
        scratch.partial.ensure(dev, splits * rows * n_pad)
    } else {
        0
    };
    let tickets = scratch.tickets.ensure(dev, map.num_tiles * column_blocks);

    let words_bytes = MM_KTILES * 8 * 4 * (max_bits_x2 as usize) * 4;
    let x_bytes = 2 * map.tile_rows * 128 * 4;
    let mut args = Args::new();
    args.arg(table)
        .arg(map.tiles)
        .arg(to_i32(rows))
        .arg(map.src_rows)
        .arg(io.x)
        .arg(x_up)
        .arg(to_i32(io.in_stride))
        .arg(to_i32(in_features))
        .arg(to_i32(k_pad))
        .arg(to_i32(n_pad))
        .arg(to_i32(ktiles_per_split))
        .arg(to_i32(splits))
        .arg(partial)
        .arg(tickets)
        .arg(io.out)
        .arg(to_i32(io.out_stride))
        .arg(to_i32(out_features));
    dev.launch(
        tile_kernel(&dev.kernels.trellis_linear, map.tile_rows),
        Grid::new((column_blocks, map.num_tiles, splits), MM_THREADS).shared(words_bytes + x_bytes),
        &mut args,
    );
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
    let map = RowMap::plain(rows);
    match w {
        CudaLinear::Trellis(t) => trellis_forward(
            dev,
            scratch,
            t.table.ptr,
            t.shape,
            t.desc.bits_x2,
            &map,
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
            &map,
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
    use trellis_codec::BitWidth;
    use trellis_codec::tile::{position_to_row_col, tile_states};

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

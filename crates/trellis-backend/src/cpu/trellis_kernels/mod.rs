//! EXL3 trellis linears on the CPU: `y = ((x ⊙ suh)·H̃ · W̃)·H̃ ⊙ svh (+ bias)` with W̃
//! decoded from the packed trellis inside the product, by kernels chosen once per process
//! from what the CPU supports.
//!
//! * [`Isa::Scalar`]: the reference; states read byte by byte, codebook from its f32 table.
//! * [`Isa::Avx2`] (AVX2 + FMA + F16C): 8 positions per vector; the 16-byte window of each
//!   8 positions is broadcast and byte-shuffled into 32-bit big-endian windows, shifted;
//!   codebooks computed in integer ALU, the fp16 rounding done by a round trip through F16C.
//! * [`Isa::Avx512`] (F, BW, VL, VBMI): a whole group of 32 positions (two output columns)
//!   per vector; one `vpermb` gives each 64-bit lane the stream bytes of its 4 positions and
//!   one `vpmultishiftqb` cuts out their 16-bit states; codebooks in 16-bit lanes, rounding
//!   via F16C.
//! * [`Isa::Avx512Fp16`] (the above + AVX512-FP16): the codebook's single fp16 operation (the
//!   mul1 FMA, the 3INST/mcg add) is done natively on 32 lanes.
//!
//! Every kernel produces W̃ exactly (bit-equal to the codebook's fp16 values) and
//! accumulates in f32. One row (decode) runs a fused GEMV with its accumulators in registers;
//! several rows decode each tile once into L1 and multiply it into all rows (GEMM).
//! Work is split over strips of 16 output columns on rayon's pool; the output Hadamard runs
//! after all strips are done, so strip ranges need not align to 128-column blocks.

mod layout;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86_avx2;
#[cfg(target_arch = "x86_64")]
mod x86_avx512;

pub use layout::PackedTrellis;

use super::scratch::{with_op_scratch, with_task_scratch};
use layout::{CHUNK_ROW_ORDER, STRIP};
use rayon::prelude::*;
use std::sync::OnceLock;
use trellis_codec::TILE_WEIGHTS;
use trellis_codec::hadamard::{HADAMARD_SIZE, fwht128_unnormalized};

/// An instruction-set level a kernel is written for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    Avx2,
    Avx512,
    Avx512Fp16,
}

impl Isa {
    pub const ALL: [Isa; 4] = [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Avx512Fp16];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Avx512Fp16 => "avx512fp16",
        }
    }

    pub fn from_name(name: &str) -> Option<Isa> {
        Isa::ALL.into_iter().find(|i| i.name() == name)
    }

    /// Whether this CPU can run the kernels of this level.
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                Isa::Avx2.is_supported()
                    && std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512vbmi")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Fp16 => {
                Isa::Avx512.is_supported() && std::arch::is_x86_feature_detected!("avx512fp16")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Levels this CPU supports, lowest first (tests run every one of them).
    pub fn available() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.is_supported()).collect()
    }

    /// The level used by [`forward`]: the best supported, unless the environment variable
    /// `TRELLIS_CPU_ISA` names a supported lower one (for measurements). Chosen once.
    pub fn selected() -> Isa {
        static SELECTED: OnceLock<Isa> = OnceLock::new();
        *SELECTED.get_or_init(|| {
            let best = *Isa::available().last().expect("scalar is always available");
            match std::env::var("TRELLIS_CPU_ISA") {
                Ok(name) => match Isa::from_name(&name) {
                    Some(isa) if isa.is_supported() => isa,
                    _ => best,
                },
                Err(_) => best,
            }
        })
    }

    /// (row, column) inside the tile of index `i` of a tile decoded in this level's native
    /// layout: column-major with rows in natural order (`c·16 + r`), except AVX2, which keeps
    /// trellis-position order (its vectors are 8 consecutive positions).
    fn native_row_col(self, i: usize) -> (usize, usize) {
        match self {
            Isa::Scalar => (i % STRIP, i / STRIP),
            Isa::Avx2 => trellis_codec::tile::position_to_row_col(i),
            Isa::Avx512 | Isa::Avx512Fp16 => (CHUNK_ROW_ORDER[i % STRIP], i / STRIP),
        }
    }

    /// Floats of prepared input per 16-row tile: AVX2 multiplies each 8-position vector by
    /// the activations of its rows (2c, 2c+1, 2c+8, 2c+9), repeated for its two columns.
    fn input_per_tile(self) -> usize {
        match self {
            Isa::Avx2 => 2 * STRIP,
            _ => STRIP,
        }
    }
}

/// Lay out one row of transformed activations `xh` as the level's kernels read it.
fn prepare_input(isa: Isa, xh: &[f32], input: &mut [f32]) {
    match isa {
        Isa::Scalar => input.copy_from_slice(xh),
        Isa::Avx2 => {
            for (dst, src) in input
                .chunks_exact_mut(2 * STRIP)
                .zip(xh.chunks_exact(STRIP))
            {
                for (i, v) in dst.iter_mut().enumerate() {
                    *v = src[trellis_codec::tile::position_to_row_col(i).0];
                }
            }
        }
        Isa::Avx512 | Isa::Avx512Fp16 => {
            for (dst, src) in input.chunks_exact_mut(STRIP).zip(xh.chunks_exact(STRIP)) {
                for (v, &r) in dst.iter_mut().zip(&CHUNK_ROW_ORDER) {
                    *v = src[r];
                }
            }
        }
    }
}

impl PackedTrellis {
    /// Tile `kt` of strip `strip` (output columns `16·strip…`) decoded by `isa`'s kernel, as a
    /// row-major 16×16 block (row = input feature); for tests and tools.
    pub fn decode_tile_with(&self, isa: Isa, strip: usize, kt: usize) -> [f32; TILE_WEIGHTS] {
        assert!(isa.is_supported(), "{isa:?} kernels on a CPU without them");
        let mut wt = [0.0f32; TILE_WEIGHTS];
        decode_tiles(self, isa, strip, kt, &mut wt);
        let mut tile = [0.0f32; TILE_WEIGHTS];
        for (i, &w) in wt.iter().enumerate() {
            let (r, c) = isa.native_row_col(i);
            tile[r * STRIP + c] = w;
        }
        tile
    }
}

/// Tiles decoded at once by the GEMM before every row passes over them: 16 KiB of f32
/// weights, which stay in L1 meanwhile.
const GEMM_TILES_PER_CHUNK: usize = 16;

/// Rows a GEMM pass multiplies into one decoded chunk: their prepared inputs (64 × 8 KiB at
/// k = 2048) stay in L2 across the strips of a task.
const GEMM_ROW_BLOCK: usize = 64;

/// Rows from which the GEMM's input and output transforms run in parallel.
const GEMM_PARALLEL_TRANSFORM_ROWS: usize = 8;

/// Floats of one row's accumulators for one strip (16 vectors of 16, or AVX2's 8 of 8).
const ACC_PER_ROW: usize = TILE_WEIGHTS;

/// `out[rows, out_features] = x[rows, in_features] · W (+ bias)` with the selected kernels.
pub fn forward(p: &PackedTrellis, x: &[f32], rows: usize, out: &mut [f32]) {
    forward_with(p, Isa::selected(), x, rows, out);
}

/// [`forward`] with an explicit instruction-set level (which must be supported).
pub fn forward_with(p: &PackedTrellis, isa: Isa, x: &[f32], rows: usize, out: &mut [f32]) {
    assert!(isa.is_supported(), "{isa:?} kernels on a CPU without them");
    assert!(x.len() >= rows * p.in_features && out.len() >= rows * p.out_features);
    if rows == 0 {
        return;
    }
    if rows == 1 {
        gemv_forward(p, isa, x, out);
    } else {
        gemm_forward(p, isa, x, rows, out);
    }
}

/// Floats of slack a scratch request adds so that [`aligned`] can skip to a cache line.
const ALIGN_SLACK: usize = 16;

/// The part of `buf` from its first 64-byte-aligned float: kernels load whole cache lines of
/// weights and inputs, and a vector load across two lines costs two. Scratch comes from a
/// `Vec<f32>`, which only promises 4-byte alignment.
fn aligned(buf: &mut [f32]) -> &mut [f32] {
    let skip = buf.as_ptr().align_offset(64);
    assert!(skip < ALIGN_SLACK, "f32 buffers are 4-byte aligned");
    &mut buf[skip..]
}

/// Strips per parallel task: a few tasks per thread so that a busy core does not hold up
/// the op, but not so many that task overhead shows.
fn strips_per_task(strips: usize) -> usize {
    let tasks = (2 * rayon::current_num_threads()).max(1);
    strips.div_ceil(tasks).max(1)
}

/// `xh = H(x ⊙ suh)` for one row, zero-padded to `k_padded` (1/√128 is folded into suh).
fn input_transform(p: &PackedTrellis, x: &[f32], xh: &mut [f32]) {
    let in_f = p.in_features;
    for ((h, &v), &s) in xh.iter_mut().zip(&x[..in_f]).zip(&p.suh_scaled) {
        *h = v * s;
    }
    xh[in_f..].fill(0.0);
    for block in xh.chunks_exact_mut(HADAMARD_SIZE) {
        fwht128_unnormalized(block);
    }
}

/// `out = H(z) ⊙ svh (+ bias)` for one row, trimmed to `out_features`; `z` is read as 16
/// values per strip, `stride` apart, starting at `z[0]`.
fn output_transform(p: &PackedTrellis, z: &[f32], stride: usize, out: &mut [f32]) {
    let mut block = [0.0f32; HADAMARD_SIZE];
    let strips_per_block = HADAMARD_SIZE / STRIP;
    // Blocks past the logical outputs (padding) are not needed.
    for b in 0..p.out_features.div_ceil(HADAMARD_SIZE) {
        for (s, dst) in block.chunks_exact_mut(STRIP).enumerate() {
            let strip = b * strips_per_block + s;
            dst.copy_from_slice(&z[strip * stride..strip * stride + STRIP]);
        }
        fwht128_unnormalized(&mut block);
        let c0 = b * HADAMARD_SIZE;
        let width = HADAMARD_SIZE.min(p.out_features - c0);
        for (j, o) in out[c0..c0 + width].iter_mut().enumerate() {
            let col = c0 + j;
            *o = block[j] * p.svh_scaled[col] + p.bias.as_ref().map_or(0.0, |b| b[col]);
        }
    }
}

fn gemv_forward(p: &PackedTrellis, isa: Isa, x: &[f32], out: &mut [f32]) {
    let k = p.k_padded;
    let strips = p.strips();
    let input_len = p.tiles_k() * isa.input_per_tile();
    with_op_scratch(ALIGN_SLACK + input_len + k + strips * STRIP, |scratch| {
        let (input, rest) = aligned(scratch).split_at_mut(input_len);
        let (xh, z) = rest.split_at_mut(k);
        let z = &mut z[..strips * STRIP];
        input_transform(p, x, xh);
        prepare_input(isa, xh, input);
        let input: &[f32] = input;
        let per_task = strips_per_task(strips);
        z.par_chunks_mut(per_task * STRIP)
            .enumerate()
            .for_each(|(task, z)| {
                let first = task * per_task;
                let range = first..first + z.len() / STRIP;
                gemv_strips(p, isa, input, range, z);
            });
        output_transform(p, z, STRIP, &mut out[..p.out_features]);
    });
}

/// The GEMV over a range of strips with one level's kernel.
fn gemv_strips(
    p: &PackedTrellis,
    isa: Isa,
    input: &[f32],
    strips: std::ops::Range<usize>,
    z: &mut [f32],
) {
    debug_assert_eq!(z.len(), strips.len() * STRIP);
    match isa {
        Isa::Scalar => scalar::gemv(p, input, strips, z),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => x86_avx2::gemv(p, input, strips, z),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Fp16 => x86_avx512::gemv(p, isa, input, strips, z),
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("only scalar kernels exist on this architecture"),
    }
}

/// Decode tiles `kt0…` of `strip`, as many as `wt` holds, each in the level's native layout
/// ([`Isa::native_row_col`]).
fn decode_tiles(p: &PackedTrellis, isa: Isa, strip: usize, kt0: usize, wt: &mut [f32]) {
    debug_assert_eq!(wt.len() % TILE_WEIGHTS, 0);
    match isa {
        Isa::Scalar => scalar::decode_tiles(p, strip, kt0, wt),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => x86_avx2::decode_tiles(p, strip, kt0, wt),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Fp16 => x86_avx512::decode_tiles(p, isa, strip, kt0, wt),
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("only scalar kernels exist on this architecture"),
    }
}

/// For each row: `acc[row] += wt[t] ⊙ input[row][t]` over `tiles` decoded tiles, with the
/// accumulators of one row (`ACC_PER_ROW` floats) held in registers for the whole chunk.
/// `inputs` holds each row's prepared input for these tiles, `input_stride` apart.
fn accumulate_rows(
    isa: Isa,
    wt: &[f32],
    tiles: usize,
    inputs: &[f32],
    input_stride: usize,
    acc: &mut [f32],
) {
    match isa {
        Isa::Scalar => scalar::accumulate_rows(wt, tiles, inputs, input_stride, acc),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => x86_avx2::accumulate_rows(wt, tiles, inputs, input_stride, acc),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Fp16 => {
            x86_avx512::accumulate_rows(wt, tiles, inputs, input_stride, acc)
        }
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("only scalar kernels exist on this architecture"),
    }
}

/// The 16 outputs of a strip from one row's accumulators.
fn finish_strip(isa: Isa, acc: &[f32], z: &mut [f32]) {
    match isa {
        Isa::Avx2 => {
            // Vector g: lanes 0..4 belong to column g, lanes 4..8 to column g+8.
            for (g, lanes) in acc[..64].chunks_exact(8).enumerate() {
                z[g] = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
                z[g + 8] = (lanes[4] + lanes[5]) + (lanes[6] + lanes[7]);
            }
        }
        _ => {
            for (zc, col) in z.iter_mut().zip(acc.chunks_exact(STRIP)) {
                *zc = col.iter().sum();
            }
        }
    }
}

fn gemm_forward(p: &PackedTrellis, isa: Isa, x: &[f32], rows: usize, out: &mut [f32]) {
    let (k, in_f, out_f) = (p.k_padded, p.in_features, p.out_features);
    let strips = p.strips();
    let tiles_k = p.tiles_k();
    let per_tile = isa.input_per_tile();
    let input_len = tiles_k * per_tile;
    // Scratch: prepared inputs [rows][input_len]; z [strip][rows][16].
    with_op_scratch(
        ALIGN_SLACK + rows * input_len + strips * rows * STRIP,
        |scratch| {
            let (inputs, z) = aligned(scratch).split_at_mut(rows * input_len);
            let z = &mut z[..strips * rows * STRIP];
            let transform_row = |(input, xr): (&mut [f32], &[f32])| {
                with_task_scratch(k, |xh| {
                    input_transform(p, xr, xh);
                    prepare_input(isa, xh, input);
                });
            };
            // The transforms cost ~k·(log2(128) + 2) flops a row: below a few rows a parallel
            // region costs more than it saves.
            if rows < GEMM_PARALLEL_TRANSFORM_ROWS {
                inputs
                    .chunks_exact_mut(input_len)
                    .zip(x[..rows * in_f].chunks_exact(in_f))
                    .for_each(transform_row);
            } else {
                inputs
                    .par_chunks_mut(input_len)
                    .zip(x[..rows * in_f].par_chunks(in_f))
                    .for_each(transform_row);
            }
            let inputs: &[f32] = inputs;
            let per_task = strips_per_task(strips);
            z.par_chunks_mut(per_task * rows * STRIP)
                .enumerate()
                .for_each(|(task, z)| {
                    let first = task * per_task;
                    let wt_len = GEMM_TILES_PER_CHUNK * TILE_WEIGHTS;
                    let block_rows = rows.min(GEMM_ROW_BLOCK);
                    let len = ALIGN_SLACK + wt_len + block_rows * ACC_PER_ROW;
                    with_task_scratch(len, |task_scratch| {
                        let (wt, acc) = aligned(task_scratch).split_at_mut(wt_len);
                        // Row blocks outside strips: a block's inputs stay in L2 while the task's
                        // strips pass over them; each block decodes the weights again.
                        for row0 in (0..rows).step_by(GEMM_ROW_BLOCK) {
                            let block = GEMM_ROW_BLOCK.min(rows - row0);
                            let acc = &mut acc[..block * ACC_PER_ROW];
                            let inputs = &inputs[row0 * input_len..];
                            for (s, zs) in z.chunks_exact_mut(rows * STRIP).enumerate() {
                                let strip = first + s;
                                acc.fill(0.0);
                                for kt0 in (0..tiles_k).step_by(GEMM_TILES_PER_CHUNK) {
                                    let tiles = GEMM_TILES_PER_CHUNK.min(tiles_k - kt0);
                                    decode_tiles(
                                        p,
                                        isa,
                                        strip,
                                        kt0,
                                        &mut wt[..tiles * TILE_WEIGHTS],
                                    );
                                    accumulate_rows(
                                        isa,
                                        wt,
                                        tiles,
                                        &inputs[kt0 * per_tile..],
                                        input_len,
                                        acc,
                                    );
                                }
                                let zs = &mut zs[row0 * STRIP..(row0 + block) * STRIP];
                                for (a, zr) in acc
                                    .chunks_exact(ACC_PER_ROW)
                                    .zip(zs.chunks_exact_mut(STRIP))
                                {
                                    finish_strip(isa, a, zr);
                                }
                            }
                        }
                    });
                });
            let z: &[f32] = z;
            let transform_row = |(row, o): (usize, &mut [f32])| {
                output_transform(p, &z[row * STRIP..], rows * STRIP, o)
            };
            if rows < GEMM_PARALLEL_TRANSFORM_ROWS {
                out[..rows * out_f]
                    .chunks_exact_mut(out_f)
                    .enumerate()
                    .for_each(transform_row);
            } else {
                out[..rows * out_f]
                    .par_chunks_mut(out_f)
                    .enumerate()
                    .for_each(transform_row);
            }
        },
    );
}

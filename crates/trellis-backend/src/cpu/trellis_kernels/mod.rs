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
//! * [`Isa::Neon`] (aarch64 base ASIMD): 4 positions (rows of one column) per vector, states
//!   cut out of 16-byte windows by `tbl`; codebooks in integer lanes, rounding via `fcvtn`.
//! * [`Isa::NeonFp16`] (the above + FEAT_FP16): the codebook's fp16 operation on 8 lanes.
//! * [`Isa::Avx512Vnni`] (AVX-512 + VNNI): mul1 products quantize the activations to int16
//!   and take integer dot products with the codebook's byte sums, skipping its fp16 rounding
//!   (`x86_vnni`: an approximation with a measured, tested error bound; a row's results do not
//!   depend on the rows beside it); the other codebooks run the exact kernels of the best
//!   level below. Products of `x86_amx::MIN_ROWS` rows or more run on AMX tiles where the
//!   CPU has AMX-INT8 (`x86_amx`, bit-equal to the VNNI kernels; `TRELLIS_CPU_AMX=0` turns
//!   it off).
//! * [`Isa::Avx2Int16`] (AVX2): the same approximation of mul1 with `vpmaddwd`, for CPUs
//!   without AVX-512 (`x86_avx2_int16`); the other codebooks run the exact AVX2 kernels.
//!
//! Every other kernel produces W̃ exactly (bit-equal to the codebook's fp16 values) and
//! accumulates in f32. One row (decode) runs a fused GEMV with its accumulators in registers;
//! several rows decode each tile once into L1 and multiply it into all rows (GEMM).
//! Work is split over strips of 16 output columns on rayon's pool (one-row products hand out
//! ~64 KiB chunks of strips in memory order, `strips_in_order`); the output Hadamard runs
//! after all strips are done, so strip ranges need not align to 128-column blocks.

#[cfg(target_arch = "aarch64")]
mod aarch64_neon;
mod layout;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86_amx;
#[cfg(target_arch = "x86_64")]
mod x86_avx2;
#[cfg(target_arch = "x86_64")]
mod x86_avx2_int16;
#[cfg(target_arch = "x86_64")]
mod x86_avx512;
#[cfg(target_arch = "x86_64")]
mod x86_vnni;

pub use layout::PackedTrellis;

use super::scratch::{with_op_scratch, with_task_scratch};
use super::simd::fwht128;
use layout::{CHUNK_ROW_ORDER, STRIP};
use rayon::prelude::*;
use std::sync::OnceLock;
use trellis_codec::TILE_WEIGHTS;
use trellis_codec::hadamard::HADAMARD_SIZE;

/// An instruction-set level a kernel is written for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    Avx2,
    Avx2Int16,
    Avx512,
    Avx512Fp16,
    Avx512Vnni,
    Neon,
    NeonFp16,
}

impl Isa {
    /// Every level, lowest first within an architecture (a CPU supports one architecture's).
    pub const ALL: [Isa; 8] = [
        Isa::Scalar,
        Isa::Avx2,
        Isa::Avx2Int16,
        Isa::Avx512,
        Isa::Avx512Fp16,
        Isa::Avx512Vnni,
        Isa::Neon,
        Isa::NeonFp16,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx2Int16 => "avx2int16",
            Isa::Avx512 => "avx512",
            Isa::Avx512Fp16 => "avx512fp16",
            Isa::Avx512Vnni => "avx512vnni",
            Isa::Neon => "neon",
            Isa::NeonFp16 => "neonfp16",
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
            Isa::Avx2Int16 => Isa::Avx2.is_supported(),
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
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => {
                Isa::Avx512.is_supported() && std::arch::is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[cfg(target_arch = "aarch64")]
            Isa::NeonFp16 => {
                Isa::Neon.is_supported() && std::arch::is_aarch64_feature_detected!("fp16")
            }
            _ => false,
        }
    }

    /// Levels this CPU supports, lowest first (tests run every one of them).
    pub fn available() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.is_supported()).collect()
    }

    /// The level used by [`forward`]: the best supported, unless the environment variable
    /// `TRELLIS_CPU_ISA` names a supported lower one (for measurements), or is `exact`: the
    /// best level whose products are all bit-exact (a reference for other backends' tests).
    /// Chosen once.
    pub fn selected() -> Isa {
        static SELECTED: OnceLock<Isa> = OnceLock::new();
        *SELECTED.get_or_init(|| {
            let best = *Isa::available().last().expect("scalar is always available");
            match std::env::var("TRELLIS_CPU_ISA") {
                Ok(name) if name == "exact" => best.exact(),
                Ok(name) => match Isa::from_name(&name) {
                    Some(isa) if isa.is_supported() => isa,
                    _ => best,
                },
                Err(_) => best,
            }
        })
    }

    /// The exact level whose kernels this one runs where it does not approximate.
    pub fn exact(self) -> Isa {
        match self {
            Isa::Avx512Vnni if Isa::Avx512Fp16.is_supported() => Isa::Avx512Fp16,
            Isa::Avx512Vnni => Isa::Avx512,
            Isa::Avx2Int16 => Isa::Avx2,
            isa => isa,
        }
    }

    /// Whether products of `codebook` at this level quantize the activations (their error is
    /// bounded by a test, not bit-exact like the rest).
    pub fn approximates(self, codebook: trellis_codec::Codebook) -> bool {
        matches!(self, Isa::Avx512Vnni | Isa::Avx2Int16)
            && codebook == trellis_codec::Codebook::Mul1
    }

    /// Floats of one row's prepared input for products of `p`.
    fn row_input_len(self, p: &PackedTrellis) -> usize {
        #[cfg(target_arch = "x86_64")]
        if self.approximates(p.codebook) {
            return match self {
                Isa::Avx2Int16 => x86_avx2_int16::input_len(p.tiles_k()),
                _ => x86_vnni::input_len(p.tiles_k()),
            };
        }
        p.tiles_k() * self.exact().input_per_tile()
    }

    /// (row, column) inside the tile of index `i` of a tile decoded in this level's native
    /// layout: column-major with rows in natural order (`c·16 + r`), except AVX2 and NEON,
    /// which keep trellis-position order (their vectors are 8 or 4 consecutive positions).
    fn native_row_col(self, i: usize) -> (usize, usize) {
        match self {
            Isa::Scalar => (i % STRIP, i / STRIP),
            Isa::Avx2 | Isa::Avx2Int16 | Isa::Neon | Isa::NeonFp16 => {
                trellis_codec::tile::position_to_row_col(i)
            }
            Isa::Avx512 | Isa::Avx512Fp16 | Isa::Avx512Vnni => {
                (CHUNK_ROW_ORDER[i % STRIP], i / STRIP)
            }
        }
    }

    /// Floats of prepared input per 16-row tile: AVX2 multiplies each 8-position vector by
    /// the activations of its rows (2c, 2c+1, 2c+8, 2c+9), repeated for its two columns.
    fn input_per_tile(self) -> usize {
        match self {
            Isa::Avx2 | Isa::Avx2Int16 => 2 * STRIP,
            _ => STRIP,
        }
    }
}

/// Lay out one row of transformed activations `xh` as the level's kernels read it.
fn prepare_input(isa: Isa, xh: &[f32], input: &mut [f32]) {
    match isa {
        Isa::Scalar => input.copy_from_slice(xh),
        Isa::Avx2 | Isa::Avx2Int16 => {
            for (dst, src) in input
                .chunks_exact_mut(2 * STRIP)
                .zip(xh.chunks_exact(STRIP))
            {
                for (i, v) in dst.iter_mut().enumerate() {
                    *v = src[trellis_codec::tile::position_to_row_col(i).0];
                }
            }
        }
        Isa::Avx512 | Isa::Avx512Fp16 | Isa::Avx512Vnni | Isa::Neon | Isa::NeonFp16 => {
            for (dst, src) in input.chunks_exact_mut(STRIP).zip(xh.chunks_exact(STRIP)) {
                for (v, &r) in dst.iter_mut().zip(&CHUNK_ROW_ORDER) {
                    *v = src[r];
                }
            }
        }
    }
}

/// [`prepare_input`] for products of `p`.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn prepare_row_input(isa: Isa, p: &PackedTrellis, xh: &[f32], input: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa.approximates(p.codebook) {
        return match isa {
            Isa::Avx2Int16 => x86_avx2_int16::prepare_input(xh, input),
            _ => x86_vnni::prepare_input(xh, input),
        };
    }
    prepare_input(isa.exact(), xh, input)
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

/// Floats of one row's accumulators for one strip (16 vectors of 16; AVX2 uses 8 of 8, NEON
/// 16 of 4).
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

/// `buf` (from [`aligned`]) as vectors of `V`, as the x86 GEMMs keep their scratch.
///
/// # Safety
/// `V` must be plain bits of a multiple of 4 bytes (an x86 vector type), so that any floats'
/// bytes are a valid `V`.
#[cfg(target_arch = "x86_64")]
unsafe fn float_vectors<V>(buf: &mut [f32]) -> &mut [V] {
    let floats = std::mem::size_of::<V>() / 4;
    assert!(floats > 0 && buf.as_ptr().cast::<V>().is_aligned());
    // SAFETY: the start is aligned for `V` (asserted), the length is rounded down to whole
    // vectors, `V` accepts any bits (the caller's promise), and `buf` is borrowed mutably for
    // as long as the result lives.
    unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<V>(), buf.len() / floats) }
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

/// Strips per parallel task: several tasks per thread so that a thread that loses its core
/// (another process, the machine's other work) holds up little of the op, but not so many that
/// task overhead shows (a task is ≥ a few µs of decoding).
fn strips_per_task(strips: usize) -> usize {
    let tasks = (8 * rayon::current_num_threads()).max(1);
    strips.div_ceil(tasks).max(1)
}

/// `xh = H(x ⊙ suh)` for one row, zero-padded to `k_padded` (1/√128 is folded into suh).
fn input_transform(p: &PackedTrellis, x: &[f32], xh: &mut [f32]) {
    let in_f = p.in_features;
    for ((h, &v), &s) in xh.iter_mut().zip(&x[..in_f]).zip(&p.suh_scaled) {
        *h = v * s;
    }
    xh[in_f..].fill(0.0);
    for block in xh.as_chunks_mut::<HADAMARD_SIZE>().0 {
        fwht128(block);
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
        fwht128(&mut block);
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
    let input_len = isa.row_input_len(p);
    with_op_scratch(ALIGN_SLACK + input_len + k + strips * STRIP, |scratch| {
        let (input, rest) = aligned(scratch).split_at_mut(input_len);
        let (xh, z) = rest.split_at_mut(k);
        let z = &mut z[..strips * STRIP];
        input_transform(p, x, xh);
        prepare_row_input(isa, p, xh, input);
        let input: &[f32] = input;
        let chunk = chunk_strips(strips, p.tiles_k() * p.tile_bytes);
        strips_in_order(z, chunk, |range, z| gemv_strips(p, isa, input, range, z));
        output_transform(p, z, STRIP, &mut out[..p.out_features]);
    });
}

/// Weight bytes a one-row product hands out to a thread at a time.
const CHUNK_BYTES: usize = 64 * 1024;

/// Most chunks per pool thread in one product: the counter's cache line moves between the
/// cores at every claim, so a large product (the head) takes larger chunks.
const MAX_CHUNKS_PER_THREAD: usize = 256;

/// Strips per chunk of [`strips_in_order`] for `strips` strips of `strip_bytes` bytes each.
fn chunk_strips(strips: usize, strip_bytes: usize) -> usize {
    let by_bytes = CHUNK_BYTES / strip_bytes.max(1);
    let by_count = strips.div_ceil(MAX_CHUNKS_PER_THREAD * rayon::current_num_threads().max(1));
    by_bytes.max(by_count).max(1)
}

/// `f(range, z_range)` over all strips of `z` (16 floats each), in chunks of `chunk` strips
/// that one task per pool thread claims in memory order from a shared counter.
///
/// Why not rayon's splitting: that gives each thread its own distant run of the weights (one
/// from the start, one from the middle) and leaves the threads to finish at different times,
/// so the early one goes to sleep and the next parallel region waits for it to wake. Claiming
/// chunks in order keeps the threads reading neighbouring memory and ending together, and a
/// thread that loses its core for a while holds up at most one chunk. Measured on the 4.0 bpw
/// GLM decode (dev-2c, alternated): `o_proj` 428 → 395 µs, `q_b` 184 → 146, `q_a` + `kv_a`
/// 190 → 168, the MLA attention after them 520 → 464; decode +4 %.
fn strips_in_order(
    z: &mut [f32],
    chunk: usize,
    f: impl Fn(std::ops::Range<usize>, &mut [f32]) + Sync,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    /// `z`'s start, shared by the tasks that carve their claimed chunks out of it.
    struct Results(*mut f32);
    // SAFETY: the tasks only touch the chunks they claimed, which are disjoint (below).
    unsafe impl Sync for Results {}
    let strips = z.len() / STRIP;
    let chunks = strips.div_ceil(chunk);
    let next = AtomicUsize::new(0);
    let results = Results(z.as_mut_ptr());
    let tasks = rayon::current_num_threads().min(chunks).max(1);
    (0..tasks).into_par_iter().for_each(|_| {
        let results = &results;
        loop {
            let c = next.fetch_add(1, Ordering::Relaxed);
            if c >= chunks {
                break;
            }
            let range = c * chunk..((c + 1) * chunk).min(strips);
            // SAFETY: the counter hands out each chunk index once, so this task alone holds
            // chunk c's floats, and range.end ≤ strips keeps them inside `z`, which stays
            // borrowed mutably until every task has returned.
            let zc = unsafe {
                std::slice::from_raw_parts_mut(
                    results.0.add(range.start * STRIP),
                    range.len() * STRIP,
                )
            };
            f(range, zc);
        }
    });
}

/// Most products one [`gemv_batch`] call runs.
pub const MAX_BATCH: usize = 16;

/// Several one-row products in one parallel region: job `j` is `(linear, x)` from `job(j)`,
/// and its `out_features` results follow the previous job's in `out`. The strips of all jobs
/// are shared out together, so small linears (a MoE layer's experts) keep every thread busy
/// without a fork and join per linear.
pub fn gemv_batch<'a>(
    jobs: usize,
    job: impl Fn(usize) -> (&'a PackedTrellis, &'a [f32]) + Sync,
    out: &mut [f32],
) {
    gemv_batch_with(Isa::selected(), jobs, job, out)
}

/// [`gemv_batch`] with each job's results in its own slice (`outs[j]`).
pub fn gemv_batch_into<'a>(
    jobs: usize,
    job: impl Fn(usize) -> (&'a PackedTrellis, &'a [f32]) + Sync,
    outs: &mut [&mut [f32]],
) {
    gemv_batch_impl(Isa::selected(), jobs, job, outs)
}

/// [`gemv_batch`] with an explicit instruction-set level (which must be supported).
pub fn gemv_batch_with<'a>(
    isa: Isa,
    jobs: usize,
    job: impl Fn(usize) -> (&'a PackedTrellis, &'a [f32]) + Sync,
    out: &mut [f32],
) {
    assert!(jobs <= MAX_BATCH, "at most {MAX_BATCH} products per batch");
    let mut out_at = [0usize; MAX_BATCH + 1];
    for j in 0..jobs {
        out_at[j + 1] = out_at[j] + job(j).0.out_features;
    }
    assert!(out.len() >= out_at[jobs]);
    let mut outs = split_at_offsets(out, &out_at[..=jobs]);
    gemv_batch_impl(isa, jobs, &job, &mut outs[..jobs])
}

/// The batch: job j's results go to `outs[j]`.
fn gemv_batch_impl<'a>(
    isa: Isa,
    jobs: usize,
    job: impl Fn(usize) -> (&'a PackedTrellis, &'a [f32]) + Sync,
    outs: &mut [&mut [f32]],
) {
    assert!(isa.is_supported(), "{isa:?} kernels on a CPU without them");
    assert!(jobs <= MAX_BATCH, "at most {MAX_BATCH} products per batch");
    assert!(outs.len() >= jobs);
    // Offsets (in floats) of each job's prepared input and of its first strip.
    let mut input_at = [0usize; MAX_BATCH + 1];
    let mut strip_at = [0usize; MAX_BATCH + 1];
    let mut strip_bytes = 0;
    for j in 0..jobs {
        let (p, x) = job(j);
        assert!(x.len() >= p.in_features);
        // Inputs start on a cache line (16 floats) each.
        input_at[j + 1] = input_at[j] + isa.row_input_len(p).next_multiple_of(16);
        strip_at[j + 1] = strip_at[j] + p.strips();
        strip_bytes = strip_bytes.max(p.tiles_k() * p.tile_bytes);
    }
    let strips = strip_at[jobs];
    with_op_scratch(ALIGN_SLACK + input_at[jobs] + strips * STRIP, |scratch| {
        let (inputs, z) = aligned(scratch).split_at_mut(input_at[jobs]);
        let z = &mut z[..strips * STRIP];
        // The transforms of a job are serial work of a few µs (a MoE layer's decode has 15
        // jobs); one task per job spreads them over the threads instead of leaving all but
        // one waiting.
        let prepare = |j: usize, input: &mut [f32]| {
            let (p, x) = job(j);
            with_task_scratch(p.k_padded, |xh| {
                input_transform(p, x, xh);
                prepare_row_input(isa, p, xh, &mut input[..isa.row_input_len(p)]);
            });
        };
        if jobs == 1 {
            prepare(0, inputs);
        } else {
            let mut parts = split_at_offsets(&mut inputs[..], &input_at[..=jobs]);
            parts[..jobs]
                .par_iter_mut()
                .enumerate()
                .for_each(|(j, part)| prepare(j, part));
        }
        let inputs: &[f32] = inputs;
        // The jobs' strips in sequence: a chunk may end one job and start the next.
        let run_range = |first: usize, last: usize, z: &mut [f32]| {
            for j in 0..jobs {
                let (a, b) = (first.max(strip_at[j]), last.min(strip_at[j + 1]));
                if a >= b {
                    continue;
                }
                let (p, _) = job(j);
                let local = a - strip_at[j]..b - strip_at[j];
                gemv_strips(
                    p,
                    isa,
                    &inputs[input_at[j]..input_at[j + 1]],
                    local,
                    &mut z[(a - first) * STRIP..(b - first) * STRIP],
                );
            }
        };
        strips_in_order(z, chunk_strips(strips, strip_bytes), |range, z| {
            run_range(range.start, range.end, z)
        });
        let z: &[f32] = z;
        let finish = |j: usize, o: &mut [f32]| {
            let (p, _) = job(j);
            let zj = &z[strip_at[j] * STRIP..strip_at[j + 1] * STRIP];
            output_transform(p, zj, STRIP, &mut o[..p.out_features]);
        };
        if jobs == 1 {
            finish(0, &mut *outs[0]);
        } else {
            outs[..jobs]
                .par_iter_mut()
                .enumerate()
                .for_each(|(j, o)| finish(j, o));
        }
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
        Isa::Avx2Int16 if isa.approximates(p.codebook) => x86_avx2_int16::gemv(p, input, strips, z),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Int16 => x86_avx2::gemv(p, input, strips, z),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Fp16 => x86_avx512::gemv(p, isa, input, strips, z),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni if isa.approximates(p.codebook) => {
            x86_vnni::gemv(p, input, strips, z, x86_vnni::Products::selected())
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => x86_avx512::gemv(p, isa.exact(), input, strips, z),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon | Isa::NeonFp16 => aarch64_neon::gemv(p, isa, input, strips, z),
        _ => unreachable!("{isa:?} kernels do not exist on this architecture"),
    }
}

/// Decode tiles `kt0…` of `strip`, as many as `wt` holds, each in the level's native layout
/// ([`Isa::native_row_col`]).
fn decode_tiles(p: &PackedTrellis, isa: Isa, strip: usize, kt0: usize, wt: &mut [f32]) {
    debug_assert_eq!(wt.len() % TILE_WEIGHTS, 0);
    match isa {
        Isa::Scalar => scalar::decode_tiles(p, strip, kt0, wt),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx2Int16 => x86_avx2::decode_tiles(p, strip, kt0, wt),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Fp16 | Isa::Avx512Vnni => {
            x86_avx512::decode_tiles(p, isa.exact(), strip, kt0, wt)
        }
        #[cfg(target_arch = "aarch64")]
        Isa::Neon | Isa::NeonFp16 => aarch64_neon::decode_tiles(p, isa, strip, kt0, wt),
        _ => unreachable!("{isa:?} kernels do not exist on this architecture"),
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
        Isa::Avx2 | Isa::Avx2Int16 => {
            x86_avx2::accumulate_rows(wt, tiles, inputs, input_stride, acc)
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Fp16 | Isa::Avx512Vnni => {
            x86_avx512::accumulate_rows(wt, tiles, inputs, input_stride, acc)
        }
        #[cfg(target_arch = "aarch64")]
        Isa::Neon | Isa::NeonFp16 => {
            aarch64_neon::accumulate_rows(wt, tiles, inputs, input_stride, acc)
        }
        _ => unreachable!("{isa:?} kernels do not exist on this architecture"),
    }
}

/// The 16 outputs of a strip from one row's accumulators.
fn finish_strip(isa: Isa, acc: &[f32], z: &mut [f32]) {
    match isa {
        Isa::Avx2 | Isa::Avx2Int16 => {
            // Vector g: lanes 0..4 belong to column g, lanes 4..8 to column g+8.
            for (g, lanes) in acc[..64].chunks_exact(8).enumerate() {
                z[g] = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
                z[g + 8] = (lanes[4] + lanes[5]) + (lanes[6] + lanes[7]);
            }
        }
        Isa::Neon | Isa::NeonFp16 => {
            // One vector of 4 lanes per column.
            for (zc, l) in z.iter_mut().zip(acc[..64].chunks_exact(4)) {
                *zc = (l[0] + l[1]) + (l[2] + l[3]);
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
    let input_len = isa.row_input_len(p);
    // Scratch: prepared inputs [rows][input_len]; z [strip][rows][16].
    with_op_scratch(
        ALIGN_SLACK + rows * input_len + strips * rows * STRIP,
        |scratch| {
            let (inputs, z) = aligned(scratch).split_at_mut(rows * input_len);
            let z = &mut z[..strips * rows * STRIP];
            let transform_row = |(input, xr): (&mut [f32], &[f32])| {
                with_task_scratch(k, |xh| {
                    input_transform(p, xr, xh);
                    prepare_row_input(isa, p, xh, input);
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
            // Each AMX task lays out every row's activations as tiles again, so they get two
            // tasks a thread instead of eight (`trellis_gemv`, Intel Xeon, 2 threads: 5120 →
            // 2048 at 64 rows 3.00–3.12 → 2.53–2.57 ms, at 256 rows 12.7–12.8 → 10.4–10.6).
            let per_task = if on_amx(p, isa, rows) {
                strips.div_ceil(2 * rayon::current_num_threads().max(1))
            } else {
                strips_per_task(strips)
            };
            z.par_chunks_mut(per_task * rows * STRIP)
                .enumerate()
                .for_each(|(task, z)| {
                    let first = task * per_task;
                    let range = first..first + z.len() / (rows * STRIP);
                    gemm_strips(p, isa, inputs, rows, range, z);
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

/// Whether [`gemm_strips`] runs a product of `rows` rows on AMX tiles.
fn on_amx(p: &PackedTrellis, isa: Isa, rows: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        isa == Isa::Avx512Vnni
            && isa.approximates(p.codebook)
            && rows >= x86_amx::MIN_ROWS
            && x86_amx::is_available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (p, isa, rows);
        false
    }
}

/// The GEMM over a range of strips: `inputs` holds each row's prepared input
/// (`tiles_k · input_per_tile` floats a row), `z` gets `[strip][rows][16]`. Decodes each chunk
/// of tiles once per block of rows into task scratch and multiplies it into the block.
fn gemm_strips(
    p: &PackedTrellis,
    isa: Isa,
    inputs: &[f32],
    rows: usize,
    strips: std::ops::Range<usize>,
    z: &mut [f32],
) {
    let tiles_k = p.tiles_k();
    let input_len = isa.row_input_len(p);
    debug_assert_eq!(z.len(), strips.len() * rows * STRIP);
    if rows == 1 {
        // One row (an expert with one token of a prefill chunk): the fused GEMV keeps its
        // tiles in registers, and its z layout ([strip][16]) is the GEMM's for one row.
        gemv_strips(p, isa, &inputs[..input_len], strips, z);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if on_amx(p, isa, rows) {
        let len = ALIGN_SLACK + 16 * x86_amx::gemm_scratch_vectors(tiles_k);
        return with_task_scratch(len, |scratch| {
            x86_amx::gemm(p, inputs, input_len, rows, strips, z, aligned(scratch))
        });
    }
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2Int16 && isa.approximates(p.codebook) {
        let len = ALIGN_SLACK + 8 * x86_avx2_int16::gemm_scratch_vectors(rows);
        return with_task_scratch(len, |scratch| {
            x86_avx2_int16::gemm(p, inputs, input_len, rows, strips, z, aligned(scratch))
        });
    }
    #[cfg(target_arch = "x86_64")]
    if isa.approximates(p.codebook) {
        let len = ALIGN_SLACK + 16 * x86_vnni::gemm_scratch_vectors(rows);
        return with_task_scratch(len, |scratch| {
            x86_vnni::gemm(
                p,
                inputs,
                input_len,
                rows,
                strips,
                z,
                aligned(scratch),
                x86_vnni::Products::selected(),
            )
        });
    }
    let isa = isa.exact();
    let per_tile = isa.input_per_tile();
    let wt_len = GEMM_TILES_PER_CHUNK * TILE_WEIGHTS;
    let block_rows = rows.min(GEMM_ROW_BLOCK);
    let len = ALIGN_SLACK + wt_len + block_rows * ACC_PER_ROW;
    with_task_scratch(len, |task_scratch| {
        let (wt, acc) = aligned(task_scratch).split_at_mut(wt_len);
        // Row blocks outside strips: a block's inputs stay in L2 while the task's strips pass
        // over them; each block decodes the weights again.
        for row0 in (0..rows).step_by(GEMM_ROW_BLOCK) {
            let block = GEMM_ROW_BLOCK.min(rows - row0);
            let acc = &mut acc[..block * ACC_PER_ROW];
            let inputs = &inputs[row0 * input_len..];
            for (strip, zs) in strips.clone().zip(z.chunks_exact_mut(rows * STRIP)) {
                acc.fill(0.0);
                for kt0 in (0..tiles_k).step_by(GEMM_TILES_PER_CHUNK) {
                    let tiles = GEMM_TILES_PER_CHUNK.min(tiles_k - kt0);
                    decode_tiles(p, isa, strip, kt0, &mut wt[..tiles * TILE_WEIGHTS]);
                    accumulate_rows(isa, wt, tiles, &inputs[kt0 * per_tile..], input_len, acc);
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
}

/// Most products one [`gemm_batch`] call runs.
pub const MAX_GEMM_BATCH: usize = 256;

/// What decoding a strip's tiles costs in the many-row products, in rows of products: a
/// rough weight (a decoded tile serves all rows of a block) for sharing out tasks of equal
/// work in [`gemm_batch`].
const GEMM_STRIP_DECODE_ROWS: usize = 8;

/// Several products of any row counts in one parallel region (a prefill chunk's MoE experts,
/// each over its own tokens): job `j` is `(linear, x, rows)` from `job(j)` with `x` holding
/// `rows × in_features` values, and its `rows × out_features` results follow the previous
/// job's in `out`. Strips of all jobs are shared out together; each tile is decoded once per
/// block of a job's rows.
pub fn gemm_batch<'a>(
    jobs: usize,
    job: impl Fn(usize) -> (&'a PackedTrellis, &'a [f32], usize) + Sync,
    out: &mut [f32],
) {
    gemm_batch_with(Isa::selected(), jobs, job, out)
}

/// [`gemm_batch`] with an explicit instruction-set level (which must be supported).
pub fn gemm_batch_with<'a>(
    isa: Isa,
    jobs: usize,
    job: impl Fn(usize) -> (&'a PackedTrellis, &'a [f32], usize) + Sync,
    out: &mut [f32],
) {
    assert!(isa.is_supported(), "{isa:?} kernels on a CPU without them");
    assert!(
        jobs <= MAX_GEMM_BATCH,
        "at most {MAX_GEMM_BATCH} products per batch"
    );
    // Per job: offsets of its prepared inputs, of its z (and its first strip), of its outputs.
    let mut input_at = [0usize; MAX_GEMM_BATCH + 1];
    let mut z_at = [0usize; MAX_GEMM_BATCH + 1];
    let mut strip_at = [0usize; MAX_GEMM_BATCH + 1];
    let mut out_at = [0usize; MAX_GEMM_BATCH + 1];
    for j in 0..jobs {
        let (p, x, rows) = job(j);
        assert!(x.len() >= rows * p.in_features);
        let input_len = isa.row_input_len(p);
        input_at[j + 1] = input_at[j] + (rows * input_len).next_multiple_of(16);
        z_at[j + 1] = z_at[j] + p.strips() * rows * STRIP;
        strip_at[j + 1] = strip_at[j] + p.strips();
        out_at[j + 1] = out_at[j] + rows * p.out_features;
    }
    assert!(out.len() >= out_at[jobs]);
    let (total_inputs, total_z, strips) = (input_at[jobs], z_at[jobs], strip_at[jobs]);
    if strips == 0 {
        return;
    }
    with_op_scratch(ALIGN_SLACK + total_inputs + total_z, |scratch| {
        let (inputs, z) = aligned(scratch).split_at_mut(total_inputs);
        let z = &mut z[..total_z];
        // Input transforms: one task per job (a few rows each).
        {
            let mut parts = split_at_offsets(&mut inputs[..], &input_at[..=jobs]);
            parts[..jobs]
                .par_iter_mut()
                .enumerate()
                .for_each(|(j, part)| {
                    let (p, x, rows) = job(j);
                    let input_len = isa.row_input_len(p);
                    with_task_scratch(p.k_padded, |xh| {
                        for r in 0..rows {
                            input_transform(p, &x[r * p.in_features..], xh);
                            let input = &mut part[r * input_len..(r + 1) * input_len];
                            prepare_row_input(isa, p, xh, input);
                        }
                    });
                });
        }
        let inputs: &[f32] = inputs;
        // Tasks are runs of strips of one job (a task never spans two jobs, whose row
        // counts differ), about eight a thread of equal work: a strip costs its job's rows
        // plus the decode of its tiles, so a job of many rows (a prefill's shared expert,
        // every token) gets short runs, and one of a few rows long ones. With runs of equal
        // length, that job's few tasks each took many times the others' and, from 8 threads
        // on, made the critical path. Split z accordingly without allocating.
        let cost = |j: usize| -> usize { job(j).2 + GEMM_STRIP_DECODE_ROWS };
        let total: usize = (0..jobs)
            .map(|j| (strip_at[j + 1] - strip_at[j]) * cost(j))
            .sum();
        let task_work = total.div_ceil(8 * rayon::current_num_threads().max(1));
        let mut per_task = [1usize; MAX_GEMM_BATCH];
        let mut task_at = [0usize; MAX_GEMM_BATCH + 1];
        for j in 0..jobs {
            let job_strips = strip_at[j + 1] - strip_at[j];
            per_task[j] = task_work.div_ceil(cost(j)).clamp(1, job_strips.max(1));
            task_at[j + 1] = task_at[j] + job_strips.div_ceil(per_task[j]);
        }
        let tasks = task_at[jobs];
        let z_ptr = SharedMut(z.as_mut_ptr());
        (0..tasks).into_par_iter().for_each(|t| {
            // The job of task t: the last whose first task is at or before t.
            let j = task_at[1..=jobs].partition_point(|&start| start <= t);
            let (p, _, rows) = job(j);
            let first = (t - task_at[j]) * per_task[j];
            let last = (first + per_task[j]).min(p.strips());
            let start = z_at[j] + first * rows * STRIP;
            let len = (last - first) * rows * STRIP;
            // SAFETY: tasks cover disjoint strip runs, so these ranges of z are disjoint and
            // inside it (z_at[j] + strips_j·rows·16 ≤ z.len()); z outlives the region.
            let zt = unsafe { std::slice::from_raw_parts_mut(z_ptr.get().add(start), len) };
            gemm_strips(
                p,
                isa,
                &inputs[input_at[j]..input_at[j + 1]],
                rows,
                first..last,
                zt,
            );
        });
        let z: &[f32] = z;
        // Output transforms: one task per job, as the input transforms, so that they no longer
        // run on one thread while the others wait.
        let mut parts = split_at_offsets(&mut out[..], &out_at[..=jobs]);
        parts[..jobs]
            .par_iter_mut()
            .enumerate()
            .for_each(|(j, part)| {
                let (p, _, rows) = job(j);
                for (row, orow) in part.chunks_exact_mut(p.out_features).enumerate() {
                    output_transform(p, &z[z_at[j] + row * STRIP..], rows * STRIP, orow);
                }
            });
    });
}

/// `buf` cut at `offsets` (ascending, the first 0): part `j` is `offsets[j]..offsets[j + 1]`,
/// and the parts past `offsets.len() - 1` are empty. An array, so a batch allocates nothing.
pub(crate) fn split_at_offsets<'b>(
    buf: &'b mut [f32],
    offsets: &[usize],
) -> [&'b mut [f32]; MAX_GEMM_BATCH] {
    let mut parts: [&mut [f32]; MAX_GEMM_BATCH] = std::array::from_fn(|_| Default::default());
    let mut rest = buf;
    for (part, edge) in parts.iter_mut().zip(offsets.windows(2)) {
        let (a, b) = std::mem::take(&mut rest).split_at_mut(edge[1] - edge[0]);
        *part = a;
        rest = b;
    }
    parts
}

/// A raw pointer handed to parallel tasks that write disjoint parts of its buffer.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: only used for disjoint writes from tasks of one parallel region (see its uses).
unsafe impl Send for SharedMut {}
// SAFETY: as above.
unsafe impl Sync for SharedMut {}
impl SharedMut {
    fn get(self) -> *mut f32 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every strip is handed out exactly once, with its own results, for chunk sizes that
    /// divide the strips and ones that leave a short last chunk.
    #[test]
    fn strips_in_order_covers_every_strip_once() {
        for (strips, chunk) in [(1, 1), (50, 1), (50, 3), (48, 8), (7, 100)] {
            let mut z = vec![0.0f32; strips * STRIP];
            strips_in_order(&mut z, chunk, |range, zc| {
                assert_eq!(zc.len(), range.len() * STRIP);
                assert!(range.len() <= chunk);
                for (s, values) in range.zip(zc.chunks_exact_mut(STRIP)) {
                    for v in values {
                        *v += s as f32 + 1.0;
                    }
                }
            });
            for (s, values) in z.chunks_exact(STRIP).enumerate() {
                assert!(
                    values.iter().all(|&v| v == s as f32 + 1.0),
                    "strip {s} of {strips}"
                );
            }
        }
    }

    /// Chunks hold about 64 KiB of weights, and a product never splits into more than 256
    /// chunks a thread.
    #[test]
    fn chunk_sizes() {
        let threads = rayon::current_num_threads();
        // An expert's gate at 4 bits: 128 tiles of 128 bytes a strip.
        assert_eq!(chunk_strips(96, 128 * 128), 4);
        assert_eq!(chunk_strips(3, 1 << 20), 1);
        // The head at 6 bits: 9,680 strips of 24 KiB.
        let head = chunk_strips(9_680, 128 * 192);
        assert!(9_680usize.div_ceil(head) <= 256 * threads);
        assert!(head >= 2);
    }
}

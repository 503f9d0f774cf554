//! Paged KV cache and attention launches: GQA, and MLA in its absorbed form.

use crate::device::{Args, Device, Grid};
use crate::linear::{DenseTensor, DenseType, unsupported};
use crate::memory::{DeviceMem, Scratch, StepView};
use crate::ops::CudaRope;
use trellis_backend::{AttentionSpec, BackendError, KvCacheLayout, KvDtype, MlaSpec, Result};
use trellis_format::LinearWeights;

/// Limits of the attention kernels (see `kernels/attention.cu`).
const GQA_MAX_HEAD_DIM: usize = 256;
const MLA_MAX_RANK: usize = 512;
const MLA_MAX_NOPE: usize = 256;
const MLA_MAX_ROPE: usize = 64;
/// Most heads the context-split MLA decode kernel takes (`MLA_DECODE_MAX_HEADS`).
const MLA_DECODE_MAX_HEADS: usize = 32;

/// Smallest bucket of [`position_bucket`].
const MIN_POSITION_BUCKET: usize = 16;

/// The power of two (at least [`MIN_POSITION_BUCKET`]) that holds positions `0..=max_position`:
/// the MLA context split is sized from it rather than from the position itself, so that one
/// recorded decode step serves every position of the bucket.
pub(crate) fn position_bucket(max_position: usize) -> usize {
    (max_position + 1)
        .next_power_of_two()
        .max(MIN_POSITION_BUCKET)
}

/// The cache of all layers: `layers × token_slots × values_per_token` values, f32 or f16.
pub struct CudaKvCache {
    mem: DeviceMem<u8>,
    pub layout: KvCacheLayout,
}

impl CudaKvCache {
    pub(crate) fn new(dev: &Device, layout: &KvCacheLayout) -> Result<CudaKvCache> {
        Ok(CudaKvCache {
            mem: DeviceMem::zeroed(dev, layout.bytes(), "KV cache")?,
            layout: layout.clone(),
        })
    }

    /// Address of the first slot of `layer`.
    fn layer_ptr(&self, layer: usize) -> u64 {
        assert!(
            layer < self.layout.layers,
            "layer {layer} of a {}-layer cache",
            self.layout.layers
        );
        let per_layer = self.layout.token_slots() * self.layout.values_per_token;
        self.mem.ptr + (layer * per_layer * self.layout.dtype.size()) as u64
    }

    fn is_f16(&self) -> bool {
        self.layout.dtype == KvDtype::F16
    }
}

/// `kv_b_proj` kept dense for absorbed MLA: `[heads·(nope + v), rank]`.
pub struct CudaMlaKvB {
    weight: DenseTensor,
}

fn to_i32(v: usize) -> i32 {
    i32::try_from(v).expect("size fits the kernels' 32-bit ints")
}

/// The step arguments every cache kernel takes last: positions, sequences, block tables.
fn push_step(args: &mut Args<'_>, step: &StepView) {
    args.arg(step.positions)
        .arg(step.sequence)
        .arg(step.block_tables)
        .arg(to_i32(step.blocks_per_sequence))
        .arg(to_i32(step.block_size));
}

pub(crate) fn upload_mla_kv_b(
    dev: &Device,
    weights: &LinearWeights<'_>,
    spec: &MlaSpec,
) -> Result<CudaMlaKvB> {
    let LinearWeights::Dense { weight, .. } = weights else {
        return Err(unsupported(
            "a trellis-quantized kv_b_proj (absorbed MLA needs its rows)",
        ));
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
    if spec.kv_lora_rank > MLA_MAX_RANK
        || spec.qk_nope_dim > MLA_MAX_NOPE
        || spec.qk_rope_dim > MLA_MAX_ROPE
    {
        return Err(unsupported(format!(
            "MLA with rank {}, nope {}, rope {} (at most {MLA_MAX_RANK}, {MLA_MAX_NOPE}, {MLA_MAX_ROPE})",
            spec.kv_lora_rank, spec.qk_nope_dim, spec.qk_rope_dim
        )));
    }
    Ok(CudaMlaKvB {
        weight: DenseTensor::upload(dev, weight)?,
    })
}

pub(crate) fn kv_append(
    dev: &Device,
    k: u64,
    v: u64,
    step: &StepView,
    cache: &mut CudaKvCache,
    layer: usize,
) {
    let width = cache.layout.values_per_token / 2;
    let n = step.rows * width;
    if n == 0 {
        return;
    }
    let kernel = if cache.is_f16() {
        &dev.kernels.kv_append_f16
    } else {
        &dev.kernels.kv_append_f32
    };
    let mut args = Args::new();
    args.arg(k)
        .arg(v)
        .arg(cache.layer_ptr(layer))
        .arg(to_i32(width))
        .arg(to_i32(cache.layout.values_per_token));
    push_step(&mut args, step);
    args.arg(to_i32(step.rows));
    dev.launch(
        kernel,
        Grid::new((dev.stride_blocks(n, 256), 1, 1), 256),
        &mut args,
    );
}

pub(crate) fn attention(
    dev: &Device,
    q: u64,
    spec: &AttentionSpec,
    step: &StepView,
    cache: &CudaKvCache,
    layer: usize,
    out: u64,
) {
    assert!(
        spec.head_dim <= GQA_MAX_HEAD_DIM
            && spec.kv_heads > 0
            && spec.heads.is_multiple_of(spec.kv_heads),
        "attention with {} heads over {} KV heads of {} dims is not supported (head dim ≤ {GQA_MAX_HEAD_DIM})",
        spec.heads,
        spec.kv_heads,
        spec.head_dim
    );
    if step.rows == 0 {
        return;
    }
    let kernel = if cache.is_f16() {
        &dev.kernels.gqa_attention_f16
    } else {
        &dev.kernels.gqa_attention_f32
    };
    let mut args = Args::new();
    args.arg(q)
        .arg(out)
        .arg(cache.layer_ptr(layer))
        .arg(to_i32(cache.layout.values_per_token))
        .arg(to_i32(spec.heads))
        .arg(to_i32(spec.kv_heads))
        .arg(to_i32(spec.head_dim))
        .arg(spec.softmax_scale)
        .arg(to_i32(spec.sliding_window.unwrap_or(0)))
        .arg(spec.logit_softcap.unwrap_or(0.0));
    push_step(&mut args, step);
    dev.launch(
        kernel,
        Grid::new((spec.heads, step.rows, 1), 128),
        &mut args,
    );
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn mla_append(
    dev: &Device,
    ckv: u64,
    kv_norm: u64,
    rope: &CudaRope,
    spec: &MlaSpec,
    step: &StepView,
    cache: &CudaKvCache,
    layer: usize,
) {
    if step.rows == 0 {
        return;
    }
    let kernel = if cache.is_f16() {
        &dev.kernels.mla_append_f16
    } else {
        &dev.kernels.mla_append_f32
    };
    let mut args = Args::new();
    args.arg(ckv)
        .arg(kv_norm)
        .arg(rope.inv_freq.ptr)
        .arg(to_i32(rope.half))
        .arg(rope.scaling)
        .arg(i32::from(rope.interleaved))
        .arg(cache.layer_ptr(layer))
        .arg(to_i32(cache.layout.values_per_token))
        .arg(to_i32(spec.kv_lora_rank))
        .arg(to_i32(spec.qk_rope_dim))
        .arg(spec.latent_norm_eps);
    push_step(&mut args, step);
    dev.launch(kernel, Grid::new((step.rows, 1, 1), 256), &mut args);
}

/// The step's latent rows to append before attending (`kv_a` output and the latent norm's
/// weights), for [`mla_attention`] to fold into its absorb launch where it can.
pub(crate) struct MlaAppend {
    pub ckv: u64,
    pub kv_norm: u64,
}

/// Rotate the queries' rope part in place, absorb W_UK into the no-rope part, attend over the
/// latent cache, and map the latent result through W_UV; with `append`, first write the step's
/// latent rows into the cache (in the absorb launch when the decode forms apply, f16 `kv_b`
/// and cache). `max_position` is the largest position of the step (it sizes the split of the
/// context over blocks).
#[allow(clippy::too_many_arguments)]
pub(crate) fn mla_attention(
    dev: &Device,
    scratch: &mut Scratch,
    max_position: usize,
    append: Option<MlaAppend>,
    q: u64,
    kv_b: &CudaMlaKvB,
    rope: &CudaRope,
    spec: &MlaSpec,
    step: &StepView,
    cache: &CudaKvCache,
    layer: usize,
    out: u64,
) {
    let rows = step.rows;
    if rows == 0 {
        return;
    }
    let fold_append = append.is_some()
        && kv_b_wide_form(rows, spec.kv_lora_rank)
        && kv_b.weight.dtype == DenseType::F16
        && cache.is_f16();
    if let Some(a) = &append
        && !fold_append
    {
        mla_append(dev, a.ckv, a.kv_norm, rope, spec, step, cache, layer);
    }
    let (heads, nope, rope_dim, v_dim, rank) = (
        spec.heads,
        spec.qk_nope_dim,
        spec.qk_rope_dim,
        spec.v_head_dim,
        spec.kv_lora_rank,
    );
    let qk = nope + rope_dim;
    let q_lat = scratch.q_lat.ensure(dev, rows * heads * rank);
    let o_lat = scratch.o_lat.ensure(dev, rows * heads * rank);
    let k = &dev.kernels;
    let wide = kv_b_wide_form(rows, rank);
    let absorb = match (kv_b.weight.dtype, wide) {
        (DenseType::F32, false) => &k.mla_absorb_q_f32,
        (DenseType::F16, false) => &k.mla_absorb_q_f16,
        (DenseType::BF16, false) => &k.mla_absorb_q_bf16,
        (DenseType::F32, true) => &k.mla_absorb_q_wide_f32,
        (DenseType::F16, true) => &k.mla_absorb_q_wide_f16,
        (DenseType::BF16, true) => &k.mla_absorb_q_wide_bf16,
    };
    let w = kv_b.weight.mem.ptr;
    let mut args = Args::new();
    args.arg(q)
        .arg(w)
        .arg(q_lat)
        .arg(to_i32(heads))
        .arg(to_i32(nope))
        .arg(to_i32(qk))
        .arg(to_i32(v_dim))
        .arg(to_i32(rank))
        // The absorb kernel also rotates the queries' rope part.
        .arg(rope.inv_freq.ptr)
        .arg(to_i32(rope.half))
        .arg(rope.scaling)
        .arg(i32::from(rope.interleaved))
        .arg(step.positions);
    match append.filter(|_| fold_append) {
        Some(a) => {
            args.arg(a.ckv)
                .arg(a.kv_norm)
                .arg(cache.layer_ptr(layer))
                .arg(to_i32(cache.layout.values_per_token))
                .arg(to_i32(rope_dim))
                .arg(spec.latent_norm_eps)
                .arg(step.sequence)
                .arg(step.block_tables)
                .arg(to_i32(step.blocks_per_sequence))
                .arg(to_i32(step.block_size));
            // Grid row `heads` appends (one block per token).
            dev.launch(
                &k.mla_absorb_q_append_wide_f16,
                Grid::new((rank.div_ceil(64), heads + 1, rows), 256),
                &mut args,
            );
        }
        None => dev.launch(
            absorb,
            Grid::new((rank.div_ceil(64), heads, rows), 256),
            &mut args,
        ),
    }

    if let Some(partials) = mla_decode_mma(
        dev,
        scratch,
        max_position,
        q,
        q_lat,
        spec,
        step,
        cache,
        layer,
    ) {
        // The decode form of the unabsorb combines few splits itself (one launch fewer).
        if kv_b_wide_form(rows, rank) && partials.splits <= FUSED_COMBINE_MAX_SPLITS {
            mla_unabsorb(dev, kv_b, o_lat, out, spec, rows, Some(partials));
        } else {
            mla_combine(dev, &partials, heads, rank, rows, o_lat);
            mla_unabsorb(dev, kv_b, o_lat, out, spec, rows, None);
        }
        return;
    }
    let shared_bytes = |tile: usize| {
        let stride = rank + rope_dim + 1;
        // Floats, then (8-byte aligned) one cache slot per tile position.
        4 * (heads * stride + tile * stride + heads * tile + 3 * heads) + 8 + 8 * tile
    };
    let tile = (256 / heads).clamp(1, 16);
    if heads <= MLA_DECODE_MAX_HEADS && shared_bytes(tile) <= dev.max_shared_bytes {
        // Split the context over blocks until the grid covers the GPU twice, sized for the
        // whole position bucket; each token's chunk is then chosen on the device from its own
        // position.
        let positions = position_bucket(max_position);
        let target_splits = (2 * dev.sm_count).div_ceil(rows);
        let chunk = positions
            .div_ceil(target_splits)
            .next_multiple_of(tile)
            .max(2 * tile);
        let splits = positions.div_ceil(chunk);
        let part_ml = scratch.mla_ml.ensure(dev, rows * splits * heads * 2);
        let part_acc = scratch.mla_acc.ensure(dev, rows * splits * heads * rank);
        let decode = if cache.is_f16() {
            &k.mla_decode_f16
        } else {
            &k.mla_decode_f32
        };
        let mut args = Args::new();
        args.arg(q)
            .arg(q_lat)
            .arg(part_ml)
            .arg(part_acc)
            .arg(cache.layer_ptr(layer))
            .arg(to_i32(cache.layout.values_per_token))
            .arg(to_i32(heads))
            .arg(to_i32(qk))
            .arg(to_i32(nope))
            .arg(to_i32(rank))
            .arg(to_i32(rope_dim))
            .arg(spec.softmax_scale)
            .arg(to_i32(tile));
        push_step(&mut args, step);
        dev.launch(
            decode,
            Grid::new((splits, rows, 1), 256).shared(shared_bytes(tile)),
            &mut args,
        );
        let partials = SplitPartials {
            ml: part_ml,
            acc: part_acc,
            splits,
        };
        mla_combine(dev, &partials, heads, rank, rows, o_lat);
    } else {
        mla_attend_per_head(dev, q, q_lat, o_lat, spec, step, cache, layer);
    }

    mla_unabsorb(dev, kv_b, o_lat, out, spec, rows, None);
}

/// Split-context MLA decode outputs not yet combined: per (token, split, head) the running max
/// and sum (`ml`) and the unnormalised latent accumulator (`acc`).
struct SplitPartials {
    ml: u64,
    acc: u64,
    splits: usize,
}

/// Most splits the decode form of `mla_unabsorb` combines itself (`MLA_FUSED_COMBINE_MAX_SPLITS`
/// in `kernels/attention.cu`); every one of its blocks re-reads its head's partials, so long
/// contexts (many splits) keep the separate combine.
const FUSED_COMBINE_MAX_SPLITS: usize = 32;

/// Tokens per launch up to which the `kv_b` products use their decode form (`…_wide`: 16-byte
/// loads, all in flight; the whole weight is requested at once). Taller launches (prefill)
/// have blocks enough to hide latency, and the wide form's registers would cost them
/// occupancy (measured on the H200: 13 → 9.5 µs per decode launch; prefill unchanged).
const KV_B_WIDE_MAX_ROWS: usize = 8;

fn kv_b_wide_form(rows: usize, rank: usize) -> bool {
    rows <= KV_B_WIDE_MAX_ROWS && rank.is_multiple_of(8)
}

/// `out[r, h] = W_UV[h] · o_lat[r, h]`; with `partials` (decode form only) `o_lat` is formed
/// from them instead of read.
fn mla_unabsorb(
    dev: &Device,
    kv_b: &CudaMlaKvB,
    o_lat: u64,
    out: u64,
    spec: &MlaSpec,
    rows: usize,
    partials: Option<SplitPartials>,
) {
    let wide = kv_b_wide_form(rows, spec.kv_lora_rank);
    assert!(
        wide || partials.is_none(),
        "only the decode form combines splits"
    );
    let k = &dev.kernels;
    let unabsorb = match (kv_b.weight.dtype, wide) {
        (DenseType::F32, false) => &k.mla_unabsorb_f32,
        (DenseType::F16, false) => &k.mla_unabsorb_f16,
        (DenseType::BF16, false) => &k.mla_unabsorb_bf16,
        (DenseType::F32, true) => &k.mla_unabsorb_wide_f32,
        (DenseType::F16, true) => &k.mla_unabsorb_wide_f16,
        (DenseType::BF16, true) => &k.mla_unabsorb_wide_bf16,
    };
    let mut args = Args::new();
    args.arg(o_lat)
        .arg(kv_b.weight.mem.ptr)
        .arg(out)
        .arg(to_i32(spec.heads))
        .arg(to_i32(spec.qk_nope_dim))
        .arg(to_i32(spec.v_head_dim))
        .arg(to_i32(spec.kv_lora_rank));
    if wide {
        let (ml, acc, splits) = partials.map_or((0, 0, 0), |p| (p.ml, p.acc, p.splits));
        args.arg(ml).arg(acc).arg(to_i32(splits));
    }
    dev.launch(
        unabsorb,
        Grid::new((spec.v_head_dim.div_ceil(32), spec.heads, rows), 256),
        &mut args,
    );
}

/// Shapes `mla_decode_mma` takes (see `kernels/attention.cu`): heads per block (one m16 tile;
/// a token's heads are dealt over ⌈heads / 16⌉ blocks), positions per tile, latent rank.
const MLAM_TILE: usize = 32;
const MLAM_HEADS: usize = 16;
const MLAM_RANK: usize = 512;
/// Most head groups (grid z) the tensor-core decode takes: 128 heads.
const MLAM_MAX_HEAD_GROUPS: usize = 8;

/// The tensor-core MLA decode when the shapes and the cache allow, leaving its split partials
/// to be combined; `None` (nothing enqueued) otherwise.
#[allow(clippy::too_many_arguments)]
fn mla_decode_mma(
    dev: &Device,
    scratch: &mut Scratch,
    max_position: usize,
    q: u64,
    q_lat: u64,
    spec: &MlaSpec,
    step: &StepView,
    cache: &CudaKvCache,
    layer: usize,
) -> Option<SplitPartials> {
    let (heads, rank, rope_dim) = (spec.heads, spec.kv_lora_rank, spec.qk_rope_dim);
    let width = rank + rope_dim;
    let xs = width + 8;
    let shared = 2 * (2 * MLAM_HEADS + MLAM_TILE) * xs
        + 4 * 2 * MLAM_HEADS * (MLAM_TILE + 1)
        + 2 * 2 * MLAM_HEADS * (MLAM_TILE + 8)
        + 4 * 3 * MLAM_HEADS
        + 8 * MLAM_TILE;
    let head_groups = heads.div_ceil(MLAM_HEADS);
    if !dev.mma
        || !cache.is_f16()
        || head_groups > MLAM_MAX_HEAD_GROUPS
        || rank != MLAM_RANK
        || rope_dim > 64
        || !width.is_multiple_of(16)
        || !spec.qk_nope_dim.is_multiple_of(4)
        || !cache.layout.values_per_token.is_multiple_of(8)
        || shared > dev.max_shared_bytes
    {
        return None;
    }
    let rows = step.rows;
    // One wave of blocks, sized for the whole position bucket. A block's time is mostly its
    // fixed chain (queries, scores, softmax, accumulate, partials), so one-tile chunks beat
    // two-tile ones (decode after 512 tokens 167.4 → 172.0 tok/s, three alternated rounds)
    // while the unabsorb still combines the splits itself; past that, two-tile chunks keep the
    // split count (and the separate combine) as they were.
    let positions = position_bucket(max_position);
    let target_splits = dev.sm_count.div_ceil(rows);
    let chunk_of = |min_tiles: usize| {
        positions
            .div_ceil(target_splits)
            .next_multiple_of(MLAM_TILE)
            .max(min_tiles * MLAM_TILE)
    };
    let min_tiles = match dev.mla_min_tiles {
        Some(tiles) => tiles,
        None if positions.div_ceil(chunk_of(1)) <= FUSED_COMBINE_MAX_SPLITS => 1,
        None => 2,
    };
    let chunk = chunk_of(min_tiles);
    let splits = positions.div_ceil(chunk);
    let part_ml = scratch.mla_ml.ensure(dev, rows * splits * heads * 2);
    let part_acc = scratch.mla_acc.ensure(dev, rows * splits * heads * rank);
    let mut args = Args::new();
    args.arg(q)
        .arg(q_lat)
        .arg(part_ml)
        .arg(part_acc)
        .arg(cache.layer_ptr(layer))
        .arg(to_i32(cache.layout.values_per_token))
        .arg(to_i32(heads))
        .arg(to_i32(spec.qk_nope_dim + rope_dim))
        .arg(to_i32(spec.qk_nope_dim))
        .arg(to_i32(rank))
        .arg(to_i32(rope_dim))
        .arg(spec.softmax_scale);
    push_step(&mut args, step);
    args.arg(to_i32(min_tiles * MLAM_TILE));
    dev.launch(
        &dev.kernels.mla_decode_mma,
        Grid::new((splits, rows, head_groups), 256).shared(shared),
        &mut args,
    );
    Some(SplitPartials {
        ml: part_ml,
        acc: part_acc,
        splits,
    })
}

fn mla_combine(
    dev: &Device,
    partials: &SplitPartials,
    heads: usize,
    rank: usize,
    rows: usize,
    o_lat: u64,
) {
    let splits = partials.splits;
    let mut args = Args::new();
    args.arg(partials.ml)
        .arg(partials.acc)
        .arg(to_i32(splits))
        .arg(to_i32(heads))
        .arg(to_i32(rank))
        .arg(o_lat);
    dev.launch(
        &dev.kernels.mla_combine,
        Grid::new((heads, rank.div_ceil(64), rows), 256).shared(4 * splits),
        &mut args,
    );
}

/// One block per (head, token) over the whole context: for head counts the split kernel does
/// not take.
#[allow(clippy::too_many_arguments)]
fn mla_attend_per_head(
    dev: &Device,
    q: u64,
    q_lat: u64,
    o_lat: u64,
    spec: &MlaSpec,
    step: &StepView,
    cache: &CudaKvCache,
    layer: usize,
) {
    let k = &dev.kernels;
    let (heads, nope, rope_dim, rank) = (
        spec.heads,
        spec.qk_nope_dim,
        spec.qk_rope_dim,
        spec.kv_lora_rank,
    );
    let qk = nope + rope_dim;
    let rows = step.rows;
    let attend = if cache.is_f16() {
        &k.mla_attend_f16
    } else {
        &k.mla_attend_f32
    };
    let mut args = Args::new();
    args.arg(q)
        .arg(q_lat)
        .arg(o_lat)
        .arg(cache.layer_ptr(layer))
        .arg(to_i32(cache.layout.values_per_token))
        .arg(to_i32(heads))
        .arg(to_i32(qk))
        .arg(to_i32(nope))
        .arg(to_i32(rank))
        .arg(to_i32(rope_dim))
        .arg(spec.softmax_scale);
    push_step(&mut args, step);
    dev.launch(attend, Grid::new((heads, rows, 1), 128), &mut args);
}

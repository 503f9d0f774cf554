//! Mixture of experts on the device: routing, and expert evaluation over the (token, expert)
//! pairs grouped by expert — a fixed sequence of launches with no host synchronisation.

use crate::device::{Args, Device, Grid, ROUTE_SHARED_BYTES};
use crate::linear::{
    CudaLinear, DenseDesc, DenseType, Io, MoeCombine, RowMap, TrellisDesc, TrellisJob,
    TrellisShape, TrellisTarget, dense_forward, tile_rows_for, trellis_forward, trellis_launch,
    trellis_tile_rows, unsupported,
};
use crate::memory::{DeviceMem, Scratch};
use std::sync::Mutex;
use trellis_backend::GatedMlp;
use trellis_backend::{BackendError, GroupRanking, Result, RouterSpec, ScoringFunction};
use trellis_format::LinearWeights;

/// Limits of the routing kernel (`MOE_MAX_EXPERTS`, `MOE_MAX_TOP_K` in `kernels/moe.cu`).
const MAX_EXPERTS: usize = 256;
const MAX_TOP_K: usize = 32;
const MAX_GROUPS: usize = 64;

pub struct CudaRouter {
    gate: DeviceMem<f32>,
    selection_bias: Option<DeviceMem<f32>>,
    hidden: usize,
    pub spec: RouterSpec,
}

pub struct CudaRouting {
    pub(crate) ids: DeviceMem<u32>,
    pub(crate) weights: DeviceMem<f32>,
    pub(crate) rows: usize,
    pub(crate) top_k: usize,
}

/// The three projections of every expert, as descriptor tables indexed by expert.
enum ExpertTables {
    Trellis {
        tables: [DeviceMem<TrellisDesc>; 3],
        shapes: [TrellisShape; 3],
        max_bits_x2: [i32; 3],
    },
    Dense {
        tables: [DeviceMem<DenseDesc>; 3],
        dtype: DenseType,
    },
}

pub struct CudaExperts {
    /// Keeps every expert's weights alive; the tables point into them.
    _experts: Vec<(CudaLinear, CudaLinear, CudaLinear)>,
    tables: ExpertTables,
    /// Host copies of the trellis descriptor tables (gate, up, down), to append a shared expert.
    descs: [Vec<TrellisDesc>; 3],
    /// The tables with a shared expert appended (see [`moe_block`]).
    with_shared: Mutex<Option<WithShared>>,
    count: usize,
    hidden: usize,
    intermediate: usize,
}

impl CudaExperts {
    pub fn count(&self) -> usize {
        self.count
    }
}

pub(crate) fn upload_router(
    dev: &Device,
    gate: &LinearWeights<'_>,
    selection_bias: Option<&[f32]>,
    spec: &RouterSpec,
) -> Result<CudaRouter> {
    let LinearWeights::Dense { weight, .. } = gate else {
        return Err(unsupported("a trellis-quantized MoE router"));
    };
    let [experts, hidden] = weight.shape[..] else {
        return Err(BackendError::Weight {
            tensor: weight.name.to_string(),
            reason: format!("expected [experts, hidden], got {:?}", weight.shape),
        });
    };
    if experts != spec.num_experts
        || spec.top_k == 0
        || spec.top_k > experts
        || spec.n_group == 0
        || spec.n_group > MAX_GROUPS
        || !experts.is_multiple_of(spec.n_group)
        || spec.topk_group > spec.n_group
    {
        return Err(BackendError::Weight {
            tensor: "router".into(),
            reason: format!(
                "routing of {} experts (top {}, {} groups, top {} groups) does not fit a gate of {experts} experts",
                spec.num_experts, spec.top_k, spec.n_group, spec.topk_group
            ),
        });
    }
    if experts > MAX_EXPERTS || spec.top_k > MAX_TOP_K {
        return Err(unsupported(format!(
            "routing {experts} experts top-{} (at most {MAX_EXPERTS} experts, top-{MAX_TOP_K})",
            spec.top_k
        )));
    }
    if let Some(b) = selection_bias.filter(|b| b.len() != experts) {
        return Err(BackendError::Weight {
            tensor: "router".into(),
            reason: format!(
                "selection bias has {} values for {experts} experts",
                b.len()
            ),
        });
    }
    Ok(CudaRouter {
        gate: DeviceMem::from_host(dev, &weight.to_f32()?, weight.name)?,
        selection_bias: match selection_bias {
            Some(b) => Some(DeviceMem::from_host(dev, b, "router selection bias")?),
            None => None,
        },
        hidden,
        spec: spec.clone(),
    })
}

pub(crate) fn alloc_routing(dev: &Device, rows: usize, top_k: usize) -> Result<CudaRouting> {
    Ok(CudaRouting {
        ids: DeviceMem::zeroed(dev, rows * top_k, "routing ids")?,
        weights: DeviceMem::zeroed(dev, rows * top_k, "routing weights")?,
        rows,
        top_k,
    })
}

pub(crate) fn upload_experts(
    dev: &Device,
    experts: Vec<(CudaLinear, CudaLinear, CudaLinear)>,
) -> Result<CudaExperts> {
    let Some(first) = experts.first() else {
        return Err(unsupported("an MoE layer without experts"));
    };
    let hidden = first.0.in_features();
    let intermediate = first.0.out_features();
    for (e, (g, u, d)) in experts.iter().enumerate() {
        let shapes = [
            (g.in_features(), g.out_features()),
            (u.in_features(), u.out_features()),
            (d.in_features(), d.out_features()),
        ];
        if shapes
            != [
                (hidden, intermediate),
                (hidden, intermediate),
                (intermediate, hidden),
            ]
        {
            return Err(unsupported(format!(
                "expert {e} has projection shapes {shapes:?}, expert 0 gate {hidden}→{intermediate}"
            )));
        }
    }
    let count = experts.len();
    let mut host_descs: [Vec<TrellisDesc>; 3] = Default::default();
    let tables = match &first.0 {
        CudaLinear::Trellis(_) => {
            let mut descs: [Vec<TrellisDesc>; 3] = Default::default();
            let mut shapes = [None; 3];
            for (e, projections) in experts.iter().enumerate() {
                let list = [&projections.0, &projections.1, &projections.2];
                for (p, linear) in list.into_iter().enumerate() {
                    let CudaLinear::Trellis(t) = linear else {
                        return Err(unsupported(format!(
                            "expert {e} mixes dense and trellis projections"
                        )));
                    };
                    if *shapes[p].get_or_insert(t.shape) != t.shape {
                        return Err(unsupported(format!(
                            "expert {e}: padded shape {:?} differs from expert 0's {:?}",
                            t.shape, shapes[p]
                        )));
                    }
                    descs[p].push(t.desc);
                }
            }
            let max_bits = |p: usize| descs[p].iter().map(|d| d.bits_x2).max().unwrap_or(2);
            host_descs.clone_from(&descs);
            ExpertTables::Trellis {
                max_bits_x2: [max_bits(0), max_bits(1), max_bits(2)],
                tables: [
                    DeviceMem::from_host(dev, &descs[0], "expert gate table")?,
                    DeviceMem::from_host(dev, &descs[1], "expert up table")?,
                    DeviceMem::from_host(dev, &descs[2], "expert down table")?,
                ],
                shapes: shapes.map(|s| s.expect("at least one expert")),
            }
        }
        CudaLinear::Dense(d0) => {
            let mut descs: [Vec<DenseDesc>; 3] = Default::default();
            for (e, projections) in experts.iter().enumerate() {
                let list = [&projections.0, &projections.1, &projections.2];
                for (p, linear) in list.into_iter().enumerate() {
                    match linear {
                        CudaLinear::Dense(d) if d.dtype == d0.dtype => descs[p].push(d.desc),
                        _ => {
                            return Err(unsupported(format!(
                                "expert {e}: all experts must be dense {:?} like expert 0",
                                d0.dtype
                            )));
                        }
                    }
                }
            }
            ExpertTables::Dense {
                dtype: d0.dtype,
                tables: [
                    DeviceMem::from_host(dev, &descs[0], "expert gate table")?,
                    DeviceMem::from_host(dev, &descs[1], "expert up table")?,
                    DeviceMem::from_host(dev, &descs[2], "expert down table")?,
                ],
            }
        }
    };
    Ok(CudaExperts {
        _experts: experts,
        tables,
        descs: host_descs,
        with_shared: Mutex::new(None),
        count,
        hidden,
        intermediate,
    })
}

fn to_i32(v: usize) -> i32 {
    i32::try_from(v).expect("size fits the kernels' 32-bit ints")
}

/// Parameters of `moe_route` (mirrors `RouteArgs` in `kernels/moe.cu`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct RouteArgs {
    gate: u64,
    selection_bias: u64,
    x: u64,
    norm_w: u64,
    h_out: u64,
    logits: u64,
    tickets: u64,
    ids: u64,
    weights: u64,
    pair_src: u64,
    pair_desc: u64,
    pair_of: u64,
    tiles: u64,
    hidden: i32,
    experts: i32,
    top_k: i32,
    softmax_scoring: i32,
    n_group: i32,
    topk_group: i32,
    top_two_sum: i32,
    normalize: i32,
    scaling: f32,
    eps: f32,
    per_block: i32,
    shared_id: i32,
    tile_rows: i32,
    max_tiles: i32,
    route_by_warp: i32,
}
// SAFETY: plain `repr(C)` data whose layout matches the kernel's struct.
unsafe impl cudarc::driver::DeviceRepr for RouteArgs {}

const ROUTE_THREADS: u32 = 512;

/// Where the routing kernel's expert grouping goes (see `moe_plan_body` in `kernels/moe.cu`).
#[derive(Clone, Copy, Debug)]
struct PlanOut {
    shared_id: i32,
    tile_rows: usize,
    max_tiles: usize,
    pair_src: u64,
    pair_desc: u64,
    pair_of: u64,
    tiles: u64,
}

/// Route `rows` tokens: with `norm`, the router input is `RMSNorm(x)·weight`, also written to
/// `h_out`; with `plan`, the launch also groups the pairs by expert.
#[allow(clippy::too_many_arguments)]
fn route_launch(
    dev: &Device,
    scratch: &mut Scratch,
    router: &CudaRouter,
    x: u64,
    norm: Option<(u64, f32, u64)>,
    rows: usize,
    routing: &mut CudaRouting,
    plan: Option<PlanOut>,
) {
    let spec = &router.spec;
    assert!(
        rows <= routing.rows && spec.top_k == routing.top_k,
        "routing buffer of {} rows × top-{} used for {rows} rows × top-{}",
        routing.rows,
        routing.top_k,
        spec.top_k
    );
    if rows == 0 {
        return;
    }
    let hidden = router.hidden;
    let row_bytes = 4 * (hidden + 8);
    assert!(
        row_bytes + 4 * hidden <= ROUTE_SHARED_BYTES,
        "routing over {hidden} inputs needs more shared memory than the kernel takes"
    );
    let per_block = ((ROUTE_SHARED_BYTES - 4 * hidden) / row_bytes).clamp(1, 32);
    // Spread the gate over at least a few blocks per token.
    let per_block = per_block.min(spec.num_experts.div_ceil(8)).max(1);
    let groups = spec.num_experts.div_ceil(per_block);
    let logits = scratch.route_logits.ensure(dev, rows * spec.num_experts);
    let tickets = scratch.route_tickets.ensure(dev, rows + 1);
    let plan = plan.unwrap_or(PlanOut {
        shared_id: -1,
        tile_rows: 1,
        max_tiles: 0,
        pair_src: 0,
        pair_desc: 0,
        pair_of: 0,
        tiles: 0,
    });
    let args = RouteArgs {
        gate: router.gate.ptr,
        selection_bias: router.selection_bias.as_ref().map_or(0, |b| b.ptr),
        x,
        norm_w: norm.map_or(0, |n| n.0),
        h_out: norm.map_or(0, |n| n.2),
        logits,
        tickets,
        ids: routing.ids.ptr,
        weights: routing.weights.ptr,
        pair_src: plan.pair_src,
        pair_desc: plan.pair_desc,
        pair_of: plan.pair_of,
        tiles: plan.tiles,
        hidden: to_i32(hidden),
        experts: to_i32(spec.num_experts),
        top_k: to_i32(spec.top_k),
        softmax_scoring: i32::from(spec.scoring == ScoringFunction::Softmax),
        n_group: to_i32(spec.n_group),
        topk_group: to_i32(spec.topk_group),
        top_two_sum: i32::from(spec.group_ranking == GroupRanking::TopTwoSum),
        normalize: i32::from(spec.normalize),
        scaling: spec.scaling,
        eps: norm.map_or(0.0, |n| n.1),
        per_block: to_i32(per_block),
        shared_id: plan.shared_id,
        tile_rows: to_i32(plan.tile_rows),
        max_tiles: to_i32(plan.max_tiles),
        // One warp selects without block barriers where the rule allows (GLM's: sigmoid, no
        // group limit, 64 experts, top 4): traced, the selection 3.6 -> 2.6 µs.
        route_by_warp: i32::from(
            spec.scoring == ScoringFunction::Sigmoid
                && (spec.n_group <= 1 || spec.topk_group >= spec.n_group)
                && spec.num_experts <= 64
                && spec.top_k <= 32,
        ),
    };
    let mut launch = Args::new();
    launch.arg_struct(&args);
    dev.launch(
        &dev.kernels.moe_route,
        Grid::new((groups, rows, 1), ROUTE_THREADS).shared(4 * (per_block * (hidden + 8) + hidden)),
        &mut launch,
    );
}

pub(crate) fn route(
    dev: &Device,
    scratch: &mut Scratch,
    router: &CudaRouter,
    x: u64,
    rows: usize,
    routing: &mut CudaRouting,
) {
    route_launch(dev, scratch, router, x, None, rows, routing, None);
}

/// Descriptor tables of the experts with the shared expert appended as one more expert (id
/// `count`), built on first use for that shared expert.
pub(crate) struct WithShared {
    key: u64,
    tables: [DeviceMem<TrellisDesc>; 3],
}

/// The shared expert's three trellis projections, if they fit the routed experts' padded
/// shapes (then it runs in the experts' launches).
fn shared_descs(
    experts: &CudaExperts,
    shared: &GatedMlp<'_, crate::CudaBackend>,
) -> Option<[TrellisDesc; 3]> {
    let ExpertTables::Trellis { shapes, .. } = &experts.tables else {
        return None;
    };
    let list = [shared.gate, shared.up, shared.down];
    let mut descs = [TrellisDesc::default(); 3];
    for (p, linear) in list.into_iter().enumerate() {
        let CudaLinear::Trellis(t) = linear else {
            return None;
        };
        if t.shape != shapes[p] {
            return None;
        }
        descs[p] = t.desc;
    }
    Some(descs)
}

/// The whole MoE block with a fused router-input norm, the shared expert run with the routed
/// ones and the residual added by the combine: `x += Σ_j w_j·expert_j(h) + shared(h)`,
/// `h = RMSNorm(x)·norm` (written to `h`). Returns false (nothing enqueued) when the experts
/// or the shared expert do not fit the fused path.
#[allow(clippy::too_many_arguments)]
pub(crate) fn moe_block(
    dev: &Device,
    scratch: &mut Scratch,
    x: u64,
    norm: (u64, f32),
    h: u64,
    rows: usize,
    router: &CudaRouter,
    experts: &CudaExperts,
    shared: Option<&GatedMlp<'_, crate::CudaBackend>>,
    routing: &mut CudaRouting,
) -> bool {
    if dev.unfused_linear || router.hidden != experts.hidden {
        return false;
    }
    let ExpertTables::Trellis {
        tables,
        shapes,
        max_bits_x2,
    } = &experts.tables
    else {
        return false;
    };
    let mut max_bits_x2 = *max_bits_x2;
    // Tables with the shared expert appended (id = count), built once.
    let mut with_shared = experts.with_shared.lock().expect("shared expert tables");
    let (tables, shared_id) = match shared {
        None => ([tables[0].ptr, tables[1].ptr, tables[2].ptr], -1),
        Some(mlp) => {
            let Some(descs) = shared_descs(experts, mlp) else {
                return false;
            };
            for (bits, d) in max_bits_x2.iter_mut().zip(&descs) {
                *bits = (*bits).max(d.bits_x2);
            }
            let key = descs[0].words;
            if with_shared.as_ref().is_none_or(|w| w.key != key) {
                if dev.capture.is_capturing() {
                    dev.capture.mark_broken();
                    return true;
                }
                let mut all: [Vec<TrellisDesc>; 3] = Default::default();
                for (p, list) in all.iter_mut().enumerate() {
                    *list = experts.descs[p].clone();
                    list.push(descs[p]);
                }
                let upload = |p: usize| {
                    DeviceMem::from_host(dev, &all[p], "expert tables with the shared expert")
                        .unwrap_or_else(|e| panic!("{e}"))
                };
                *with_shared = Some(WithShared {
                    key,
                    tables: [upload(0), upload(1), upload(2)],
                });
            }
            let w = with_shared.as_ref().expect("built above");
            (
                [w.tables[0].ptr, w.tables[1].ptr, w.tables[2].ptr],
                to_i32(experts.count),
            )
        }
    };
    if rows == 0 {
        return true;
    }
    let (hidden, inter, top_k) = (experts.hidden, experts.intermediate, routing.top_k);
    let groups_used = usize::from(shared_id >= 0);
    let pairs = rows * (top_k + groups_used);
    let used_experts = experts.count.min(rows * top_k) + groups_used;
    let tile_rows = trellis_tile_rows(dev, pairs.div_ceil(used_experts));
    // One token has one pair per expert, so exactly one tile each (no idle blocks in the
    // expert launches); more tokens may split an expert's pairs over partial tiles.
    let max_tiles = if rows == 1 {
        pairs
    } else {
        pairs.div_ceil(tile_rows) + used_experts
    };
    let pair_src = scratch.pair_src.ensure(dev, pairs);
    let pair_desc = scratch.pair_desc.ensure(dev, pairs);
    let pair_of = scratch.pair_of.ensure(dev, pairs);
    let tiles = scratch.tiles.ensure(dev, 3 * max_tiles);
    let gate = scratch.moe_gate.ensure(dev, pairs * inter);
    let up = scratch.moe_up.ensure(dev, pairs * inter);
    let down = scratch.moe_down.ensure(dev, pairs * hidden);

    route_launch(
        dev,
        scratch,
        router,
        x,
        Some((norm.0, norm.1, h)),
        rows,
        routing,
        Some(PlanOut {
            shared_id,
            tile_rows,
            max_tiles,
            pair_src,
            pair_desc,
            pair_of,
            tiles,
        }),
    );
    let gathered = RowMap {
        rows: pairs,
        tile_rows,
        tiles,
        num_tiles: max_tiles,
        row_desc: pair_desc,
        src_rows: pair_src,
    };
    let sorted = RowMap {
        src_rows: 0,
        ..gathered
    };
    let target = |p: usize, out: u64, out_stride: usize| TrellisTarget {
        table: tables[p],
        shape: shapes[p],
        out,
        out_stride,
        max_bits_x2: max_bits_x2[p],
    };
    // gate and up in one launch, then down with silu(gate) ⊙ up applied as it reads.
    trellis_launch(
        dev,
        scratch,
        &TrellisJob {
            map: &gathered,
            x: h,
            in_stride: hidden,
            x_up: 0,
            norm: None,
            residual: false,
            targets: &[target(0, gate, inter), target(1, up, inter)],
            combine: None,
            tiles_settled: false,
        },
    );
    // One token's combine is done by the down launch's last finishers (one launch fewer).
    let fold = (rows == 1).then_some(MoeCombine {
        pair_of,
        weights: routing.weights.ptr,
        top_k,
        has_shared: shared_id >= 0,
        residual: true,
        out: x,
    });
    let folded = trellis_launch(
        dev,
        scratch,
        &TrellisJob {
            map: &sorted,
            x: gate,
            in_stride: inter,
            x_up: up,
            norm: None,
            residual: false,
            targets: &[target(2, down, hidden)],
            combine: fold,
            tiles_settled: true,
        },
    );
    if !folded {
        combine(
            dev,
            down,
            pair_of,
            routing,
            rows,
            hidden,
            shared_id >= 0,
            true,
            x,
        );
    }
    true
}

/// `out (+)= Σ_j w_j · down[pair_of[r, j]] (+ shared)`.
#[allow(clippy::too_many_arguments)]
fn combine(
    dev: &Device,
    down: u64,
    pair_of: u64,
    routing: &CudaRouting,
    rows: usize,
    hidden: usize,
    has_shared: bool,
    residual: bool,
    out: u64,
) {
    let mut args = Args::new();
    args.arg(down)
        .arg(pair_of)
        .arg(routing.weights.ptr)
        .arg(to_i32(routing.top_k))
        .arg(to_i32(hidden))
        .arg(i32::from(has_shared))
        .arg(i32::from(residual))
        .arg(out);
    dev.launch(
        &dev.kernels.moe_combine,
        Grid::new((hidden.div_ceil(256), rows, 1), 256),
        &mut args,
    );
}

/// `out = Σ_j weight_j · expert_j(x)`: group the pairs by expert on the device, run the three
/// projections over the grouped pairs (each row tile with its expert's weights), then add each
/// token's weighted expert outputs in ascending expert order.
pub(crate) fn experts_forward(
    dev: &Device,
    scratch: &mut Scratch,
    experts: &CudaExperts,
    x: u64,
    rows: usize,
    routing: &CudaRouting,
    out: u64,
) {
    if rows == 0 {
        return;
    }
    let (hidden, inter, top_k) = (experts.hidden, experts.intermediate, routing.top_k);
    let pairs = rows * top_k;
    let used_experts = experts.count.min(pairs);
    let tile_rows = match experts.tables {
        ExpertTables::Trellis { .. } => trellis_tile_rows(dev, pairs.div_ceil(used_experts)),
        ExpertTables::Dense { .. } => tile_rows_for(pairs.div_ceil(used_experts)),
    };
    let max_tiles = pairs.div_ceil(tile_rows) + used_experts;

    let pair_src = scratch.pair_src.ensure(dev, pairs);
    let pair_desc = scratch.pair_desc.ensure(dev, pairs);
    let pair_of = scratch.pair_of.ensure(dev, pairs);
    let tiles = scratch.tiles.ensure(dev, 3 * max_tiles);
    let gate = scratch.moe_gate.ensure(dev, pairs * inter);
    let up = scratch.moe_up.ensure(dev, pairs * inter);
    let down = scratch.moe_down.ensure(dev, pairs * hidden);

    let mut args = Args::new();
    args.arg(routing.ids.ptr)
        .arg(to_i32(rows))
        .arg(to_i32(top_k))
        .arg(to_i32(experts.count))
        .arg(-1i32)
        .arg(to_i32(tile_rows))
        .arg(to_i32(max_tiles))
        .arg(pair_src)
        .arg(pair_desc)
        .arg(pair_of)
        .arg(tiles);
    dev.launch(&dev.kernels.moe_plan, Grid::new((1, 1, 1), 256), &mut args);

    let gathered = RowMap {
        rows: pairs,
        tile_rows,
        tiles,
        num_tiles: max_tiles,
        row_desc: pair_desc,
        src_rows: pair_src,
    };
    let sorted = RowMap {
        src_rows: 0,
        ..gathered
    };
    let io_gate = Io {
        x,
        in_stride: hidden,
        out: gate,
        out_stride: inter,
    };
    let io_up = Io { out: up, ..io_gate };
    let io_down = Io {
        x: gate,
        in_stride: inter,
        out: down,
        out_stride: hidden,
    };
    match &experts.tables {
        ExpertTables::Trellis {
            tables,
            shapes,
            max_bits_x2,
        } => {
            let run = |scratch: &mut Scratch, p: usize, map: &RowMap, io: Io, x_up: u64| {
                trellis_forward(
                    dev,
                    scratch,
                    tables[p].ptr,
                    shapes[p],
                    max_bits_x2[p],
                    map,
                    io,
                    x_up,
                )
            };
            run(scratch, 0, &gathered, io_gate, 0);
            run(scratch, 1, &gathered, io_up, 0);
            // The down projection applies silu(gate) ⊙ up to its input as it reads it.
            run(scratch, 2, &sorted, io_down, up);
        }
        ExpertTables::Dense { tables, dtype } => {
            dense_forward(
                dev,
                tables[0].ptr,
                *dtype,
                hidden,
                inter,
                &gathered,
                io_gate,
            );
            dense_forward(dev, tables[1].ptr, *dtype, hidden, inter, &gathered, io_up);
            crate::ops::silu_mul(dev, gate, up, pairs * inter);
            dense_forward(dev, tables[2].ptr, *dtype, inter, hidden, &sorted, io_down);
        }
    }

    combine(dev, down, pair_of, routing, rows, hidden, false, false, out);
}

//! Mixture of experts on the device: routing, and expert evaluation over the (token, expert)
//! pairs grouped by expert — a fixed sequence of launches with no host synchronisation.

use crate::device::{Args, Device, Grid};
use crate::linear::{
    CudaLinear, DenseDesc, DenseType, Io, RowMap, TrellisDesc, TrellisShape, dense_forward,
    tile_rows_for, trellis_forward, unsupported,
};
use crate::memory::{DeviceMem, Scratch};
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
        count,
        hidden,
        intermediate,
    })
}

fn to_i32(v: usize) -> i32 {
    i32::try_from(v).expect("size fits the kernels' 32-bit ints")
}

pub(crate) fn route(
    dev: &Device,
    router: &CudaRouter,
    x: u64,
    rows: usize,
    routing: &mut CudaRouting,
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
    let mut args = Args::new();
    args.arg(router.gate.ptr)
        .arg(router.selection_bias.as_ref().map_or(0, |b| b.ptr))
        .arg(x)
        .arg(to_i32(router.hidden))
        .arg(to_i32(spec.num_experts))
        .arg(to_i32(spec.top_k))
        .arg(i32::from(spec.scoring == ScoringFunction::Softmax))
        .arg(to_i32(spec.n_group))
        .arg(to_i32(spec.topk_group))
        .arg(i32::from(spec.group_ranking == GroupRanking::TopTwoSum))
        .arg(i32::from(spec.normalize))
        .arg(spec.scaling)
        .arg(routing.ids.ptr)
        .arg(routing.weights.ptr);
    dev.launch(
        &dev.kernels.moe_route,
        Grid::new((rows, 1, 1), 512),
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
    let tile_rows = tile_rows_for(pairs.div_ceil(used_experts));
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

    let mut args = Args::new();
    args.arg(down)
        .arg(pair_of)
        .arg(routing.weights.ptr)
        .arg(to_i32(top_k))
        .arg(to_i32(hidden))
        .arg(out);
    dev.launch(
        &dev.kernels.moe_combine,
        Grid::new((hidden.div_ceil(256), rows, 1), 256),
        &mut args,
    );
}

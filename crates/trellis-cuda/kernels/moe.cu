// Mixture of experts on the device: routing, grouping of (token, expert) pairs by expert, and
// the weighted combination of expert outputs. Nothing here needs the host.

#define MOE_MAX_EXPERTS 256
#define MOE_MAX_TOP_K 32
#define ROUTE_THREADS 512
#define ROUTE_ROW_REGS 8  // router input values per thread held in registers (hidden ≤ 4096)

// A selection score that orders: NaN (from a broken input) ranks with −∞, so that exactly
// top_k experts are chosen and every id written is a real expert (the reference may pick a
// NaN expert instead; either way the output is garbage, but never an out-of-range id).
__device__ __forceinline__ float orderable(float v) { return v != v ? NEG_INF : v; }

// Rust's f32::total_cmp as a signed integer key.
__device__ __forceinline__ int total_order_key(float v) {
    int bits = __float_as_int(v);
    return bits ^ (int)(((u32)(bits >> 31)) >> 1);
}

// The router's sigmoid/softmax exponentials are evaluated in double and rounded once, which
// lands on the correctly rounded f32 value the CPU reference's exp nearly always returns.
__device__ __forceinline__ float exp_rounded(float x) { return (float)exp((double)x); }

// ---- routing -------------------------------------------------------------------------------
//
// moe_route: grid (expert groups, tokens), ROUTE_THREADS threads. Block (g, r):
//   1. stages its `per_block` experts' gate rows in shared memory (coalesced 16-byte loads;
//      before waiting for the previous kernel, as they are constant);
//   2. forms the token's router input h in shared memory: x, or RMSNorm(x)·norm_w when norm_w is
//      set (block (0, r) also writes h to `h_out` for the experts), and computes the experts'
//      logits in the CPU reference's exact summation order without FMA (eight strided partial
//      sums, added in order, then the tail), so they match it bit for bit;
//   3. takes the token's ticket: the token's last block applies the scoring and the selection
//      (the reference's serial algorithm; exponentials in double, rounded once), with one warp
//      where the rule allows (route_select_warp), else with the whole block;
//   4. with `plan` set, takes the launch's ticket: the last token's finisher groups the
//      (token, expert) pairs by expert for the expert launches (moe_plan_body); a single
//      token's finisher writes its plan directly.
// Tickets are zero between launches (each finisher resets its own).
//
// Shared memory (dynamic): gate rows [per_block][hidden + 8] (the padding spreads the experts
// of one warp over banks), then h [hidden].

__device__ __forceinline__ void moe_plan_body(const u32* ids, int rows, int top_k, int experts,
                                              int shared_id, int tile_rows, int max_tiles,
                                              int* pair_src, int* pair_desc, int* pair_of,
                                              int* tiles);

struct RouteArgs {
    const float* gate;
    const float* selection_bias;
    const float* x;
    const float* norm_w;
    float* h_out;
    float* logits;   // [rows][experts]
    u32* tickets;    // [rows + 1]
    u32* ids;
    float* weights;
    int* pair_src;   // plan outputs (null: no plan)
    int* pair_desc;
    int* pair_of;
    int* tiles;
    int hidden, experts, top_k, softmax_scoring, n_group, topk_group, top_two_sum, normalize;
    float scaling, eps;
    int per_block, shared_id, tile_rows, max_tiles;
    // Sigmoid scoring, no group limit, ≤ 64 experts, top_k ≤ 32: the selection is one warp's
    // (route_select_warp), else the block's (route_select_block).
    int route_by_warp;
};

// One token's plan when its experts, ascending, are already the sorted pairs (the shared
// expert last): entries p = start, start + stride, ... of the `max_tiles` row tiles.
__device__ __forceinline__ void one_token_plan(const RouteArgs& a, const int* picked, int start,
                                               int stride) {
    const int pairs = a.top_k + (a.shared_id >= 0 ? 1 : 0);
    for (int p = start; p < a.max_tiles; p += stride) {
        const bool used = p < pairs;
        const int e = p < a.top_k ? picked[p] : a.shared_id;
        if (used) {
            a.pair_src[p] = 0;
            a.pair_desc[p] = e;
            a.pair_of[p] = p;
        }
        a.tiles[3 * p] = used ? e : -1;
        a.tiles[3 * p + 1] = used ? p : 0;
        a.tiles[3 * p + 2] = used ? 1 : 0;
    }
}

// Token r's ids and weights, by warp 0: lane i < top_k holds pick i (ascending id) and its
// score w. Every lane forms the normalising sum in pick order, as the reference does, from
// shuffles (no barrier, no serial loads). Resets the token's ticket.
__device__ __forceinline__ void write_routing(const RouteArgs& a, int r, int pick, float w) {
    const int lane = threadIdx.x & 31, top_k = a.top_k;
    float sum = 0.f;
    for (int i = 0; i < top_k; i++) sum = __fadd_rn(sum, __shfl_sync(FULL_MASK, w, i));
    sum = __fadd_rn(sum, 1e-20f);
    if (lane < top_k) {
        a.ids[(u64)r * top_k + lane] = (u32)pick;
        a.weights[(u64)r * top_k + lane] = __fmul_rn(a.normalize ? __fdiv_rn(w, sum) : w, a.scaling);
    }
    if (lane == 0) a.tickets[r] = 0u;
}

// The selection of token r by one warp, without block barriers: sigmoid scores, no group
// limit, ≤ 64 experts, top_k ≤ 32 (`route_by_warp`). Lane l holds experts l and l + 32. Each of
// the top_k rounds is a warp argmax over (selection score, −id) among the untaken experts:
// the reference's serial pick of the largest score, the lowest id on ties. Writes ids and
// weights (ascending id, as the reference lists them) and the chosen ids to `picked`.
__device__ __forceinline__ void route_select_warp(const RouteArgs& a, int r, float bias_low,
                                                  float bias_high, int* picked,
                                                  float* picked_score) {
    const int lane = threadIdx.x & 31, experts = a.experts, top_k = a.top_k;
    float score[2], key[2];
    bool live[2], taken[2] = {false, false};
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int e = lane + 32 * h;
        live[h] = e < experts;
        const float logit = live[h] ? __ldcg(a.logits + (u64)r * experts + e) : 0.f;
        score[h] = __fdiv_rn(1.f, __fadd_rn(1.f, exp_rounded(-logit)));
        key[h] = orderable(a.selection_bias ? __fadd_rn(score[h], h == 0 ? bias_low : bias_high)
                                            : score[h]);
    }
    for (int k = 0; k < top_k; k++) {
        int id = -1;
        float v = 0.f;
#pragma unroll
        for (int h = 0; h < 2; h++) {
            if (live[h] && !taken[h] && argmax_better(key[h], lane + 32 * h, v, id)) {
                id = lane + 32 * h;
                v = key[h];
            }
        }
        argmax_warp(v, id);
        taken[0] = taken[0] || id == lane;
        taken[1] = taken[1] || id == lane + 32;
    }
    const u32 low = __ballot_sync(FULL_MASK, taken[0]), high = __ballot_sync(FULL_MASK, taken[1]);
    const u32 below = (1u << lane) - 1u;
    const int slot_low = __popc(low & below), slot_high = __popc(low) + __popc(high & below);
    if (taken[0]) {
        picked[slot_low] = lane;
        picked_score[slot_low] = score[0];
    }
    if (taken[1]) {
        picked[slot_high] = lane + 32;
        picked_score[slot_high] = score[1];
    }
    __syncwarp();
    write_routing(a, r, lane < top_k ? picked[lane] : 0, lane < top_k ? picked_score[lane] : 0.f);
}

// The selection of token r by the whole block (any rule): thread e scores expert e (`bias`:
// its selection bias), thread 0 applies the group limit, and the chosen experts, ascending,
// go to `picked`.
__device__ __forceinline__ void route_select_block(const RouteArgs& a, int r, float bias,
                                                   float* scores, float* select, int* picked,
                                                   float* scratch) {
    const int tid = threadIdx.x, experts = a.experts, top_k = a.top_k;
    // Scores (one expert per thread, same arithmetic as the reference).
    for (int e = tid; e < experts; e += ROUTE_THREADS) scores[e] = __ldcg(a.logits + (u64)r * experts + e);
    __syncthreads();
    if (a.softmax_scoring) {
        float mx = NEG_INF;
        for (int e = tid; e < experts; e += ROUTE_THREADS) mx = fmaxf(mx, scores[e]);
        mx = block_max(mx, scratch);
        for (int e = tid; e < experts; e += ROUTE_THREADS)
            scores[e] = exp_rounded(__fsub_rn(scores[e], mx));
        __syncthreads();
        // The reference adds the exponentials in expert order.
        if (tid == 0) {
            float total = 0.f;
            for (int e = 0; e < experts; e++) total = __fadd_rn(total, scores[e]);
            scratch[0] = __fdiv_rn(1.f, total);
        }
        __syncthreads();
        const float inv = scratch[0];
        for (int e = tid; e < experts; e += ROUTE_THREADS) scores[e] = __fmul_rn(scores[e], inv);
    } else {
        for (int e = tid; e < experts; e += ROUTE_THREADS)
            scores[e] = __fdiv_rn(1.f, __fadd_rn(1.f, exp_rounded(-scores[e])));
    }
    // experts ≤ MOE_MAX_EXPERTS < ROUTE_THREADS: thread e holds expert e's bias. Past the
    // experts, −∞ up to a multiple of 8 (never ahead of anything in the rank count below).
    const int padded = (experts + 7) & ~7;
    if (tid < experts)
        select[tid] = orderable(a.selection_bias ? __fadd_rn(scores[tid], bias) : scores[tid]);
    else if (tid < padded) select[tid] = NEG_INF;
    __syncthreads();

    if (a.n_group > 1 && tid == 0) {
        // Keep the experts of the topk_group best-ranked groups (serial, as the reference).
        const int n_group = a.n_group, per_group = experts / n_group;
        float group_score[64];
        bool removed[64];
        for (int gi = 0; gi < n_group; gi++) {
            float best0 = NEG_INF, best1 = NEG_INF;
            for (int e = gi * per_group; e < (gi + 1) * per_group; e++) {
                const float v = select[e];
                if (v > best0) {
                    best1 = best0;
                    best0 = v;
                } else if (v > best1) {
                    best1 = v;
                }
            }
            group_score[gi] =
                a.top_two_sum ? __fadd_rn(best0, per_group > 1 ? best1 : 0.f) : best0;
            removed[gi] = false;
        }
        for (int drop = 0; drop < n_group - a.topk_group; drop++) {
            // The lowest score goes first; on ties the higher group index.
            int worst = -1;
            for (int gi = 0; gi < n_group; gi++) {
                if (removed[gi]) continue;
                if (worst < 0) {
                    worst = gi;
                    continue;
                }
                const int kg = total_order_key(group_score[gi]);
                const int kw = total_order_key(group_score[worst]);
                if (kg < kw || (kg == kw && gi > worst)) worst = gi;
            }
            for (int e = worst * per_group; e < (worst + 1) * per_group; e++) select[e] = NEG_INF;
            removed[worst] = true;
        }
    }
    __syncthreads();

    trace_mark(4);
    // The reference picks, top_k times, the untaken expert with the largest selection score
    // (lowest id on ties): expert e is chosen iff fewer than top_k experts precede it in
    // (score descending, id ascending) order. Chosen experts are listed by ascending id.
    // Thread e counts the experts ahead of it, eight at a time from two 16-byte loads (a guarded
    // load per expert compiled to a branch and a wait each: ~2.7 µs), and one ballot per warp
    // numbers the chosen.
    __shared__ int warp_chosen[ROUTE_THREADS / 32];
    const int warp = tid >> 5, lane = tid & 31;
    bool is_chosen = false;
    if (tid < experts) {  // experts ≤ MOE_MAX_EXPERTS < ROUTE_THREADS
        const float v = select[tid];
        int ahead = 0;
        for (int j0 = 0; j0 < padded; j0 += 8) {
            const float4 lo = *(const float4*)(select + j0);
            const float4 hi = *(const float4*)(select + j0 + 4);
            const float sj[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
            for (int u = 0; u < 8; u++) ahead += (sj[u] > v) || (sj[u] == v && j0 + u < tid);
        }
        is_chosen = ahead < top_k;
    }
    const u32 chosen_bits = __ballot_sync(FULL_MASK, is_chosen);
    if (lane == 0) warp_chosen[warp] = __popc(chosen_bits);
    __syncthreads();
    trace_mark(5);
    if (is_chosen) {
        int slot = __popc(chosen_bits & ((1u << lane) - 1u));
        for (int w = 0; w < warp; w++) slot += warp_chosen[w];
        if (slot < top_k) picked[slot] = tid;
    }
    __syncthreads();
    if (warp == 0) {  // lane i takes pick i (top_k ≤ 32)
        const int pick = lane < top_k ? picked[lane] : 0;
        write_routing(a, r, pick, lane < top_k ? scores[pick] : 0.f);
    }
}

extern "C" __global__ void __launch_bounds__(ROUTE_THREADS) moe_route(const RouteArgs a) {
    extern __shared__ float dyn[];
    __shared__ float scores[MOE_MAX_EXPERTS];
    __shared__ __align__(16) float select[MOE_MAX_EXPERTS];
    __shared__ int chosen[MOE_MAX_EXPERTS + MOE_MAX_TOP_K];
    __shared__ float scratch[32];
    __shared__ int is_last;
    const int g = blockIdx.x, r = blockIdx.y, tid = threadIdx.x;
    const int hidden = a.hidden, experts = a.experts, top_k = a.top_k;
    const int row_stride = hidden + 8;
    float* gs = dyn;
    float* hs = dyn + a.per_block * row_stride;
    const float* xr = a.x + (u64)r * hidden;
    const int e0 = g * a.per_block;
    const int ne = min(a.per_block, experts - e0);

    // Stage this block's gate rows (16-byte loads when rows are 16-byte aligned). They are
    // constant, so this happens before waiting for the kernel that writes x.
    if ((hidden & 3) == 0) {
        // Eight loads in flight per thread (one memory latency per batch).
        const int v4 = hidden >> 2;
        for (int i0 = tid; i0 < ne * v4; i0 += ROUTE_THREADS * 8) {
            float4 v[8];
#pragma unroll
            for (int u = 0; u < 8; u++) {
                const int i = i0 + ROUTE_THREADS * u;
                const int e = i / v4, c4 = i - e * v4;
                v[u] = i < ne * v4 ? ((const float4*)(a.gate + (u64)(e0 + e) * hidden))[c4]
                                   : make_float4(0.f, 0.f, 0.f, 0.f);
            }
#pragma unroll
            for (int u = 0; u < 8; u++) {
                const int i = i0 + ROUTE_THREADS * u;
                if (i < ne * v4) {
                    const int e = i / v4, c4 = i - e * v4;
                    float* dst = gs + e * row_stride + 4 * c4;
                    dst[0] = v[u].x;
                    dst[1] = v[u].y;
                    dst[2] = v[u].z;
                    dst[3] = v[u].w;
                }
            }
        }
    } else {
        for (int i = tid; i < ne * hidden; i += ROUTE_THREADS) {
            const int e = i / hidden, c = i - e * hidden;
            gs[e * row_stride + c] = a.gate[(u64)(e0 + e) * hidden + c];
        }
    }
    // The norm's weights and the selection bias are constant too: requested before the wait,
    // so that the norm and the finisher do not wait for them afterwards.
    float norm_w[ROUTE_ROW_REGS];
    const bool rows_in_regs = hidden <= ROUTE_ROW_REGS * ROUTE_THREADS;
    if (a.norm_w && rows_in_regs) {
#pragma unroll
        for (int i = 0; i < ROUTE_ROW_REGS; i++) {
            const int c = tid + ROUTE_THREADS * i;
            norm_w[i] = c < hidden ? a.norm_w[c] : 0.f;
        }
    }
    const float bias = a.selection_bias && tid < experts ? a.selection_bias[tid] : 0.f;
    const float bias_high = a.route_by_warp && a.selection_bias && tid < 32 && tid + 32 < experts
                                ? a.selection_bias[tid + 32]
                                : 0.f;
    pdl_entry();
    // The router input.
    if (a.norm_w && rows_in_regs) {
        float xv[ROUTE_ROW_REGS];
        float sum_sq = 0.f;
#pragma unroll
        for (int i = 0; i < ROUTE_ROW_REGS; i++) {
            const int c = tid + ROUTE_THREADS * i;
            xv[i] = c < hidden ? xr[c] : 0.f;
        }
#pragma unroll
        for (int i = 0; i < ROUTE_ROW_REGS; i++) sum_sq += xv[i] * xv[i];
        sum_sq = block_sum(sum_sq, scratch);
        const float inv = 1.f / sqrtf(sum_sq / (float)hidden + a.eps);
#pragma unroll
        for (int i = 0; i < ROUTE_ROW_REGS; i++) {
            const int c = tid + ROUTE_THREADS * i;
            if (c < hidden) {
                const float v = norm_w[i] * (xv[i] * inv);
                hs[c] = v;
                if (g == 0 && a.h_out) a.h_out[(u64)r * hidden + c] = v;
            }
        }
    } else if (a.norm_w) {
        float sum_sq = 0.f;
        for (int c = tid; c < hidden; c += ROUTE_THREADS) sum_sq += xr[c] * xr[c];
        sum_sq = block_sum(sum_sq, scratch);
        const float inv = 1.f / sqrtf(sum_sq / (float)hidden + a.eps);
        for (int c = tid; c < hidden; c += ROUTE_THREADS) {
            const float v = a.norm_w[c] * (xr[c] * inv);
            hs[c] = v;
            if (g == 0 && a.h_out) a.h_out[(u64)r * hidden + c] = v;
        }
    } else {
        for (int c = tid; c < hidden; c += ROUTE_THREADS) hs[c] = xr[c];
    }
    __syncthreads();

    trace_mark(1);
    // Logits: thread (e, l) sums inputs l, l + 8, l + 16, ... of expert e serially.
    const int chunks = hidden / 8;
    float* lane_sums = (float*)chosen;  // [per_block·8] ≤ 256 + 32 values
    if (tid < ne * 8) {
        const int e = tid >> 3, l = tid & 7;
        const float* gr = gs + e * row_stride;
        float acc = 0.f;
        // The sum is a serial chain (the reference's order); the products go ahead of it.
        int c = 0;
        for (; c + 8 <= chunks; c += 8) {
            float p[8];
#pragma unroll
            for (int u = 0; u < 8; u++) p[u] = __fmul_rn(gr[8 * (c + u) + l], hs[8 * (c + u) + l]);
#pragma unroll
            for (int u = 0; u < 8; u++) acc = __fadd_rn(acc, p[u]);
        }
        for (; c < chunks; c++) acc = __fadd_rn(acc, __fmul_rn(gr[8 * c + l], hs[8 * c + l]));
        lane_sums[tid] = acc;
    }
    __syncthreads();
    if (tid < ne) {
        float sum = 0.f;
        for (int l = 0; l < 8; l++) sum = __fadd_rn(sum, lane_sums[8 * tid + l]);
        const float* gr = gs + tid * row_stride;
        for (int c = 8 * chunks; c < hidden; c++) sum = __fadd_rn(sum, __fmul_rn(gr[c], hs[c]));
        a.logits[(u64)r * experts + e0 + tid] = sum;
    }
    __syncthreads();
    if (tid == 0) is_last = take_ticket(&a.tickets[r]) == gridDim.x - 1;
    __syncthreads();
    trace_mark(2);
    if (!is_last) return;
    trace_mark(3);
    int* picked = chosen + MOE_MAX_EXPERTS;
    const int warp = tid >> 5, lane = tid & 31;
    if (a.route_by_warp) {
        // Warp 0 selects; the others only join the multi-token plan below.
        if (warp == 0) {
            route_select_warp(a, r, bias, bias_high, picked, select);
            trace_mark(7);
            if (a.tiles && gridDim.y == 1) one_token_plan(a, picked, lane, 32);
        }
        if (!a.tiles || gridDim.y == 1) return;  // block-uniform
    } else {
        route_select_block(a, r, bias, scores, select, picked, scratch);
        trace_mark(7);
        if (!a.tiles) return;  // block-uniform
        if (gridDim.y == 1) {
            // One token (decode): its experts, ascending, are already the sorted pairs and
            // the shared expert comes last, so the plan needs neither a ticket nor a scan.
            one_token_plan(a, picked, tid, ROUTE_THREADS);
            return;
        }
    }
    __syncthreads();
    if (tid == 0) is_last = take_ticket(&a.tickets[gridDim.y]) == gridDim.y - 1;
    __syncthreads();
    if (!is_last) return;
    moe_plan_body(a.ids, gridDim.y, top_k, experts, a.shared_id, a.tile_rows, a.max_tiles,
                  a.pair_src, a.pair_desc, a.pair_of, a.tiles);
    if (tid == 0) a.tickets[gridDim.y] = 0u;
}

// Group the (token, expert) pairs by expert, tokens in order within an expert: the rows·top_k
// routed pairs and, with shared_id ≥ 0, one pair per token of the shared expert (id shared_id,
// sorted last; its routing entry is rows·top_k + token). Writes, for sorted pair index p:
// pair_src[p] (its token), pair_desc[p] (its expert); for routing entry i: pair_of[i] (its
// sorted index); and the row tiles of at most `tile_rows` pairs of one expert,
// `tiles[3t..3t+3] = (expert, first pair, pairs)`, the unused ones of the `max_tiles` marked
// with expert -1. One block; ids are read with __ldcg (another block of the launch may have
// written them).
__device__ __forceinline__ void moe_plan_body(const u32* ids, int rows, int top_k, int experts,
                                              int shared_id, int tile_rows, int max_tiles,
                                              int* pair_src, int* pair_desc, int* pair_of,
                                              int* tiles) {
    __shared__ int counts[MOE_MAX_EXPERTS + 1], offsets[MOE_MAX_EXPERTS + 1];
    const int routed = rows * top_k;
    const int groups = experts + (shared_id >= 0 ? 1 : 0);
    for (int e = threadIdx.x; e < groups; e += blockDim.x) counts[e] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < routed; i += blockDim.x) atomicAdd(&counts[__ldcg(ids + i)], 1);
    if (shared_id >= 0 && threadIdx.x == 0) counts[experts] = rows;
    __syncthreads();
    if (threadIdx.x == 0) {
        int offset = 0, tile = 0;
        for (int e = 0; e < groups; e++) {
            offsets[e] = offset;
            const int id = e < experts ? e : shared_id;
            for (int start = 0; start < counts[e]; start += tile_rows) {
                tiles[3 * tile] = id;
                tiles[3 * tile + 1] = offset + start;
                tiles[3 * tile + 2] = min(tile_rows, counts[e] - start);
                tile++;
            }
            offset += counts[e];
        }
        for (; tile < max_tiles; tile++) {
            tiles[3 * tile] = -1;
            tiles[3 * tile + 1] = 0;
            tiles[3 * tile + 2] = 0;
        }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < groups; e += blockDim.x) {
        int next = offsets[e];
        if (e == experts) {
            for (int t = 0; t < rows; t++) {
                pair_src[next] = t;
                pair_desc[next] = shared_id;
                pair_of[routed + t] = next;
                next++;
            }
            continue;
        }
        for (int i = 0; i < routed; i++) {
            if (__ldcg(ids + i) == (u32)e) {
                pair_src[next] = i / top_k;
                pair_desc[next] = e;
                pair_of[i] = next;
                next++;
            }
        }
    }
}

extern "C" __global__ void moe_plan(const u32* ids, int rows, int top_k, int experts,
                                    int shared_id, int tile_rows, int max_tiles, int* pair_src,
                                    int* pair_desc, int* pair_of, int* tiles) {
    pdl_entry();
    moe_plan_body(ids, rows, top_k, experts, shared_id, tile_rows, max_tiles, pair_src,
                  pair_desc, pair_of, tiles);
}

// out[r, c] (+)= Σ_j weight[r, j] · expert_out[pair_of[r, j], c] (+ the shared expert's output,
// pair pair_of[rows·top_k + r], when has_shared), summed in ascending expert order from zero
// without fused multiply-add, as the reference accumulates; with `residual` the sum is added to
// out (x += routed + shared). Grid (hidden / 256, rows).
extern "C" __global__ void moe_combine(const float* expert_out, const int* pair_of,
                                       const float* weights, int top_k, int hidden,
                                       int has_shared, int residual, float* out) {
    pdl_entry();
    const int r = blockIdx.y, rows = gridDim.y;
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= hidden) return;
    float acc = 0.f;
    for (int j = 0; j < top_k; j++) {
        const int p = pair_of[r * top_k + j];
        acc = __fadd_rn(acc, __fmul_rn(weights[r * top_k + j], expert_out[(u64)p * hidden + c]));
    }
    if (has_shared) acc = __fadd_rn(acc, expert_out[(u64)pair_of[rows * top_k + r] * hidden + c]);
    float* dst = out + (u64)r * hidden + c;
    *dst = residual ? __fadd_rn(*dst, acc) : acc;
}

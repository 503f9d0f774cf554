// Mixture of experts on the device: routing, grouping of (token, expert) pairs by expert, and
// the weighted combination of expert outputs. Nothing here needs the host.

#define MOE_MAX_EXPERTS 256
#define MOE_MAX_TOP_K 32
#define ROUTE_THREADS 512
#define ROUTE_LOAD_BATCH 32

// Rust's f32::total_cmp as a signed integer key.
__device__ __forceinline__ int total_order_key(float v) {
    int bits = __float_as_int(v);
    return bits ^ (int)(((u32)(bits >> 31)) >> 1);
}

// The router's sigmoid/softmax exponentials are evaluated in double and rounded once, which
// lands on the correctly rounded f32 value the CPU reference's exp nearly always returns.
__device__ __forceinline__ float exp_rounded(float x) { return (float)exp((double)x); }

// One block per token. Logits use the CPU reference's summation order exactly (eight strided
// partial sums, added in order, then the tail), with no fused multiply-add, so they match it
// bit for bit; the selection is the reference's serial algorithm run by one thread.
extern "C" __global__ void __launch_bounds__(ROUTE_THREADS)
    moe_route(const float* gate, const float* selection_bias, const float* x, int hidden,
              int experts, int top_k, int softmax_scoring, int n_group, int topk_group,
              int top_two_sum, int normalize, float scaling, u32* ids, float* weights) {
    __shared__ float lane_sums[MOE_MAX_EXPERTS * 8];
    __shared__ float scores[MOE_MAX_EXPERTS], select[MOE_MAX_EXPERTS];
    const int r = blockIdx.x;
    const float* xr = x + (u64)r * hidden;
    const int chunks = hidden / 8;
    for (int task = threadIdx.x; task < experts * 8; task += blockDim.x) {
        const int e = task >> 3, l = task & 7;
        const float* g = gate + (u64)e * hidden;
        float acc = 0.f;
        // The sum is a serial chain (the reference's order); batches of loads keep it fed.
        for (int c0 = 0; c0 < chunks; c0 += ROUTE_LOAD_BATCH) {
            float gv[ROUTE_LOAD_BATCH], xv[ROUTE_LOAD_BATCH];
#pragma unroll
            for (int u = 0; u < ROUTE_LOAD_BATCH; u++) {
                const int c = c0 + u;
                gv[u] = c < chunks ? g[8 * c + l] : 0.f;
                xv[u] = c < chunks ? xr[8 * c + l] : 0.f;
            }
#pragma unroll
            for (int u = 0; u < ROUTE_LOAD_BATCH; u++)
                if (c0 + u < chunks) acc = __fadd_rn(acc, __fmul_rn(gv[u], xv[u]));
        }
        lane_sums[task] = acc;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < experts; e += blockDim.x) {
        float sum = 0.f;
        for (int l = 0; l < 8; l++) sum = __fadd_rn(sum, lane_sums[8 * e + l]);
        const float* g = gate + (u64)e * hidden;
        for (int c = 8 * chunks; c < hidden; c++) sum = __fadd_rn(sum, __fmul_rn(g[c], xr[c]));
        scores[e] = sum;
    }
    __syncthreads();

    // Scores (one expert per thread, same arithmetic as the reference).
    if (softmax_scoring) {
        float mx = NEG_INF;
        for (int e = threadIdx.x; e < experts; e += blockDim.x) mx = fmaxf(mx, scores[e]);
        mx = block_max(mx, lane_sums);
        for (int e = threadIdx.x; e < experts; e += blockDim.x)
            scores[e] = exp_rounded(__fsub_rn(scores[e], mx));
        __syncthreads();
        // The reference adds the exponentials in expert order.
        if (threadIdx.x == 0) {
            float total = 0.f;
            for (int e = 0; e < experts; e++) total = __fadd_rn(total, scores[e]);
            lane_sums[0] = __fdiv_rn(1.f, total);
        }
        __syncthreads();
        const float inv = lane_sums[0];
        for (int e = threadIdx.x; e < experts; e += blockDim.x) scores[e] = __fmul_rn(scores[e], inv);
    } else {
        for (int e = threadIdx.x; e < experts; e += blockDim.x)
            scores[e] = __fdiv_rn(1.f, __fadd_rn(1.f, exp_rounded(-scores[e])));
    }
    for (int e = threadIdx.x; e < experts; e += blockDim.x)
        select[e] = selection_bias ? __fadd_rn(scores[e], selection_bias[e]) : scores[e];
    __syncthreads();

    if (n_group > 1 && threadIdx.x == 0) {
        // Keep the experts of the topk_group best-ranked groups (serial, as the reference).
        const int per_group = experts / n_group;
        float group_score[64];
        bool removed[64];
        for (int g = 0; g < n_group; g++) {
            float best0 = NEG_INF, best1 = NEG_INF;
            for (int e = g * per_group; e < (g + 1) * per_group; e++) {
                const float v = select[e];
                if (v > best0) {
                    best1 = best0;
                    best0 = v;
                } else if (v > best1) {
                    best1 = v;
                }
            }
            group_score[g] =
                top_two_sum ? __fadd_rn(best0, per_group > 1 ? best1 : 0.f) : best0;
            removed[g] = false;
        }
        for (int drop = 0; drop < n_group - topk_group; drop++) {
            // The lowest score goes first; on ties the higher group index.
            int worst = -1;
            for (int g = 0; g < n_group; g++) {
                if (removed[g]) continue;
                if (worst < 0) {
                    worst = g;
                    continue;
                }
                const int kg = total_order_key(group_score[g]);
                const int kw = total_order_key(group_score[worst]);
                if (kg < kw || (kg == kw && g > worst)) worst = g;
            }
            for (int e = worst * per_group; e < (worst + 1) * per_group; e++) select[e] = NEG_INF;
            removed[worst] = true;
        }
    }
    __syncthreads();

    // The reference picks, top_k times, the untaken expert with the largest selection score
    // (lowest id on ties): expert e is chosen iff fewer than top_k experts precede it in
    // (score descending, id ascending) order. Chosen experts are listed by ascending id.
    int* chosen = (int*)lane_sums;  // [experts] flags, then [top_k] ids
    for (int e = threadIdx.x; e < experts; e += blockDim.x) {
        const float v = select[e];
        int ahead = 0;
        for (int j = 0; j < experts; j++) ahead += (select[j] > v) || (select[j] == v && j < e);
        chosen[e] = ahead < top_k;
    }
    __syncthreads();
    int* picked = chosen + MOE_MAX_EXPERTS;
    for (int e = threadIdx.x; e < experts; e += blockDim.x) {
        if (chosen[e]) {
            int slot = 0;
            for (int j = 0; j < e; j++) slot += chosen[j];
            if (slot < top_k) picked[slot] = e;
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float w[MOE_MAX_TOP_K];
        for (int i = 0; i < top_k; i++) w[i] = scores[picked[i]];
        if (normalize) {
            float sum = 0.f;
            for (int i = 0; i < top_k; i++) sum = __fadd_rn(sum, w[i]);
            sum = __fadd_rn(sum, 1e-20f);
            for (int i = 0; i < top_k; i++) w[i] = __fdiv_rn(w[i], sum);
        }
        for (int i = 0; i < top_k; i++) {
            ids[(u64)r * top_k + i] = (u32)picked[i];
            weights[(u64)r * top_k + i] = __fmul_rn(w[i], scaling);
        }
    }
}

// Group the rows·top_k (token, expert) pairs by expert, tokens in order within an expert.
// Writes, for sorted pair index p: pair_src[p] (its token), pair_desc[p] (its expert); for
// routing entry i = token·top_k + j: pair_of[i] (its sorted index); and the row tiles of at
// most `tile_rows` pairs of one expert, `tiles[3t..3t+3] = (expert, first pair, pairs)`, the
// unused ones of the `max_tiles` marked with expert -1. One block.
extern "C" __global__ void moe_plan(const u32* ids, int rows, int top_k, int experts,
                                    int tile_rows, int max_tiles, int* pair_src, int* pair_desc,
                                    int* pair_of, int* tiles) {
    __shared__ int counts[MOE_MAX_EXPERTS], offsets[MOE_MAX_EXPERTS];
    const int pairs = rows * top_k;
    for (int e = threadIdx.x; e < experts; e += blockDim.x) counts[e] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < pairs; i += blockDim.x) atomicAdd(&counts[ids[i]], 1);
    __syncthreads();
    if (threadIdx.x == 0) {
        int offset = 0, tile = 0;
        for (int e = 0; e < experts; e++) {
            offsets[e] = offset;
            for (int start = 0; start < counts[e]; start += tile_rows) {
                tiles[3 * tile] = e;
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
    for (int e = threadIdx.x; e < experts; e += blockDim.x) {
        int next = offsets[e];
        for (int i = 0; i < pairs; i++) {
            if (ids[i] == (u32)e) {
                pair_src[next] = i / top_k;
                pair_desc[next] = e;
                pair_of[i] = next;
                next++;
            }
        }
    }
}

// out[r, c] = Σ_j weight[r, j] · expert_out[pair_of[r, j], c], summed in ascending expert order
// from zero without fused multiply-add, as the reference accumulates.
extern "C" __global__ void moe_combine(const float* expert_out, const int* pair_of,
                                       const float* weights, int top_k, int hidden, float* out) {
    const int r = blockIdx.y;
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= hidden) return;
    float acc = 0.f;
    for (int j = 0; j < top_k; j++) {
        const int p = pair_of[r * top_k + j];
        acc = __fadd_rn(acc, __fmul_rn(weights[r * top_k + j], expert_out[(u64)p * hidden + c]));
    }
    out[(u64)r * hidden + c] = acc;
}

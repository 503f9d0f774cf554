// Attention over the paged KV cache: GQA (keys then values in a slot's row) and MLA in its
// absorbed form over the normalised latent plus the shared rope key.
//
// The cache pointer passed to every kernel is the layer's base: slot s of the layer starts at
// element s * values_per_token. Softmax runs online (running max and sum per warp, merged
// across the block's warps at the end), which equals the reference's max-subtracted softmax.

#define ATT_WARPS 4
#define ATT_THREADS (ATT_WARPS * 32)

template <typename C>
__device__ __forceinline__ void kv_append_impl(const float* k, const float* v, C* cache, int width,
                                               int values_per_token, const u32* positions,
                                               const u32* sequence, const u32* block_tables,
                                               int blocks_per_sequence, int block_size,
                                               int rows) {
    const u64 total = (u64)rows * width;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (u64)gridDim.x * blockDim.x) {
        const int r = (int)(i / width), c = (int)(i - (u64)r * width);
        const u64 slot =
            cache_slot(positions, sequence, block_tables, blocks_per_sequence, block_size, r);
        C* row = cache + slot * values_per_token;
        store_f32(row + c, k[i]);
        store_f32(row + width + c, v[i]);
    }
}

#define KV_APPEND(NAME, C)                                                                      \
    extern "C" __global__ void NAME(const float* k, const float* v, C* cache, int width,          \
                                    int values_per_token, const u32* positions,                   \
                                    const u32* sequence, const u32* block_tables,                 \
                                    int blocks_per_sequence, int block_size, int rows) {          \
        pdl_entry();                                                                              \
        kv_append_impl(k, v, cache, width, values_per_token, positions, sequence, block_tables,   \
                       blocks_per_sequence, block_size, rows);                                    \
    }
KV_APPEND(kv_append_f32, float)
KV_APPEND(kv_append_f16, f16_t)

// Merge the per-warp online-softmax states (max, sum, accumulator) of the block and write
// `out[c] = Σ_w acc_w[c]·e^(m_w − M) / Σ_w l_w·e^(m_w − M)` for c < width.
__device__ __forceinline__ void merge_warps_and_store(float m, float l, const float* acc_shared,
                                                      float* m_shared, float* l_shared,
                                                      int width, int acc_stride, float* out) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) {
        m_shared[warp] = m;
        l_shared[warp] = l;
    }
    __syncthreads();
    float big = NEG_INF;
#pragma unroll
    for (int w = 0; w < ATT_WARPS; w++) big = fmaxf(big, m_shared[w]);
    float scale[ATT_WARPS];
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < ATT_WARPS; w++) {
        scale[w] = m_shared[w] == NEG_INF ? 0.f : expf(m_shared[w] - big);
        total += l_shared[w] * scale[w];
    }
    const float inv = 1.f / total;
    for (int c = threadIdx.x; c < width; c += blockDim.x) {
        float o = 0.f;
#pragma unroll
        for (int w = 0; w < ATT_WARPS; w++) o += acc_shared[w * acc_stride + c] * scale[w];
        out[c] = o * inv;
    }
}

// One block per (head, token). Lane L of a warp holds dims L, L+32, ... of the query and of
// its accumulator; the warps take positions round-robin.
#define GQA_DIMS_PER_LANE 8  // head_dim <= 256
template <typename C>
__device__ __forceinline__ void gqa_attention_impl(const float* q, float* out, const C* cache,
                                                   int values_per_token, int heads, int kv_heads,
                                                   int head_dim, float scale, int window,
                                                   float softcap, const u32* positions,
                                                   const u32* sequence, const u32* block_tables,
                                                   int blocks_per_sequence, int block_size) {
    __shared__ float acc_shared[ATT_WARPS * 32 * GQA_DIMS_PER_LANE];
    __shared__ float m_shared[ATT_WARPS], l_shared[ATT_WARPS];
    const int head = blockIdx.x, r = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int kv_head = head / (heads / kv_heads);
    const int k_off = kv_head * head_dim, v_off = kv_heads * head_dim + kv_head * head_dim;
    const u32 pos = positions[r];
    const u32 first = (window > 0 && pos >= (u32)window) ? pos + 1 - (u32)window : 0;
    const u32 seq = sequence[r];
    const float* qh = q + ((u64)r * heads + head) * head_dim;
    float qv[GQA_DIMS_PER_LANE], acc[GQA_DIMS_PER_LANE];
#pragma unroll
    for (int i = 0; i < GQA_DIMS_PER_LANE; i++) {
        const int c = lane + 32 * i;
        qv[i] = c < head_dim ? qh[c] : 0.f;
        acc[i] = 0.f;
    }
    float m = NEG_INF, l = 0.f;
    for (u32 p = first + warp; p <= pos; p += ATT_WARPS) {
        const u32 block = block_tables[(u64)seq * blocks_per_sequence + p / (u32)block_size];
        const C* row = cache + ((u64)block * block_size + p % (u32)block_size) * values_per_token;
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < GQA_DIMS_PER_LANE; i++) {
            const int c = lane + 32 * i;
            if (c < head_dim) s += qv[i] * to_f32(row[k_off + c]);
        }
        s = warp_sum(s) * scale;
        if (softcap > 0.f) s = tanhf(s / softcap) * softcap;
        const float m_new = fmaxf(m, s);
        const float correction = expf(m - m_new);
        const float weight = expf(s - m_new);
        l = l * correction + weight;
#pragma unroll
        for (int i = 0; i < GQA_DIMS_PER_LANE; i++) {
            const int c = lane + 32 * i;
            const float vv = c < head_dim ? to_f32(row[v_off + c]) : 0.f;
            acc[i] = acc[i] * correction + weight * vv;
        }
        m = m_new;
    }
#pragma unroll
    for (int i = 0; i < GQA_DIMS_PER_LANE; i++)
        acc_shared[warp * 32 * GQA_DIMS_PER_LANE + lane + 32 * i] = acc[i];
    merge_warps_and_store(m, l, acc_shared, m_shared, l_shared, head_dim,
                          32 * GQA_DIMS_PER_LANE, out + ((u64)r * heads + head) * head_dim);
}

#define GQA_ATTENTION(NAME, C)                                                                  \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS)                                   \
        NAME(const float* q, float* out, const C* cache, int values_per_token, int heads,       \
             int kv_heads, int head_dim, float scale, int window, float softcap,                \
             const u32* positions, const u32* sequence, const u32* block_tables,                \
             int blocks_per_sequence, int block_size) {                                         \
        pdl_entry();                                                                            \
        gqa_attention_impl(q, out, cache, values_per_token, heads, kv_heads, head_dim, scale,   \
                           window, softcap, positions, sequence, block_tables,                  \
                           blocks_per_sequence, block_size);                                    \
    }
GQA_ATTENTION(gqa_attention_f32, float)
GQA_ATTENTION(gqa_attention_f16, f16_t)

// ---- MLA ------------------------------------------------------------------------------------

// One block per token (row r): RMS-normalise the latent, rotate the shared rope key, write
// the row.
template <typename C>
__device__ __forceinline__ void mla_append_impl(const float* ckv, const float* norm_weight,
                                                const float* inv_freq, int half, float scaling,
                                                int interleaved, C* cache, int values_per_token,
                                                int rank, int rope_dim, float eps,
                                                const u32* positions, const u32* sequence,
                                                const u32* block_tables, int blocks_per_sequence,
                                                int block_size, int r) {
    __shared__ float scratch[32];
    const float* src = ckv + (u64)r * (rank + rope_dim);
    float sum_sq = 0.f;
    for (int c = threadIdx.x; c < rank; c += blockDim.x) sum_sq += src[c] * src[c];
    sum_sq = block_sum(sum_sq, scratch);
    const float inv = 1.f / sqrtf(sum_sq / (float)rank + eps);
    const u64 slot =
        cache_slot(positions, sequence, block_tables, blocks_per_sequence, block_size, r);
    C* row = cache + slot * values_per_token;
    for (int c = threadIdx.x; c < rank; c += blockDim.x)
        store_f32(row + c, norm_weight[c] * (src[c] * inv));
    const float* k_rope = src + rank;
    C* dst = row + rank;
    const float p = (float)positions[r];
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        const float angle = p * inv_freq[i];
        float s, c;
        sincosf(angle, &s, &c);
        s *= scaling;
        c *= scaling;
        const int a = interleaved ? 2 * i : i;
        const int b = interleaved ? 2 * i + 1 : i + half;
        const float x0 = k_rope[a], x1 = k_rope[b];
        store_f32(dst + a, x0 * c - x1 * s);
        store_f32(dst + b, x1 * c + x0 * s);
    }
    // Dims past the rotated ones (if any) are copied unchanged.
    for (int c = 2 * half + threadIdx.x; c < rope_dim; c += blockDim.x) store_f32(dst + c, k_rope[c]);
}

#define MLA_APPEND(NAME, C)                                                                     \
    extern "C" __global__ void NAME(const float* ckv, const float* norm_weight,                  \
                                    const float* inv_freq, int half, float scaling,               \
                                    int interleaved, C* cache, int values_per_token, int rank,    \
                                    int rope_dim, float eps, const u32* positions,                \
                                    const u32* sequence, const u32* block_tables,                 \
                                    int blocks_per_sequence, int block_size) {                    \
        pdl_entry();                                                                              \
        mla_append_impl(ckv, norm_weight, inv_freq, half, scaling, interleaved, cache,            \
                        values_per_token, rank, rope_dim, eps, positions, sequence,               \
                        block_tables, blocks_per_sequence, block_size, blockIdx.x);               \
    }
MLA_APPEND(mla_append_f32, float)
MLA_APPEND(mla_append_f16, f16_t)

// q_lat[r, h, c] = Σ_d q_nope[r, h, d] · W_UK[h][d][c], W_UK[h][d] = kv_b row h·(nope + v) + d.
// Grid (latent columns / 64, heads, tokens), 256 threads: four groups of 64 columns each take
// every fourth d (coalesced rows of W_UK, loads issued eight at a time) and the groups' sums
// are added in order; the query's no-rope part sits in shared memory.
#define MLA_MAX_NOPE 256
#define ABSORB_COLS 64
#define ABSORB_GROUPS 4
//
// The blocks of column group 0 also rotate their head's rope part of q in place (the rope
// kernel's arithmetic exactly), so no separate rope launch is needed; only mla_decode, a later
// launch, reads the rotated part.
// The head's no-rope query part into shared `q_nope`; the blocks of column group 0 also rotate
// its rope part in place (see mla_absorb_q_impl).
__device__ __forceinline__ void mla_absorb_stage_query(float* q, float* q_nope, int heads,
                                                       int nope, int qk, const float* inv_freq,
                                                       int half, float scaling, int interleaved,
                                                       const u32* positions) {
    const int h = blockIdx.y, r = blockIdx.z;
    float* qh = q + ((u64)r * heads + h) * qk;
    for (int d = threadIdx.x; d < nope; d += blockDim.x) q_nope[d] = qh[d];
    if (blockIdx.x == 0 && inv_freq) {
        for (int i = threadIdx.x; i < half; i += blockDim.x) {
            const float angle = (float)positions[r] * inv_freq[i];
            float sn, cs;
            sincosf(angle, &sn, &cs);
            sn *= scaling;
            cs *= scaling;
            float* base = qh + nope;
            const int a = interleaved ? 2 * i : i;
            const int b = interleaved ? 2 * i + 1 : i + half;
            const float x0 = base[a], x1 = base[b];
            base[a] = x0 * cs - x1 * sn;
            base[b] = x1 * cs + x0 * sn;
        }
    }
    __syncthreads();
}

template <typename W>
__device__ __forceinline__ void mla_absorb_q_impl(float* q, const W* kv_b, float* q_lat,
                                                  int heads, int nope, int qk, int v_dim,
                                                  int rank, const float* inv_freq, int half,
                                                  float scaling, int interleaved,
                                                  const u32* positions) {
    __shared__ float q_nope[MLA_MAX_NOPE];
    __shared__ float group_sum[ABSORB_GROUPS][ABSORB_COLS];
    const int h = blockIdx.y, r = blockIdx.z;
    mla_absorb_stage_query(q, q_nope, heads, nope, qk, inv_freq, half, scaling, interleaved,
                           positions);
    const W* w = kv_b + (u64)h * (nope + v_dim) * rank;
    const int col = threadIdx.x % ABSORB_COLS, group = threadIdx.x / ABSORB_COLS;
    const int c = blockIdx.x * ABSORB_COLS + col;
    float acc = 0.f;
    if (c < rank) {
        for (int d0 = group; d0 < nope; d0 += 8 * ABSORB_GROUPS) {
            float wv[8];
#pragma unroll
            for (int u = 0; u < 8; u++) {
                const int d = d0 + u * ABSORB_GROUPS;
                wv[u] = d < nope ? to_f32(w[(u64)d * rank + c]) : 0.f;
            }
#pragma unroll
            for (int u = 0; u < 8; u++) {
                const int d = d0 + u * ABSORB_GROUPS;
                if (d < nope) acc += q_nope[d] * wv[u];
            }
        }
    }
    group_sum[group][col] = acc;
    __syncthreads();
    if (group == 0 && c < rank) {
        float sum = 0.f;
        for (int g = 0; g < ABSORB_GROUPS; g++) sum += group_sum[g][col];
        q_lat[((u64)r * heads + h) * rank + c] = sum;
    }
}

// mla_absorb_q for decode (few tokens, rank a multiple of 8): the same product with wide loads
// all in flight, since one token's W_UK read is latency-bound. A kernel of its own so that its
// registers do not lower the occupancy of the prefill form.
template <typename W>
__device__ __forceinline__ void mla_absorb_q_wide_impl(float* q, const W* kv_b, float* q_lat,
                                                       int heads, int nope, int qk, int v_dim,
                                                       int rank, const float* inv_freq, int half,
                                                       float scaling, int interleaved,
                                                       const u32* positions) {
    __shared__ float q_nope[MLA_MAX_NOPE];
    const int h = blockIdx.y, r = blockIdx.z;
    const W* w = kv_b + (u64)h * (nope + v_dim) * rank;
    // Thread (row group g, column group cg) sums rows g, g + 32, … for 8 columns read with
    // one 16-byte load per row, all rows' loads in flight at once (W_UK is read once per
    // token: its latency, not its bytes, is the cost); the 32 row groups are added in order.
    // The weights are constant, so the first rows are requested before waiting for the
    // kernel that writes q: their latency overlaps its tail.
    __shared__ float row_group_sum[32][ABSORB_COLS];
    const int cg = threadIdx.x & 7, g = threadIdx.x >> 3;
    const int c0 = blockIdx.x * ABSORB_COLS + 8 * cg;
    float wv[8][8];
    if (c0 < rank) {
#pragma unroll
        for (int u = 0; u < 8; u++) {
            const int d = g + 32 * u;
            if (d < nope) load8_f32(w + (u64)d * rank + c0, wv[u]);
        }
    }
    pdl_entry();
    mla_absorb_stage_query(q, q_nope, heads, nope, qk, inv_freq, half, scaling, interleaved,
                           positions);
    float acc8[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (c0 < rank) {
        for (int d0 = g; d0 < nope; d0 += 32 * 8) {
            if (d0 != g) {
#pragma unroll
                for (int u = 0; u < 8; u++) {
                    const int d = d0 + 32 * u;
                    if (d < nope) load8_f32(w + (u64)d * rank + c0, wv[u]);
                }
            }
#pragma unroll
            for (int u = 0; u < 8; u++) {
                const int d = d0 + 32 * u;
                if (d < nope) {
                    const float qv = q_nope[d];
#pragma unroll
                    for (int i = 0; i < 8; i++) acc8[i] += qv * wv[u][i];
                }
            }
        }
    }
#pragma unroll
    for (int i = 0; i < 8; i++) row_group_sum[g][8 * cg + i] = acc8[i];
    __syncthreads();
    const int col = threadIdx.x, c = blockIdx.x * ABSORB_COLS + col;
    if (col < ABSORB_COLS && c < rank) {
        float sum = 0.f;
        for (int gi = 0; gi < 32; gi++) sum += row_group_sum[gi][col];
        q_lat[((u64)r * heads + h) * rank + c] = sum;
    }
}

// out[r, h, v] = Σ_c W_UV[h][v][c] · o_lat[r, h, c], W_UV[h][v] = kv_b row h·(nope + v) + nope + v.
// Grid (values / MLA_VALUES_PER_BLOCK, heads, tokens); one warp per output value.
#define MLA_VALUES_PER_BLOCK 32
#define MLA_MAX_RANK 512
template <typename W>
__device__ __forceinline__ void mla_unabsorb_impl(const float* o_lat, const W* kv_b, float* out,
                                                  int heads, int nope, int v_dim, int rank) {
    __shared__ float latent[MLA_MAX_RANK];
    const int h = blockIdx.y, r = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    const float* src = o_lat + ((u64)r * heads + h) * rank;
    for (int c = threadIdx.x; c < rank; c += blockDim.x) latent[c] = src[c];
    __syncthreads();
    // Each warp takes MLA_VALUES_PER_BLOCK / warps consecutive values together, so that the
    // loads of their rows are in flight at once.
    const int per_warp = MLA_VALUES_PER_BLOCK / warps;  // 4 with 8 warps
    const int v0 = blockIdx.x * MLA_VALUES_PER_BLOCK + warp * per_warp;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    // Four columns' loads of the four rows in flight at once.
    for (int c0 = lane; c0 < rank; c0 += 32 * 4) {
        float wv[4][4];
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int c = c0 + 32 * u;
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int v = v0 + i;
                wv[u][i] = (c < rank && i < per_warp && v < v_dim)
                               ? to_f32(kv_b[((u64)h * (nope + v_dim) + nope + v) * rank + c])
                               : 0.f;
            }
        }
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int c = c0 + 32 * u;
            const float l = c < rank ? latent[c] : 0.f;
#pragma unroll
            for (int i = 0; i < 4; i++) acc[i] += wv[u][i] * l;
        }
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const float sum = warp_sum(acc[i]);
        const int v = v0 + i;
        if (lane == 0 && i < per_warp && v < v_dim) out[((u64)r * heads + h) * v_dim + v] = sum;
    }
}

// mla_unabsorb for decode (few tokens, rank a multiple of 8), with wide loads all in flight; a
// kernel of its own for the same reason as mla_absorb_q_wide.
//
// With `splits` > 0 the latent comes straight from mla_decode's split partials (the combine of
// mla_combine, done by every block of the head for itself): one launch fewer per decode step
// at contexts short enough for few splits (at most 32).
#define MLA_FUSED_COMBINE_MAX_SPLITS 32
__device__ __forceinline__ void mla_stage_combined(const float* part_ml, const float* part_acc,
                                                   int splits, int heads, int rank,
                                                   float* latent) {
    __shared__ float split_weight[MLA_FUSED_COMBINE_MAX_SPLITS];
    __shared__ float inv_total;
    const int h = blockIdx.y, r = blockIdx.z, lane = threadIdx.x & 31;
    const u64 first = (u64)r * splits * heads + h;  // (split 0, head h) of token r
    if (threadIdx.x < 32) {
        const bool in = lane < splits;
        const float m = in ? __ldcg(part_ml + (first + (u64)lane * heads) * 2) : NEG_INF;
        const float l = in ? __ldcg(part_ml + (first + (u64)lane * heads) * 2 + 1) : 0.f;
        const float big = warp_max(m);
        const float wgt = m == NEG_INF ? 0.f : expf(m - big);
        const float total = warp_sum(l * wgt);
        if (in) split_weight[lane] = wgt;
        if (lane == 0) inv_total = 1.f / total;
    }
    __syncthreads();
    // Two adjacent columns per thread (rank is even), sixteen splits' pairs requested at once:
    // the partials cost one or two memory latencies, not one per eight splits and column
    // (sixteen, not all 32: the caller keeps its weights in registers meanwhile).
#define MLA_COMBINE_BATCH 16
    for (int c = 2 * threadIdx.x; c < rank; c += 2 * blockDim.x) {
        float o0 = 0.f, o1 = 0.f;
        for (int s0 = 0; s0 < splits; s0 += MLA_COMBINE_BATCH) {
            float2 v[MLA_COMBINE_BATCH];
#pragma unroll
            for (int u = 0; u < MLA_COMBINE_BATCH; u++) {
                const int s = s0 + u;
                v[u] = s < splits ? __ldcg((const float2*)(part_acc +
                                                            (first + (u64)s * heads) * rank + c))
                                  : make_float2(0.f, 0.f);
            }
#pragma unroll
            for (int u = 0; u < MLA_COMBINE_BATCH; u++) {
                if (s0 + u < splits) {
                    o0 += v[u].x * split_weight[s0 + u];
                    o1 += v[u].y * split_weight[s0 + u];
                }
            }
        }
        latent[c] = o0 * inv_total;
        latent[c + 1] = o1 * inv_total;
    }
}

template <typename W>
__device__ __forceinline__ void mla_unabsorb_wide_impl(const float* o_lat, const W* kv_b,
                                                       float* out, int heads, int nope, int v_dim,
                                                       int rank, const float* part_ml,
                                                       const float* part_acc, int splits) {
    __shared__ __align__(16) float latent[MLA_MAX_RANK];
    const int h = blockIdx.y, r = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    const int per_warp = MLA_VALUES_PER_BLOCK / warps;  // 4 with 8 warps
    const int v0 = blockIdx.x * MLA_VALUES_PER_BLOCK + warp * per_warp;
    // Lane L reads columns 8L…8L+7 (+ 256·j) of the warp's rows with 16-byte loads, every
    // load of the warp in flight at once (at rank 512: two per row, eight per lane). W_UV is
    // constant: the first columns are requested before waiting for the attention's partials.
    float wv[2][4][8];
    auto load_columns = [&](int c0) {
#pragma unroll
        for (int u = 0; u < 2; u++) {
            const int c = c0 + 256 * u;
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int v = v0 + i;
                if (c < rank && i < per_warp && v < v_dim)
                    load8_f32(kv_b + ((u64)h * (nope + v_dim) + nope + v) * rank + c, wv[u][i]);
            }
        }
    };
    load_columns(8 * lane);
    pdl_entry();
    if (splits > 0) {
        mla_stage_combined(part_ml, part_acc, splits, heads, rank, latent);
    } else {
        const float* src = o_lat + ((u64)r * heads + h) * rank;
        for (int c = threadIdx.x; c < rank; c += blockDim.x) latent[c] = src[c];
    }
    __syncthreads();
    trace_mark(1);
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int c0 = 8 * lane; c0 < rank; c0 += 32 * 8 * 2) {
        if (c0 != 8 * lane) load_columns(c0);
#pragma unroll
        for (int u = 0; u < 2; u++) {
            const int c = c0 + 256 * u;
            if (c >= rank) continue;
            float lat[8];
            load8_f32(latent + c, lat);
#pragma unroll
            for (int i = 0; i < 4; i++) {
                if (i >= per_warp || v0 + i >= v_dim) continue;
#pragma unroll
                for (int e = 0; e < 8; e++) acc[i] += wv[u][i][e] * lat[e];
            }
        }
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const float sum = warp_sum(acc[i]);
        const int v = v0 + i;
        if (lane == 0 && i < per_warp && v < v_dim) out[((u64)r * heads + h) * v_dim + v] = sum;
    }
    trace_mark(2);
}

#define MLA_KV_B_KERNELS(SUFFIX, W)                                                             \
    extern "C" __global__ void mla_absorb_q_##SUFFIX(                                           \
        float* q, const W* kv_b, float* q_lat, int heads, int nope, int qk, int v_dim, int rank, \
        const float* inv_freq, int half, float scaling, int interleaved, const u32* positions) { \
        pdl_entry();                                                                             \
        mla_absorb_q_impl(q, kv_b, q_lat, heads, nope, qk, v_dim, rank, inv_freq, half, scaling, \
                          interleaved, positions);                                               \
    }                                                                                            \
    extern "C" __global__ void mla_unabsorb_##SUFFIX(const float* o_lat, const W* kv_b,          \
                                                     float* out, int heads, int nope, int v_dim, \
                                                     int rank) {                                 \
        pdl_entry();                                                                             \
        mla_unabsorb_impl(o_lat, kv_b, out, heads, nope, v_dim, rank);                           \
    }                                                                                            \
    extern "C" __global__ void mla_absorb_q_wide_##SUFFIX(                                      \
        float* q, const W* kv_b, float* q_lat, int heads, int nope, int qk, int v_dim, int rank, \
        const float* inv_freq, int half, float scaling, int interleaved, const u32* positions) { \
        mla_absorb_q_wide_impl(q, kv_b, q_lat, heads, nope, qk, v_dim, rank, inv_freq, half,     \
                               scaling, interleaved, positions);                                 \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(256, 2) mla_unabsorb_wide_##SUFFIX(            \
        const float* o_lat, const W* kv_b, float* out, int heads, int nope, int v_dim, int rank, \
        const float* part_ml, const float* part_acc, int splits) {                              \
        mla_unabsorb_wide_impl(o_lat, kv_b, out, heads, nope, v_dim, rank, part_ml, part_acc,    \
                               splits);                                                          \
    }
MLA_KV_B_KERNELS(f32, float)
MLA_KV_B_KERNELS(f16, f16_t)
MLA_KV_B_KERNELS(bf16, bf16_t)

// The decode absorb (f16 kv_b) with the step's MLA append in the same launch: blocks
// (0, heads, r) append token r's latent row to the f16 cache (mla_append's work) while the
// others absorb. The append only has to be done before mla_decode, the launch after this one,
// so it needs no launch of its own (one launch fewer per layer).
extern "C" __global__ void mla_absorb_q_append_wide_f16(
    float* q, const f16_t* kv_b, float* q_lat, int heads, int nope, int qk, int v_dim, int rank,
    const float* inv_freq, int half, float scaling, int interleaved, const u32* positions,
    const float* ckv, const float* kv_norm, f16_t* cache, int values_per_token, int rope_dim,
    float eps, const u32* sequence, const u32* block_tables, int blocks_per_sequence,
    int block_size) {
    if ((int)blockIdx.y == heads) {  // block-uniform
        pdl_entry();
        if (blockIdx.x == 0)
            mla_append_impl(ckv, kv_norm, inv_freq, half, scaling, interleaved, cache,
                            values_per_token, rank, rope_dim, eps, positions, sequence,
                            block_tables, blocks_per_sequence, block_size, blockIdx.z);
        return;
    }
    mla_absorb_q_wide_impl(q, kv_b, q_lat, heads, nope, qk, v_dim, rank, inv_freq, half,
                           scaling, interleaved, positions);
}

// Scores of one head against each cached [latent ‖ rope key] row, softmax, and the
// probability-weighted sum of latents. One block per (head, token).
#define MLA_LATENT_PER_LANE (MLA_MAX_RANK / 32)
#define MLA_ROPE_PER_LANE 2  // rope dims <= 64
template <typename C>
__device__ __forceinline__ void mla_attend_impl(const float* q, const float* q_lat, float* o_lat,
                                                const C* cache, int values_per_token, int heads,
                                                int qk, int nope, int rank, int rope_dim,
                                                float scale, const u32* positions,
                                                const u32* sequence, const u32* block_tables,
                                                int blocks_per_sequence, int block_size) {
    __shared__ float acc_shared[ATT_WARPS * MLA_MAX_RANK];
    __shared__ float m_shared[ATT_WARPS], l_shared[ATT_WARPS];
    const int h = blockIdx.x, r = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const u32 pos = positions[r], seq = sequence[r];
    const float* ql = q_lat + ((u64)r * heads + h) * rank;
    const float* qr = q + ((u64)r * heads + h) * qk + nope;
    float qlv[MLA_LATENT_PER_LANE], acc[MLA_LATENT_PER_LANE], qrv[MLA_ROPE_PER_LANE];
#pragma unroll
    for (int i = 0; i < MLA_LATENT_PER_LANE; i++) {
        const int c = lane + 32 * i;
        qlv[i] = c < rank ? ql[c] : 0.f;
        acc[i] = 0.f;
    }
#pragma unroll
    for (int i = 0; i < MLA_ROPE_PER_LANE; i++) {
        const int c = lane + 32 * i;
        qrv[i] = c < rope_dim ? qr[c] : 0.f;
    }
    float m = NEG_INF, l = 0.f;
    for (u32 p = warp; p <= pos; p += ATT_WARPS) {
        const u32 block = block_tables[(u64)seq * blocks_per_sequence + p / (u32)block_size];
        const C* row = cache + ((u64)block * block_size + p % (u32)block_size) * values_per_token;
        float lat[MLA_LATENT_PER_LANE];
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < MLA_LATENT_PER_LANE; i++) {
            const int c = lane + 32 * i;
            lat[i] = c < rank ? to_f32(row[c]) : 0.f;
            s += qlv[i] * lat[i];
        }
#pragma unroll
        for (int i = 0; i < MLA_ROPE_PER_LANE; i++) {
            const int c = lane + 32 * i;
            if (c < rope_dim) s += qrv[i] * to_f32(row[rank + c]);
        }
        s = warp_sum(s) * scale;
        const float m_new = fmaxf(m, s);
        const float correction = expf(m - m_new);
        const float weight = expf(s - m_new);
        l = l * correction + weight;
#pragma unroll
        for (int i = 0; i < MLA_LATENT_PER_LANE; i++) acc[i] = acc[i] * correction + weight * lat[i];
        m = m_new;
    }
#pragma unroll
    for (int i = 0; i < MLA_LATENT_PER_LANE; i++)
        acc_shared[warp * MLA_MAX_RANK + lane + 32 * i] = acc[i];
    merge_warps_and_store(m, l, acc_shared, m_shared, l_shared, rank, MLA_MAX_RANK,
                          o_lat + ((u64)r * heads + h) * rank);
}

#define MLA_ATTEND(NAME, C)                                                                     \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS)                                   \
        NAME(const float* q, const float* q_lat, float* o_lat, const C* cache,                  \
             int values_per_token, int heads, int qk, int nope, int rank, int rope_dim,         \
             float scale, const u32* positions, const u32* sequence, const u32* block_tables,   \
             int blocks_per_sequence, int block_size) {                                         \
        pdl_entry();                                                                            \
        mla_attend_impl(q, q_lat, o_lat, cache, values_per_token, heads, qk, nope, rank,        \
                        rope_dim, scale, positions, sequence, block_tables,                     \
                        blocks_per_sequence, block_size);                                       \
    }
MLA_ATTEND(mla_attend_f32, float)
MLA_ATTEND(mla_attend_f16, f16_t)

// ---- MLA decode: context split over blocks, all heads of a token per block ----------------
//
// mla_decode: grid (splits, tokens), MLA_DECODE_THREADS threads. Block (s, r) takes positions
// [s·chunk, min((s+1)·chunk, pos_r + 1)) of token r's sequence in tiles of `tile` positions:
// each cached [latent ‖ rope key] row is loaded into shared memory once and scored against all
// heads' absorbed queries (also in shared memory), an online softmax per head runs over the
// tiles, and thread t accumulates latent columns t and t + 256 of every head. The block leaves
// (max, sum) per head and the unnormalised accumulators for mla_combine.
//
// Shared memory (floats): queries [heads][stride], tile [tile][stride], probabilities
// [heads][tile], per head max, sum and correction, and the cache slot of each tile position;
// stride = rank + rope + 1 (odd, so rows of different positions fall in different banks).
//
// The split count is the grid's (fixed for a graph-recorded step); each token's chunk is sized
// from its own position on the device: chunk = max(2·tile, ⌈(pos+1)/splits⌉ rounded up to a
// tile), so later splits of a short context are empty (max −∞, sum 0).

#define MLA_DECODE_THREADS 256
#define MLA_DECODE_MAX_HEADS 32
#define MLA_DECODE_COLS (MLA_MAX_RANK / MLA_DECODE_THREADS)

template <typename C>
__device__ __forceinline__ void mla_decode_impl(
    const float* q, const float* q_lat, float* part_ml, float* part_acc, const C* cache,
    int values_per_token, int heads, int qk, int nope, int rank, int rope_dim, float scale,
    int tile, const u32* positions, const u32* sequence, const u32* block_tables,
    int blocks_per_sequence, int block_size) {
    extern __shared__ float shared[];
    const int width = rank + rope_dim, stride = width + 1;
    float* qs = shared;
    float* lat = qs + heads * stride;
    float* prob = lat + tile * stride;
    float* run_max = prob + heads * tile;
    float* run_sum = run_max + heads;
    float* corr = run_sum + heads;
    u64* slots = (u64*)(((u64)(corr + heads) + 7) & ~(u64)7);
    const int s = blockIdx.x, r = blockIdx.y, splits = gridDim.x;
    const int tid = threadIdx.x;
    const u32 pos = positions[r], seq = sequence[r];
    const int per_split = ((int)pos + splits) / splits;  // ⌈(pos + 1) / splits⌉
    const int chunk = max(2 * tile, (per_split + tile - 1) / tile * tile);
    const int p_begin = s * chunk;
    const int p_end = min((int)pos + 1, p_begin + chunk);

    for (int i = tid; i < heads * width; i += MLA_DECODE_THREADS) {
        const int h = i / width, c = i - h * width;
        qs[h * stride + c] = c < rank ? q_lat[((u64)r * heads + h) * rank + c]
                                      : q[((u64)r * heads + h) * qk + nope + (c - rank)];
    }
    for (int h = tid; h < heads; h += MLA_DECODE_THREADS) {
        run_max[h] = NEG_INF;
        run_sum[h] = 0.f;
    }
    float acc[MLA_DECODE_MAX_HEADS][MLA_DECODE_COLS];
#pragma unroll
    for (int h = 0; h < MLA_DECODE_MAX_HEADS; h++)
#pragma unroll
        for (int j = 0; j < MLA_DECODE_COLS; j++) acc[h][j] = 0.f;

    for (int p0 = p_begin; p0 < p_end; p0 += tile) {
        const int np = min(tile, p_end - p0);
        __syncthreads();  // the previous tile is no longer read
        if (tid < np) {
            const u32 p = (u32)(p0 + tid);
            const u32 block = block_tables[(u64)seq * blocks_per_sequence + p / (u32)block_size];
            slots[tid] = ((u64)block * block_size + p % (u32)block_size) * values_per_token;
        }
        __syncthreads();
        for (int i = tid; i < np * width; i += MLA_DECODE_THREADS) {
            const int pp = i / width, c = i - pp * width;
            lat[pp * stride + c] = to_f32(cache[slots[pp] + c]);
        }
        __syncthreads();
        for (int i = tid; i < heads * tile; i += MLA_DECODE_THREADS) {
            const int h = i / tile, pp = i - h * tile;
            float score = NEG_INF;
            if (pp < np) {
                const float* qh = qs + h * stride;
                const float* lp = lat + pp * stride;
                float dot = 0.f;
                for (int c = 0; c < width; c++) dot += qh[c] * lp[c];
                score = dot * scale;
            }
            prob[i] = score;
        }
        __syncthreads();
        for (int h = tid; h < heads; h += MLA_DECODE_THREADS) {
            float mx = run_max[h];
            for (int pp = 0; pp < np; pp++) mx = fmaxf(mx, prob[h * tile + pp]);
            const float c = run_max[h] == NEG_INF ? 0.f : expf(run_max[h] - mx);
            float sum = 0.f;
            for (int pp = 0; pp < np; pp++) {
                const float e = expf(prob[h * tile + pp] - mx);
                prob[h * tile + pp] = e;
                sum += e;
            }
            run_sum[h] = run_sum[h] * c + sum;
            run_max[h] = mx;
            corr[h] = c;
        }
        __syncthreads();
#pragma unroll
        for (int h = 0; h < MLA_DECODE_MAX_HEADS; h++) {
            if (h < heads) {
                const float ch = corr[h];
#pragma unroll
                for (int j = 0; j < MLA_DECODE_COLS; j++) {
                    const int c = tid + MLA_DECODE_THREADS * j;
                    if (c < rank) {
                        float a = acc[h][j] * ch;
                        for (int pp = 0; pp < np; pp++) a += prob[h * tile + pp] * lat[pp * stride + c];
                        acc[h][j] = a;
                    }
                }
            }
        }
    }
    __syncthreads();
    const u64 base = (u64)r * splits + s;
    for (int h = tid; h < heads; h += MLA_DECODE_THREADS) {
        part_ml[(base * heads + h) * 2] = run_max[h];
        part_ml[(base * heads + h) * 2 + 1] = run_sum[h];
    }
#pragma unroll
    for (int h = 0; h < MLA_DECODE_MAX_HEADS; h++) {
        if (h < heads) {
#pragma unroll
            for (int j = 0; j < MLA_DECODE_COLS; j++) {
                const int c = tid + MLA_DECODE_THREADS * j;
                if (c < rank) part_acc[(base * heads + h) * rank + c] = acc[h][j];
            }
        }
    }
}

#define MLA_DECODE(NAME, C)                                                                     \
    extern "C" __global__ void __launch_bounds__(MLA_DECODE_THREADS)                            \
        NAME(const float* q, const float* q_lat, float* part_ml, float* part_acc, const C* cache, \
             int values_per_token, int heads, int qk, int nope, int rank, int rope_dim,         \
             float scale, int tile, const u32* positions, const u32* sequence,                  \
             const u32* block_tables, int blocks_per_sequence, int block_size) {                \
        pdl_entry();                                                                            \
        mla_decode_impl(q, q_lat, part_ml, part_acc, cache, values_per_token, heads, qk, nope,  \
                        rank, rope_dim, scale, tile, positions, sequence, block_tables,         \
                        blocks_per_sequence, block_size);                                       \
    }
MLA_DECODE(mla_decode_f32, float)
MLA_DECODE(mla_decode_f16, f16_t)

// o_lat[r, h] = Σ_s acc_s · e^(m_s − M) / Σ_s l_s · e^(m_s − M) over the splits of mla_decode.
// Grid (heads, latent columns / MLA_COMBINE_COLS, tokens), MLA_COMBINE_THREADS threads: every
// block forms the split weights of its head (dynamic shared memory, one per split); thread
// (column, group) sums every MLA_COMBINE_GROUPS-th split of its column, and the groups' sums
// are added in group order.
#define MLA_COMBINE_THREADS 256
#define MLA_COMBINE_COLS 64
#define MLA_COMBINE_GROUPS (MLA_COMBINE_THREADS / MLA_COMBINE_COLS)
extern "C" __global__ void __launch_bounds__(MLA_COMBINE_THREADS)
    mla_combine(const float* part_ml, const float* part_acc, int splits, int heads, int rank,
                float* o_lat) {
    pdl_entry();
    extern __shared__ float split_weight[];
    __shared__ float scratch[32];
    __shared__ float group_sum[MLA_COMBINE_GROUPS][MLA_COMBINE_COLS];
    const int h = blockIdx.x, r = blockIdx.z;
    const u64 first = (u64)r * splits * heads + h;  // (split 0, head h) of token r
    float big = NEG_INF;
    for (int s = threadIdx.x; s < splits; s += blockDim.x)
        big = fmaxf(big, part_ml[(first + (u64)s * heads) * 2]);
    big = block_max(big, scratch);
    float total = 0.f;
    for (int s = threadIdx.x; s < splits; s += blockDim.x) {
        const float m = part_ml[(first + (u64)s * heads) * 2];
        const float wgt = m == NEG_INF ? 0.f : expf(m - big);
        split_weight[s] = wgt;
        total += part_ml[(first + (u64)s * heads) * 2 + 1] * wgt;
    }
    total = block_sum(total, scratch);  // also orders the split_weight writes before the reads
    const int col = threadIdx.x % MLA_COMBINE_COLS, group = threadIdx.x / MLA_COMBINE_COLS;
    const int c = blockIdx.y * MLA_COMBINE_COLS + col;
    float o = 0.f;
    if (c < rank) {
        for (int s0 = group; s0 < splits; s0 += 4 * MLA_COMBINE_GROUPS) {
            float v[4];
#pragma unroll
            for (int u = 0; u < 4; u++) {
                const int s = s0 + u * MLA_COMBINE_GROUPS;
                v[u] = s < splits ? __ldcg(part_acc + (first + (u64)s * heads) * rank + c) : 0.f;
            }
#pragma unroll
            for (int u = 0; u < 4; u++) {
                const int s = s0 + u * MLA_COMBINE_GROUPS;
                if (s < splits) o += v[u] * split_weight[s];
            }
        }
    }
    group_sum[group][col] = o;
    __syncthreads();
    if (group == 0 && c < rank) {
        float sum = 0.f;
#pragma unroll
        for (int g = 0; g < MLA_COMBINE_GROUPS; g++) sum += group_sum[g][col];
        o_lat[((u64)r * heads + h) * rank + c] = sum * (1.f / total);
    }
}

// ---- MLA decode on the tensor cores --------------------------------------------------------
//
// mla_decode_mma: the split-context MLA decode above with both products on the tensor cores,
// for an f16 cache, a latent rank of 512 and a cache row width that is a multiple of 16.
// Grid (splits, tokens, head groups), 256 threads; a block takes one m16 tile of heads (the
// token's heads dealt evenly over the head groups, at most 16 each) and tiles of 32 positions;
// each split's chunk of the context is at least `min_chunk` positions (whole tiles).
//   scores S[16 heads × 32 positions] = Q[heads × width] · tileᵀ: warp w computes n8 tile w%4
//     over half the width (w/4 picks the half; the halves are added in shared memory), the
//     cache rows being the B fragments as they lie;
//   per head online softmax (one warp per two heads, one lane per position);
//   O[heads × 512] += P[heads × 32] · tile[32 × 512]: warp w owns latent columns 64w..64w+63
//     (eight n8 accumulators); B fragments gathered transposed from the tile.
// One block per head group rather than all heads in one block: a decode block's time is the
// serial chain of its warps (staging, the score MMAs, softmax, accumulate, partials), and a
// head group halves every part of that chain for 17–32 heads.
// Queries and probabilities are split into fp16 hi + lo halves and both multiplied (f32-level
// accuracy); cached values are fp16 already; fp32 accumulation. Padded heads have zero queries.
// Outputs as mla_decode (per split max, sum and unnormalised accumulators for mla_combine).

#define MLAM_TILE 32
#define MLAM_HEADS 16
#define MLAM_RANK 512

__device__ __forceinline__ void split_f16(float v, u16& hi, u16& lo) {
    hi = f32_to_f16_bits(v);
    lo = f32_to_f16_bits(v - f16_bits_to_f32(hi));
}

extern "C" __global__ void __launch_bounds__(256, 1) mla_decode_mma(
    const float* q, const float* q_lat, float* part_ml, float* part_acc, const f16_t* cache,
    int values_per_token, int heads, int qk, int nope, int rank, int rope_dim, float scale,
    const u32* positions, const u32* sequence, const u32* block_tables, int blocks_per_sequence,
    int block_size, int min_chunk) {
    pdl_entry();
    extern __shared__ __align__(16) unsigned char mlam_smem[];
    const int width = rank + rope_dim;  // multiple of 16
    const int xs = width + 8;           // fp16 values per staged row
    u16* qhi = (u16*)mlam_smem;
    u16* qlo = qhi + MLAM_HEADS * xs;
    u16* lat = qlo + MLAM_HEADS * xs;
    float* sc = (float*)(lat + MLAM_TILE * xs);  // [2 width halves][heads][MLAM_TILE + 1]
    u16* phi = (u16*)(sc + 2 * MLAM_HEADS * (MLAM_TILE + 1));
    u16* plo = phi + MLAM_HEADS * (MLAM_TILE + 8);
    float* run_max = (float*)(plo + MLAM_HEADS * (MLAM_TILE + 8));
    float* run_sum = run_max + MLAM_HEADS;
    float* corr = run_sum + MLAM_HEADS;
    u64* slots = (u64*)(corr + MLAM_HEADS);

    const int s = blockIdx.x, r = blockIdx.y, splits = gridDim.x;
    const int per_group = (heads + gridDim.z - 1) / gridDim.z;  // ≤ MLAM_HEADS (host)
    const int h0 = blockIdx.z * per_group, nh = min(per_group, heads - h0);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const u32 pos = positions[r], seq = sequence[r];
    const int per_split = ((int)pos + splits) / splits;
    const int chunk = max(min_chunk, (per_split + MLAM_TILE - 1) / MLAM_TILE * MLAM_TILE);
    const int p_begin = s * chunk;
    const int p_end = min((int)pos + 1, p_begin + chunk);

    // Queries [latent ‖ rope] of the group's heads, split into hi + lo; padded heads are zero.
    // 16-byte loads, all of a thread's in flight at once (the host checks the alignment: rank,
    // nope and qk multiples of 4).
#define MLAM_QBATCH ((MLAM_HEADS * (MLAM_RANK + 64) / 4 + 255) / 256)
    {
        const int w4 = width >> 2, r4 = rank >> 2;
        float4 v[MLAM_QBATCH];
#pragma unroll
        for (int u = 0; u < MLAM_QBATCH; u++) {
            const int i = tid + 256 * u;
            const int hl = i / w4, c4 = i - hl * w4;
            const int h = h0 + hl;
            v[u] = make_float4(0.f, 0.f, 0.f, 0.f);
            if (hl < nh)
                v[u] = c4 < r4 ? *(const float4*)(q_lat + ((u64)r * heads + h) * rank + 4 * c4)
                               : *(const float4*)(q + ((u64)r * heads + h) * qk + nope +
                                                  4 * (c4 - r4));
        }
#pragma unroll
        for (int u = 0; u < MLAM_QBATCH; u++) {
            const int i = tid + 256 * u;
            const int hl = i / w4, c4 = i - hl * w4;
            if (hl < MLAM_HEADS) {
                const float e[4] = {v[u].x, v[u].y, v[u].z, v[u].w};
#pragma unroll
                for (int k = 0; k < 4; k++) {
                    u16 hi, lo;
                    split_f16(e[k], hi, lo);
                    qhi[hl * xs + 4 * c4 + k] = hi;
                    qlo[hl * xs + 4 * c4 + k] = lo;
                }
            }
        }
    }
    trace_mark(1);
    if (tid < MLAM_HEADS) {
        run_max[tid] = NEG_INF;
        run_sum[tid] = 0.f;
    }
    float acc[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++) acc[nt][e] = 0.f;
    // The width half of warp w's scores (16-column steps, the first half the longer).
    const int steps = width >> 4, first_half = (steps + 1) >> 1;
    const int k_begin = (warp >> 2) ? 16 * first_half : 0;
    const int k_end = (warp >> 2) ? width : 16 * first_half;

    for (int p0 = p_begin; p0 < p_end; p0 += MLAM_TILE) {
        const int np = min(MLAM_TILE, p_end - p0);
        __syncthreads();  // the previous tile is no longer read
        if (tid < np) {
            const u32 p = (u32)(p0 + tid);
            const u32 block = block_tables[(u64)seq * blocks_per_sequence + p / (u32)block_size];
            slots[tid] = ((u64)block * block_size + p % (u32)block_size) * values_per_token;
        }
        __syncthreads();
        trace_mark(2);
        // The tile's cached rows (16-byte loads, all of a thread's in flight at once: the
        // tile is one memory latency, not three; rows past the context are zero).
        const int v8 = width >> 3;
#define MLAM_TILE_LOADS ((MLAM_TILE * (MLAM_RANK + 64) / 8 + 255) / 256)
        {
            uint4 v[MLAM_TILE_LOADS];
#pragma unroll
            for (int u = 0; u < MLAM_TILE_LOADS; u++) {
                const int i = tid + 256 * u;
                const int pp = i / v8, c8 = i - pp * v8;
                v[u] = make_uint4(0u, 0u, 0u, 0u);
                if (i < MLAM_TILE * v8 && pp < np)
                    v[u] = *(const uint4*)(cache + slots[pp] + 8 * c8);
            }
#pragma unroll
            for (int u = 0; u < MLAM_TILE_LOADS; u++) {
                const int i = tid + 256 * u;
                if (i < MLAM_TILE * v8) {
                    const int pp = i / v8, c8 = i - pp * v8;
                    u32* dst = (u32*)(lat + pp * xs + 8 * c8);
                    dst[0] = v[u].x;
                    dst[1] = v[u].y;
                    dst[2] = v[u].z;
                    dst[3] = v[u].w;
                }
            }
        }
        __syncthreads();
        trace_mark(3);
        // Scores: warp w → positions 8·(w%4) .. over width half w/4.
        {
            const int nt = warp & 3;
            float c_hi[4] = {0.f, 0.f, 0.f, 0.f}, c_lo[4] = {0.f, 0.f, 0.f, 0.f};
            const u16* qa = qhi + g * xs + 2 * t;
            const u16* qb = qlo + g * xs + 2 * t;
            const u16* lb = lat + (nt * 8 + g) * xs + 2 * t;
            for (int k0 = k_begin; k0 < k_end; k0 += 16) {
                const u32 b0 = *(const u32*)(lb + k0), b1 = *(const u32*)(lb + k0 + 8);
                mma_f16_f32(c_hi, *(const u32*)(qa + k0), *(const u32*)(qa + 8 * xs + k0),
                            *(const u32*)(qa + k0 + 8), *(const u32*)(qa + 8 * xs + k0 + 8), b0,
                            b1);
                mma_f16_f32(c_lo, *(const u32*)(qb + k0), *(const u32*)(qb + 8 * xs + k0),
                            *(const u32*)(qb + k0 + 8), *(const u32*)(qb + 8 * xs + k0 + 8), b0,
                            b1);
            }
            float* half_scores = sc + (warp >> 2) * MLAM_HEADS * (MLAM_TILE + 1);
            const int pp = nt * 8 + 2 * t;
#pragma unroll
            for (int e = 0; e < 4; e++)
                half_scores[(g + (e >> 1) * 8) * (MLAM_TILE + 1) + pp + (e & 1)] = c_hi[e] + c_lo[e];
        }
        __syncthreads();
        trace_mark(4);
        // Online softmax: warp w takes heads w and w + 8; lane = position.
#pragma unroll
        for (int k = 0; k < 2; k++) {
            const int h = warp + 8 * k;
            const float* row = sc + h * (MLAM_TILE + 1) + lane;
            const float sv =
                lane < np ? (row[0] + row[MLAM_HEADS * (MLAM_TILE + 1)]) * scale : NEG_INF;
            const float old = run_max[h];
            const float mx = fmaxf(old, warp_max(sv));
            const float e = lane < np ? expf(sv - mx) : 0.f;
            const float sum = warp_sum(e);
            u16 hi, lo;
            split_f16(e, hi, lo);
            phi[h * (MLAM_TILE + 8) + lane] = hi;
            plo[h * (MLAM_TILE + 8) + lane] = lo;
            if (lane == 0) {
                const float c = old == NEG_INF ? 0.f : expf(old - mx);
                run_sum[h] = run_sum[h] * c + sum;
                run_max[h] = mx;
                corr[h] = c;
            }
        }
        __syncthreads();
        trace_mark(5);
        // Accumulate: warp w owns latent columns 64w .. 64w + 63.
        {
            const float c0 = corr[g], c1 = corr[g + 8];
#pragma unroll
            for (int nt = 0; nt < 8; nt++) {
                acc[nt][0] *= c0;
                acc[nt][1] *= c0;
                acc[nt][2] *= c1;
                acc[nt][3] *= c1;
            }
        }
#pragma unroll
        for (int k0 = 0; k0 < MLAM_TILE; k0 += 16) {
            const int ra = g * (MLAM_TILE + 8) + k0 + 2 * t;
            const int rb = ra + 8 * (MLAM_TILE + 8);
            const u32 ahi0 = *(const u32*)(phi + ra), ahi1 = *(const u32*)(phi + rb);
            const u32 ahi2 = *(const u32*)(phi + ra + 8), ahi3 = *(const u32*)(phi + rb + 8);
            const u32 alo0 = *(const u32*)(plo + ra), alo1 = *(const u32*)(plo + rb);
            const u32 alo2 = *(const u32*)(plo + ra + 8), alo3 = *(const u32*)(plo + rb + 8);
#pragma unroll
            for (int nt = 0; nt < 8; nt++) {
                const int col = warp * 64 + nt * 8 + g;
                const u16* l0 = lat + (k0 + 2 * t) * xs + col;
                const u32 b0 = (u32)l0[0] | ((u32)l0[xs] << 16);
                const u32 b1 = (u32)l0[8 * xs] | ((u32)l0[9 * xs] << 16);
                mma_f16_f32(acc[nt], ahi0, ahi1, ahi2, ahi3, b0, b1);
                mma_f16_f32(acc[nt], alo0, alo1, alo2, alo3, b0, b1);
            }
        }
    }
    __syncthreads();
    trace_mark(6);
    const u64 base = (u64)r * splits + s;
    if (tid < nh) {
        part_ml[(base * heads + h0 + tid) * 2] = run_max[tid];
        part_ml[(base * heads + h0 + tid) * 2 + 1] = run_sum[tid];
    }
#pragma unroll
    for (int nt = 0; nt < 8; nt++) {
        const int col = warp * 64 + nt * 8 + 2 * t;
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int hl = g + (e >> 1) * 8;
            if (hl < nh) part_acc[(base * heads + h0 + hl) * rank + col + (e & 1)] = acc[nt][e];
        }
    }
    trace_mark(7);
}

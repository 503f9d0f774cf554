// Elementwise and row-wise ops: embedding lookup, RMSNorm, residual add, gated activations,
// row gather, RoPE. Each mirrors the CPU reference's arithmetic order.

template <typename T>
__device__ __forceinline__ void embed_impl(const T* table, const u32* tokens, int rows, int hidden,
                                           float scale, float* out) {
    const u64 total = (u64)rows * hidden;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (u64)gridDim.x * blockDim.x) {
        const u64 r = i / hidden, c = i - r * hidden;
        float v = to_f32(table[(u64)tokens[r] * hidden + c]);
        if (scale != 1.f) v *= scale;
        out[i] = v;
    }
}

extern "C" __global__ void embed_f32(const float* table, const u32* tokens, int rows, int hidden,
                                     float scale, float* out) {
    pdl_entry();
    embed_impl(table, tokens, rows, hidden, scale, out);
}
extern "C" __global__ void embed_f16(const f16_t* table, const u32* tokens, int rows, int hidden,
                                     float scale, float* out) {
    pdl_entry();
    embed_impl(table, tokens, rows, hidden, scale, out);
}
extern "C" __global__ void embed_bf16(const bf16_t* table, const u32* tokens, int rows, int hidden,
                                      float scale, float* out) {
    pdl_entry();
    embed_impl(table, tokens, rows, hidden, scale, out);
}

// One block per row: out = weight * (x / rms(x)). `out` may equal `x` (each thread writes only
// the elements it read).
extern "C" __global__ void rms_norm(const float* x, const float* weight, float eps, int width,
                                    float* out) {
    pdl_entry();
    __shared__ float scratch[32];
    const float* xr = x + (u64)blockIdx.x * width;
    float* orow = out + (u64)blockIdx.x * width;
    float sum_sq = 0.f;
    for (int c = threadIdx.x; c < width; c += blockDim.x) sum_sq += xr[c] * xr[c];
    sum_sq = block_sum(sum_sq, scratch);
    const float inv = 1.f / sqrtf(sum_sq / (float)width + eps);
    for (int c = threadIdx.x; c < width; c += blockDim.x) orow[c] = weight[c] * (xr[c] * inv);
}

extern "C" __global__ void add_inplace(float* x, const float* y, u64 len) {
    pdl_entry();
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < len;
         i += (u64)gridDim.x * blockDim.x)
        x[i] += y[i];
}

extern "C" __global__ void silu_mul(float* gate, const float* up, u64 len) {
    pdl_entry();
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < len;
         i += (u64)gridDim.x * blockDim.x) {
        const float g = gate[i];
        gate[i] = g / (1.f + expf(-g)) * up[i];
    }
}

extern "C" __global__ void gelu_tanh_mul(float* gate, const float* up, u64 len) {
    pdl_entry();
    const float sqrt_2_over_pi = 0.7978846f;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < len;
         i += (u64)gridDim.x * blockDim.x) {
        const float v = gate[i];
        const float g = 0.5f * v * (1.f + tanhf(sqrt_2_over_pi * (v + 0.044715f * v * v * v)));
        gate[i] = g * up[i];
    }
}

// Row indices travel as a kernel parameter (no host-to-device copy, so the launch can be
// captured in a graph). Larger lists are split into several launches.
#define ROW_LIST_CAPACITY 64
struct RowList {
    int count;
    int rows[ROW_LIST_CAPACITY];
};

// dst[first_dst_row + j] = src[list.rows[j]]; grid (column blocks, list.count).
extern "C" __global__ void copy_rows(const float* src, float* dst, int width, RowList list,
                                     int first_dst_row) {
    pdl_entry();
    const int j = blockIdx.y;
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= width || j >= list.count) return;
    dst[(u64)(first_dst_row + j) * width + c] = src[(u64)list.rows[j] * width + c];
}

// Rotate dims offset .. offset + 2*half of each head of each row at that row's position.
// One thread per (row, head, pair).
extern "C" __global__ void rope(float* x, const float* inv_freq, int half, float scaling,
                                int interleaved, int heads, int head_dim, int offset,
                                const u32* positions, int rows) {
    pdl_entry();
    const u64 total = (u64)rows * heads * half;
    for (u64 idx = (u64)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (u64)gridDim.x * blockDim.x) {
        const int i = (int)(idx % half);
        const u64 rh = idx / half;
        const int h = (int)(rh % heads);
        const u64 r = rh / heads;
        // The angle is formed in f32 exactly as the reference does.
        const float angle = (float)positions[r] * inv_freq[i];
        float s, c;
        sincosf(angle, &s, &c);
        s *= scaling;
        c *= scaling;
        float* base = x + (r * heads + h) * head_dim + offset;
        const int a = interleaved ? 2 * i : i;
        const int b = interleaved ? 2 * i + 1 : i + half;
        const float x0 = base[a], x1 = base[b];
        base[a] = x0 * c - x1 * s;
        base[b] = x1 * c + x0 * s;
    }
}

extern "C" __global__ void fill_f32(float* x, float value, u64 len) {
    pdl_entry();
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < len;
         i += (u64)gridDim.x * blockDim.x)
        x[i] = value;
}

// dst[r] = the index of the largest value of row r (`width` values), the lowest on ties; NaN
// and −∞ never win, and a row without anything above −∞ gets 0xFFFFFFFF (NO_CHOICE) — the host
// argmax's rule. Grid (parts, rows), ARGMAX_THREADS threads: block p scans part p of the row
// and leaves its (value, index) in `parts`; the row's last block to finish (a ticket) picks
// among the parts. One block per row scanned the 154,880 logits of GLM in 54 µs.
// `parts` holds per row ARGMAX_MAX_PARTS values, as many indices and the ticket (zero between
// launches: the last block resets it).
#define ARGMAX_THREADS 256
#define ARGMAX_MAX_PARTS 64

extern "C" __global__ void __launch_bounds__(ARGMAX_THREADS)
    argmax_rows(const float* src, int width, u32* dst, u32* parts) {
    pdl_entry();
    __shared__ float best_values[ARGMAX_THREADS / 32];
    __shared__ int best_indices[ARGMAX_THREADS / 32];
    __shared__ int is_last;
    const float* row = src + (u64)blockIdx.y * width;
    const int chunk = (width + gridDim.x - 1) / gridDim.x;
    const int begin = blockIdx.x * chunk, end = min(width, begin + chunk);
    float best_v = 0.f;
    int best_i = -1;
#pragma unroll 4
    for (int i = begin + threadIdx.x; i < end; i += ARGMAX_THREADS) {
        const float v = row[i];
        if (v > NEG_INF && argmax_better(v, i, best_v, best_i)) {
            best_v = v;
            best_i = i;
        }
    }
    argmax_warp(best_v, best_i);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) {
        best_values[warp] = best_v;
        best_indices[warp] = best_i;
    }
    __syncthreads();
    u32* row_parts = parts + (u64)blockIdx.y * (2 * ARGMAX_MAX_PARTS + 1);
    u32* ticket = row_parts + 2 * ARGMAX_MAX_PARTS;
    if (threadIdx.x == 0) {
        for (int w = 1; w < ARGMAX_THREADS / 32; w++) {
            if (best_indices[w] >= 0 &&
                argmax_better(best_values[w], best_indices[w], best_v, best_i)) {
                best_v = best_values[w];
                best_i = best_indices[w];
            }
        }
        row_parts[blockIdx.x] = __float_as_uint(best_v);
        row_parts[ARGMAX_MAX_PARTS + blockIdx.x] = (u32)best_i;
        is_last = take_ticket(ticket) == gridDim.x - 1;
    }
    __syncthreads();
    if (!is_last || warp != 0) return;
    // Every part is visible: each was written before its block took the ticket.
    best_v = 0.f;
    best_i = -1;
    for (int p = lane; p < (int)gridDim.x; p += 32) {
        const float v = __uint_as_float(__ldcg(row_parts + p));
        const int i = (int)__ldcg(row_parts + ARGMAX_MAX_PARTS + p);
        if (i >= 0 && argmax_better(v, i, best_v, best_i)) {
            best_v = v;
            best_i = i;
        }
    }
    argmax_warp(best_v, best_i);
    if (lane == 0) {
        dst[blockIdx.y] = best_i < 0 ? 0xFFFFFFFFu : (u32)best_i;
        *ticket = 0u;
    }
}

// Dense linear y = x · Wᵀ (+ bias) with W in HF orientation [out, in] stored as f32, f16 or
// bf16. One warp per output feature and row tile: the weight row is read once for up to TM
// rows. Rows, tiles, descriptors and source rows follow the conventions of trellis.cu.

struct DenseDesc {
    const void* weight;  // [out, in]
    const float* bias;   // [out] or null
};

// The input row of each of the tile's TM rows (rows past `nrows` repeat the first; their
// results are not stored).
template <int TM>
__device__ __forceinline__ void dense_input_rows(const float* x, const int* src_rows, int row0,
                                                 int nrows, int in_stride, const float* xr[TM]) {
#pragma unroll
    for (int m = 0; m < TM; m++) {
        const int r = row0 + (m < nrows ? m : 0);
        const u64 src = src_rows ? (u64)src_rows[r] : (u64)r;
        xr[m] = x + src * in_stride;
    }
}

// One warp's dot products of weight row `w` with TM input rows, for two-byte weights in
// 16-byte chunks of eight (16-byte aligned rows): a warp covers 256 inputs per chunk and holds
// U chunks per lane in flight. With `early`, the first chunks are requested before waiting for
// the previous kernel (the weights are constant; the inputs are not).
template <typename W, int TM>
__device__ __forceinline__ void dense_rows_vec8(const W* w, const float* x, const int* src_rows,
                                                int row0, int nrows, int in_stride,
                                                int in_features, bool early, int lane,
                                                float acc[TM]) {
    constexpr int U = TM <= 4 ? 8 : 4;
    uint4 chunk[U];
    int c0 = 0;
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int c = (u * 32 + lane) * 8;
        chunk[u] = c < in_features ? *(const uint4*)(w + c) : make_uint4(0u, 0u, 0u, 0u);
    }
    if (early) pdl_entry();
    const float* xr[TM];
    dense_input_rows<TM>(x, src_rows, row0, nrows, in_stride, xr);
    for (;;) {
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int c = c0 + (u * 32 + lane) * 8;
            if (c < in_features) {
                float wf[8];
                widen8(chunk[u], w, wf);
#pragma unroll
                for (int m = 0; m < TM; m++) {
                    float xv[8];
                    load8_f32(xr[m] + c, xv);
#pragma unroll
                    for (int i = 0; i < 8; i++) acc[m] = fmaf(wf[i], xv[i], acc[m]);
                }
            }
        }
        c0 += U * 256;
        if (c0 >= in_features) break;
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int c = c0 + (u * 32 + lane) * 8;
            chunk[u] = c < in_features ? *(const uint4*)(w + c) : make_uint4(0u, 0u, 0u, 0u);
        }
    }
}

// One warp per (output feature, row tile). A plain launch (no tile list) waits for the previous
// kernel only once its first weights are requested.
template <typename W, int TM>
__device__ __forceinline__ void dense_matmul_impl(const DenseDesc* descs, const int* tiles,
                                                  int rows, const int* src_rows, const float* x,
                                                  int in_stride, int in_features,
                                                  int out_features, float* out, int out_stride) {
    int desc_index = 0, row0, nrows;
    if (tiles) {
        // The tile list comes from an earlier kernel (MoE plans).
        pdl_entry();
        desc_index = tiles[3 * blockIdx.y];
        if (desc_index < 0) return;
        row0 = tiles[3 * blockIdx.y + 1];
        nrows = tiles[3 * blockIdx.y + 2];
    } else {
        row0 = blockIdx.y * TM;
        nrows = min(TM, rows - row0);
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int o = blockIdx.x * (blockDim.x >> 5) + warp;
    if (o >= out_features) {  // warp-uniform; no barriers below
        if (!tiles) pdl_entry();
        return;
    }
    const DenseDesc d = descs[desc_index];
    const W* w = (const W*)d.weight + (u64)o * in_features;
    float acc[TM];
#pragma unroll
    for (int m = 0; m < TM; m++) acc[m] = 0.f;
    const bool vectors = (in_features & 7) == 0 && (((u64)d.weight) & 15) == 0 &&
                         (in_stride & 3) == 0 && (((u64)x) & 15) == 0;
    if constexpr (sizeof(W) == 2) {
        if (vectors) {
            dense_rows_vec8<W, TM>(w, x, src_rows, row0, nrows, in_stride, in_features,
                                   tiles == nullptr, lane, acc);
        }
    }
    if (sizeof(W) != 2 || !vectors) {
        if (!tiles) pdl_entry();
        const float* xr[TM];
        dense_input_rows<TM>(x, src_rows, row0, nrows, in_stride, xr);
        for (int c = lane; c < in_features; c += 32) {
            const float wv = to_f32(w[c]);
#pragma unroll
            for (int m = 0; m < TM; m++) acc[m] += wv * xr[m][c];
        }
    }
#pragma unroll
    for (int m = 0; m < TM; m++) acc[m] = warp_sum(acc[m]);
    if (lane == 0) {
        const float b = d.bias ? d.bias[o] : 0.f;
#pragma unroll
        for (int m = 0; m < TM; m++)
            if (m < nrows) out[(u64)(row0 + m) * out_stride + o] = acc[m] + b;
    }
}

#define DENSE_MATMUL(NAME, W, TM)                                                              \
    extern "C" __global__ void NAME(const DenseDesc* descs, const int* tiles, int rows,          \
                                    const int* src_rows, const float* x, int in_stride,          \
                                    int in_features, int out_features, float* out,               \
                                    int out_stride) {                                            \
        dense_matmul_impl<W, TM>(descs, tiles, rows, src_rows, x, in_stride, in_features,        \
                                 out_features, out, out_stride);                                 \
    }

DENSE_MATMUL(dense_matmul_f32_tm1, float, 1)
DENSE_MATMUL(dense_matmul_f32_tm2, float, 2)
DENSE_MATMUL(dense_matmul_f32_tm4, float, 4)
DENSE_MATMUL(dense_matmul_f32_tm8, float, 8)
DENSE_MATMUL(dense_matmul_f32_tm16, float, 16)
DENSE_MATMUL(dense_matmul_f16_tm1, f16_t, 1)
DENSE_MATMUL(dense_matmul_f16_tm2, f16_t, 2)
DENSE_MATMUL(dense_matmul_f16_tm4, f16_t, 4)
DENSE_MATMUL(dense_matmul_f16_tm8, f16_t, 8)
DENSE_MATMUL(dense_matmul_f16_tm16, f16_t, 16)
DENSE_MATMUL(dense_matmul_bf16_tm1, bf16_t, 1)
DENSE_MATMUL(dense_matmul_bf16_tm2, bf16_t, 2)
DENSE_MATMUL(dense_matmul_bf16_tm4, bf16_t, 4)
DENSE_MATMUL(dense_matmul_bf16_tm8, bf16_t, 8)
DENSE_MATMUL(dense_matmul_bf16_tm16, bf16_t, 16)

// Dense linear y = x · Wᵀ (+ bias) with W in HF orientation [out, in] stored as f32, f16 or
// bf16. One warp per output feature and row tile: the weight row is read once for up to TM
// rows. Rows, tiles, descriptors and source rows follow the conventions of trellis.cu.

struct DenseDesc {
    const void* weight;  // [out, in]
    const float* bias;   // [out] or null
};

template <typename W, int TM>
__device__ __forceinline__ void dense_matmul_impl(const DenseDesc* descs, const int* tiles,
                                                  int rows, const int* src_rows, const float* x,
                                                  int in_stride, int in_features,
                                                  int out_features, float* out, int out_stride) {
    int desc_index = 0, row0, nrows;
    if (tiles) {
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
    if (o >= out_features) return;  // warp-uniform; no barriers below
    const DenseDesc d = descs[desc_index];
    const W* w = (const W*)d.weight + (u64)o * in_features;
    const float* xr[TM];
#pragma unroll
    for (int m = 0; m < TM; m++) {
        const int r = row0 + (m < nrows ? m : 0);
        const u64 src = src_rows ? (u64)src_rows[r] : (u64)r;
        xr[m] = x + src * in_stride;
    }
    float acc[TM];
#pragma unroll
    for (int m = 0; m < TM; m++) acc[m] = 0.f;
    for (int c = lane; c < in_features; c += 32) {
        const float wv = to_f32(w[c]);
#pragma unroll
        for (int m = 0; m < TM; m++) acc[m] += wv * xr[m][c];
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
        pdl_entry();                                                                             \
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

// EXL3 trellis linear: y = ((x ⊙ suh)·H̃ · W̃)·H̃ ⊙ svh (+ bias), W̃ decoded on the fly from
// the packed tile words. Three launches:
//   trellis_prep     xh = H̃(x ⊙ suh), zero-padded to k            (one warp per 128 inputs)
//   trellis_matmul   partial[split] = xh[:, k-range] · W̃           (tiles decoded in registers)
//   trellis_finish   y = H̃(Σ_split partial) ⊙ svh + bias, trimmed  (one warp per 128 outputs)
//
// Every launch works on "rows": a plain linear's activation rows, or the (token, expert) pairs
// of an MoE layer sorted by expert. `row_desc[r]` names the descriptor (the weight) of row r
// (null: descriptor 0), `src_rows[r]` the input row it reads (null: row r). The matmul walks
// "row tiles" of up to TM rows that share a descriptor: `tiles[3t..3t+3] = (desc, first row,
// rows)`, desc -1 for an unused tile; null means rows 0.. in tiles of TM with descriptor 0.

struct TrellisDesc {
    const u32* words;  // tile (kt, nt) at u32 offset (kt * n/16 + nt) * 8K
    const u16* suh;    // fp16 bits, k_pad values
    const u16* svh;    // fp16 bits, n_pad values
    const u16* bias;   // fp16 bits, n_pad values, or null
    int bits_x2;       // 2K: 2..16, odd for 1.5 / 2.5 / 3.5
    int codebook;      // 0 3INST, 1 mcg, 2 mul1
    int reserved0, reserved1;
};

extern "C" __global__ void trellis_prep(const TrellisDesc* descs, const int* row_desc,
                                        const int* src_rows, const float* x, int in_stride,
                                        int in_features, int k_pad, float* xh) {
    pdl_entry();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int chunk = blockIdx.x * (blockDim.x >> 5) + warp;
    if (chunk * 128 >= k_pad) return;  // warp-uniform
    const int r = blockIdx.y;
    const TrellisDesc d = descs[row_desc ? row_desc[r] : 0];
    const u64 src = src_rows ? (u64)src_rows[r] : (u64)r;
    float v[4];
#pragma unroll
    for (int q = 0; q < 4; q++) {
        const int c = chunk * 128 + lane + 32 * q;
        v[q] = c < in_features ? x[src * in_stride + c] * f16_bits_to_f32(d.suh[c]) : 0.f;
    }
    fwht128_warp(v);
#pragma unroll
    for (int q = 0; q < 4; q++) {
        const int c = chunk * 128 + lane + 32 * q;
        xh[(u64)r * k_pad + c] = v[q] * HADAMARD_SCALE;
    }
}

extern "C" __global__ void trellis_finish(const TrellisDesc* descs, const int* row_desc,
                                          const float* partial, int splits, int rows, int n_pad,
                                          int out_features, int out_stride, float* out) {
    pdl_entry();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int chunk = blockIdx.x * (blockDim.x >> 5) + warp;
    if (chunk * 128 >= n_pad) return;  // warp-uniform
    const int r = blockIdx.y;
    const TrellisDesc d = descs[row_desc ? row_desc[r] : 0];
    float v[4];
#pragma unroll
    for (int q = 0; q < 4; q++) {
        const int c = chunk * 128 + lane + 32 * q;
        v[q] = ordered_sum_cg(partial + (u64)r * n_pad + c, (u64)rows * n_pad, splits);
    }
    fwht128_warp(v);
#pragma unroll
    for (int q = 0; q < 4; q++) {
        const int c = chunk * 128 + lane + 32 * q;
        if (c < out_features) {
            float y = __fmul_rn(__fmul_rn(v[q], HADAMARD_SCALE), f16_bits_to_f32(d.svh[c]));
            if (d.bias) y = __fadd_rn(y, f16_bits_to_f32(d.bias[c]));
            out[(u64)r * out_stride + c] = y;
        }
    }
}

// `CASE(CB)` with `codebook` (0 3INST, 1 mcg, 2 mul1) as the compile-time constant CB that the
// decode loops are specialised on; each kernel defines its own CASE.
#define WITH_CODEBOOK(codebook, CASE) \
    switch (codebook) {               \
        case 0: CASE(0); break;       \
        case 1: CASE(1); break;       \
        default: CASE(2); break;      \
    }

// ---- codebooks: 16-bit state -> weight, each with exactly one fp16 rounding --------------

__device__ __forceinline__ float inst_halves_sum(u32 x) {
    x = (x & 0x8FFF8FFFu) ^ 0x3B603B60u;
    // Both halves are fp16 values in [0.125, 2) in magnitude: their f32 sum is exact, so
    // rounding it to fp16 once equals the reference's single fp16 addition.
    const float lo = f16_bits_to_f32((u16)(x & 0xFFFFu));
    const float hi = f16_bits_to_f32((u16)(x >> 16));
    return f16_bits_to_f32(f32_to_f16_bits(lo + hi));
}

template <int CB>
__device__ __forceinline__ float codebook_value(u32 state) {
    if (CB == 0) return inst_halves_sum(state * 89226354u + 64248484u);
    if (CB == 1) return inst_halves_sum(state * 0xCBAC1FEDu);
    const u32 x = state * 0x83DCD12Du;
    u32 byte_sum;
    asm("dp4a.u32.u32 %0, %1, %2, %3;" : "=r"(byte_sum) : "r"(x), "r"(0x01010101u), "r"(0u));
    // (1024 + byte_sum) * fp16(0x1EEE) + fp16(0xC931) is exact in f32 (at most 22 significant
    // bits), so one rounding to fp16 matches the reference's single fused multiply-add.
    const float h = (float)(1024u + byte_sum);
    return f16_bits_to_f32(f32_to_f16_bits(fmaf(h, 0.00676727294921875f, -10.3828125f)));
}

// Bits consumed by trellis positions 0..=t (S(t)) for a width of bits_x2 / 2.
__device__ __forceinline__ int stream_end(int t, int bits_x2) {
    const int whole = bits_x2 >> 1;
    return (bits_x2 & 1) ? (t + 1) * whole + ((t + 1) >> 1) : (t + 1) * whole;
}

#define MM_THREADS 256
#define MM_KTILES 8  // k-tiles staged in shared memory per iteration

// Block: 8 warps over one 128-column Hadamard block (warp w decodes n-tile 8·block + w) for one
// row tile and one k-range (blockIdx.z). Lane L decodes trellis positions 8L..8L+7 of each tile:
// rows r0, r0+1, r0+8, r0+9 (r0 = 2·(L mod 4)) of columns L/4 and L/4 + 8, the tensor-core
// fragment order of the format.
// The four lanes that share a column (same L/4) hold different inputs of it: after this
// every one holds the column's sums.
template <int TM>
__device__ __forceinline__ void quad_sum(float (&acc)[TM][2]) {
#pragma unroll
    for (int m = 0; m < TM; m++) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            float v = acc[m][h];
            v += __shfl_xor_sync(FULL_MASK, v, 1);
            v += __shfl_xor_sync(FULL_MASK, v, 2);
            acc[m][h] = v;
        }
    }
}

template <int TM, int CB>
__device__ __forceinline__ void trellis_matmul_body(const TrellisDesc& d, const float* xh,
                                                    int k_pad, int n_pad, int row0, int nrows,
                                                    int kt0, int kt1, float* partial) {
    extern __shared__ u32 smem[];
    const int bits_x2 = d.bits_x2;
    const int nw = 4 * bits_x2;  // u32 words per tile
    u32* sw = smem;
    float* sx = (float*)(smem + MM_KTILES * 8 * nw);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int tiles_n = n_pad >> 4;
    const int nb = blockIdx.x;

    // Where each of this lane's 8 states lies in the tile's ring: the two words holding the
    // 16-bit window ending at S(t) and the funnel-shift amount (packed i0 | i1 << 8 | s << 16).
    int plan[8];
    const int ring = 128 * bits_x2;
#pragma unroll
    for (int j = 0; j < 8; j++) {
        const int t = 8 * lane + j;
        const int b0 = stream_end(t, bits_x2) + ring - 16;
        const int i0 = (b0 >> 5) % nw;
        const int i1 = ((b0 + 15) >> 5) % nw;
        const int shift = 31 - ((b0 + 15) & 31);
        plan[j] = i0 | (i1 << 8) | (shift << 16);
    }
    const int r0 = 2 * (lane & 3);

    float acc[TM][2];
#pragma unroll
    for (int m = 0; m < TM; m++) acc[m][0] = acc[m][1] = 0.f;

    const int chunk4 = 2 * nw;  // uint4 per k-tile row of the block (8 tiles)
    for (int kb = kt0; kb < kt1; kb += MM_KTILES) {
        const int nk = min(MM_KTILES, kt1 - kb);
        for (int i = threadIdx.x; i < nk * chunk4; i += MM_THREADS) {
            const int c = i / chunk4, o = i - c * chunk4;
            const uint4* src =
                (const uint4*)(d.words + ((u64)(kb + c) * tiles_n + (u64)nb * 8) * nw);
            ((uint4*)sw)[i] = src[o];
        }
        for (int i = threadIdx.x; i < TM * MM_KTILES * 16; i += MM_THREADS) {
            const int m = i / (MM_KTILES * 16), c = i - m * (MM_KTILES * 16);
            sx[i] = (m < nrows && c < nk * 16) ? xh[(u64)(row0 + m) * k_pad + kb * 16 + c] : 0.f;
        }
        __syncthreads();
        for (int c = 0; c < nk; c++) {
            const u32* tw = sw + (c * 8 + warp) * nw;
            float xv[TM][4];
#pragma unroll
            for (int m = 0; m < TM; m++) {
                const float* xr = sx + m * (MM_KTILES * 16) + c * 16 + r0;
                xv[m][0] = xr[0];
                xv[m][1] = xr[1];
                xv[m][2] = xr[8];
                xv[m][3] = xr[9];
            }
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const int p = plan[j];
                const u32 state =
                    __funnelshift_r(tw[(p >> 8) & 0xFF], tw[p & 0xFF], p >> 16) & 0xFFFFu;
                const float w = codebook_value<CB>(state);
#pragma unroll
                for (int m = 0; m < TM; m++) acc[m][j >> 2] += xv[m][j & 3] * w;
            }
        }
        __syncthreads();
    }
    quad_sum<TM>(acc);
    if ((lane & 3) == 0) {
        const int col = (nb * 8 + warp) * 16 + (lane >> 2);
#pragma unroll
        for (int m = 0; m < TM; m++) {
            if (m < nrows) {
                partial[(u64)(row0 + m) * n_pad + col] = acc[m][0];
                partial[(u64)(row0 + m) * n_pad + col + 8] = acc[m][1];
            }
        }
    }
}

template <int TM>
__device__ __forceinline__ void trellis_matmul_impl(const TrellisDesc* descs, const int* tiles,
                                                    int rows, const float* xh, int k_pad,
                                                    int n_pad, int ktiles_per_split,
                                                    float* partial) {
    int desc_index = 0, row0, nrows;
    if (tiles) {
        desc_index = tiles[3 * blockIdx.y];
        if (desc_index < 0) return;  // block-uniform, before any barrier
        row0 = tiles[3 * blockIdx.y + 1];
        nrows = tiles[3 * blockIdx.y + 2];
    } else {
        row0 = blockIdx.y * TM;
        nrows = min(TM, rows - row0);
    }
    const TrellisDesc d = descs[desc_index];
    const int tiles_k = k_pad >> 4;
    const int kt0 = blockIdx.z * ktiles_per_split;
    const int kt1 = min(tiles_k, kt0 + ktiles_per_split);
    float* part = partial + (u64)blockIdx.z * rows * n_pad;
#define TRELLIS_MATMUL_CASE(CB) \
    trellis_matmul_body<TM, CB>(d, xh, k_pad, n_pad, row0, nrows, kt0, kt1, part)
    WITH_CODEBOOK(d.codebook, TRELLIS_MATMUL_CASE)
#undef TRELLIS_MATMUL_CASE
}

#define TRELLIS_MATMUL(TM)                                                                      \
    extern "C" __global__ void __launch_bounds__(MM_THREADS)                                    \
        trellis_matmul_tm##TM(const TrellisDesc* descs, const int* tiles, int rows,             \
                              const float* xh, int k_pad, int n_pad, int ktiles_per_split,       \
                              float* partial) {                                                 \
        pdl_entry();                                                                            \
        trellis_matmul_impl<TM>(descs, tiles, rows, xh, k_pad, n_pad, ktiles_per_split, partial); \
    }

TRELLIS_MATMUL(1)
TRELLIS_MATMUL(2)
TRELLIS_MATMUL(4)
TRELLIS_MATMUL(8)
TRELLIS_MATMUL(16)

// ---- single-launch linear ------------------------------------------------------------------
//
// trellis_linear_tm{TM}: the whole layer in one launch. Each block takes one 128-column block
// (blockIdx.x), one row tile (blockIdx.y) and a k-range of whole 128-input Hadamard blocks
// (blockIdx.z of `splits`). It forms xh = H̃(x ⊙ suh) for its k-range itself (one warp per row
// and Hadamard block; inputs past in_features are zero), decodes and multiplies as above, and
// then either finishes directly (one split) or leaves its partial product in `partial` and
// takes a ticket: the block that completes a (row tile, column block) last adds the partials
// in split order, applies the output Hadamard, svh and bias, writes the trimmed output, and
// resets the ticket to zero for the next launch.
//
// Fused extras, all optional:
//   * x_up:     the input is silu(x) ⊙ x_up (a gated MLP's activation, for the down projection);
//   * norm_w:   the input is RMSNorm(x)·norm_w (each block forms its rows' 1/rms itself);
//   * residual: out += y instead of out = y;
//   * outputs:  up to LIN_MAX_OUT weights reading the same input (q_a and kv_a, gate and up):
//               the grid's x covers the column blocks of output 0, then of output 1.

// ---- decoding eight weights per lane, two at a time --------------------------------------
//
// Lane L decodes trellis positions 8L..8L+7 of a tile. Their 16-bit states are windows of the
// tile's bit ring ending at S(t) (bits MSB-first within the u32 words). The four states of each
// half (positions 8L + 4h .. 8L + 4h + 3) lie within 3K + 16 ≤ 40 bits starting at
// s_h = S(8L + 4h) − 16, so each half loads the three words holding [s_h, s_h + 64), forms that
// 64-bit window with two funnel shifts, and takes state i with one clamped funnel shift and one
// shift: state = funnelshift_rc(lo, hi, 32 − d_i) >> 16, d_i = S(t0 + i) − S(t0), which is
// the same for every lane and both halves (i·K, plus ⌈i/2⌉ for the half widths).
//
// The codebooks then produce two fp16 weights with one f16x2 instruction each, with exactly
// the reference's single fp16 rounding: mul1 forms 1024 + byte_sum as fp16 bits directly
// (0x6400 + sum, sum ≤ 1020) and applies the fp16 FMA; 3INST/mcg add the two fp16 halves.

struct LanePlan {
    int w[2][3];  // word index (within the tile) of the three words of each half's window
    int off[2];   // bit offset of each window within its first word
    int sh[4];    // 32 − d_i: the clamped funnel shift of state i of a half
};

__device__ __forceinline__ void lane_plan_init(LanePlan& lp, int bits_x2, int nw) {
    const int lane = threadIdx.x & 31;
    const int ring = 128 * bits_x2;
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int t0 = 8 * lane + 4 * h;
        const int start = (stream_end(t0, bits_x2) - 16 + ring) % ring;
        const int w0 = start >> 5;
        lp.w[h][0] = w0;
        lp.w[h][1] = (w0 + 1) % nw;
        lp.w[h][2] = (w0 + 2) % nw;
        lp.off[h] = start & 31;
    }
#pragma unroll
    for (int i = 0; i < 4; i++) lp.sh[i] = 32 - (stream_end(i, bits_x2) - stream_end(0, bits_x2));
}

template <int CB>
__device__ __forceinline__ u32 codebook_pair(u32 s0, u32 s1) {
    if (CB == 2) {
        const u32 x0 = s0 * 0x83DCD12Du, x1 = s1 * 0x83DCD12Du;
        u32 h0, h1, w;
        asm("dp4a.u32.u32 %0, %1, %2, %3;" : "=r"(h0) : "r"(x0), "r"(0x01010101u), "r"(0x6400u));
        asm("dp4a.u32.u32 %0, %1, %2, %3;" : "=r"(h1) : "r"(x1), "r"(0x01010101u), "r"(0x6400u));
        asm("fma.rn.f16x2 %0, %1, %2, %3;"
            : "=r"(w)
            : "r"(__byte_perm(h0, h1, 0x5410)), "r"(0x1EEE1EEEu), "r"(0xC931C931u));
        return w;
    }
    const u32 mult = CB == 0 ? 89226354u : 0xCBAC1FEDu;
    const u32 add = CB == 0 ? 64248484u : 0u;
    const u32 x0 = ((s0 * mult + add) & 0x8FFF8FFFu) ^ 0x3B603B60u;
    const u32 x1 = ((s1 * mult + add) & 0x8FFF8FFFu) ^ 0x3B603B60u;
    u32 w;
    asm("add.rn.f16x2 %0, %1, %2;"
        : "=r"(w)
        : "r"(__byte_perm(x0, x1, 0x5410)), "r"(__byte_perm(x0, x1, 0x7632)));
    return w;
}

// The lane's eight weights as four fp16 pairs, w2[k] = (weight 2k, 2k+1), from the three
// words of each half's window (`w[h][j]`, word lp.w[h][j] of the tile).
template <int CB>
__device__ __forceinline__ void decode_words8(const u32 w[2][3], const LanePlan& lp, u32 w2[4]) {
    u32 st[8];
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const u32 hi = __funnelshift_l(w[h][1], w[h][0], lp.off[h]);
        const u32 lo = __funnelshift_l(w[h][2], w[h][1], lp.off[h]);
#pragma unroll
        for (int i = 0; i < 4; i++) st[4 * h + i] = __funnelshift_rc(lo, hi, lp.sh[i]) >> 16;
    }
#pragma unroll
    for (int k = 0; k < 4; k++) w2[k] = codebook_pair<CB>(st[2 * k], st[2 * k + 1]);
}

// The lane's eight weights of the tile at `tw`.
template <int CB>
__device__ __forceinline__ void decode_tile8(const u32* tw, const LanePlan& lp, u32 w2[4]) {
    u32 w[2][3];
#pragma unroll
    for (int h = 0; h < 2; h++)
#pragma unroll
        for (int j = 0; j < 3; j++) w[h][j] = tw[lp.w[h][j]];
    decode_words8<CB>(w, lp, w2);
}

// The 32-bit shared-window address of a shared-memory pointer.
__device__ __forceinline__ u32 shared_address(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

__device__ __forceinline__ u32 lds_u32(u32 address) {
    u32 v;
    // "memory": ordered with the block's barriers and the stores that fill the words.
    asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(address) : "memory");
    return v;
}

// decode_tile8 with the lane's six word addresses computed once per kernel (`words[h][j]`, the
// addresses in the first tile of its warp) and the tile's byte offset from them: the generic
// form re-derived all six addresses from the tile index every k-tile (ncu: ~1.75 address
// instructions per weight).
template <int CB>
__device__ __forceinline__ void decode_tile8_at(const u32 words[2][3], u32 tile_offset,
                                                const LanePlan& lp, u32 w2[4]) {
    u32 w[2][3];
#pragma unroll
    for (int h = 0; h < 2; h++)
#pragma unroll
        for (int j = 0; j < 3; j++) w[h][j] = lds_u32(words[h][j] + tile_offset);
    decode_words8<CB>(w, lp, w2);
}

__device__ __forceinline__ float2 half2_to_float2(u32 h) {
    return make_float2(f16_bits_to_f32((u16)(h & 0xFFFFu)), f16_bits_to_f32((u16)(h >> 16)));
}

#define LIN_MAX_OUT 2

struct LinearOut {
    const TrellisDesc* descs;  // indexed by the row tile's descriptor
    float* out;
    float* partial;  // [splits][rows][n_pad]
    int n_pad, out_features, out_stride, col_blocks;
};

// The MoE combine folded into the experts' down launch when it covers one token (each row tile
// then holds one pair): the launch's last finisher of each column block adds
// Σ_j weight_j · down[pair_of[j]] (+ the shared expert's row) to `out` for its columns, in
// moe_combine's order and arithmetic.
struct MoeCombineArgs {
    const int* pair_of;
    const float* weights;
    float* out;       // null: no combine
    u32* tickets;     // [column blocks], zero between launches
    int top_k, has_shared, residual, reserved;
};

struct LinearArgs {
    const int* tiles;
    const int* src_rows;
    const float* x;
    const float* x_up;
    const float* norm_w;
    u32* tickets;  // [row tiles][all column blocks]
    LinearOut o[LIN_MAX_OUT];
    int rows, in_stride, in_features, k_pad, ktiles_per_split, splits, residual, outputs;
    // The row tiles were final before the previous launch began (the experts' down launch,
    // after gate+up: both follow the routing), so blocks may read them and request their
    // first weights before waiting, as launches without tiles do.
    int tiles_settled;
    float eps;
    MoeCombineArgs combine;
};

__device__ __forceinline__ float silu_times(float g, float u) { return g / (1.f + expf(-g)) * u; }

// Registers that carry one k-batch (MM_KTILES k-tiles × 8 n-tiles of words, and the inputs of
// one Hadamard block for this warp's rows) from global memory to shared memory, so that the
// next batch's loads are in flight while the current one is decoded.
#define MM_WORD_REGS ((MM_KTILES * 8 * 64 / 4 + MM_THREADS - 1) / MM_THREADS)  // K ≤ 8
// Shared-memory words per staged k-tile (8 n-tiles of up to 64 words, K ≤ 8), whatever the
// width: with a constant stride the decode loop's tile offsets are immediates of its loads.
#define MM_TILE_WORDS (8 * 64)

// Where 16-byte chunk `idx` of a batch goes in shared memory: chunk o of k-tile c (2·nw
// chunks each) at c · MM_TILE_WORDS / 4 + o.
__device__ __forceinline__ int staged_chunk(int idx, int nw, u32 tile_magic) {
    const int c = (int)__umulhi((u32)idx, tile_magic);
    return c * (MM_TILE_WORDS / 4) + idx - c * 2 * nw;
}
template <int TM>
struct LinearStage {
    uint4 words[MM_WORD_REGS];
    float x[(TM + 7) / 8][4];
    float up[(TM + 7) / 8][4];
    float suh[4];
    float nw[4];
};

// ⌈2^32 / (2·nw)⌉: `__umulhi(i, m)` is then i / (2·nw), the k-tile of 16-byte chunk i of a
// batch, exactly for every i of a batch. Each batch's load divided by the runtime width four
// times (~150 instructions a batch, a fifth of the decode loop's).
__device__ __forceinline__ u32 chunk_tile_magic(int nw) {
    return 0xFFFFFFFFu / (u32)(2 * nw) + 1u;
}

// The weights' part of a batch (packed words, suh, norm weights): constant for the launch, so
// it may be loaded before waiting for the previous kernel.
template <int TM>
__device__ __forceinline__ void linear_load_weights(LinearStage<TM>& st, const TrellisDesc& d,
                                                    int kb, int tiles_n, int nb, int nw,
                                                    u32 tile_magic, const LinearArgs& a) {
    const int lane = threadIdx.x & 31;
    const int chunk4 = 2 * nw, batch4 = MM_KTILES * chunk4;
#pragma unroll
    for (int i = 0; i < MM_WORD_REGS; i++) {
        const int idx = threadIdx.x + i * MM_THREADS;
        if (idx < batch4) {
            const int c = (int)__umulhi((u32)idx, tile_magic), o = idx - c * chunk4;
            // In 16-byte units, 32-bit: 64-bit address arithmetic per chunk cost ~25
            // instructions a chunk (a tensor's words stay far below 64 GB).
            const u32 tile = (u32)(kb + c) * (u32)tiles_n + (u32)nb * 8u;
            st.words[i] = ((const uint4*)d.words)[tile * (u32)(nw >> 2) + (u32)o];
        }
    }
#pragma unroll
    for (int q = 0; q < 4; q++) {
        const int c = kb * 16 + lane + 32 * q;
        st.suh[q] = c < a.in_features ? f16_bits_to_f32(d.suh[c]) : 0.f;
        st.nw[q] = (a.norm_w && c < a.in_features) ? a.norm_w[c] : 0.f;
    }
}

// The activations' part of a batch: written by earlier kernels.
template <int TM>
__device__ __forceinline__ void linear_load_inputs(LinearStage<TM>& st, int kb, int row0,
                                                   int nrows, const LinearArgs& a) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
    for (int k = 0; k < (TM + 7) / 8; k++) {
        const int m = warp + 8 * k;
        if (m < TM && m < nrows) {
            const int r = row0 + m;
            const u64 src = a.src_rows ? (u64)a.src_rows[r] : (u64)r;
#pragma unroll
            for (int q = 0; q < 4; q++) {
                const int c = kb * 16 + lane + 32 * q;
                st.x[k][q] = c < a.in_features ? a.x[src * a.in_stride + c] : 0.f;
                st.up[k][q] =
                    (a.x_up && c < a.in_features) ? a.x_up[src * a.in_stride + c] : 0.f;
            }
        }
    }
}

template <int TM>
__device__ __forceinline__ void linear_load(LinearStage<TM>& st, const TrellisDesc& d, int kb,
                                            int tiles_n, int nb, int nw, u32 tile_magic,
                                            int row0, int nrows, const LinearArgs& a) {
    linear_load_weights<TM>(st, d, kb, tiles_n, nb, nw, tile_magic, a);
    linear_load_inputs<TM>(st, kb, row0, nrows, a);
}

// One warp's 128 inputs of a batch (lane L holds L, L+32, L+64, L+96) as the products read
// them, before the Hadamard's scale: the gated activation or RMSNorm where the launch has one
// (the reference's order, weight · (x · (1 / rms))), times suh, through the 128-point Hadamard.
__device__ __forceinline__ void transform_inputs(float v[4], const float x[4], const float up[4],
                                                 const float norm_w[4], const float suh[4],
                                                 const float* inv_rms, bool gated, bool normed) {
#pragma unroll
    for (int q = 0; q < 4; q++) {
        float xv = gated ? silu_times(x[q], up[q]) : x[q];
        if (normed) xv = norm_w[q] * (xv * *inv_rms);
        v[q] = xv * suh[q];
    }
    fwht128_warp(v);
}

// A batch's packed words from the stage's registers into shared memory (k-tile c at
// c · MM_TILE_WORDS).
template <int TM>
__device__ __forceinline__ void stage_words(const LinearStage<TM>& st, u32* sw, int nw,
                                            u32 tile_magic) {
    const int batch4 = MM_KTILES * 2 * nw;
#pragma unroll
    for (int i = 0; i < MM_WORD_REGS; i++) {
        const int idx = threadIdx.x + i * MM_THREADS;
        if (idx < batch4) ((uint4*)sw)[staged_chunk(idx, nw, tile_magic)] = st.words[i];
    }
}

template <int TM>
__device__ __forceinline__ void linear_stage(const LinearStage<TM>& st, u32* sw, float* sx, int nw,
                                             u32 tile_magic, int nrows, bool gated, bool normed,
                                             const float* inv_rms) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    stage_words<TM>(st, sw, nw, tile_magic);
#pragma unroll
    for (int k = 0; k < (TM + 7) / 8; k++) {
        const int m = warp + 8 * k;
        if (m < TM) {  // warp-uniform
            float v[4];
            if (m < nrows) {
                transform_inputs(v, st.x[k], st.up[k], st.nw, st.suh, inv_rms + m, gated, normed);
            } else {
#pragma unroll
                for (int q = 0; q < 4; q++) v[q] = 0.f;
            }
#pragma unroll
            for (int q = 0; q < 4; q++) sx[m * 128 + lane + 32 * q] = v[q] * HADAMARD_SCALE;
        }
    }
}

// 1/rms of each row of the tile over all in_features inputs, into inv_rms[m] (visible to the
// whole block on return). One row (decode): the whole block sums it, eight loads in flight per
// thread; taller tiles: one warp per row, eight loads in flight per lane.
__device__ __forceinline__ void tile_inv_rms(const LinearArgs& a, int row0, int nrows,
                                             float* inv_rms) {
    __shared__ float partial_sums[MM_THREADS / 32];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int n = a.in_features;
    if (nrows == 1) {
        const float* xr = a.x + (a.src_rows ? (u64)a.src_rows[row0] : (u64)row0) * a.in_stride;
        float sum_sq = 0.f;
        for (int c0 = threadIdx.x; c0 < n; c0 += MM_THREADS * 8) {
            float v[8];
#pragma unroll
            for (int u = 0; u < 8; u++) {
                const int c = c0 + MM_THREADS * u;
                v[u] = c < n ? xr[c] : 0.f;
            }
#pragma unroll
            for (int u = 0; u < 8; u++) sum_sq += v[u] * v[u];
        }
        sum_sq = warp_sum(sum_sq);
        if (lane == 0) partial_sums[warp] = sum_sq;
        __syncthreads();
        if (threadIdx.x == 0) {
            float total = 0.f;
            for (int w = 0; w < MM_THREADS / 32; w++) total += partial_sums[w];
            inv_rms[0] = 1.f / sqrtf(total / (float)n + a.eps);
        }
        __syncthreads();
        return;
    }
    for (int m = warp; m < nrows; m += MM_THREADS / 32) {
        const int r = row0 + m;
        const float* xr = a.x + (a.src_rows ? (u64)a.src_rows[r] : (u64)r) * a.in_stride;
        float sum_sq = 0.f;
        for (int c0 = lane; c0 < n; c0 += 32 * 8) {
            float v[8];
#pragma unroll
            for (int u = 0; u < 8; u++) {
                const int c = c0 + 32 * u;
                v[u] = c < n ? xr[c] : 0.f;
            }
#pragma unroll
            for (int u = 0; u < 8; u++) sum_sq += v[u] * v[u];
        }
        sum_sq = warp_sum(sum_sq);
        if (lane == 0) inv_rms[m] = 1.f / sqrtf(sum_sq / (float)n + a.eps);
    }
    __syncthreads();
}

// After a row tile's outputs of column block nb are written: the last row tile to finish the
// column block adds the experts' weighted outputs to the combine's destination (see
// MoeCombineArgs). `flag` is a block-shared int for the ticket's answer.
__device__ __forceinline__ void moe_combine_last(const MoeCombineArgs& m, const LinearOut& o,
                                                 int nb, int& flag) {
    __syncthreads();
    if (threadIdx.x == 0) flag = take_ticket(m.tickets + nb) == gridDim.y - 1;
    __syncthreads();
    if (!flag) return;
    // Eight pairs at a time: their rows and weights, then their values, each batch of loads
    // in flight together (a chain of dependent loads per pair cost two round trips each).
    const int pairs = m.top_k + (m.has_shared ? 1 : 0);
    for (int i = threadIdx.x; i < 128; i += blockDim.x) {
        const int c = nb * 128 + i;
        if (c >= o.out_features) continue;
        float* dst = m.out + c;
        const float prior = m.residual ? *dst : 0.f;
        float acc = 0.f;
        for (int j0 = 0; j0 < pairs; j0 += 8) {
            int rows[8];
            float weights[8], v[8];
#pragma unroll
            for (int u = 0; u < 8; u++) {
                const int j = j0 + u;
                rows[u] = j < pairs ? __ldcg(m.pair_of + j) : 0;
                weights[u] = j < m.top_k ? m.weights[j] : 1.f;
            }
#pragma unroll
            for (int u = 0; u < 8; u++)
                v[u] = j0 + u < pairs ? __ldcg(o.out + (u64)rows[u] * o.out_stride + c) : 0.f;
#pragma unroll
            for (int u = 0; u < 8; u++) {
                const int j = j0 + u;
                if (j < m.top_k) acc = __fadd_rn(acc, __fmul_rn(weights[u], v[u]));
                else if (j < pairs) acc = __fadd_rn(acc, v[u]);  // the shared expert's row
            }
        }
        *dst = m.residual ? __fadd_rn(prior, acc) : acc;
    }
    if (threadIdx.x == 0) m.tickets[nb] = 0u;
}

// The output transform of a finished row tile (its products summed in `sz`, [rows][128]) for
// column block nb: out = H̃(sz) ⊙ svh + bias, or out += that. One warp per row. The scales,
// biases and prior outputs are all requested before the transform: loaded one element at a
// time behind each store (which they might alias), they cost four round trips to memory.
__device__ __forceinline__ void finish_tile_rows(const LinearArgs& a, const TrellisDesc& d,
                                                 const LinearOut& o, const float* sz, int nb,
                                                 int row0, int nrows) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int m = warp; m < nrows; m += MM_THREADS / 32) {
        float* out = o.out + (u64)(row0 + m) * o.out_stride + nb * 128;
        float scale[4], bias[4], prior[4], v[4];
#pragma unroll
        for (int q = 0; q < 4; q++) {
            const int c = nb * 128 + lane + 32 * q;
            const bool inside = c < o.out_features;
            scale[q] = inside ? f16_bits_to_f32(d.svh[c]) : 0.f;
            bias[q] = inside && d.bias ? f16_bits_to_f32(d.bias[c]) : 0.f;
            prior[q] = inside && a.residual ? out[lane + 32 * q] : 0.f;
        }
#pragma unroll
        for (int q = 0; q < 4; q++) v[q] = sz[m * 128 + lane + 32 * q];
        fwht128_warp(v);
#pragma unroll
        for (int q = 0; q < 4; q++) {
            if (nb * 128 + lane + 32 * q < o.out_features) {
                float y = __fmul_rn(__fmul_rn(v[q], HADAMARD_SCALE), scale[q]);
                if (d.bias) y = __fadd_rn(y, bias[q]);
                out[lane + 32 * q] = a.residual ? __fadd_rn(prior[q], y) : y;
            }
        }
    }
}

// One k-tile's products of a lane: its four decoded fp16 pairs (pairs 0, 1 of column g, pairs
// 2, 3 of column g + 8, inputs 2t, 2t+1, 2t+8, 2t+9) times its inputs `xv[m]` of each row.
template <int TM>
__device__ __forceinline__ void accumulate_tile(float (&acc)[TM][2], const float (&xv)[TM][4],
                                                const u32 w2[4]) {
    float2 w[4];
#pragma unroll
    for (int k = 0; k < 4; k++) w[k] = half2_to_float2(w2[k]);
#pragma unroll
    for (int k = 0; k < 4; k++) {
#pragma unroll
        for (int m = 0; m < TM; m++) {
            acc[m][k >> 1] += xv[m][(2 * k) & 3] * w[k].x;
            acc[m][k >> 1] += xv[m][(2 * k + 1) & 3] * w[k].y;
        }
    }
}

// The end of a one-launch linear: the lanes' partial sums reduced over each quad (lane & 3)
// into `sz` (the products of the block's 128 columns), then the output (one split) or this
// split's partials and ticket and, in the last split, their ordered sum; then the finish
// (output Hadamard, svh, bias, residual, MoE combine). `sx` is free scratch of 128 floats.
template <int TM>
__device__ __forceinline__ void linear_products_out(const LinearArgs& a, const TrellisDesc& d,
                                                    const LinearOut& o, float (&acc)[TM][2],
                                                    int nb, int tile_slot, int row0, int nrows,
                                                    float* sz, float* sx) {
    __shared__ int is_last;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int n_pad = o.n_pad;
    quad_sum<TM>(acc);
    trace_mark(2);
    const int col_in_block = warp * 16 + (lane >> 2);
    if ((lane & 3) == 0) {
#pragma unroll
        for (int m = 0; m < TM; m++) {
            sz[m * 128 + col_in_block] = acc[m][0];
            sz[m * 128 + col_in_block + 8] = acc[m][1];
        }
    }
    if (a.splits > 1) {
        if ((lane & 3) == 0) {
            float* part = o.partial + ((u64)blockIdx.z * a.rows + row0) * n_pad + nb * 128;
#pragma unroll
            for (int m = 0; m < TM; m++) {
                if (m < nrows) {
                    part[(u64)m * n_pad + col_in_block] = acc[m][0];
                    part[(u64)m * n_pad + col_in_block + 8] = acc[m][1];
                }
            }
        }
        __syncthreads();
        u32* ticket = a.tickets + (u64)tile_slot * gridDim.x + blockIdx.x;
        if (threadIdx.x == 0) is_last = take_ticket(ticket) == (u32)(a.splits - 1);
        __syncthreads();
        trace_mark(3);
        if (!is_last) return;
        // Every split's partial is visible (each wrote, then took its ticket).
        const u64 split_stride = (u64)a.rows * n_pad;
        if (nrows == 1 && a.splits > 8) {
            // One row: both halves of the block sum half the splits each (8 loads in flight
            // per thread), so that 9–16 splits cost one round trip to memory, not two; the
            // halves meet in the free input area.
            const int c = threadIdx.x & 127, half = threadIdx.x >> 7;
            const int lo_splits = (a.splits + 1) / 2;
            const float* p = o.partial + (u64)row0 * n_pad + nb * 128 + c;
            const float part = half == 0 ? ordered_sum_cg(p, split_stride, lo_splits)
                                         : ordered_sum_cg(p + lo_splits * split_stride,
                                                          split_stride, a.splits - lo_splits);
            (half == 0 ? sz : sx)[c] = part;
            __syncthreads();
            if (half == 0) sz[c] = __fadd_rn(sz[c], sx[c]);
        } else {
            for (int i = threadIdx.x; i < nrows * 128; i += MM_THREADS) {
                const int m = i >> 7, c = i & 127;
                sz[i] = ordered_sum_cg(o.partial + (u64)(row0 + m) * n_pad + nb * 128 + c,
                                       split_stride, a.splits);
            }
        }
        if (threadIdx.x == 0) *ticket = 0u;
    }
    __syncthreads();
    finish_tile_rows(a, d, o, sz, nb, row0, nrows);
    trace_mark(4);
    if (a.combine.out) moe_combine_last(a.combine, o, nb, is_last);  // launch-uniform
    trace_mark(5);
}

template <int TM, int CB>
__device__ __forceinline__ void trellis_linear_body(const LinearArgs& a, const TrellisDesc& d,
                                                    const LinearOut& o, int nb, int tile_slot,
                                                    int row0, int nrows, int kt0, int kt1) {
    extern __shared__ u32 smem[];
    __shared__ float inv_rms[TM];
    const int bits_x2 = d.bits_x2;
    const int nw = 4 * bits_x2;
    u32* sw = smem;
    float* sx = (float*)(smem + MM_KTILES * MM_TILE_WORDS);  // [TM][128] transformed inputs
    float* sz = sx + TM * 128;  // [TM][128] products of this block
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int tiles_n = o.n_pad >> 4;

    LanePlan lp;
    lane_plan_init(lp, bits_x2, nw);
    const int r0 = 2 * (lane & 3);
    u32 words[2][3];
#pragma unroll
    for (int h = 0; h < 2; h++)
#pragma unroll
        for (int j = 0; j < 3; j++) words[h][j] = shared_address(sw + warp * nw + lp.w[h][j]);

    float acc[TM][2];
#pragma unroll
    for (int m = 0; m < TM; m++) acc[m][0] = acc[m][1] = 0.f;

    // The first batch of weights is requested before waiting for the kernel that writes the
    // inputs, so their latency overlaps its tail (row tiles from the router were waited for
    // already: the descriptor depends on them).
    LinearStage<TM> st;
    const u32 tile_magic = chunk_tile_magic(nw);
    if (kt0 < kt1) linear_load_weights<TM>(st, d, kt0, tiles_n, nb, nw, tile_magic, a);
    if (!a.tiles || a.tiles_settled) pdl_entry();

    // The first batch's inputs are requested before the norm's full-row pass, so the two
    // round trips to memory overlap (the inputs are only scaled later, in the stage).
    if (kt0 < kt1) linear_load_inputs<TM>(st, kt0, row0, nrows, a);
    if (a.norm_w) tile_inv_rms(a, row0, nrows, inv_rms);
    for (int kb = kt0; kb < kt1; kb += MM_KTILES) {  // kt0, kt1 are multiples of MM_KTILES
        linear_stage<TM>(st, sw, sx, nw, tile_magic, nrows, a.x_up != nullptr,
                         a.norm_w != nullptr, inv_rms);
        __syncthreads();
        if (kb == kt0) trace_mark(1);
        // The next batch's loads fly while this one is decoded.
        if (kb + MM_KTILES < kt1)
            linear_load<TM>(st, d, kb + MM_KTILES, tiles_n, nb, nw, tile_magic, row0, nrows,
                            a);
        // Unrolled so that the tile offsets are immediates (eight tiles spill taller tiles'
        // accumulators under the register budget of three blocks per SM).
#pragma unroll(TM == 1 ? MM_KTILES : 1)
        for (int c = 0; c < MM_KTILES; c++) {
            float xv[TM][4];
#pragma unroll
            for (int m = 0; m < TM; m++) {
                const float* xr = sx + m * 128 + c * 16 + r0;
                xv[m][0] = xr[0];
                xv[m][1] = xr[1];
                xv[m][2] = xr[8];
                xv[m][3] = xr[9];
            }
            u32 w2[4];
            decode_tile8_at<CB>(words, c * MM_TILE_WORDS * 4, lp, w2);
            accumulate_tile<TM>(acc, xv, w2);
        }
        __syncthreads();
    }
    linear_products_out<TM>(a, d, o, acc, nb, tile_slot, row0, nrows, sz, sx);
}

// What a block of a one-launch linear works on: its row tile (descriptor, first row, rows), the
// output its column block belongs to and its k-range. False for an empty MoE row tile (then the
// block returns at once, before any barrier). Without row tiles (or with settled ones) the body
// waits for the previous kernel itself, after its first loads; otherwise this waits first.
struct BlockJob {
    LinearOut o;
    TrellisDesc d;
    int row0, nrows, nb, kt0, kt1;
};

template <int TM>
__device__ __forceinline__ bool block_job(const LinearArgs& a, BlockJob& j) {
    int desc_index = 0;
    if (a.tiles && !a.tiles_settled) pdl_entry();
    if (a.tiles) {
        desc_index = a.tiles[3 * blockIdx.y];
        if (desc_index < 0) return false;  // block-uniform
        j.row0 = a.tiles[3 * blockIdx.y + 1];
        j.nrows = a.tiles[3 * blockIdx.y + 2];
    } else {
        j.row0 = blockIdx.y * TM;
        j.nrows = min(TM, a.rows - j.row0);
    }
    // Which output this column block belongs to (selects, no indexing of the parameter array).
    const bool second = a.outputs > 1 && (int)blockIdx.x >= a.o[0].col_blocks;
    LinearOut& o = j.o;
    o.descs = second ? a.o[1].descs : a.o[0].descs;
    o.out = second ? a.o[1].out : a.o[0].out;
    o.partial = second ? a.o[1].partial : a.o[0].partial;
    o.n_pad = second ? a.o[1].n_pad : a.o[0].n_pad;
    o.out_features = second ? a.o[1].out_features : a.o[0].out_features;
    o.out_stride = second ? a.o[1].out_stride : a.o[0].out_stride;
    o.col_blocks = second ? a.o[1].col_blocks : a.o[0].col_blocks;
    j.nb = second ? (int)blockIdx.x - a.o[0].col_blocks : (int)blockIdx.x;
    j.d = o.descs[desc_index];
    const int tiles_k = a.k_pad >> 4;
    j.kt0 = blockIdx.z * a.ktiles_per_split;
    j.kt1 = min(tiles_k, j.kt0 + a.ktiles_per_split);
    return true;
}

template <int TM>
__device__ __forceinline__ void trellis_linear_impl(const LinearArgs& a) {
    BlockJob j;
    if (!block_job<TM>(a, j)) return;
#define TRELLIS_LINEAR_CASE(CB) \
    trellis_linear_body<TM, CB>(a, j.d, j.o, j.nb, blockIdx.y, j.row0, j.nrows, j.kt0, j.kt1)
    WITH_CODEBOOK(j.d.codebook, TRELLIS_LINEAR_CASE)
#undef TRELLIS_LINEAR_CASE
}

// Blocks per SM the register budget is fitted to: one-row and two-row tiles fit three blocks
// (80 registers) without spilling, taller tiles need more registers.
#define TRELLIS_LINEAR(TM, MIN_BLOCKS)                                                          \
    extern "C" __global__ void __launch_bounds__(MM_THREADS, MIN_BLOCKS)                        \
        trellis_linear_tm##TM(const LinearArgs a) {                                             \
        trellis_linear_impl<TM>(a);                                                             \
    }

TRELLIS_LINEAR(1, 3)
TRELLIS_LINEAR(2, 3)
TRELLIS_LINEAR(4, 2)
TRELLIS_LINEAR(8, 2)
TRELLIS_LINEAR(16, 1)

// ---- one-row linear with per-warp pipelines ----------------------------------------------------
//
// trellis_row_tm1: the one-row launch above without block barriers in its product loop. Each
// warp decodes only its own n-tile's words, so it stages only those, with `cp.async` (shared
// memory, no registers) into ROW_BUFFERS buffers: the next batch's copy flies while one is
// decoded, waited for with the warp's own `cp.async.wait_group` and `__syncwarp`. The block's
// transformed inputs (its whole k-range, at most ROW_MAX_BATCHES batches) are formed once up
// front, one batch per warp, so no warp waits for another's Hadamard transform batch by batch.
// A k-tile's words sit at a stride of TS words (32 for K ≤ 4, else 64), a constant, so that the
// decode's offsets are immediates. (Measured on the H200: the block-wide form's product loop
// took 2.2 µs a batch in the experts' gate+up, this one ~1.1; three buffers per warp were no
// faster than two once their requests no longer delayed the inputs', and slower before.)
#define ROW_BUFFERS 2
#define ROW_MAX_BATCHES 16

__device__ __forceinline__ void cp_async16(u32 shared_dst, const void* global_src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(shared_dst), "l"(global_src)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;" ::: "memory");
}
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(PENDING) : "memory");
}

// The warp's words of batch `b` of its k-range (k-tiles kt0 + 8b ..) into buffer b mod
// ROW_BUFFERS: 8 k-tiles × bits_x2 chunks of 16 bytes.
template <int TS>
__device__ __forceinline__ void row_issue_words(const TrellisDesc& d, u32 warp_words, int kt0,
                                                int b, int tiles_n, int nb, u32 tile_magic) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int bits_x2 = d.bits_x2;
    const u32 dst = warp_words + (u32)((b % ROW_BUFFERS) * MM_KTILES * TS * 4);
    const int kb = kt0 + b * MM_KTILES;
    for (int i = lane; i < MM_KTILES * bits_x2; i += 32) {
        const int c = (int)__umulhi((u32)i, tile_magic), o = i - c * bits_x2;
        const u32 tile = (u32)(kb + c) * (u32)tiles_n + (u32)nb * 8u + (u32)warp;
        cp_async16(dst + (u32)(c * TS + 4 * o) * 4u,
                   (const uint4*)d.words + tile * (u32)bits_x2 + o);
    }
    cp_async_commit();
}

template <int CB, int TS>
__device__ __forceinline__ void trellis_row_body(const LinearArgs& a, const TrellisDesc& d,
                                                 const LinearOut& o, int nb, int tile_slot,
                                                 int row0, int kt0, int kt1) {
    constexpr int WARP_WORDS = ROW_BUFFERS * MM_KTILES * TS;  // a warp's staged words
    extern __shared__ u32 smem[];
    __shared__ float inv_rms[1];
    const int bits_x2 = d.bits_x2;
    const int nw = 4 * bits_x2;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int tiles_n = o.n_pad >> 4;
    float* sz = (float*)(smem + 8 * WARP_WORDS);  // [128] products of this block
    float* sx = sz + 128;                          // [128] scratch of the finish
    float* xa = sx + 128;                          // [batches][128] transformed inputs
    const int batches = (kt1 - kt0) / MM_KTILES;
    const u32 warp_words = shared_address(smem + warp * WARP_WORDS);
    // ⌈2^32 / bits_x2⌉: __umulhi(i, m) = i / bits_x2 for every chunk index of a batch.
    const u32 tile_magic = 0xFFFFFFFFu / (u32)bits_x2 + 1u;

    // The weights are constant: the first batch, and this warp's first input batch's suh and
    // norm weights, are requested before waiting for the kernel that writes the inputs (the
    // further batches only once the inputs are requested: they delay them). Empty groups keep
    // every lane's count of groups equal to the batch index.
    if (batches > 0)
        row_issue_words<TS>(d, warp_words, kt0, 0, tiles_n, nb, tile_magic);
    else
        cp_async_commit();
    const bool gated = a.x_up != nullptr, normed = a.norm_w != nullptr;
    float suh[4], norm_w[4], x[4], up[4];
    auto load_weights = [&](int b) {
#pragma unroll
        for (int q = 0; q < 4; q++) {
            const int c = (kt0 + b * MM_KTILES) * 16 + lane + 32 * q;
            suh[q] = c < a.in_features ? f16_bits_to_f32(d.suh[c]) : 0.f;
            norm_w[q] = normed && c < a.in_features ? a.norm_w[c] : 0.f;
        }
    };
    const u64 src = a.src_rows ? (u64)a.src_rows[row0] : (u64)row0;
    auto load_inputs = [&](int b) {
#pragma unroll
        for (int q = 0; q < 4; q++) {
            const int c = (kt0 + b * MM_KTILES) * 16 + lane + 32 * q;
            x[q] = c < a.in_features ? a.x[src * a.in_stride + c] : 0.f;
            up[q] = gated && c < a.in_features ? a.x_up[src * a.in_stride + c] : 0.f;
        }
    };
    if (warp < batches) load_weights(warp);
    if (!a.tiles || a.tiles_settled) pdl_entry();
    // The inputs are requested before the norm's full-row pass, so the two round trips overlap.
    if (warp < batches) load_inputs(warp);
    if (normed) tile_inv_rms(a, row0, 1, inv_rms);
    for (int b = warp; b < batches; b += MM_THREADS / 32) {
        if (b != warp) {
            load_weights(b);
            load_inputs(b);
        }
        float v[4];
        transform_inputs(v, x, up, norm_w, suh, inv_rms, gated, normed);
#pragma unroll
        for (int q = 0; q < 4; q++) xa[b * 128 + lane + 32 * q] = v[q] * HADAMARD_SCALE;
    }
#pragma unroll
    for (int b = 1; b < ROW_BUFFERS - 1; b++) {
        if (b < batches)
            row_issue_words<TS>(d, warp_words, kt0, b, tiles_n, nb, tile_magic);
        else
            cp_async_commit();
    }
    __syncthreads();
    trace_mark(1);

    LanePlan lp;
    lane_plan_init(lp, bits_x2, nw);
    const int r0 = 2 * (lane & 3);
    u32 words[2][3];
#pragma unroll
    for (int h = 0; h < 2; h++)
#pragma unroll
        for (int j = 0; j < 3; j++) words[h][j] = warp_words + 4u * (u32)lp.w[h][j];
    float acc[1][2] = {{0.f, 0.f}};
    u32 buffer_offset = 0;  // of batch b's buffer, in bytes
    for (int b = 0; b < batches; b++) {
        cp_async_wait<ROW_BUFFERS - 2>();
        // Every lane's copies of batch b have landed, and every lane is done with batch b - 1,
        // whose buffer the next request reuses.
        __syncwarp();
        if (b + ROW_BUFFERS - 1 < batches)
            row_issue_words<TS>(d, warp_words, kt0, b + ROW_BUFFERS - 1, tiles_n, nb, tile_magic);
        else
            cp_async_commit();
        const float* xb = xa + b * 128;
#pragma unroll
        for (int c = 0; c < MM_KTILES; c++) {
            const float* xr = xb + c * 16 + r0;
            const float xv[1][4] = {{xr[0], xr[1], xr[8], xr[9]}};
            u32 w2[4];
            decode_tile8_at<CB>(words, buffer_offset + c * TS * 4, lp, w2);
            accumulate_tile<1>(acc, xv, w2);
        }
        buffer_offset = buffer_offset == (ROW_BUFFERS - 1) * MM_KTILES * TS * 4
                            ? 0u
                            : buffer_offset + MM_KTILES * TS * 4;
    }
    cp_async_wait<0>();
    __syncthreads();
    linear_products_out<1>(a, d, o, acc, nb, tile_slot, row0, 1, sz, sx);
}

extern "C" __global__ void __launch_bounds__(MM_THREADS, 3) trellis_row_tm1(const LinearArgs a) {
    BlockJob j;
    if (!block_job<1>(a, j)) return;
#define TRELLIS_ROW_CASE(CB)                                                         \
    if (j.d.bits_x2 <= 8)                                                            \
        trellis_row_body<CB, 32>(a, j.d, j.o, j.nb, blockIdx.y, j.row0, j.kt0, j.kt1); \
    else                                                                             \
        trellis_row_body<CB, 64>(a, j.d, j.o, j.nb, blockIdx.y, j.row0, j.kt0, j.kt1)
    WITH_CODEBOOK(j.d.codebook, TRELLIS_ROW_CASE)
#undef TRELLIS_ROW_CASE
}

// ---- tensor-core linear ---------------------------------------------------------------------
//
// trellis_mma_tm{16,64}: the single-launch linear above for row tiles of up to 16 or 64 rows,
// with the products on the tensor cores. The decoded weights of lane L (positions 8L..8L+7 of a
// tile) are exactly its B fragments of `mma.m16n8k16` (k = 2·(L mod 4) + {0, 1, 8, 9},
// n = L/4 and L/4 + 8) and are fp16 values already (every codebook rounds to fp16 once), so
// they feed the MMA as they are. The transformed inputs are split into fp16 hi + lo halves
// (x ≈ hi + lo to about 2^-22 relative) and both are multiplied, so the products keep f32-level
// accuracy; fp32 accumulation. Warp w computes n-tile w (16 columns) of the block for all rows
// of the tile: MT m16 tiles × two n8 halves × (hi, lo) MMAs per 16×16 weight tile, the A
// fragments loaded with one `ldmatrix` each.
//
// The 16-row form serves batched decode: each weight costs its decode only (no fp16 → f32
// widening, no FMAs per row), so 8–16 rows cost about what one does. For 1–4 rows the SIMT
// kernels are faster on the H200 (measured; see src/linear.rs).

#define MMA_XS 136  // fp16 values per staged input row (128 + 8: conflict-free fragment loads)

__device__ __forceinline__ void mma_f16_f32(float c[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0,
                                            u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// The A fragment of one m16 × k16 block of fp16 values in shared memory: lane L supplies the
// address of row L mod 8 (+ 8 for matrices 1 and 3) at column 8·(L / 16).
__device__ __forceinline__ void ldmatrix_a(u32 a[4], const u16* base) {
    const int lane = threadIdx.x & 31;
    const int mi = lane >> 3;
    const u16* row = base + ((lane & 7) + 8 * (mi & 1)) * MMA_XS + 8 * (mi >> 1);
    const u32 addr = (u32)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
                 : "r"(addr));
}

template <int TM>
__device__ __forceinline__ void mma_stage(const LinearStage<TM>& st, u32* sw, u16* xhi, u16* xlo,
                                          int nw, u32 tile_magic, int nrows, bool gated,
                                          bool normed, const float* inv_rms) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    stage_words<TM>(st, sw, nw, tile_magic);
#pragma unroll
    for (int k = 0; k < TM / 8; k++) {
        const int m = warp + 8 * k;
        float v[4];
        if (m < nrows) {  // warp-uniform
            transform_inputs(v, st.x[k], st.up[k], st.nw, st.suh, inv_rms + m, gated, normed);
        } else {
#pragma unroll
            for (int q = 0; q < 4; q++) v[q] = 0.f;
        }
#pragma unroll
        for (int q = 0; q < 4; q++) {
            const float val = v[q] * HADAMARD_SCALE;
            const u16 hi = f32_to_f16_bits(val);
            xhi[m * MMA_XS + lane + 32 * q] = hi;
            xlo[m * MMA_XS + lane + 32 * q] = f32_to_f16_bits(val - f16_bits_to_f32(hi));
        }
    }
}

template <int MT, int CB>
__device__ __forceinline__ void trellis_mma_body(const LinearArgs& a, const TrellisDesc& d,
                                                 const LinearOut& o, int nb, int tile_slot,
                                                 int row0, int nrows, int kt0, int kt1) {
    constexpr int TM = 16 * MT;
    extern __shared__ u32 smem[];
    __shared__ int is_last;
    __shared__ float inv_rms[TM];
    const int bits_x2 = d.bits_x2;
    const int nw = 4 * bits_x2;
    u32* sw = smem;
    u16* xhi = (u16*)(smem + MM_KTILES * MM_TILE_WORDS);
    u16* xlo = xhi + TM * MMA_XS;
    float* sz = (float*)xhi;  // [TM][128] products, after the main loop (aliases the inputs)
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int tiles_n = o.n_pad >> 4;
    const int n_pad = o.n_pad;
    const int g = lane >> 2, t = lane & 3;

    LanePlan lp;
    lane_plan_init(lp, bits_x2, nw);

    // The 16-row form accumulates the hi and lo products separately: two independent MMA
    // chains per n8 half instead of one twice as long (its warps have little else to issue).
    constexpr int NACC = MT == 1 ? 2 : 1;
    float acc[MT][NACC][2][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int s = 0; s < NACC; s++)
#pragma unroll
            for (int h = 0; h < 2; h++)
#pragma unroll
                for (int e = 0; e < 4; e++) acc[mt][s][h][e] = 0.f;

    // As in the SIMT form: the first weights are requested before waiting for the kernel that
    // writes the inputs (row tiles from the router were waited for: descriptors depend on them).
    LinearStage<TM> st;
    const u32 tile_magic = chunk_tile_magic(nw);
    if (kt0 < kt1) linear_load_weights<TM>(st, d, kt0, tiles_n, nb, nw, tile_magic, a);
    if (!a.tiles || a.tiles_settled) pdl_entry();

    // The first batch's inputs are requested before the norm's full-row pass, so the two
    // round trips to memory overlap (the inputs are only scaled later, in the stage).
    if (kt0 < kt1) linear_load_inputs<TM>(st, kt0, row0, nrows, a);
    if (a.norm_w) tile_inv_rms(a, row0, nrows, inv_rms);
    for (int kb = kt0; kb < kt1; kb += MM_KTILES) {
        mma_stage<TM>(st, sw, xhi, xlo, nw, tile_magic, nrows, a.x_up != nullptr,
                      a.norm_w != nullptr, inv_rms);
        __syncthreads();
        if (kb + MM_KTILES < kt1)
            linear_load<TM>(st, d, kb + MM_KTILES, tiles_n, nb, nw, tile_magic, row0, nrows,
                            a);
#pragma unroll 1
        for (int c = 0; c < MM_KTILES; c++) {
            const u32* tw = sw + c * MM_TILE_WORDS + warp * nw;
            u32 w2[4];
            decode_tile8<CB>(tw, lp, w2);
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                u32 h[4], l[4];
                ldmatrix_a(h, xhi + mt * 16 * MMA_XS + c * 16);
                ldmatrix_a(l, xlo + mt * 16 * MMA_XS + c * 16);
                mma_f16_f32(acc[mt][0][0], h[0], h[1], h[2], h[3], w2[0], w2[1]);
                mma_f16_f32(acc[mt][NACC - 1][0], l[0], l[1], l[2], l[3], w2[0], w2[1]);
                mma_f16_f32(acc[mt][0][1], h[0], h[1], h[2], h[3], w2[2], w2[3]);
                mma_f16_f32(acc[mt][NACC - 1][1], l[0], l[1], l[2], l[3], w2[2], w2[3]);
            }
        }
        __syncthreads();
    }
    // Products into shared memory (the input staging area is free now).
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int col = warp * 16 + h * 8 + 2 * t;
            const int row = mt * 16 + g;
            float v[4];
#pragma unroll
            for (int e = 0; e < 4; e++)
                v[e] = NACC == 1 ? acc[mt][0][h][e] : acc[mt][0][h][e] + acc[mt][NACC - 1][h][e];
            sz[row * 128 + col] = v[0];
            sz[row * 128 + col + 1] = v[1];
            sz[(row + 8) * 128 + col] = v[2];
            sz[(row + 8) * 128 + col + 1] = v[3];
        }
    }
    __syncthreads();
    if (a.splits > 1) {
        float* part = o.partial + ((u64)blockIdx.z * a.rows + row0) * n_pad + nb * 128;
        for (int i = threadIdx.x; i < nrows * 128; i += MM_THREADS)
            part[(u64)(i >> 7) * n_pad + (i & 127)] = sz[i];
        __syncthreads();
        u32* ticket = a.tickets + (u64)tile_slot * gridDim.x + blockIdx.x;
        if (threadIdx.x == 0) is_last = take_ticket(ticket) == (u32)(a.splits - 1);
        __syncthreads();
        if (!is_last) return;
        for (int i = threadIdx.x; i < nrows * 128; i += MM_THREADS) {
            const int m = i >> 7, c = i & 127;
            sz[i] = ordered_sum_cg(o.partial + (u64)(row0 + m) * n_pad + nb * 128 + c,
                                   (u64)a.rows * n_pad, a.splits);
        }
        if (threadIdx.x == 0) *ticket = 0u;
        __syncthreads();
    }
    finish_tile_rows(a, d, o, sz, nb, row0, nrows);
    if (a.combine.out) moe_combine_last(a.combine, o, nb, is_last);  // launch-uniform
}

template <int MT>
__device__ __forceinline__ void trellis_mma_impl(const LinearArgs& a) {
    BlockJob j;
    if (!block_job<16 * MT>(a, j)) return;
#define TRELLIS_MMA_CASE(CB) \
    trellis_mma_body<MT, CB>(a, j.d, j.o, j.nb, blockIdx.y, j.row0, j.nrows, j.kt0, j.kt1)
    WITH_CODEBOOK(j.d.codebook, TRELLIS_MMA_CASE)
#undef TRELLIS_MMA_CASE
}

// The 16-row form keeps the SIMT kernels' three blocks per SM.
extern "C" __global__ void __launch_bounds__(MM_THREADS, 3) trellis_mma_tm16(const LinearArgs a) {
    trellis_mma_impl<1>(a);
}

extern "C" __global__ void __launch_bounds__(MM_THREADS, 1) trellis_mma_tm64(const LinearArgs a) {
    trellis_mma_impl<4>(a);
}

// Shared definitions for every kernel source. Compiled by NVRTC with no #include: the types and
// conversions the kernels need are defined here (fp16 conversions through PTX `cvt`).

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

#define FULL_MASK 0xffffffffu
#define NEG_INF __int_as_float(0xff800000)

// 1/sqrt(128) exactly as the CPU reference writes it (f32 0.088_388_35).
#define HADAMARD_SCALE 0.08838835f

// Programmatic dependent launch (Hopper and later). The host launches kernels with the
// programmatic-serialization attribute, so a kernel may be scheduled while its predecessor in
// the stream still runs: its launch and block set-up overlap the predecessor's tail. Every
// kernel therefore first waits for its predecessors to complete (and their writes to become
// visible) and only then lets its own successor be scheduled, so at most one kernel waits
// ahead and nothing reads data before it is written. Before sm_90 both are no-ops (the host
// then launches without the attribute).
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch_dependents() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

#ifdef TRELLIS_TRACE
// Launch timeline for analysis (TRELLIS_CUDA_TRACE=1 compiles it in): block (0, 0, 0) of every
// launch records the global nanosecond time at which it entered and at which its wait for the
// predecessor returned, in launch order. The release times of successive launches give each
// kernel's share of the critical path as it runs inside a step graph, which per-launch event
// timing and ncu (both serialise the kernels) cannot show.
#define TRACE_CAPACITY 65536
__device__ u64 trellis_trace[TRACE_CAPACITY][2];
__device__ u32 trellis_trace_next;

__device__ __forceinline__ u64 global_ns() {
    u64 t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// Phase marks of block (0, 0, 0): trace_mark(k) records the time at which that block passed
// mark k (1 ≤ k < TRACE_MARKS) of its launch, so the host can split a kernel's time into its
// phases as it runs in the graph. Nothing when the trace is not compiled in.
#define TRACE_MARKS 8
__device__ u64 trellis_marks[TRACE_CAPACITY][TRACE_MARKS];
// This launch's slot, kept by the thread that took it (thread 0 of block (0, 0, 0)).
__shared__ u32 trellis_trace_slot;

__device__ __forceinline__ void trace_mark(int k) {
    if ((blockIdx.x | blockIdx.y | blockIdx.z | threadIdx.x) == 0) {
        const u64 now = global_ns();
        trellis_marks[trellis_trace_slot][k] = now;
    }
}
#else
#define trace_mark(k)
#endif

__device__ __forceinline__ void pdl_entry() {
#ifdef TRELLIS_TRACE
    const u64 entered = global_ns();
#endif
    pdl_wait();
    pdl_launch_dependents();
#ifdef TRELLIS_TRACE
    if ((blockIdx.x | blockIdx.y | blockIdx.z | threadIdx.x) == 0) {
        const u32 slot = atomicAdd(&trellis_trace_next, 1u) & (TRACE_CAPACITY - 1);
        trellis_trace_slot = slot;
        trellis_trace[slot][0] = entered;
        trellis_trace[slot][1] = global_ns();
        for (int k = 1; k < TRACE_MARKS; k++) trellis_marks[slot][k] = 0;
    }
#endif
}


// Storage element types, distinct so that overloads pick the right widening.
struct f16_t {
    u16 bits;
};
struct bf16_t {
    u16 bits;
};

__device__ __forceinline__ float f16_bits_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f32_to_f16_bits(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(f16_t v) { return f16_bits_to_f32(v.bits); }
__device__ __forceinline__ float to_f32(bf16_t v) { return __uint_as_float(((u32)v.bits) << 16); }

// Eight consecutive weights widened to f32, with 16-byte loads (two for f32). `p` must be
// 16-byte aligned.
__device__ __forceinline__ void load8_f32(const float* p, float out[8]) {
    const float4 a = ((const float4*)p)[0], b = ((const float4*)p)[1];
    out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w;
    out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
}
// Eight two-byte values already loaded as 16 bytes, widened to f32 (the pointer only picks
// the type).
__device__ __forceinline__ void widen8(const uint4 v, const f16_t*, float out[8]) {
    const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        out[2 * i] = f16_bits_to_f32((u16)(w[i] & 0xFFFFu));
        out[2 * i + 1] = f16_bits_to_f32((u16)(w[i] >> 16));
    }
}
__device__ __forceinline__ void widen8(const uint4 v, const bf16_t*, float out[8]) {
    const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        out[2 * i] = __uint_as_float(w[i] << 16);
        out[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
    }
}
__device__ __forceinline__ void load8_f32(const f16_t* p, float out[8]) {
    widen8(*(const uint4*)p, p, out);
}
__device__ __forceinline__ void load8_f32(const bf16_t* p, float out[8]) {
    widen8(*(const uint4*)p, p, out);
}

__device__ __forceinline__ void store_f32(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_f32(f16_t* p, float v) { p->bits = f32_to_f16_bits(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(FULL_MASK, v, offset);
    return v;
}

// Sum over the whole block; every thread gets the result. `scratch` holds 32 floats.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float w = lane < warps ? scratch[lane] : 0.f;
        w = warp_sum(w);
        if (lane == 0) scratch[0] = w;
    }
    __syncthreads();
    return scratch[0];
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, offset));
    return v;
}

// Maximum over the whole block; every thread gets the result. `scratch` holds 32 floats.
__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warps = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float w = lane < warps ? scratch[lane] : NEG_INF;
        w = warp_max(w);
        if (lane == 0) scratch[0] = w;
    }
    __syncthreads();
    return scratch[0];
}

// The greedy rule on (value, index) pairs: the larger value wins, the lower index on ties;
// index −1 is "no candidate" and loses to any other. argmax_warp leaves every lane of the warp
// with the warp's best pair (the rule is a total order, so all lanes agree).
__device__ __forceinline__ bool argmax_better(float v, int i, float best_v, int best_i) {
    return best_i < 0 || v > best_v || (v == best_v && i < best_i);
}

__device__ __forceinline__ void argmax_warp(float& best_v, int& best_i) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float v = __shfl_xor_sync(FULL_MASK, best_v, o);
        const int i = __shfl_xor_sync(FULL_MASK, best_i, o);
        if (i >= 0 && argmax_better(v, i, best_v, best_i)) {
            best_v = v;
            best_i = i;
        }
    }
}

// Takes a ticket of a split reduction: adds one to *t and returns the old count, with release
// and acquire semantics at GPU scope. Called by one thread after a block barrier, it publishes
// every write the block made before the barrier; the block that takes the last ticket then
// sees all other blocks' writes (its threads, after a barrier). Every thread fencing
// sequentially consistent (`__threadfence`) before the atomic cost more.
__device__ __forceinline__ u32 take_ticket(u32* t) {
    u32 old;
    asm volatile("atom.add.acq_rel.gpu.u32 %0, [%1], 1;" : "=r"(old) : "l"(t) : "memory");
    return old;
}

// Σ_s p[s·stride] for s < n in order, with loads issued eight at a time (L2-latency bound
// reductions over split-k or split-context partials).
__device__ __forceinline__ float ordered_sum_cg(const float* p, u64 stride, int n) {
    float sum = 0.f;
    for (int s0 = 0; s0 < n; s0 += 8) {
        float v[8];
#pragma unroll
        for (int u = 0; u < 8; u++) v[u] = s0 + u < n ? __ldcg(p + (u64)(s0 + u) * stride) : 0.f;
#pragma unroll
        for (int u = 0; u < 8; u++)
            if (s0 + u < n) sum += v[u];
    }
    return sum;
}

// Cache slot of token `row` of the step: its sequence's block table maps the position's block.
__device__ __forceinline__ u64 cache_slot(const u32* positions, const u32* sequence,
                                          const u32* block_tables, int blocks_per_sequence,
                                          int block_size, int row) {
    const u32 pos = positions[row], seq = sequence[row];
    const u32 block = block_tables[(u64)seq * blocks_per_sequence + pos / (u32)block_size];
    return (u64)block * block_size + pos % (u32)block_size;
}

// Unnormalised 128-point Walsh-Hadamard transform held by one warp: lane L holds elements
// L, L+32, L+64, L+96. The butterflies run in the CPU reference's order (h = 1, 2, ..., 64)
// with the same (a + b, a - b) arithmetic, so results are bit-identical to it.
__device__ __forceinline__ void fwht128_warp(float v[4]) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int h = 1; h < 32; h <<= 1) {
        const bool low = (lane & h) == 0;
#pragma unroll
        for (int q = 0; q < 4; q++) {
            const float other = __shfl_xor_sync(FULL_MASK, v[q], h);
            v[q] = low ? v[q] + other : other - v[q];
        }
    }
    // h = 32 pairs elements (q, q + 1) for even q; h = 64 pairs (q, q + 2).
    const float a0 = v[0] + v[1], a1 = v[0] - v[1];
    const float a2 = v[2] + v[3], a3 = v[2] - v[3];
    v[0] = a0 + a2;
    v[2] = a0 - a2;
    v[1] = a1 + a3;
    v[3] = a1 - a3;
}

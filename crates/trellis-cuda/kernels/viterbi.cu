// The quantizer's Viterbi search on the GPU: the minimum-squared-error tail-biting walk of every
// target tile (format reference §9.7), as `trellis_codec::encode` searches it on the CPU with
// `Effort::Exact`. Each step does the same f32 operations (`cost + (value − x)²`, no fused
// multiply-add) and keeps the same winner (the smallest cost, ties to the smallest `hi`), so the
// walks are identical to the CPU's, tile for tile.
//
// One block searches one tile at a time (blocks loop over the tiles). A step's 2^(16−dn)
// survivors are spread over the threads; each thread tries its survivors' 2^dn candidates in
// increasing `hi`, holds their new costs in registers until every thread has read the old ones,
// and then overwrites them: one buffer of survivor costs in shared memory (at most 128 KiB, at
// one bit) instead of two, which leaves the L1 room for the codebook table. Steps are compiled
// per `dn`, so the candidates' table and cost addresses are constant offsets. Backpointers go to
// the block's global scratch as `dn` bit planes per step (a warp ballot packs 32 survivors into a
// word), at most 1 MiB per pass; thread 0 follows them back once the pass is done.

#define VITERBI_THREADS 512
#define VITERBI_WARPS (VITERBI_THREADS / 32)
#define VITERBI_POSITIONS 256
#define VITERBI_STATE_BITS 16
#define VITERBI_INF __int_as_float(0x7f800000)

// Shift (code bits) of ring position `pos`, wrapping.
__device__ __forceinline__ u32 viterbi_shift(const unsigned char* shifts, u32 pos) {
    return shifts[pos & (VITERBI_POSITIONS - 1)];
}

// Survivors a thread may hold in registers during a step; steps with more (dn ≤ 2, i.e. widths
// up to 2.5 bits) stage the new costs in the block's global scratch instead.
#define VITERBI_HELD_ROUNDS 16

// One step whose successor shifts in DN bits: `cost` holds the 2^(16−d) predecessor costs and
// receives the 2^(16−DN) survivor costs; the winners' `hi` go to `back` as DN bit planes.
// `staged` is the block's scratch of 2^15 floats for steps with many survivors.
template <int DN>
__device__ __forceinline__ void viterbi_step(float* cost, const u16* __restrict__ table, u32 d,
                                             float x, u32* back, float* staged) {
    constexpr u32 WIDTH = 1u << (VITERBI_STATE_BITS - DN);
    constexpr u32 ROUNDS = (WIDTH + VITERBI_THREADS - 1) / VITERBI_THREADS;
    constexpr bool HELD = ROUNDS <= VITERBI_HELD_ROUNDS;
    constexpr u32 PLANE_WORDS = WIDTH / 32;
    const u32 tid = threadIdx.x;
    // Candidate `hi` of survivor o is state (hi << (16 − DN)) | o, whose predecessor is
    // (hi << (16 − DN − d)) | (o >> d).
    const u32 pred_stride = 1u << (VITERBI_STATE_BITS - DN - d);
    float best[HELD ? ROUNDS : 1];
#pragma unroll
    for (u32 r = 0; r < ROUNDS; r++) {
        const u32 o = r * VITERBI_THREADS + tid;
        // WIDTH is a multiple of 32, so a warp is wholly in or out and the ballots see every
        // lane.
        if (WIDTH >= VITERBI_THREADS || o < WIDTH) {
            const u16* values = table + o;
            const float* pred = cost + (o >> d);
            float b = VITERBI_INF;
            u32 b_hi = 0;
#pragma unroll
            for (u32 hi = 0; hi < (1u << DN); hi++) {
                const float value = f16_bits_to_f32(__ldg(values + (hi << (VITERBI_STATE_BITS - DN))));
                const float e = __fsub_rn(value, x);
                const float c = __fadd_rn(pred[hi * pred_stride], __fmul_rn(e, e));
                if (c < b) {
                    b = c;
                    b_hi = hi;
                }
            }
            if (HELD) {
                best[r] = b;
            } else {
                staged[o] = b;
            }
#pragma unroll
            for (u32 p = 0; p < DN; p++) {
                const u32 bits = __ballot_sync(FULL_MASK, (b_hi >> p) & 1u);
                if ((tid & 31) == 0) back[p * PLANE_WORDS + o / 32] = bits;
            }
        }
    }
    __syncthreads();
#pragma unroll
    for (u32 r = 0; r < ROUNDS; r++) {
        const u32 o = r * VITERBI_THREADS + tid;
        if (WIDTH >= VITERBI_THREADS || o < WIDTH) cost[o] = HELD ? best[r] : staged[o];
    }
    __syncthreads();
}

// Backpointer words of a step whose successor shifts in `dn` bits.
__device__ __forceinline__ u32 viterbi_step_words(u32 dn) {
    return dn * ((1u << (VITERBI_STATE_BITS - dn)) / 32);
}

// One pass over the ring from position `offset` (steps t = 0..255 visit positions t + offset,
// wrapping). `start` < 0 lets the walk begin anywhere; otherwise the first state's overlap is
// forced to `start`. Leaves the last step's survivor costs in `cost`.
__device__ __forceinline__ void viterbi_forward(const float* xs, const unsigned char* shifts,
                                                u32 offset, int start,
                                                const u16* __restrict__ table, float* cost,
                                                u32* back, float* staged) {
    const u32 first = 1u << (VITERBI_STATE_BITS - viterbi_shift(shifts, offset));
    for (u32 i = threadIdx.x; i < first; i += VITERBI_THREADS) {
        cost[i] = (start < 0 || i == (u32)start) ? 0.0f : VITERBI_INF;
    }
    __syncthreads();
    for (u32 t = 0; t < VITERBI_POSITIONS; t++) {
        const u32 d = viterbi_shift(shifts, t + offset);
        const u32 dn = viterbi_shift(shifts, t + 1 + offset);
        const float x = xs[(t + offset) & (VITERBI_POSITIONS - 1)];
        switch (dn) {
        case 1: viterbi_step<1>(cost, table, d, x, back, staged); break;
        case 2: viterbi_step<2>(cost, table, d, x, back, staged); break;
        case 3: viterbi_step<3>(cost, table, d, x, back, staged); break;
        case 4: viterbi_step<4>(cost, table, d, x, back, staged); break;
        case 5: viterbi_step<5>(cost, table, d, x, back, staged); break;
        case 6: viterbi_step<6>(cost, table, d, x, back, staged); break;
        case 7: viterbi_step<7>(cost, table, d, x, back, staged); break;
        default: viterbi_step<8>(cost, table, d, x, back, staged); break;
        }
        back += viterbi_step_words(dn);
    }
}

// Follow the backpointers of a pass from survivor `last` after its final step down to step
// `stop`, writing each step's state to `states[t]`. Thread 0 only, after the pass's barrier.
__device__ void viterbi_backtrack(const unsigned char* shifts, u32 offset, const u32* back,
                                  u32 last, u32 stop, u16* states) {
    u32 back_at = 0;
    for (u32 t = 0; t < VITERBI_POSITIONS; t++) {
        back_at += viterbi_step_words(viterbi_shift(shifts, t + 1 + offset));
    }
    u32 o = last;
    for (int t = VITERBI_POSITIONS - 1; t >= (int)stop; t--) {
        const u32 d = viterbi_shift(shifts, t + offset);
        const u32 dn = viterbi_shift(shifts, t + 1 + offset);
        const u32 plane_words = (1u << (VITERBI_STATE_BITS - dn)) / 32;
        back_at -= dn * plane_words;
        u32 hi = 0;
        for (u32 p = 0; p < dn; p++) {
            hi |= ((back[back_at + p * plane_words + o / 32] >> (o & 31)) & 1u) << p;
        }
        const u32 s = (hi << (VITERBI_STATE_BITS - dn)) | o;
        states[t] = (u16)s;
        o = s >> d;
    }
}

// The first cheapest of `n` survivor costs (the CPU's tie rule). Every thread calls it; the
// result is valid in every thread.
__device__ u32 viterbi_cheapest(const float* cost, u32 n) {
    __shared__ float warp_cost[VITERBI_WARPS];
    __shared__ u32 warp_index[VITERBI_WARPS];
    const u32 tid = threadIdx.x, lane = tid & 31, warp = tid / 32;
    float best = VITERBI_INF;
    u32 index = n;
    for (u32 i = tid; i < n; i += VITERBI_THREADS) {
        const float c = cost[i];
        if (c < best || (c == best && i < index)) {
            best = c;
            index = i;
        }
    }
    for (int step = 16; step > 0; step /= 2) {
        const float oc = __shfl_xor_sync(FULL_MASK, best, step);
        const u32 oi = __shfl_xor_sync(FULL_MASK, index, step);
        if (oc < best || (oc == best && oi < index)) {
            best = oc;
            index = oi;
        }
    }
    if (lane == 0) {
        warp_cost[warp] = best;
        warp_index[warp] = index;
    }
    __syncthreads();
    best = warp_cost[0];
    index = warp_index[0];
    for (u32 w = 1; w < VITERBI_WARPS; w++) {
        if (warp_cost[w] < best || (warp_cost[w] == best && warp_index[w] < index)) {
            best = warp_cost[w];
            index = warp_index[w];
        }
    }
    __syncthreads();
    return index;
}

// `xs`: [tiles][256] targets in trellis position order; `shifts`: the code bits of each of the
// 256 positions; `table`: the codebook's 65536 values as fp16 bits (all exact in fp16);
// `back`: `back_words` per block; `staged`: 2^15 floats per block, used by widths with steps of
// dn ≤ 2; `states`: [tiles][256] out, the walk in position order. The dynamic shared memory
// holds 2^(16 − least shift) survivor costs.
extern "C" __global__ void __launch_bounds__(VITERBI_THREADS, 2)
viterbi_tiles(const float* __restrict__ xs, const unsigned char* __restrict__ shifts,
              const u16* __restrict__ table, u32* back, u64 back_words, float* staged_costs,
              u16* __restrict__ states, u32 tiles) {
    pdl_entry();
    extern __shared__ float viterbi_costs[];
    __shared__ float x_s[VITERBI_POSITIONS];
    __shared__ unsigned char shift_s[VITERBI_POSITIONS];
    __shared__ u16 walk_s[VITERBI_POSITIONS];
    __shared__ u32 wrap_s;
    const u32 tid = threadIdx.x;
    u32* block_back = back + (u64)blockIdx.x * back_words;
    float* staged = staged_costs + (u64)blockIdx.x * (1u << 15);
    for (u32 i = tid; i < VITERBI_POSITIONS; i += VITERBI_THREADS) shift_s[i] = shifts[i];

    for (u32 tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        for (u32 i = tid; i < VITERBI_POSITIONS; i += VITERBI_THREADS) {
            x_s[i] = xs[(u64)tile * VITERBI_POSITIONS + i];
        }
        __syncthreads();
        // Pass 1 over the ring rotated by half, free at both ends: the overlap its best walk
        // carries from position 255 to 0 pins the ring.
        const u32 half = VITERBI_POSITIONS / 2;
        viterbi_forward(x_s, shift_s, half, -1, table, viterbi_costs, block_back, staged);
        const u32 last =
            viterbi_cheapest(viterbi_costs, 1u << (VITERBI_STATE_BITS - shift_s[half]));
        if (tid == 0) {
            // Step 127 of the rotated pass is position 255.
            viterbi_backtrack(shift_s, half, block_back, last, half - 1, walk_s);
            wrap_s = walk_s[half - 1] & ((1u << (VITERBI_STATE_BITS - shift_s[0])) - 1);
        }
        __syncthreads();
        const u32 wrap = wrap_s;
        // Pass 2 over positions 0..255, starting from and returning to that overlap.
        viterbi_forward(x_s, shift_s, 0, (int)wrap, table, viterbi_costs, block_back, staged);
        if (tid == 0) viterbi_backtrack(shift_s, 0, block_back, wrap, 0, walk_s);
        __syncthreads();
        for (u32 i = tid; i < VITERBI_POSITIONS; i += VITERBI_THREADS) {
            states[(u64)tile * VITERBI_POSITIONS + i] = walk_s[i];
        }
        __syncthreads();
    }
}

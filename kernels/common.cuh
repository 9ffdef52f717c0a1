// Shared device helpers, prepended to every kernel source before NVRTC compiles it:
// fixed-width types, the dropout hash, and block-wide reductions in a fixed order.
//
// Every reduction combines the threads' partial values in the same tree for the same
// block size, so a kernel's result does not depend on scheduling (deterministic).

typedef unsigned int u32;
typedef int i32;
typedef unsigned long long u64;

#define NEG_INF (-__int_as_float(0x7f800000))

// splitmix64's finaliser: the same function as `backend::mix64` on the host.
__device__ __forceinline__ u64 mix64(u64 z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

// A buffer's rows' global positions, laid out as the host's `backend::RowMap`: up to three
// segments of consecutive local rows, and `tokens` token rows per sequence (0: a row is a
// whole sequence or document).
struct Rows {
    u32 local[3];
    u32 tokens;
    u64 global[3];
};

// The global position of local sequence (or document) r, by the segments alone.
__device__ __forceinline__ u64 rows_sequence(const Rows& m, u32 r) {
    if (r >= m.local[2]) return m.global[2] + (r - m.local[2]);
    if (r >= m.local[1]) return m.global[1] + (r - m.local[1]);
    return m.global[0] + (r - m.local[0]);
}

// The global position of local row r: `RowMap::position`.
__device__ __forceinline__ u64 rows_position(const Rows& m, u32 r) {
    if (m.tokens == 0) return rows_sequence(m, r);
    return (rows_sequence(m, r / m.tokens) << 16) + (r % m.tokens);
}

// A running log-sum-exp: max m and sum s of exp(x - m).
struct Lse {
    float m;
    float s;
};

__device__ __forceinline__ Lse lse_empty() {
    Lse a;
    a.m = NEG_INF;
    a.s = 0.0f;
    return a;
}

__device__ __forceinline__ Lse lse_push(Lse a, float x) {
    if (x == NEG_INF) return a;
    if (x > a.m) {
        a.s = a.s * expf(a.m - x) + 1.0f;
        a.m = x;
    } else {
        a.s += expf(x - a.m);
    }
    return a;
}

__device__ __forceinline__ Lse lse_merge(Lse a, Lse b) {
    if (a.m == NEG_INF) return b;
    if (b.m == NEG_INF) return a;
    float m = fmaxf(a.m, b.m);
    Lse r;
    r.m = m;
    r.s = a.s * expf(a.m - m) + b.s * expf(b.m - m);
    return r;
}

// An argmax candidate: the lowest index wins among equal values.
struct ArgMax {
    float v;
    int i;
};

__device__ __forceinline__ ArgMax argmax_merge(ArgMax a, ArgMax b) {
    if (b.v > a.v || (b.v == a.v && b.i < a.i)) return b;
    return a;
}

// Block-wide reductions for blocks of at most 1024 threads (a multiple of 32). `scratch`
// is shared memory of at least 32 elements of the reduced type; every thread gets the
// result. Threads combine within their warp first, then warp 0 combines the warps.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// The sum over the block (float or double).
template <typename T>
__device__ T block_sum(T v, T* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : T(0);
    v = warp_sum(v);
    return v;
}

__device__ Lse block_lse(Lse a, Lse* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) {
        Lse b;
        b.m = __shfl_xor_sync(0xffffffffu, a.m, o);
        b.s = __shfl_xor_sync(0xffffffffu, a.s, o);
        a = lse_merge(a, b);
    }
    __syncthreads();
    if (lane == 0) scratch[warp] = a;
    __syncthreads();
    a = lane < warps ? scratch[lane] : lse_empty();
    for (int o = 16; o > 0; o >>= 1) {
        Lse b;
        b.m = __shfl_xor_sync(0xffffffffu, a.m, o);
        b.s = __shfl_xor_sync(0xffffffffu, a.s, o);
        a = lse_merge(a, b);
    }
    return a;
}

__device__ ArgMax block_argmax(ArgMax a, ArgMax* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) {
        ArgMax b;
        b.v = __shfl_xor_sync(0xffffffffu, a.v, o);
        b.i = __shfl_xor_sync(0xffffffffu, a.i, o);
        a = argmax_merge(a, b);
    }
    __syncthreads();
    if (lane == 0) scratch[warp] = a;
    __syncthreads();
    if (lane < warps) {
        a = scratch[lane];
    } else {
        a.v = NEG_INF;
        a.i = 0x7fffffff;
    }
    for (int o = 16; o > 0; o >>= 1) {
        ArgMax b;
        b.v = __shfl_xor_sync(0xffffffffu, a.v, o);
        b.i = __shfl_xor_sync(0xffffffffu, a.i, o);
        a = argmax_merge(a, b);
    }
    return a;
}

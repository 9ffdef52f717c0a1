// The Transformer encoder's operations (twins: `EncoderOps for Cpu` in src/backend/cpu.rs):
// LayerNorm forward and backward, one block per row; the attention core over rows of b·l
// tokens whose heads sit side by side (head h in columns h·d..(h+1)·d), forward one block
// per (sequence, head, query row), backward in two passes without atomics: per query row
// (dS and dQ), then per key row (dK and dV).

// y = (x − μ)·rstd·γ + β per row; stats = (μ, rstd).
extern "C" __global__ void layer_norm_forward(const float* __restrict__ x, int n, int w,
                                              const float* __restrict__ g, const float* __restrict__ b,
                                              float eps, float* __restrict__ y, float* __restrict__ stats) {
    __shared__ float s_sum[32];
    const int r = blockIdx.x;
    if (r >= n) return;
    const float* xr = x + (size_t)r * w;
    float s = 0.0f;
    for (int j = threadIdx.x; j < w; j += blockDim.x) s += xr[j];
    const float mu = block_sum(s, s_sum) / (float)w;
    float v = 0.0f;
    for (int j = threadIdx.x; j < w; j += blockDim.x) v += (xr[j] - mu) * (xr[j] - mu);
    const float rstd = 1.0f / sqrtf(block_sum(v, s_sum) / (float)w + eps);
    for (int j = threadIdx.x; j < w; j += blockDim.x) y[(size_t)r * w + j] = (xr[j] - mu) * rstd * g[j] + b[j];
    if (threadIdx.x == 0) {
        stats[2 * r] = mu;
        stats[2 * r + 1] = rstd;
    }
}

// dx = rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂ ⊙ x̂)) with dx̂ = dy ⊙ γ, per row.
extern "C" __global__ void layer_norm_backward_dx(const float* __restrict__ x, int n, int w,
                                                  const float* __restrict__ g, const float* __restrict__ stats,
                                                  const float* __restrict__ dy, float* __restrict__ dx) {
    __shared__ float s_sum[32];
    const int r = blockIdx.x;
    if (r >= n) return;
    const float mu = stats[2 * r], rstd = stats[2 * r + 1];
    const float *xr = x + (size_t)r * w, *dyr = dy + (size_t)r * w;
    float s1 = 0.0f, s2 = 0.0f;
    for (int j = threadIdx.x; j < w; j += blockDim.x) {
        float d = dyr[j] * g[j];
        s1 += d;
        s2 += d * (xr[j] - mu) * rstd;
    }
    const float m1 = block_sum(s1, s_sum) / (float)w;
    const float m2 = block_sum(s2, s_sum) / (float)w;
    for (int j = threadIdx.x; j < w; j += blockDim.x) {
        float xh = (xr[j] - mu) * rstd;
        dx[(size_t)r * w + j] = rstd * (dyr[j] * g[j] - m1 - xh * m2);
    }
}

// dγ[j] += Σ_r dy[r, j]·x̂[r, j], dβ[j] += Σ_r dy[r, j]: one thread per column, rows in order.
extern "C" __global__ void layer_norm_backward_params(const float* __restrict__ x, int n, int w,
                                                      const float* __restrict__ stats, const float* __restrict__ dy,
                                                      float* __restrict__ dg, float* __restrict__ db) {
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < w; j += gridDim.x * blockDim.x) {
        float ag = dg[j], ab = db[j];
        for (int r = 0; r < n; ++r) {
            float d = dy[(size_t)r * w + j];
            ag += d * (x[(size_t)r * w + j] - stats[2 * r]) * stats[2 * r + 1];
            ab += d;
        }
        dg[j] = ag;
        db[j] = ab;
    }
}

// Attention-probability dropout's factor for element (t, j) of head h of the sequence
// whose hash base is `sb` (`AttnDropout::sequence_base`): 0 or 1/(1 − p) from the hash of
// (t·heads + h)·2^16 + j; 1 when p = 0.
__device__ __forceinline__ float attn_drop(float p, u64 sb, int h, int t, int j, int heads) {
    if (p <= 0.0f) return 1.0f;
    u64 idx = (((u64)t * heads + h) << 16) + (u64)j;
    float u = (float)(mix64(sb ^ mix64(idx)) >> 40) * (1.0f / 16777216.0f);
    return u >= p ? 1.0f / (1.0f - p) : 0.0f;
}

// Sequence i's dropout hash base: mix64(base ^ mix64(its global position)).
__device__ __forceinline__ u64 attn_seq_base(u64 base, const Rows& rows, int i) {
    return mix64(base ^ mix64(rows_sequence(rows, (u32)i)));
}

// One block per (sequence i, head h, query row t): P[i,h,t,:] = softmax over the unmasked
// keys of q·k·scale (kept before dropout), and ctx[i·l + t, h·d..] = Σ_j P_j·M_j·v_j with
// M the dropout factor (drop_p = 0: none). grid = (l, heads, b).
extern "C" __global__ void attention_forward(const float* __restrict__ q, const float* __restrict__ k,
                                             const float* __restrict__ v, const float* __restrict__ mask, int l,
                                             int heads, int d, float scale, float drop_p, u64 drop_base, Rows drop_rows,
                                             float* __restrict__ ctx, float* __restrict__ probs) {
    __shared__ Lse s_lse[32];
    const int t = blockIdx.x, h = blockIdx.y, i = blockIdx.z;
    const int hd = heads * d;
    const float* qr = q + ((size_t)i * l + t) * hd + h * d;
    float* p = probs + (((size_t)i * heads + h) * l + t) * l;
    const u64 sb = attn_seq_base(drop_base, drop_rows, i);
    // Scores into p (unmasked keys), then their log-sum-exp.
    Lse a = lse_empty();
    for (int j = threadIdx.x; j < l; j += blockDim.x) {
        float sc = NEG_INF;
        if (mask[(size_t)i * l + j] != 0.0f) {
            const float* kr = k + ((size_t)i * l + j) * hd + h * d;
            float dot = 0.0f;
            for (int c = 0; c < d; ++c) dot += qr[c] * kr[c];
            sc = dot * scale;
        }
        p[j] = sc;
        a = lse_push(a, sc);
    }
    a = block_lse(a, s_lse);
    for (int j = threadIdx.x; j < l; j += blockDim.x) p[j] = p[j] == NEG_INF ? 0.0f : expf(p[j] - a.m) / a.s;
    __syncthreads();
    float* cr = ctx + ((size_t)i * l + t) * hd + h * d;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < l; ++j)
            acc += p[j] * attn_drop(drop_p, sb, h, t, j, heads) * v[((size_t)i * l + j) * hd + h * d + c];
        cr[c] = acc;
    }
}

// Backward, pass 1, per query row: dP_j = M_j·(dctx·v_j), dS_j = P_j·(dP_j − Σ P·dP)·scale
// (kept in ds), dQ = Σ_j dS_j·k_j. grid = (l, heads, b).
extern "C" __global__ void attention_backward_rows(const float* __restrict__ k, const float* __restrict__ v,
                                                   const float* __restrict__ probs, const float* __restrict__ dctx,
                                                   int l, int heads, int d, float scale, float drop_p, u64 drop_base, Rows drop_rows,
                                                   float* __restrict__ ds, float* __restrict__ dq) {
    __shared__ float s_sum[32];
    const int t = blockIdx.x, h = blockIdx.y, i = blockIdx.z;
    const int hd = heads * d;
    const size_t prow = (((size_t)i * heads + h) * l + t) * l;
    const float* p = probs + prow;
    float* dsr = ds + prow;
    const float* dc = dctx + ((size_t)i * l + t) * hd + h * d;
    const u64 sb = attn_seq_base(drop_base, drop_rows, i);
    float dot = 0.0f;
    for (int j = threadIdx.x; j < l; j += blockDim.x) {
        const float* vr = v + ((size_t)i * l + j) * hd + h * d;
        float dp = 0.0f;
        for (int c = 0; c < d; ++c) dp += dc[c] * vr[c];
        dp *= attn_drop(drop_p, sb, h, t, j, heads);
        dsr[j] = dp;
        dot += p[j] * dp;
    }
    dot = block_sum(dot, s_sum);
    for (int j = threadIdx.x; j < l; j += blockDim.x) dsr[j] = p[j] * (dsr[j] - dot) * scale;
    __syncthreads();
    float* dqr = dq + ((size_t)i * l + t) * hd + h * d;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < l; ++j) acc += dsr[j] * k[((size_t)i * l + j) * hd + h * d + c];
        dqr[c] = acc;
    }
}

// Backward, pass 2, per key row j: dK_j = Σ_t dS_tj·q_t, dV_j = Σ_t P_tj·M_tj·dctx_t.
// grid = (l, heads, b).
extern "C" __global__ void attention_backward_keys(const float* __restrict__ q, const float* __restrict__ probs,
                                                   const float* __restrict__ dctx, const float* __restrict__ ds,
                                                   int l, int heads, int d, float drop_p, u64 drop_base, Rows drop_rows,
                                                   float* __restrict__ dk, float* __restrict__ dv) {
    const int j = blockIdx.x, h = blockIdx.y, i = blockIdx.z;
    const int hd = heads * d;
    const size_t base = ((size_t)i * heads + h) * l * l;
    const u64 sb = attn_seq_base(drop_base, drop_rows, i);
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float ak = 0.0f, av = 0.0f;
        for (int t = 0; t < l; ++t) {
            const size_t row = ((size_t)i * l + t) * hd + h * d + c;
            ak += ds[base + (size_t)t * l + j] * q[row];
            av += probs[base + (size_t)t * l + j] * attn_drop(drop_p, sb, h, t, j, heads) * dctx[row];
        }
        dk[((size_t)i * l + j) * hd + h * d + c] = ak;
        dv[((size_t)i * l + j) * hd + h * d + c] = av;
    }
}

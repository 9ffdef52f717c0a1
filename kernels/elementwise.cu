// Elementwise and row-wise kernels over flat buffers: activations, dropout, scaling, the
// EMA update, the optimizers (dense and on table rows), the bias terms of the linear
// layer, and partial sums of squares. Twins: the methods of the same names in
// `backend/cpu.rs`. Every loop is grid-stride over `size_t` indices, so one launch covers
// buffers of any length.

#define GRID_STRIDE(i, n) for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (n); i += (size_t)gridDim.x * blockDim.x)

// act: 0 relu, 1 gelu (tanh approximation), 2 tanh, 3 gelu with erf (x·Φ(x)).
__device__ __forceinline__ void act_eval(int act, float x, float* y, float* dy) {
    if (act == 0) {
        *y = fmaxf(x, 0.0f);
        *dy = x > 0.0f ? 1.0f : 0.0f;
    } else if (act == 1) {
        const float c = 0.7978845608028654f, k = 0.044715f;
        float u = c * (x + k * x * x * x), t = tanhf(u);
        *y = 0.5f * x * (1.0f + t);
        float du = c * (1.0f + 3.0f * k * x * x);
        *dy = 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du;
    } else if (act == 2) {
        float t = tanhf(x);
        *y = t;
        *dy = 1.0f - t * t;
    } else {
        float cdf = 0.5f * (1.0f + erff(x * 0.7071067811865476f));
        *y = x * cdf;
        *dy = cdf + x * expf(-0.5f * x * x) * 0.3989422804014327f;
    }
}

extern "C" __global__ void activation_forward(int act, const float* __restrict__ x, float* __restrict__ y,
                                              size_t n) {
    GRID_STRIDE(i, n) {
        float v, d;
        act_eval(act, x[i], &v, &d);
        y[i] = v;
    }
}

extern "C" __global__ void activation_backward(int act, const float* __restrict__ x,
                                               const float* __restrict__ dy, float* __restrict__ dx,
                                               size_t n) {
    GRID_STRIDE(i, n) {
        float v, d;
        act_eval(act, x[i], &v, &d);
        dx[i] = d * dy[i];
    }
}

// Dropout in place on rows of `width`, keyed as `DropoutKey::keep`: row r's element j is
// hashed at position(r)·width + j, position mapping local rows to global ones (`RowMap`).
extern "C" __global__ void dropout(float* __restrict__ x, size_t n, u32 width, float p, float scale, u64 base,
                                   Rows rows) {
    GRID_STRIDE(i, n) {
        u32 r = (u32)(i / width), j = (u32)(i % width);
        u64 h = mix64(base ^ mix64(rows_position(rows, r) * (u64)width + j));
        float u = (float)(h >> 40) * (1.0f / 16777216.0f);
        x[i] = u >= p ? x[i] * scale : 0.0f;
    }
}

extern "C" __global__ void scale_buf(float* __restrict__ x, size_t n, float f) {
    GRID_STRIDE(i, n) x[i] = x[i] * f;
}

extern "C" __global__ void axpy(float* __restrict__ y, const float* __restrict__ x, size_t n, float a) {
    GRID_STRIDE(i, n) y[i] += a * x[i];
}

// shadow ← a·shadow + b·params, with 16-byte loads when both pointers allow them: 12 bytes
// of traffic per parameter, the floor.
extern "C" __global__ void ema(float* __restrict__ shadow, const float* __restrict__ params, size_t n, float a,
                               float b) {
    const bool vec = ((((size_t)shadow) | ((size_t)params)) & 15) == 0;
    size_t head = 0;
    if (vec) {
        const size_t n4 = n / 4;
        float4* s4 = (float4*)shadow;
        const float4* p4 = (const float4*)params;
        GRID_STRIDE(i, n4) {
            float4 s = s4[i], p = p4[i];
            s.x = a * s.x + b * p.x;
            s.y = a * s.y + b * p.y;
            s.z = a * s.z + b * p.z;
            s.w = a * s.w + b * p.w;
            s4[i] = s;
        }
        head = n4 * 4;
    }
    for (size_t i = head + blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        shadow[i] = a * shadow[i] + b * params[i];
}

// The same on table rows, each with its own factors a_k, b_k = 1 − a_k.
extern "C" __global__ void ema_rows(float* __restrict__ shadow, const float* __restrict__ params,
                                    const u32* __restrict__ rows, const float* __restrict__ a,
                                    const float* __restrict__ b, size_t k, u32 dim) {
    GRID_STRIDE(i, k * dim) {
        size_t r = i / dim, j = i % dim;
        size_t at = (size_t)rows[r] * dim + j;
        shadow[at] = a[r] * shadow[at] + b[r] * params[at];
    }
}

// Adam's constants for one step (`AdamConsts` on the host).
struct Adam {
    float b1, b2, ob1, ob2, inv_c1, inv_sqrt_c2, eps, wd;
};

__device__ __forceinline__ float adam_direction(const Adam& k, float p, float g, float* m, float* v) {
    *m = k.b1 * *m + k.ob1 * g;
    *v = k.b2 * *v + k.ob2 * g * g;
    return *m * k.inv_c1 / (sqrtf(*v) * k.inv_sqrt_c2 + k.eps) + k.wd * p;
}

// AdamW over one tensor: 28 bytes of traffic per parameter (read p, g, m, v; write p, m, v).
extern "C" __global__ void adamw(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                                 float* __restrict__ v, size_t n, Adam k, float lr) {
    GRID_STRIDE(i, n) {
        float mi = m[i], vi = v[i], pi = p[i];
        float d = adam_direction(k, pi, g[i], &mi, &vi);
        m[i] = mi;
        v[i] = vi;
        p[i] = pi - lr * d;
    }
}

// LAMB, first pass: moments, the direction u, and per-block partial sums of p² and u²
// (doubles; the host adds the blocks in order).
extern "C" __global__ void lamb_direction(const float* __restrict__ p, const float* __restrict__ g,
                                          float* __restrict__ m, float* __restrict__ v, float* __restrict__ u,
                                          size_t n, Adam k, double* __restrict__ partial) {
    __shared__ double s_sum[32];
    double pp = 0.0, uu = 0.0;
    GRID_STRIDE(i, n) {
        float mi = m[i], vi = v[i], pi = p[i];
        float d = adam_direction(k, pi, g[i], &mi, &vi);
        m[i] = mi;
        v[i] = vi;
        u[i] = d;
        pp += (double)pi * (double)pi;
        uu += (double)d * (double)d;
    }
    pp = block_sum(pp, s_sum);
    uu = block_sum(uu, s_sum);
    if (threadIdx.x == 0) {
        partial[2 * blockIdx.x] = pp;
        partial[2 * blockIdx.x + 1] = uu;
    }
}

// LAMB, second pass: p −= step·u.
extern "C" __global__ void lamb_apply(float* __restrict__ p, const float* __restrict__ u, size_t n, float step) {
    GRID_STRIDE(i, n) p[i] = p[i] - step * u[i];
}

// SGD: g' = g + wd·p; with momentum b = μb + g' and the step g' + μb (Nesterov) or b.
extern "C" __global__ void sgd(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ buf,
                               size_t n, float lr, float mu, float wd, int momentum, int nesterov) {
    GRID_STRIDE(i, n) {
        float gi = g[i] + wd * p[i];
        if (!momentum) {
            p[i] = p[i] - lr * gi;
        } else {
            float b = mu * buf[i] + gi;
            buf[i] = b;
            p[i] = p[i] - lr * (nesterov ? gi + mu * b : b);
        }
    }
}

// Lazy Adam on the touched rows of a table (no weight decay): row rows[r] gets values[r, :].
extern "C" __global__ void sparse_adam(float* __restrict__ p, float* __restrict__ m, float* __restrict__ v,
                                       const u32* __restrict__ rows, const float* __restrict__ values,
                                       size_t k, u32 dim, Adam c, float lr) {
    GRID_STRIDE(i, k * dim) {
        size_t r = i / dim, j = i % dim;
        size_t at = (size_t)rows[r] * dim + j;
        float mi = m[at], vi = v[at], pi = p[at];
        float d = adam_direction(c, pi, values[i], &mi, &vi);
        m[at] = mi;
        v[at] = vi;
        p[at] = pi - lr * d;
    }
}

extern "C" __global__ void sparse_sgd(float* __restrict__ p, const u32* __restrict__ rows,
                                      const float* __restrict__ values, size_t k, u32 dim, float lr) {
    GRID_STRIDE(i, k * dim) {
        size_t at = (size_t)rows[i / dim] * dim + i % dim;
        p[at] = p[at] - lr * values[i];
    }
}

// The sum of two sparse gradients: out row r = a[ia[r]] (if ≥ 0) + b[ib[r]] (if ≥ 0).
extern "C" __global__ void sparse_merge(const float* __restrict__ a, const i32* __restrict__ ia,
                                        const float* __restrict__ b, const i32* __restrict__ ib,
                                        float* __restrict__ out, size_t k, u32 dim) {
    GRID_STRIDE(i, k * dim) {
        size_t r = i / dim, j = i % dim;
        float s = 0.0f;
        if (ia[r] >= 0) s += a[(size_t)ia[r] * dim + j];
        if (ib[r] >= 0) s += b[(size_t)ib[r] * dim + j];
        out[i] = s;
    }
}

// y[r, :] = bias for every row (the linear layer's first term; cuBLAS adds x·Wᵀ).
extern "C" __global__ void fill_rows(float* __restrict__ y, const float* __restrict__ bias, size_t n, u32 width) {
    GRID_STRIDE(i, n * width) y[i] = bias[i % width];
}

// db[j] += Σ_r dy[r, j], rows in order: one thread per column.
extern "C" __global__ void col_sums_add(float* __restrict__ db, const float* __restrict__ dy, u32 n, u32 width) {
    GRID_STRIDE(j, (size_t)width) {
        float acc = db[j];
        for (u32 r = 0; r < n; ++r) acc += dy[(size_t)r * width + j];
        db[j] = acc;
    }
}

// Per-block partial sums of x² in double; the host adds the blocks in order.
extern "C" __global__ void sq_norm_partial(const float* __restrict__ x, size_t n, double* __restrict__ partial) {
    __shared__ double s_sum[32];
    double acc = 0.0;
    GRID_STRIDE(i, n) acc += (double)x[i] * (double)x[i];
    acc = block_sum(acc, s_sum);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// f32 → bf16 bits, rounded to nearest even, NaN kept quiet: half::bf16::from_f32's bits.
__device__ __forceinline__ unsigned short bf16_bits(float f) {
    const u32 b = __float_as_uint(f);
    if ((b & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((b >> 16) | 0x40u);
    return (unsigned short)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

// f32 → bf16: the gradient's wire format for `dist.allreduce_dtype = "bf16"`.
extern "C" __global__ void to_bf16(const float* __restrict__ x, unsigned short* __restrict__ y, size_t n) {
    GRID_STRIDE(i, n) y[i] = bf16_bits(x[i]);
}

// bf16 → f32 times `scale`: exact when scale is 1; else the f32 product rounded to bf16
// again (the mean of a bf16 sum, as the MPI path computes it).
extern "C" __global__ void from_bf16(const unsigned short* __restrict__ x, float* __restrict__ y, size_t n,
                                     float scale) {
    GRID_STRIDE(i, n) {
        const float v = __uint_as_float(((u32)x[i]) << 16);
        y[i] = scale == 1.0f ? v : __uint_as_float(((u32)bf16_bits(v * scale)) << 16);
    }
}

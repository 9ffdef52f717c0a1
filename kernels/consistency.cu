// The fused consistency operation of METHODS.md §2 (twin: `algo::consistency::row`, run
// row by row by `Cpu::consistency`). One block per row; nothing of length C is stored:
// sweep 1 gathers both log-sum-exps and the target's argmax, sweep 2 the kind's sums,
// and the last sweep writes the gradients (kl and ce_hard write ∂z_s in sweep 2).
//
// kind: 0 mse, 1 kl, 2 ce_hard, 3 sym_kl. form: 0 logits, 1 probabilities.

#define KIND_MSE 0
#define KIND_KL 1
#define KIND_CE_HARD 2
#define KIND_SYM_KL 3

struct Row {
    const float* zs;
    const float* zt;
    const float* bias;  // null: none
    int form;
    float inv_t;
    float ms, ls;  // student: max and log Σ exp(z − max)
    float mt, lt;  // target's tempered logits: the same

    // The target's tempered logit, then the bias (distribution alignment's ln π − ln p̃,
    // applied to q = softmax(z/T) as METHODS.md §10b says): log q up to its normaliser.
    __device__ __forceinline__ float tl(int c) const {
        float base = form == 0 ? zt[c] : logf(zt[c]);
        return base * inv_t + (bias ? bias[c] : 0.0f);
    }
    __device__ __forceinline__ float logp(int c) const { return zs[c] - ms - ls; }
    __device__ __forceinline__ float logq(int c) const { return tl(c) - mt - lt; }
};

// q·x, with q = 0 giving 0 (a zero probability in a target given as probabilities).
__device__ __forceinline__ float qlog(float q, float x) { return q == 0.0f ? 0.0f : q * x; }

extern "C" __global__ void consistency(const float* __restrict__ student, int s_row0,
                                       const float* __restrict__ target, int n, int classes,
                                       const float* __restrict__ bias, int has_bias,
                                       const float* __restrict__ class_mult, int has_mult,
                                       const float* __restrict__ row_weight, int has_weight,
                                       int kind, int form, float inv_t, float threshold, float scale,
                                       float* __restrict__ dstudent, float* __restrict__ dtarget,
                                       int has_dtarget, float* __restrict__ rows,
                                       int* __restrict__ passed_out) {
    __shared__ Lse s_lse[32];
    __shared__ ArgMax s_arg[32];
    __shared__ float s_sum[32];
    const int i = blockIdx.x;
    if (i >= n) return;
    const int C = classes;
    Row r;
    r.zs = student + (size_t)(s_row0 + i) * C;
    r.zt = target + (size_t)i * C;
    r.bias = has_bias ? bias : 0;
    r.form = form;
    r.inv_t = inv_t;
    float* ds = dstudent + (size_t)(s_row0 + i) * C;
    float* dt = has_dtarget ? dtarget + (size_t)i * C : 0;

    // Sweep 1: both log-sum-exps and the target's argmax.
    Lse a = lse_empty(), b = lse_empty();
    ArgMax best;
    best.v = NEG_INF;
    best.i = 0x7fffffff;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        a = lse_push(a, r.zs[c]);
        float t = r.tl(c);
        b = lse_push(b, t);
        ArgMax cand;
        cand.v = t;
        cand.i = c;
        best = argmax_merge(best, cand);
    }
    a = block_lse(a, s_lse);
    b = block_lse(b, s_lse);
    best = block_argmax(best, s_arg);
    r.ms = a.m;
    r.ls = logf(a.s);
    r.mt = b.m;
    r.lt = logf(b.s);
    // A row with no comparable value (all NaN: a diverged model) has no argmax; the CPU
    // twin reports class 0, and an index past the row must never be used.
    const int label = best.i < C ? best.i : 0;
    const float conf = expf(best.v - r.mt - r.lt);
    const float w = has_weight ? row_weight[i] : 1.0f;
    const float tau = threshold * (has_mult ? class_mult[label] : 1.0f);
    const bool passed = w != 0.0f && conf >= tau;
    float loss = 0.0f;
    if (passed) {
        const float g = scale * w;
        const float cf = (float)C;
        if (kind == KIND_MSE) {
            // dp = Σ d·p, dq = Σ −d·q, loss = Σ d²/C with d = p − q.
            float dp = 0.0f, dq = 0.0f, dd = 0.0f;
            for (int c = threadIdx.x; c < C; c += blockDim.x) {
                float p = expf(r.logp(c)), q = expf(r.logq(c)), d = p - q;
                dp += d * p;
                dq += -d * q;
                dd += d * d;
            }
            dp = block_sum(dp, s_sum);
            dq = block_sum(dq, s_sum);
            dd = block_sum(dd, s_sum);
            for (int c = threadIdx.x; c < C; c += blockDim.x) {
                float p = expf(r.logp(c)), q = expf(r.logq(c)), d = p - q;
                ds[c] += g * 2.0f / cf * p * (d - dp);
                if (dt) dt[c] += g * inv_t * 2.0f / cf * q * (-d - dq);
            }
            loss = dd / cf;
        } else if (kind == KIND_KL) {
            float kl = 0.0f;
            for (int c = threadIdx.x; c < C; c += blockDim.x) {
                float lp = r.logp(c), lq = r.logq(c), q = expf(lq);
                kl += qlog(q, lq - lp);
                ds[c] += g * (expf(lp) - q);
            }
            kl = block_sum(kl, s_sum);
            if (dt) {
                for (int c = threadIdx.x; c < C; c += blockDim.x) {
                    float lp = r.logp(c), lq = r.logq(c);
                    dt[c] += g * inv_t * qlog(expf(lq), lq - lp - kl);
                }
            }
            loss = kl;
        } else if (kind == KIND_CE_HARD) {
            for (int c = threadIdx.x; c < C; c += blockDim.x) {
                ds[c] += g * (expf(r.logp(c)) - (c == label ? 1.0f : 0.0f));
            }
            loss = -r.logp(label);
        } else {
            float kl_pq = 0.0f, kl_qp = 0.0f;
            for (int c = threadIdx.x; c < C; c += blockDim.x) {
                float lp = r.logp(c), lq = r.logq(c);
                kl_pq += expf(lp) * (lp - lq);
                kl_qp += qlog(expf(lq), lq - lp);
            }
            kl_pq = block_sum(kl_pq, s_sum);
            kl_qp = block_sum(kl_qp, s_sum);
            for (int c = threadIdx.x; c < C; c += blockDim.x) {
                float lp = r.logp(c), lq = r.logq(c), p = expf(lp), q = expf(lq);
                ds[c] += g * 0.5f * ((p - q) + p * (lp - lq - kl_pq));
                if (dt) dt[c] += g * inv_t * 0.5f * ((q - p) + qlog(q, lq - lp - kl_qp));
            }
            loss = 0.5f * (kl_pq + kl_qp);
        }
    }
    if (threadIdx.x == 0) {
        rows[i] = passed ? loss * w : 0.0f;
        rows[n + i] = conf;
        rows[2 * n + i] = (float)label;
        passed_out[i] = passed ? 1 : 0;
    }
}

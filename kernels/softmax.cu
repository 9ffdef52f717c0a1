// Row-wise softmax and the supervised loss (twins: `Cpu::softmax`, `Cpu::softmax_loss`).
// One block per row.

extern "C" __global__ void softmax_rows(const float* __restrict__ logits, int n, int classes,
                                        float* __restrict__ probs) {
    __shared__ Lse s_lse[32];
    const int i = blockIdx.x;
    if (i >= n) return;
    const float* z = logits + (size_t)i * classes;
    float* p = probs + (size_t)i * classes;
    Lse a = lse_empty();
    for (int c = threadIdx.x; c < classes; c += blockDim.x) a = lse_push(a, z[c]);
    a = block_lse(a, s_lse);
    const float inv = 1.0f / a.s;
    for (int c = threadIdx.x; c < classes; c += blockDim.x) p[c] = expf(z[c] - a.m) * inv;
}

// loss: 0 cross-entropy against (1−ε)·onehot(y) + ε/C (param = ε); 1 focal (param = γ).
// Unlabeled rows (label < 0) get a zero gradient and a zero loss.
extern "C" __global__ void softmax_loss(const float* __restrict__ logits, int n, int classes,
                                        const i32* __restrict__ labels, int loss, float param,
                                        float scale, float* __restrict__ dlogits,
                                        float* __restrict__ row_loss) {
    __shared__ Lse s_lse[32];
    __shared__ float s_sum[32];
    const int i = blockIdx.x;
    if (i >= n) return;
    const int C = classes;
    const float* z = logits + (size_t)i * C;
    float* g = dlogits + (size_t)i * C;
    const int y = labels[i];
    if (y < 0) {
        for (int c = threadIdx.x; c < C; c += blockDim.x) g[c] = 0.0f;
        if (threadIdx.x == 0) row_loss[i] = 0.0f;
        return;
    }
    Lse a = lse_empty();
    float zsum = 0.0f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        a = lse_push(a, z[c]);
        zsum += z[c];
    }
    a = block_lse(a, s_lse);
    zsum = block_sum(zsum, s_sum);
    const float shift = a.m + logf(a.s);  // log p_c = z_c − shift
    const float logp_y = z[y] - shift;
    if (loss == 0) {
        const float eps = param, off = eps / (float)C;
        for (int c = threadIdx.x; c < C; c += blockDim.x) {
            float t = c == y ? 1.0f - eps + off : off;
            g[c] = (expf(z[c] - shift) - t) * scale;
        }
        // Σ_c t_c·log p_c = (1 − ε)·log p_y + (ε/C)·Σ_c log p_c.
        if (threadIdx.x == 0) row_loss[i] = -((1.0f - eps) * logp_y + off * (zsum - (float)C * shift));
    } else {
        const float gm = param, p_y = expf(logp_y), q = fmaxf(1.0f - p_y, 0.0f);
        float pg = -powf(q, gm);
        if (gm > 0.0f && q > 0.0f) pg += gm * powf(q, gm - 1.0f) * p_y * logp_y;
        for (int c = threadIdx.x; c < C; c += blockDim.x) {
            float delta = c == y ? 1.0f : 0.0f;
            g[c] = pg * (delta - expf(z[c] - shift)) * scale;
        }
        if (threadIdx.x == 0) row_loss[i] = -powf(q, gm) * logp_y;
    }
}

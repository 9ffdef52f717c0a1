// The embedding bag (twins: `Cpu::embedding_bag_forward`, `_backward`, `_sgd`). The
// backward passes read the batch's occurrences grouped by table row (`row_starts`, `docs`:
// the documents of each touched row's occurrences, in document order), which the host
// builds once per batch; each touched row is then summed by one block in a fixed order,
// with no atomics, so the result is deterministic.

// out[i, :] = mean over document i's ids of table[id, :]. One block per document,
// threads across the row.
extern "C" __global__ void bag_forward(const float* __restrict__ table, const u32* __restrict__ ids,
                                       const u32* __restrict__ offsets, int n, int dim,
                                       float* __restrict__ out) {
    const int i = blockIdx.x;
    if (i >= n) return;
    const u32 a = offsets[i], b = offsets[i + 1];
    const float inv = b > a ? 1.0f / (float)(b - a) : 0.0f;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) {
        float acc = 0.0f;
        for (u32 k = a; k < b; ++k) acc += table[(size_t)ids[k] * dim + j];
        out[(size_t)i * dim + j] = b > a ? acc * inv : 0.0f;
    }
}

// values[r, :] = Σ over row r's occurrences (document d) of dout[d, :] · inv_len[d].
extern "C" __global__ void bag_backward(const float* __restrict__ dout, const u32* __restrict__ row_starts,
                                        const u32* __restrict__ docs, const float* __restrict__ inv_len,
                                        int rows, int dim, float* __restrict__ values) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const u32 a = row_starts[r], b = row_starts[r + 1];
    for (int j = threadIdx.x; j < dim; j += blockDim.x) {
        float acc = 0.0f;
        for (u32 k = a; k < b; ++k) {
            const u32 d = docs[k];
            acc += dout[(size_t)d * dim + j] * inv_len[d];
        }
        values[(size_t)r * dim + j] = acc;
    }
}

// table[row_ids[r], :] += step[d] · dout[d, :] for each occurrence of the row, in document
// order (step[d] = −lr / len_d): the backward pass and plain SGD without the gradient.
extern "C" __global__ void bag_sgd(float* __restrict__ table, const u32* __restrict__ row_ids,
                                   const float* __restrict__ dout, const u32* __restrict__ row_starts,
                                   const u32* __restrict__ docs, const float* __restrict__ step, int rows,
                                   int dim) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const u32 a = row_starts[r], b = row_starts[r + 1];
    float* t = table + (size_t)row_ids[r] * dim;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) {
        float v = t[j];
        for (u32 k = a; k < b; ++k) {
            const u32 d = docs[k];
            v += step[d] * dout[(size_t)d * dim + j];
        }
        t[j] = v;
    }
}

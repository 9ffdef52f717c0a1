"""The data-parallel step-time model of docs/scaling.md: prints its tables.

  python3 bench/scaling_model.py

Inputs that are measurements (this repository, 2-core CPU VM): the models' gradient bytes
(from their layouts), the table rows a step touches on Brown genre (words + bigrams of
random paragraphs), and the CPU step times from metrics.jsonl / bench/results. Inputs that
are NOT measurements: every GPU compute time (no GPU run exists yet: they are
placeholders, marked), and the link figures (the issue's NVLink and InfiniBand bus
bandwidths, and a per-hop latency).
"""

# Gradient bytes (f32).
MINILM_PARAMS = 22_565_376 + 384 * 15 + 15   # our layout of all-MiniLM-L6-v2 (no pooler) + a 15-class head
BAG_TABLE = (1 << 20) * 100                  # 2^20 buckets × dim 100
BAG_DENSE_EXCHANGE = (1 << 20) * (100 + 1)   # what the dense exchange all-reduces: the table and a touched-row column
BAG_DENSE = 100 * 15 + 15                    # the output layer
ROW_BYTES = 100 * 4 + 4                      # one table row and its id
# Unique table rows per rank and step on Brown genre (measured: python over the TSV).
ROWS = {"16 labeled": 1_548, "16 + 112 unlabeled (μ 7)": 10_356, "1024 docs": 59_727}

LINKS = {  # bus bandwidth (bytes/s), per-hop latency (s); the figures
    "NVLink, 8 GPUs/node": (420e9, 5e-6),
    "InfiniBand, 46 GB/s per NIC": (46e9, 10e-6),
}


def allreduce(nbytes, w, bw, lat):
    return 0.0 if w == 1 else 2 * (w - 1) / w * nbytes / bw + 2 * (w - 1) * lat


def allgather(nbytes_per_rank, w, bw, lat):
    return 0.0 if w == 1 else (w - 1) * nbytes_per_rank / bw + (w - 1) * lat


def step(t_fwd, t_bwd, comm, buckets=8):
    """Bucketed all-reduce overlapped with backward: every bucket but the last can hide
    behind the backward of the layers below it."""
    if comm == 0:
        return t_fwd + t_bwd
    hidden = min(comm * (buckets - 1) / buckets, t_bwd * (buckets - 1) / buckets)
    return t_fwd + t_bwd + comm - hidden


def table(name, grad_bytes, t_compute, worlds, note):
    print(f"\n{name}: {grad_bytes / 1e6:.1f} MB of gradients, compute {t_compute * 1e3:.1f} ms/step ({note})")
    print("| link | W | all-reduce ms | step ms, no overlap | step ms, overlapped | efficiency (overlapped) |")
    print("| --- | --- | --- | --- | --- | --- |")
    t_fwd, t_bwd = t_compute / 3, 2 * t_compute / 3
    for link, (bw, lat) in LINKS.items():
        for w in worlds:
            c = allreduce(grad_bytes, w, bw, lat)
            plain = t_compute + c
            over = step(t_fwd, t_bwd, c)
            print(f"| {link} | {w} | {c * 1e3:.2f} | {plain * 1e3:.1f} | {over * 1e3:.1f} | {t_compute / over:.0%} |")


def main():
    mini = MINILM_PARAMS * 4
    table("MiniLM fine-tuning, 16 × 64 tokens per rank", mini, 1024 / 1256, [1, 8, 64],
          "measured on this 2-core CPU: 1 256 tokens/s; a CPU cluster over MPI")
    for t in (0.020, 0.005):
        table("MiniLM fine-tuning, 16 × 64 tokens per rank", mini, t, [1, 8, 64],
              "GPU placeholder, NOT measured")
    print("\nBag model's table: dense all-reduce against the all-gather of touched rows")
    print("| link | W | rows/rank/step | dense all-reduce ms | row all-gather ms | rows below which rows win |")
    print("| --- | --- | --- | --- | --- | --- |")
    for link, (bw, lat) in LINKS.items():
        for w in (8, 64):
            dense = allreduce(BAG_DENSE_EXCHANGE * 4, w, bw, lat)
            for label, k in ROWS.items():
                rows = allgather(k * ROW_BYTES, w, bw, lat)
                breakeven = int(2 * BAG_DENSE_EXCHANGE * 4 / (w * ROW_BYTES))
                print(f"| {link} | {w} | {k} ({label}) | {dense * 1e3:.2f} | {rows * 1e3:.3f} | {breakeven} |")


if __name__ == "__main__":
    main()

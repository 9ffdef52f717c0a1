"""End-to-end Mean Teacher training steps per second: dtrain against a PyTorch reference of
the same model and method on the same data and batch sizes, in one run.

The model is dtrain's bag model as configs/brown/mean_teacher.toml sets it: a mean
EmbeddingBag over the data set's hashed ids (2^20 buckets x 100), dropout 0.5 on the pooled
vector, a linear layer to the classes. A step reads B labeled and mu*B unlabeled documents
(B = 16, mu = 1 unless changed), runs the student and the EMA teacher (each with its own
dropout), and minimises cross-entropy on the labeled rows plus w * MSE between the two
softmaxes over all rows; the table takes lazy (sparse) Adam and the output layer AdamW, as
in dtrain; the teacher is updated by torch._foreach_lerp_ over every parameter (the usual
PyTorch way; dtrain's default updates only the table rows a step touches).

    python3 bench/peers/mean_teacher_torch.py --data runs/brown20/data \
        --dtrain target/release/dtrain --json bench/results/mean-teacher-vs-torch.json

Needs torch with a CUDA device for the peer (numpy and xxhash for reading the shards).
Written without a GPU at hand: it has not run yet (see the CUDA issue's notes).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests", "python"))
from dtrain_ref import read_shard  # noqa: E402


def load_split(data, split):
    """Every document of a split: flat ids, offsets (n+1) and labels, as numpy arrays."""
    manifest = json.load(open(os.path.join(data, "manifest.json")))
    ids, offsets, labels = [], [0], []
    for shard in manifest["splits"][split]["shards"]:
        s = read_shard(os.path.join(data, shard["file"]))
        for doc, label in zip(s["docs"], s["labels"]):
            ids.extend(doc)
            offsets.append(len(ids))
            labels.append(label)
    return (np.asarray(ids, dtype=np.int64), np.asarray(offsets, dtype=np.int64),
            np.asarray(labels, dtype=np.int64), manifest)


def torch_steps(args, train, unl, buckets, classes):
    """Seconds per Mean Teacher step of the PyTorch reference (median of --steps)."""
    import torch
    import torch.nn.functional as F

    dev = torch.device(args.device)
    torch.manual_seed(0)

    def to_dev(split):
        ids, off, lab = split
        return (torch.from_numpy(ids).to(dev), torch.from_numpy(off).to(dev), torch.from_numpy(lab).to(dev))

    train_d, unl_d = to_dev(train[:3]), to_dev(unl[:3])

    def gather(split, idx):
        """EmbeddingBag inputs (flat ids, offsets) of documents idx, built on the device."""
        ids, off, _ = split
        starts, lens = off[idx], off[idx + 1] - off[idx]
        new_off = torch.zeros_like(lens)
        new_off[1:] = torch.cumsum(lens, 0)[:-1]
        total = int(lens.sum())
        pos = torch.arange(total, device=dev) - torch.repeat_interleave(new_off, lens, output_size=total)
        pos += torch.repeat_interleave(starts, lens, output_size=total)
        return ids[pos], new_off

    class Bag(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.EmbeddingBag(buckets, args.dim, mode="mean", sparse=True)
            self.out = torch.nn.Linear(args.dim, classes)

        def forward(self, ids, off):
            return self.out(F.dropout(self.emb(ids, off), 0.5, training=True))

    student = Bag().to(dev)
    teacher = Bag().to(dev)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    opt_table = torch.optim.SparseAdam([student.emb.weight], lr=0.01)
    opt_dense = torch.optim.AdamW(student.out.parameters(), lr=0.01)
    s_params, t_params = list(student.parameters()), list(teacher.parameters())
    n_l, n_u = len(train[2]), len(unl[2])
    b, bu = args.batch_size, args.batch_size * args.ratio

    def step(t):
        li = torch.randint(0, n_l, (b,), device=dev)
        ui = torch.randint(0, n_u, (bu,), device=dev)
        lids, loff = gather(train_d, li)
        uids, uoff = gather(unl_d, ui)
        ids = torch.cat([lids, uids])
        off = torch.cat([loff, uoff + lids.numel()])
        zs = student(ids, off)
        with torch.no_grad():
            zt = teacher(ids, off)
        loss = F.cross_entropy(zs[:b], train_d[2][li])
        loss = loss + args.weight * F.mse_loss(F.softmax(zs, -1), F.softmax(zt, -1))
        opt_table.zero_grad(set_to_none=True)
        opt_dense.zero_grad(set_to_none=True)
        loss.backward()
        opt_table.step()
        opt_dense.step()
        alpha = min(1 - 1 / (t + 1), 0.99)
        with torch.no_grad():
            torch._foreach_lerp_(t_params, s_params, 1 - alpha)
        return loss

    for t in range(20):
        step(t)
    torch.cuda.synchronize()
    times = []
    for t in range(20, 20 + args.steps):
        start = time.perf_counter()
        loss = step(t)
        loss.item()  # the loss for logging, as dtrain reads its scalars every step
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2], float(loss)


def dtrain_steps(args):
    """Median step_ms of dtrain's Mean Teacher on the same data and batch sizes."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [args.dtrain, "--quiet", "train", "--config", "configs/brown/mean_teacher.toml",
               "--device", args.dtrain_device,
               "--set", f'data.dir="{args.data}"', "--set", f'train.out_dir="{out}"',
               "--set", f"train.steps={args.steps + 20}", "--set", f"train.batch_size={args.batch_size}",
               "--set", f"unlabeled.ratio={args.ratio}", "--set", "train.log_every=10",
               "--set", f"train.eval_every={args.steps + 20}"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
        ms = sorted(r["step_ms"] for r in recs if "step_ms" in r and r["step"] > 20)
        return ms[len(ms) // 2] / 1e3, cmd


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="a prepared data set (dtrain prepare)")
    ap.add_argument("--dtrain", help="the dtrain binary to compare (omit: PyTorch only)")
    ap.add_argument("--dtrain-device", default="cuda")
    ap.add_argument("--device", default="cuda", help="PyTorch's device")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--ratio", type=int, default=1, help="unlabeled rows per labeled row (mu)")
    ap.add_argument("--dim", type=int, default=100)
    ap.add_argument("--weight", type=float, default=1.0, help="consistency weight (no effect on speed)")
    ap.add_argument("--json")
    args = ap.parse_args()
    train = load_split(args.data, "train")
    unl = load_split(args.data, "unlabeled")
    manifest = train[3]
    buckets, classes = manifest["tokenizer"]["buckets"], len(manifest["labels"])
    print(f"data: {len(train[2])} labeled, {len(unl[2])} unlabeled documents; {buckets} buckets, {classes} classes")
    result = dict(batch_size=args.batch_size, ratio=args.ratio, steps=args.steps, dim=args.dim)
    secs, loss = torch_steps(args, train, unl, buckets, classes)
    print(f"pytorch eager: {secs * 1e3:.3f} ms/step ({1 / secs:.0f} steps/s), last loss {loss:.4f}")
    result["torch_seconds_per_step"] = secs
    if args.dtrain:
        d, cmd = dtrain_steps(args)
        print(f"dtrain ({args.dtrain_device}): {d * 1e3:.3f} ms/step ({1 / d:.0f} steps/s); "
              f"{secs / d:.2f}x PyTorch's steps/s")
        result.update(dtrain_seconds_per_step=d, dtrain_command=" ".join(cmd), speedup=secs / d)
    if args.json:
        import torch
        rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
        result["provenance"] = dict(command=" ".join(sys.argv), date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                    git_revision=rev.stdout.strip() or "unknown", machine=platform.node(),
                                    device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                                    torch=torch.__version__)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print("wrote", args.json)


if __name__ == "__main__":
    main()

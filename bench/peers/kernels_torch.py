"""PyTorch eager doing the work of `dtrain bench kernels`, on the same sizes, for the same
table: the consistency loss (KL(softmax(t) || softmax(s)) forward and backward to the
student's logits) at B x C = 2^20..2^26 for C in 16, 1024, 32768; the EMA update with
torch._foreach_lerp_ and AdamW (fused) at 2^20..2^max parameters; and the copy bandwidth.
GB/s are counted against the same byte floors as dtrain's (12 bytes per logit, 12 per
EMA parameter, 28 per AdamW parameter), so the two tables compare directly.

    python3 bench/peers/kernels_torch.py --json bench/results/kernels-torch.json

Not run by the test suite; needs torch with a CUDA device. Written without a GPU at hand:
it has not run yet (see the CUDA issue's notes).
"""

import argparse
import json
import platform
import subprocess
import time

import torch
import torch.nn.functional as F


def timed(fn, iters=20):
    """Median seconds of fn() over iters calls, each timed with CUDA events."""
    fn()
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    times.sort()
    return times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-log2", type=int, default=30)
    ap.add_argument("--json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)

    n = 1 << 26
    src = torch.rand(n, device=dev)
    dst = torch.empty_like(src)
    copy_gbs = 8 * n / timed(lambda: dst.copy_(src)) / 1e9
    del src, dst
    rows = []

    def row(kernel, elements, shape, floor, secs):
        gbs = floor / secs / 1e9
        rows.append(dict(kernel=kernel, elements=elements, shape=shape, floor_bytes=floor,
                         seconds=secs, gbs=gbs, percent_of_copy=100 * gbs / copy_gbs))
        print(f"{kernel:<26} {elements:>12} {shape:>14} {secs * 1e6:>10.1f} us {gbs:>8.1f} GB/s "
              f"{100 * gbs / copy_gbs:>6.1f}%")

    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}; copy {copy_gbs:.1f} GB/s")
    for log2 in range(20, min(26, args.max_log2) + 1, 2):
        total = 1 << log2
        for classes in (16, 1024, 32768):
            b = total // classes
            zs = (torch.rand(b, classes, device=dev) - 0.5).requires_grad_(True)
            zt = torch.rand(b, classes, device=dev) - 0.5

            def step():
                zs.grad = None
                loss = F.kl_div(F.log_softmax(zs, dim=-1), F.softmax(zt, dim=-1), reduction="batchmean")
                loss.backward()

            row("consistency kl (eager)", total, f"{b} x {classes}", 12 * total, timed(step))
            del zs, zt
    for log2 in range(20, args.max_log2 + 1, 2):
        k = 1 << log2
        params = torch.rand(k, device=dev)
        shadow = torch.rand(k, device=dev)
        row("ema (_foreach_lerp_)", k, "", 12 * k,
            timed(lambda: torch._foreach_lerp_([shadow], [params], 1 - 0.999)))
        del shadow
        p = torch.nn.Parameter(params)
        p.grad = torch.rand(k, device=dev)
        opt = torch.optim.AdamW([p], lr=1e-3, weight_decay=0.01, fused=True)
        row("adamw (fused)", k, "", 28 * k, timed(opt.step))
        del p, opt, params
        torch.cuda.empty_cache()
    if args.json:
        rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
        out = dict(provenance=dict(command="python3 bench/peers/kernels_torch.py", date=time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime()), git_revision=rev.stdout.strip() or "unknown",
            machine=platform.node(), device=torch.cuda.get_device_name(), torch=torch.__version__),
            copy_gbs=copy_gbs, rows=rows)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print("wrote", args.json)


if __name__ == "__main__":
    main()

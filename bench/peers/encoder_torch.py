"""PyTorch doing the work of `dtrain bench encoder`, in the same run: a pretrained BERT-family
encoder (models/minilm) read from the same safetensors file, forward and forward+backward
passes on the same random batch shape, in eager mode and under torch.compile, at f32, TF32
and bf16 (autocast); and dtrain's own `bench encoder` on the same device at each precision.
Tokens/s and model FLOP/s are counted the same way for both (2 flops per multiply-add of
the layers' GEMMs and attention's two products; forward + backward = 3x forward), and
model FLOPs utilisation against the device's dense peak where the device is known.

    python3 bench/peers/encoder_torch.py --dtrain target/gpu/dtrain --json bench/results/encoder-vs-torch.json

Before timing, the peer's f32 forward is checked against `dtrain embed` on a few texts
(mean-pooled vectors within 1e-3), so both sides run the same model.

What differs: PyTorch's bf16 is autocast (the linear layers, attention's products and
the softmax's input in bf16); dtrain's `--matmul bf16` rounds only the linear layers'
operands and keeps attention in f32. Not run by the test suite; written without a GPU at
hand: it has not run yet (see the encoder issue's notes).
"""

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

# Dense peak TFLOP/s by device name and precision (NVIDIA's data sheets, without sparsity).
PEAKS = {
    "H100 80GB HBM3": {"f32": 67.0, "tf32": 494.7, "bf16": 989.4},  # SXM
    "H100 PCIe": {"f32": 51.2, "tf32": 378.0, "bf16": 756.0},
    "H200": {"f32": 67.0, "tf32": 494.7, "bf16": 989.4},
}


def peak(name, precision):
    for key, p in PEAKS.items():
        if key in name:
            return p[precision]
    return None


class Bert:
    """BERT (post-LN, exact GELU), mean pooling and a linear head, from Hugging Face names."""

    def __init__(self, model_dir, classes, device):
        with open(os.path.join(model_dir, "config.json")) as f:
            self.cfg = json.load(f)
        t = load_file(os.path.join(model_dir, "model.safetensors"))
        self.t = {k.removeprefix("bert."): v.float().to(device).requires_grad_() for k, v in t.items()}
        h = self.cfg["hidden_size"]
        g = torch.Generator().manual_seed(0)
        self.t["head.weight"] = (torch.randn(classes, h, generator=g) * 0.02).to(device).requires_grad_()
        self.t["head.bias"] = torch.zeros(classes, device=device, requires_grad=True)

    def params(self):
        return list(self.t.values())

    def pooled(self, ids, mask):
        t, c = self.t, self.cfg
        h, heads, eps = c["hidden_size"], c["num_attention_heads"], c["layer_norm_eps"]
        b, n = ids.shape
        d = h // heads
        x = t["embeddings.word_embeddings.weight"][ids] + t["embeddings.position_embeddings.weight"][:n] \
            + t["embeddings.token_type_embeddings.weight"][0]
        x = F.layer_norm(x, (h,), t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"], eps)
        attn_mask = mask[:, None, None, :].bool()
        for k in range(c["num_hidden_layers"]):
            p = f"encoder.layer.{k}."

            def lin(name, v):
                return F.linear(v, t[p + name + ".weight"], t[p + name + ".bias"])

            q, kk, v = (lin(f"attention.self.{w}", x).view(b, n, heads, d).transpose(1, 2)
                        for w in ("query", "key", "value"))
            ctx = F.scaled_dot_product_attention(q, kk, v, attn_mask=attn_mask)
            ctx = ctx.transpose(1, 2).reshape(b, n, h)
            x = F.layer_norm(x + lin("attention.output.dense", ctx), (h,),
                             t[p + "attention.output.LayerNorm.weight"], t[p + "attention.output.LayerNorm.bias"], eps)
            inner = F.gelu(lin("intermediate.dense", x))
            x = F.layer_norm(x + lin("output.dense", inner), (h,),
                             t[p + "output.LayerNorm.weight"], t[p + "output.LayerNorm.bias"], eps)
        m = mask[:, :, None].to(x.dtype)
        return (x * m).sum(1) / m.sum(1)

    def logits(self, ids, mask):
        return F.linear(self.pooled(ids, mask), self.t["head.weight"], self.t["head.bias"])


def write_random_weights(model_dir):
    """model.safetensors for config.json's shapes with random weights (normal 0.02, LayerNorm
    1 and 0), Hugging Face names: for a machine that has MiniLM's config.json and
    tokenizer.json but not its 90 MB of weights (the GPU machine's carry holds 64 MiB).
    Throughput does not depend on the values, and both sides read the same file."""
    from safetensors.torch import save_file
    with open(os.path.join(model_dir, "config.json")) as f:
        c = json.load(f)
    h, i, g = c["hidden_size"], c["intermediate_size"], torch.Generator().manual_seed(0)
    shapes = {"embeddings.word_embeddings.weight": (c["vocab_size"], h),
              "embeddings.position_embeddings.weight": (c["max_position_embeddings"], h),
              "embeddings.token_type_embeddings.weight": (c.get("type_vocab_size", 2), h),
              "embeddings.LayerNorm.weight": (h,), "embeddings.LayerNorm.bias": (h,)}
    for k in range(c["num_hidden_layers"]):
        p = f"encoder.layer.{k}."
        for name, (rows, cols) in [("attention.self.query", (h, h)), ("attention.self.key", (h, h)),
                                   ("attention.self.value", (h, h)), ("attention.output.dense", (h, h)),
                                   ("intermediate.dense", (i, h)), ("output.dense", (h, i))]:
            shapes[p + name + ".weight"] = (rows, cols)
            shapes[p + name + ".bias"] = (rows,)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[p + ln + ".weight"] = (h,)
            shapes[p + ln + ".bias"] = (h,)
    t = {}
    for name, shape in shapes.items():
        if "LayerNorm" in name:
            t[name] = torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
        else:
            t[name] = torch.randn(shape, generator=g) * 0.02
    save_file(t, os.path.join(model_dir, "model.safetensors"))
    print(f"wrote random weights to {model_dir}/model.safetensors")


def parity(model, dtrain, model_dir, device):
    """Largest difference between the peer's and `dtrain embed`'s pooled vectors."""
    texts = ["The quick brown fox jumps over the lazy dog.", "Semi-supervised learning needs few labels."]
    out = subprocess.run([dtrain, "embed", "--model", model_dir, *texts], check=True, capture_output=True, text=True)
    worst = 0.0
    with torch.no_grad():
        for row in map(json.loads, out.stdout.splitlines()):
            ids = torch.tensor([row["ids"]], device=device)
            got = model.pooled(ids, torch.ones_like(ids))[0].double().cpu()
            worst = max(worst, float((got - torch.tensor(row["pooled"], dtype=torch.float64)).abs().max()))
    return worst


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats, device):
    """Median, min and max seconds of fn() over `repeats` calls after two warm-ups."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"min": times[0], "median": times[len(times) // 2], "max": times[-1]}


def forward_flops(cfg, batch, n):
    h, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    return 2.0 * batch * n * layers * (4 * h * h + 2 * h * i + 2 * n * h)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/minilm")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--len", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precisions", nargs="+", default=["f32", "tf32", "bf16"])
    ap.add_argument("--modes", nargs="+", default=["eager", "compile"])
    ap.add_argument("--dtrain", help="a dtrain binary: the parity check and its own bench encoder, same run")
    ap.add_argument("--random-weights", action="store_true",
                    help="write random weights of config.json's shapes when model.safetensors is missing")
    ap.add_argument("--json")
    args = ap.parse_args()
    device = torch.device(args.device)
    random = args.random_weights and not os.path.exists(os.path.join(args.model, "model.safetensors"))
    if random:
        write_random_weights(args.model)
    torch.manual_seed(0)
    model = Bert(args.model, 15, device)
    cfg = model.cfg
    n = min(args.len, cfg["max_position_embeddings"])
    # dtrain's bench batch: token t of sequence i is mix64(i*1000+t) mod vocab; any ids do
    # for timing, so these are torch's.
    ids = torch.randint(0, cfg["vocab_size"], (args.batch, n), device=device)
    mask = torch.ones_like(ids)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    flops = forward_flops(cfg, args.batch, n)
    result = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "device": name, "torch": torch.__version__, "batch": args.batch, "len": n,
              "weights": "random" if random else "pretrained",
              "forward_flops": flops, "rows": []}
    if args.dtrain:
        torch.backends.cuda.matmul.allow_tf32 = False
        result["parity_max_abs_diff"] = parity(model, args.dtrain, args.model, device)
        print(f"peer vs dtrain embed: largest pooled difference {result['parity_max_abs_diff']:.2e}")
        assert result["parity_max_abs_diff"] < 1e-3, "the peer does not compute dtrain's model"
    print(f"{'who':<8} {'mode':<8} {'precision':<9} {'pass':<17} {'median s':>9} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6}")

    def row(who, mode, precision, what, spread, mult):
        tps = args.batch * n / spread["median"]
        tf = mult * flops / spread["median"] / 1e12
        pk = peak(name, precision) if device.type == "cuda" else None
        mfu = tf / pk if pk else None
        result["rows"].append({"who": who, "mode": mode, "precision": precision, "pass": what, **spread,
                               "tokens_per_s": tps, "tflops": tf, "mfu": mfu})
        print(f"{who:<8} {mode:<8} {precision:<9} {what:<17} {spread['median']:>9.4f} {tps:>10.0f} {tf:>8.2f} "
              f"{'' if mfu is None else f'{100 * mfu:.1f}%':>6}")

    for precision in args.precisions:
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        torch.backends.cudnn.allow_tf32 = precision == "tf32"
        for mode in args.modes:
            fwd = torch.compile(model.logits) if mode == "compile" else model.logits

            def forward():
                with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
                    fwd(ids, mask)

            def forward_backward():
                for p in model.params():
                    p.grad = None
                with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
                    out = fwd(ids, mask)
                (out.float() * 1e-2).sum().backward()

            row("torch", mode, precision, "forward", timed(forward, args.repeat, device), 1)
            row("torch", mode, precision, "forward+backward", timed(forward_backward, args.repeat, device), 3)
        if args.dtrain:
            out = "/tmp/dtrain-bench-encoder.json"
            dev = "cuda:0" if device.type == "cuda" else "cpu"
            subprocess.run([args.dtrain, "bench", "encoder", "--model", args.model, "--batch", str(args.batch),
                            "--len", str(n), "--repeat", str(args.repeat), "--device", dev, "--matmul", precision,
                            "--json", out], check=True, stdout=subprocess.DEVNULL)
            d = json.load(open(out))
            row("dtrain", "", precision, "forward", {k: d["forward"][k] for k in ("min", "median", "max")}, 1)
            row("dtrain", "", precision, "forward+backward",
                {k: d["forward_backward"][k] for k in ("min", "median", "max")}, 3)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

"""Pretraining speed and output against fastText skip-gram, on identical text.

Writes the word sequences dtrain pretrains on (the data set's splits, words joined by
spaces, one document per line) to a text file, then times, interleaved, whole processes:
  dtrain pretrain  (config given; checkpoints off)
  fastText train_unsupervised(skipgram) with the same dim, window, negatives, epochs,
  min_count, character n-grams, subsampling, learning rate, threads and buckets.
Prints wall times, words/s/thread (trained-word tokens × epochs / wall seconds) and the
ratio; also each tool's own words/s/thread figure (dtrain's metrics.jsonl; fastText's
verbose log).

  .venv/bin/python bench/pretrain_vs_fasttext.py --data runs/brown20/data \
      --config configs/brown/pretrain.toml --threads 1 --repeat 3 --json OUT.json
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time
import tomllib

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "python"))
import dtrain_ref  # noqa: E402

FT_SCRIPT = r"""
import sys, fasttext
a = dict(arg.split("=", 1) for arg in sys.argv[2:])
m = fasttext.train_unsupervised(sys.argv[1], model=a["model"], dim=int(a["dim"]), ws=int(a["ws"]),
    neg=int(a["neg"]), epoch=int(a["epoch"]), minCount=int(a["minCount"]), minn=int(a["minn"]),
    maxn=int(a["maxn"]), t=float(a["t"]), lr=float(a["lr"]), thread=int(a["thread"]),
    bucket=int(a["bucket"]), verbose=2)
if a.get("save"):
    m.save_model(a["save"])
"""


def export_text(data, splits, path):
    manifest = json.load(open(os.path.join(data, "manifest.json")))
    vocab = dtrain_ref.read_vocab(os.path.join(data, "vocab.bin"))
    tokens = 0
    with open(path, "w", encoding="utf-8") as out:
        for split in splits:
            for i in range(manifest["num_shards"]):
                shard = dtrain_ref.read_shard(os.path.join(data, f"{split}-{i:05}.shard"))
                for doc in shard["words"]:
                    if doc:
                        out.write(" ".join(vocab[w] for w in doc) + "\n")
                        tokens += len(doc)
    return manifest, tokens


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--dtrain", default="target/release/dtrain")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work", default="runs/pretrain_bench")
    ap.add_argument("--json")
    args = ap.parse_args()
    cfg = tomllib.load(open(args.config, "rb"))
    model, train = cfg.get("model", {}), cfg.get("train", {})
    splits = cfg.get("data", {}).get("splits", ["train", "unlabeled"])
    os.makedirs(args.work, exist_ok=True)
    text = os.path.join(args.work, "text.txt")
    manifest, tokens = export_text(args.data, splits, text)
    g = lambda d, k, v: d.get(k, v)  # noqa: E731
    p = dict(model="cbow" if g(model, "objective", "skipgram") == "cbow" else "skipgram",
             dim=g(model, "dim", 100), ws=g(model, "window", 5), neg=g(model, "negatives", 5),
             epoch=g(train, "epochs", 5), minCount=g(model, "min_count", 5),
             minn=g(model, "char_ngram_min", 3), maxn=g(model, "char_ngram_max", 6),
             t=g(model, "subsample", 1e-4), lr=g(train, "lr", 0.05), thread=args.threads,
             bucket=manifest["tokenizer"]["buckets"])
    ft_cmd = [sys.executable, "-c", FT_SCRIPT, text] + [f"{k}={v}" for k, v in p.items()]
    out = os.path.join(args.work, "dtrain")
    dt_cmd = [args.dtrain, "--quiet", "pretrain", "--config", args.config,
              "--set", f'data.dir="{args.data}"', "--set", f'train.out_dir="{out}"',
              "--set", f"train.threads={args.threads}", "--set", "train.checkpoint_every=0"]
    runs = {"dtrain": [], "fasttext": []}
    own = {"dtrain": [], "fasttext": []}
    for r in range(args.repeat + 1):
        for name, cmd in (("dtrain", dt_cmd), ("fasttext", ft_cmd)):
            if name == "dtrain" and os.path.exists(out):
                subprocess.run(["rm", "-rf", out], check=True)
            t0 = time.perf_counter()
            res = subprocess.run(cmd, capture_output=True, text=True)
            dt = time.perf_counter() - t0
            if res.returncode != 0:
                sys.exit(f"{name} failed:\n{res.stdout}\n{res.stderr}")
            if r == 0:
                continue  # warm-up
            runs[name].append(dt)
            if name == "dtrain":
                recs = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
                n = sum(x["words_per_s"] * x["seconds"] for x in recs)
                own[name].append(n / sum(x["seconds"] for x in recs) / args.threads)
            else:
                m = re.findall(r"words/sec/thread:\s*(\d+)", res.stderr + res.stdout)
                own[name].append(float(m[-1]) if m else float("nan"))
            print(f"run {r}: {name} {dt:.2f} s", flush=True)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    # Trained-word tokens per epoch (words seen min_count times), what both tools count.
    vocab_counts = {}
    for line in open(text, encoding="utf-8"):
        for w in line.split():
            vocab_counts[w] = vocab_counts.get(w, 0) + 1
    trained = sum(c for c in vocab_counts.values() if c >= p["minCount"])
    result = dict(params=p, text_tokens=tokens, trained_tokens_per_epoch=trained,
                  wall_s=runs, own_words_per_s_per_thread=own)
    for name in runs:
        w = med(runs[name])
        result[f"{name}_wall_median_s"] = w
        result[f"{name}_words_per_s_per_thread"] = trained * p["epoch"] / w / args.threads
    pair = sorted(f / d for d, f in zip(runs["dtrain"], runs["fasttext"]))
    result["ratio_dtrain_over_fasttext_pairwise_median"] = med(pair)
    result["ratio_own_figures"] = med(own["dtrain"]) / med(own["fasttext"])
    print(json.dumps(result, indent=1))
    if args.json:
        json.dump(result, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()

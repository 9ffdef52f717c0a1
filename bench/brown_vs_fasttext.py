"""dtrain vs fastText on Brown genre, on identical splits: (a) all training labels,
(b) 20 labels per class; 20% of each class held out for testing; several seeds.

For each seed this script de-duplicates the data (lower-cased, whitespace-normalised text,
first occurrence wins), draws a stratified split, writes the same train and test files for
both tools, trains fastText (dim 100, word bigrams, 25 epochs, its other defaults) through
the fasttext-wheel package, and dtrain with configs/brown/supervised.toml on data prepared
from those files (--test-input; no validation split, so both train on the same documents).
Hyperparameters are fixed in advance; nothing is tuned on the test split.

Usage (from the repository root, after `cargo build --release`):
    .venv/bin/pip install fasttext-wheel==0.9.2
    .venv/bin/python bench/brown_vs_fasttext.py --seeds 1 2 3 --out runs/vs_fasttext
    # dtrain with fastText's own recipe (SGD) instead of configs/brown/supervised.toml:
    .venv/bin/python bench/brown_vs_fasttext.py --config configs/brown/fasttext.toml --out runs/vs_fasttext_sgd
Writes runs/vs_fasttext/results.json and prints a Markdown table.
"""

import argparse
import gzip
import json
import os
import random
import statistics
import subprocess
import time

import fasttext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTRAIN = os.path.join(ROOT, "target", "release", "dtrain")


def load():
    seen, rows = set(), []
    with gzip.open(os.path.join(ROOT, "data", "brown_genre.tsv.gz"), "rt", encoding="utf-8") as f:
        for line in f:
            label, text = line.rstrip("\n").split("\t", 1)
            key = " ".join(text.lower().split())
            if key not in seen:
                seen.add(key)
                rows.append((label, text))
    return rows


def split(rows, seed, k):
    rng = random.Random(seed)
    by = {}
    for label, text in rows:
        by.setdefault(label, []).append(text)
    train, test = [], []
    for label in sorted(by):
        texts = by[label][:]
        rng.shuffle(texts)
        n_test = round(0.2 * len(texts))
        test += [(label, t) for t in texts[:n_test]]
        rest = texts[n_test:]
        train += [(label, t) for t in (rest if k is None else rest[:k])]
    rng.shuffle(train)
    return train, test


def write(path, rows, fasttext_format):
    with open(path, "w", encoding="utf-8") as f:
        for label, text in rows:
            f.write(f"__label__{label} {text}\n" if fasttext_format else f"{label}\t{text}\n")


def run_fasttext(d, train, test, seed):
    tr, te = os.path.join(d, "train.ft"), os.path.join(d, "test.ft")
    write(tr, train, True)
    write(te, test, True)
    start = time.time()
    model = fasttext.train_supervised(tr, dim=100, wordNgrams=2, epoch=25, thread=2, seed=seed, verbose=0)
    secs = time.time() - start
    n, p_at_1, _ = model.test(te)
    return {"accuracy": p_at_1, "test_documents": n, "seconds": secs}


def run_dtrain(d, train, test, seed, config):
    tr, te = os.path.join(d, "train.tsv"), os.path.join(d, "test.tsv")
    write(tr, train, False)
    write(te, test, False)
    data, out = os.path.join(d, "data"), os.path.join(d, "dtrain")
    subprocess.run([DTRAIN, "prepare", "--quiet", "--input", tr, "--test-input", te, "--val-fraction", "0",
                    "--out", data, "--force"], check=True, capture_output=True)
    if os.path.exists(out):
        subprocess.run(["rm", "-rf", out], check=True)
    start = time.time()
    subprocess.run([DTRAIN, "train", "--quiet", "--config", os.path.join(ROOT, config),
                    "--set", f'data.dir="{data}"', "--set", f'train.out_dir="{out}"', "--set", f"train.seed={seed}"],
                   check=True, capture_output=True)
    secs = time.time() - start
    with open(os.path.join(out, "metrics.jsonl")) as f:
        test_line = [json.loads(line) for line in f if '"split":"test"' in line][-1]
    return {"accuracy": test_line["accuracy"], "macro_f1": test_line["macro_f1"], "seconds": secs}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--out", default="runs/vs_fasttext")
    ap.add_argument("--config", default="configs/brown/supervised.toml", help="dtrain's training config")
    args = ap.parse_args()
    rows = load()
    results = []
    for setting, k in [("all labels", None), ("20 labels per class", 20)]:
        for seed in args.seeds:
            d = os.path.join(args.out, f"{'all' if k is None else k}-seed{seed}")
            os.makedirs(d, exist_ok=True)
            train, test = split(rows, seed, k)
            ft = run_fasttext(d, train, test, seed)
            dt = run_dtrain(d, train, test, seed, args.config)
            r = {"setting": setting, "seed": seed, "train_documents": len(train), "test_documents": len(test),
                 "fasttext": ft, "dtrain": dt}
            print(json.dumps(r), flush=True)
            results.append(r)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print("\n| setting | train docs | fastText accuracy | dtrain accuracy | dtrain macro-F1 |")
    print("|---|---|---|---|---|")
    for setting in ["all labels", "20 labels per class"]:
        rs = [r for r in results if r["setting"] == setting]
        ft = [r["fasttext"]["accuracy"] for r in rs]
        dt = [r["dtrain"]["accuracy"] for r in rs]
        f1 = [r["dtrain"]["macro_f1"] for r in rs]
        sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
        print(f"| {setting} | {rs[0]['train_documents']} | {100 * statistics.mean(ft):.1f} ± {100 * sd(ft):.1f} | "
              f"{100 * statistics.mean(dt):.1f} ± {100 * sd(dt):.1f} | {100 * statistics.mean(f1):.1f} ± {100 * sd(f1):.1f} |")


if __name__ == "__main__":
    main()

"""Ablations of FixMatch, the method that gained most on Brown genre with 20 labels per
class (from scratch): stabilisers, consistency weight, augmentation strength, threshold.
Each row changes one thing from the base setting (the one chosen on validation in
bench/brown_methods.py) and runs on seeds 1-3; prints and writes test accuracy and the
paired difference from supervised-only (dropout 0.5, the chosen supervised setting).
These are analyses after the choice, so test accuracy is reported; nothing here was
chosen on it.

  python3 bench/brown_ablations.py --seeds 1 2 3 --json bench/results/brown-ablations.json
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import brown_methods as bm  # noqa: E402

BASE = ["consistency.weight=0.1", 'consistency.adaptive_threshold="freematch"',
        "consistency.distribution_alignment=true", "consistency.stabiliser_momentum=0.9"]
ROWS = [
    ("base: λ 0.1, FreeMatch + DA", []),
    ("stabilisers: none (τ 0.95)", ['consistency.adaptive_threshold="fixed"', "consistency.distribution_alignment=false"]),
    ("stabilisers: DA only (τ 0.95)", ['consistency.adaptive_threshold="fixed"']),
    ("stabilisers: FreeMatch only", ["consistency.distribution_alignment=false"]),
    ("stabilisers: FlexMatch + DA (τ 0.95)", ['consistency.adaptive_threshold="flexmatch"']),
    ("threshold: fixed τ 0.5 + DA", ['consistency.adaptive_threshold="fixed"', "consistency.threshold=0.5"]),
    ("threshold: fixed τ 0.8 + DA", ['consistency.adaptive_threshold="fixed"', "consistency.threshold=0.8"]),
    ("weight λ 0.03", ["consistency.weight=0.03"]),
    ("weight λ 0.3", ["consistency.weight=0.3"]),
    ("weight λ 1", ["consistency.weight=1.0"]),
    ("augmentation off (deletion = replacement = 0)", ["augment.deletion=0", "augment.replacement=0"]),
    ("augmentation 0.2 / 0.2", ["augment.deletion=0.2", "augment.replacement=0.2"]),
    ("augmentation 0.4 / 0.4", ["augment.deletion=0.4", "augment.replacement=0.4"]),
    ("dropout 0 (weak view without noise)", ["model.embed_dropout=0"]),
    ("μ 3", ["unlabeled.ratio=3"]),
]


def run(dt, data, out, seed, config, sets):
    subprocess.run(["rm", "-rf", out], check=True)
    args = [dt, "--quiet", "train", "--config", config, "--set", f'data.dir="{data}"', "--set",
            f'train.out_dir="{out}"', "--set", f"train.seed={seed}"]
    for s in sets:
        args += ["--set", s]
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    recs = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    subprocess.run(["rm", "-rf", os.path.join(out, "checkpoints")], check=True)
    test = [r for r in recs if r.get("split") == "test" and r.get("model") is None][-1]["accuracy"]
    steps = [r for r in recs if "split" not in r]
    return dict(test=test, mask_ratio=statistics.mean(r.get("mask_ratio", 0) for r in steps),
                pseudo_label_accuracy=statistics.mean(r.get("pseudo_label_accuracy", 0) for r in steps))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--data-root", default="runs/brown_pretrain")
    ap.add_argument("--out", default="runs/brown_ablations")
    ap.add_argument("--dtrain", default="target/release/dtrain")
    ap.add_argument("--json")
    a = ap.parse_args()
    data = lambda s: os.path.join(a.data_root, f"seed{s}", "pool", "data")
    sup = {s: run(a.dtrain, data(s), os.path.join(a.out, "sup"), s, "configs/brown/supervised.toml",
                  ["model.embed_dropout=0.5"])["test"] for s in a.seeds}
    result = {"supervised": sup, "rows": []}
    for name, sets in ROWS:
        per = {s: run(a.dtrain, data(s), os.path.join(a.out, "x"), s, "configs/brown/fixmatch.toml", BASE + sets)
               for s in a.seeds}
        diffs = [per[s]["test"] - sup[s] for s in a.seeds]
        row = dict(name=name, sets=BASE + sets, per_seed=per,
                   test=(statistics.mean(p["test"] for p in per.values()), statistics.stdev(p["test"] for p in per.values())),
                   paired=(statistics.mean(diffs), statistics.stdev(diffs)),
                   mask_ratio=statistics.mean(p["mask_ratio"] for p in per.values()),
                   pseudo_label_accuracy=statistics.mean(p["pseudo_label_accuracy"] for p in per.values()))
        result["rows"].append(row)
        print(f"{name:48} test {100 * row['test'][0]:.2f} ± {100 * row['test'][1]:.2f}   paired "
              f"{100 * row['paired'][0]:+.2f} ± {100 * row['paired'][1]:.2f}   mask {row['mask_ratio']:.3f}   "
              f"pl acc {row['pseudo_label_accuracy']:.3f}", flush=True)
    if a.json:
        result["provenance"] = bm.provenance("python3 bench/brown_ablations.py --seeds " + " ".join(map(str, a.seeds)))
        json.dump(result, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()

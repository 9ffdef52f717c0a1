"""Does skip-gram pretraining on unlabeled text help the bag classifier with 20 labels per
class? Brown genre, per seed (split and training seed together):
  scratch     configs/brown/supervised.toml
  pool        dtrain pretrain on the data set's train + unlabeled splits (the 12k-paragraph
              pool), then configs/brown/pretrained.toml
  pool+100k   the same with the 100k unlabeled sentences added to the unlabeled split
Prints and writes test accuracy and macro-F1 per seed and mean ± sd.

  python3 bench/brown_pretrain.py --seeds 1 2 3 --out runs/brown_pretrain --json OUT.json
"""
import argparse
import json
import os
import statistics
import subprocess

BROWN = "../shared/data/brown_genre.tsv.gz"
SENTENCES = "../shared/data/nlp_corpus_en_sentences.txt.gz"


def sh(*cmd):
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def train(dt, cfg, data, out, seed, extra=()):
    sh(dt, "--quiet", "train", "--config", cfg, "--set", f'data.dir="{data}"', "--set", f'train.out_dir="{out}"',
       "--set", f"train.seed={seed}", *extra)
    recs = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    test = [r for r in recs if r.get("split") == "test"][-1]
    val = [r for r in recs if r.get("split") == "val"][-1]
    return dict(test_accuracy=test["accuracy"], test_macro_f1=test["macro_f1"], val_accuracy=val["accuracy"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--out", default="runs/brown_pretrain")
    ap.add_argument("--dtrain", default="target/release/dtrain")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args()
    dt, rows = a.dtrain, []
    for seed in a.seeds:
        base = os.path.join(a.out, f"seed{seed}")
        row = dict(seed=seed)
        for name, unl in (("pool", []), ("pool+100k", ["--unlabeled", SENTENCES])):
            data = os.path.join(base, name, "data")
            sh(dt, "--quiet", "prepare", "--config", "configs/brown/prepare.toml", "--input", BROWN, *unl,
               "--seed", str(seed), "--out", data, "--force")
            if name == "pool":
                row["scratch"] = train(dt, "configs/brown/supervised.toml", data, os.path.join(base, "scratch"), seed)
            pre = os.path.join(base, name, "pretrain")
            sh("rm", "-rf", pre)
            sh(dt, "--quiet", "pretrain", "--config", "configs/brown/pretrain.toml", "--set", f'data.dir="{data}"',
               "--set", f'train.out_dir="{pre}"', "--set", f"train.seed={seed}",
               "--set", f"train.threads={a.threads}", "--set", "train.checkpoint_every=0")
            row[name] = train(dt, "configs/brown/pretrained.toml", data, os.path.join(base, name, "train"), seed,
                              ("--set", f'model.init_from="{pre}"'))
            sh("rm", "-f", os.path.join(pre, "embeddings.safetensors"))
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {}
    for name in ("scratch", "pool", "pool+100k"):
        for k in ("test_accuracy", "test_macro_f1", "val_accuracy"):
            xs = [r[name][k] * 100 for r in rows]
            summary[f"{name}.{k}"] = [statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0]
    for k, (m, s) in summary.items():
        print(f"{k:32} {m:5.1f} ± {s:.1f}")
    if a.json:
        json.dump(dict(seeds=rows, summary=summary), open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()

"""A linear student on frozen features: how much of the spread labels' quality a student
keeps when it reads what the graph read, outside dtrain (scikit-learn), on Brown genre with
20 labels per class, seeds 1-3.

Per seed, every row's features are
  M  MiniLM's mean-pooled vectors of up to 256 WordPiece tokens, stored by
       dtrain embed --model models/minilm --data runs/brown_encoder/seedN/data-256 \
           --out runs/brown_encoder/seedN/vectors-minilm-256.safetensors
  S  the mean of the seed's skip-gram word vectors, stored by
       dtrain embed --model runs/brown_bag_ls/seedN/pretrain --data runs/brown_bag_ls/seedN/data \
           --out runs/brown_bag_ls/seedN/vectors-skipgram.safetensors
     (both made with $DTRAIN_BIN when missing; each centred, then unit length again)
  T  TF-IDF of the paragraph's lowercased words (scikit-learn's TfidfVectorizer: sublinear
     tf, words of at least 2 rows; the text found by the row's sample id in
     ../shared/data/brown_genre.tsv.gz with duplicates dropped, as `dtrain prepare` does,
     and checked against every labeled row's class)
and a multinomial logistic regression (L2, C in {0.3, 1, 3, 10} chosen on val) is fitted
  labels   on the 300 training labels alone (the supervised baseline of the probe), or
  spread   on those and the unlabeled split's argmax of dtrain's spread labels (the aligned
           three-view 256-token file of bench/brown_bag_propagate.py --students
           three-view-256-aligned, made when missing), each row weighted by its spread
           probability; val and test rows are never fitted (inductive).
Feature sets: M+S+T, M alone, S+T. Test accuracy of the val-chosen C is reported.

Needs numpy, scipy, scikit-learn and safetensors (not in the project's .venv):
  python3 -m venv /tmp/probe && /tmp/probe/bin/pip install numpy scipy scikit-learn safetensors xxhash
  /tmp/probe/bin/python bench/brown_frozen_probe.py --seeds 1 2 3 --json bench/results/brown-frozen-probe.json
"""
import argparse
import gzip
import json
import os
import statistics
import sys

import numpy as np
import scipy.sparse as sp
from safetensors.numpy import load_file
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

sys.path.insert(0, os.path.dirname(__file__))
import brown_bag_propagate as bp  # noqa: E402
import brown_methods as bm  # noqa: E402
import brown_oracle as bo  # noqa: E402

BIN = os.environ.get("DTRAIN_BIN", "./target/release/dtrain")
DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "brown_genre.tsv.gz")
CS = [0.3, 1, 3, 10]


def stored(model, data, out):
    """The rows' vectors of `data` by `model` (stored by `dtrain embed --data` when missing)."""
    t = load_file(bp.stored(BIN, model, data, out))
    return t["vectors"], t["split"], t["label"], t["sample_id"]


def centred(v):
    has = np.abs(v).sum(1) > 0
    v = v.astype(np.float64)
    v[has] -= v[has].mean(0)
    n = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.where(n > 0, n, 1)


def paragraphs():
    """(class, text) of every distinct paragraph, in `prepare`'s sample-id order."""
    seen, out = set(), []
    for line in gzip.open(DATA, "rt", encoding="utf-8"):
        line = line.rstrip("\n")
        if not line.strip():
            continue
        label, text = line.split("\t", 1)
        key = " ".join(text.lower().split())
        if key not in seen:
            seen.add(key)
            out.append((label.strip(), text))
    return out


def fit(X, rows, targets, weights, split, y):
    """The val-chosen C's (val, test, C)."""
    best = None
    for c in CS:
        p = LogisticRegression(C=c, max_iter=1000).fit(X[rows], targets, sample_weight=weights).predict(X)
        val, test = [float((p[split == s] == y[split == s]).mean()) for s in (1, 2)]
        if best is None or val > best[0]:
            best = (val, test, c)
    return dict(val=best[0], test=best[1], C=best[2])


def seed_rows(seed, texts):
    enc, bag = f"runs/brown_encoder/seed{seed}", f"runs/brown_bag_ls/seed{seed}"
    m, split, label, sid = stored("models/minilm", f"{enc}/data-256", f"{enc}/vectors-minilm-256.safetensors")
    s, split2, label2, sid2 = stored(f"{bag}/pretrain", f"{bag}/data", f"{bag}/vectors-skipgram.safetensors")
    assert (split == split2).all() and (label == label2).all() and (sid == sid2).all()
    names = json.load(open(f"{enc}/data-256/manifest.json"))["labels"]
    labeled = split < 3
    assert all(texts[i][0] == names[c] for i, c in zip(sid[labeled], label[labeled])), "sample ids do not map"
    logits = f"{enc}/oracle/propagated-3view-256-aligned.logits"
    if not os.path.exists(logits):
        bp.views_logits(BIN, "three-view-256-aligned", seed)
    z = bo.read_logits(logits)[2]
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = label.copy()
    y[split == 3] = bo.hidden_labels(f"{enc}/data")
    t = TfidfVectorizer(min_df=2, sublinear_tf=True, lowercase=True).fit_transform([texts[i][1] for i in sid])
    return centred(m), centred(s), t, split, label, y, p


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--json")
    a = ap.parse_args()
    texts = paragraphs()
    out = {"seeds": {}}
    for seed in a.seeds:
        m, s, t, split, label, y, p = seed_rows(seed, texts)
        train, unl = split == 0, split == 3
        assert len(p) == unl.sum()
        spread_right = float((p.argmax(1) == y[unl]).mean())
        sets = {"M+S+T": sp.hstack([sp.csr_matrix(m), sp.csr_matrix(s), t]).tocsr(), "M": m,
                "S+T": sp.hstack([sp.csr_matrix(s), t]).tocsr()}
        rows = np.where(train | unl)[0]
        pl = np.zeros(len(split), np.int64)
        conf = np.ones(len(split))
        pl[train], pl[unl], conf[unl] = label[train], p.argmax(1), p.max(1)
        row = {"spread_unlabeled_right": spread_right}
        for name, x in sets.items():
            row[f"{name} labels"] = fit(x, np.where(train)[0], label[train], None, split, y)
            row[f"{name} spread"] = fit(x, rows, pl[rows], conf[rows], split, y)
        out["seeds"][seed] = row
        print(json.dumps(dict(seed=seed, **row)), flush=True)

    def ms(xs):
        return [statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0]
    seeds = list(out["seeds"].values())
    out["summary"] = {k: ms([r[k]["test"] for r in seeds]) for k in seeds[0] if k != "spread_unlabeled_right"}
    out["summary"]["spread_unlabeled_right"] = ms([r["spread_unlabeled_right"] for r in seeds])
    print(json.dumps(out["summary"]))
    out["provenance"] = bm.provenance(
        f"python bench/brown_frozen_probe.py --seeds {' '.join(map(str, a.seeds))}")
    if a.json:
        json.dump(out, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()

"""How many random labels does class-mass alignment's prior need? Brown genre, 20 labels per
class, labels spread over three views (bench/brown_bag_propagate.py's `three-view` kind,
written with --align 0), aligned afterwards here as `dtrain propagate --align a` does:
q_ic ∝ p_ic · (π_c / m_c)^a, m_c the unlabeled rows' mean probability of class c (propagate
takes the mean over the val, test and unlabeled rows that a label reaches; here over the
whole unlabeled split, from the logits file, whose unreached rows are uniform and whose
probabilities carry the 1e-6 floor).

The prior π comes from the val split's label counts each plus one (propagate's
`--class-prior val`), from m labels drawn at random from val (50 draws per m: what a user
who labeled m random rows would have), or is uniform (the training split's, 20 per class).
Reported: the unlabeled split's accuracy against its hidden labels (a diagnostic no user
has), mean and sd over the draws. Needs the runs of bench/brown_bag_propagate.py.

  .venv/bin/python bench/brown_prior_sensitivity.py --seeds 1 2 3 --json bench/results/brown-prior-sensitivity.json
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import brown_methods as bm  # noqa: E402
import brown_oracle as bo  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--power", type=float, default=0.5)
    ap.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 300])
    ap.add_argument("--draws", type=int, default=50)
    ap.add_argument("--json")
    a = ap.parse_args()
    out = {"power": a.power, "seeds": {}}
    for seed in a.seeds:
        data = f"runs/brown_encoder/seed{seed}/data"
        val = np.array(json.load(open(os.path.join(data, "manifest.json")))["splits"]["val"]["per_class"])
        _, _, z = bo.read_logits(f"runs/brown_encoder/seed{seed}/oracle/propagated-3view.logits")
        hidden = bo.hidden_labels(data)
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        mass = p.mean(0)

        def right(prior):
            return 100 * float(((p * (prior / mass) ** a.power).argmax(1) == hidden).mean())
        row = {"none": 100 * float((p.argmax(1) == hidden).mean()),
               "uniform": right(np.full(len(val), 1 / len(val))),
               "val": right((val + 1) / (val + 1).sum())}
        labels = np.repeat(np.arange(len(val)), val)
        rng = np.random.default_rng(seed)
        for m in a.sizes:
            xs = []
            for _ in range(a.draws):
                c = np.bincount(rng.choice(labels, m, replace=False), minlength=len(val)) + 1
                xs.append(right(c / c.sum()))
            row[f"random_{m}"] = [float(np.mean(xs)), float(np.std(xs, ddof=1))]
        out["seeds"][seed] = row
        print(json.dumps({"seed": seed, **row}), flush=True)
    out["provenance"] = bm.provenance("python3 bench/brown_prior_sensitivity.py " + " ".join(sys.argv[1:]))
    if a.json:
        json.dump(out, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()

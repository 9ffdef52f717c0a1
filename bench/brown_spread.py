"""The spread labels of bench/brown_bag_propagate.py's kinds on their own, no student: per
seed and kind the setting val chose (shift, k, alpha, align), the transductive test accuracy,
and how many of the unlabeled split's argmaxes are right against its hidden labels (a
diagnostic no user has). A kind's logits file and report are made by
bench/brown_bag_propagate.py when missing (its views read the seeds' data sets, skip-gram
embeddings and stored vectors; the student kinds need bench/brown_encoder_oracle.py's
student runs).

  DTRAIN_BIN=/tmp/dtrain-len .venv/bin/python bench/brown_spread.py --seeds 1 2 3 \\
      --kinds three-view-256-aligned student-view four-view-256-aligned \\
      --json bench/results/brown-spread-student-view.json

--choose-on-val adds a row "val-chosen": per seed, the kind of highest val accuracy among
--kinds (the first in their order on a tie), as a user would pick between, e.g., the labels
of two rounds of alternation without reading test.

  DTRAIN_BIN=/tmp/dtrain-r3 .venv/bin/python bench/brown_spread.py --seeds 1 2 3 \\
      --kinds four-view-256w-weighted round3-256w-weighted --choose-on-val \\
      --json bench/results/brown-spread-round3-weighted.json
"""
import argparse
import json
import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import brown_bag_propagate as bp  # noqa: E402
import brown_encoder as be  # noqa: E402
import brown_oracle as bo  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--kinds", nargs="+", required=True, choices=bp.KINDS)
    ap.add_argument("--choose-on-val", action="store_true",
                    help="also report, per seed, the kind of highest val accuracy (row val-chosen)")
    ap.add_argument("--json")
    a = ap.parse_args()
    rows = {}
    for kind in a.kinds:
        for seed in a.seeds:
            path, report = bp.views_logits(be.BIN, kind, seed)
            got = bp.chosen_line(report)
            z = bo.read_logits(path)[2]
            # The rows of a kind's logits file are the encoder protocol's unlabeled split
            # (every view holds the same rows; bag kinds read the bag protocol's).
            data = be.prepare(seed) if "oracle" in path else f"runs/brown_bag_ls/seed{seed}/data"
            got["unlabeled_right"] = float(np.mean(z.argmax(1) == bo.hidden_labels(data)))
            rows.setdefault(kind, {})[seed] = got
            print(json.dumps(dict(kind=kind, seed=seed, **got)), flush=True)
    if a.choose_on_val:
        for seed in a.seeds:
            # max keeps the first of equal val accuracies, in --kinds order.
            kind = max(a.kinds, key=lambda k: rows[k][seed]["val"])
            rows.setdefault("val-chosen", {})[seed] = dict(rows[kind][seed], kind=kind)
            print(json.dumps(dict(kind="val-chosen", seed=seed, chosen=kind, val=rows[kind][seed]["val"],
                                  test=rows[kind][seed]["test"])), flush=True)
    summary = {}
    for kind, by_seed in rows.items():
        test = [100 * r["test"] for r in by_seed.values()]
        right = [100 * r["unlabeled_right"] for r in by_seed.values()]
        sd = statistics.stdev(test) if len(test) > 1 else 0.0
        summary[kind] = dict(test=statistics.mean(test), test_sd=sd, unlabeled_right=statistics.mean(right),
                             seeds=len(test))
        print(f"{kind:>24}: test {summary[kind]['test']:.2f} ± {sd:.2f}, "
              f"unlabeled split {summary[kind]['unlabeled_right']:.1f}% right ({len(test)} seeds)")
    if a.json:
        prov = bo.bm.provenance("python3 bench/brown_spread.py " + " ".join(sys.argv[1:]))
        json.dump({"provenance": prov, "rows": rows, "summary": summary}, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()

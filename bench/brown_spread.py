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

--rounds takes --kinds as successive rounds of alternation (e.g. the labels of the first and
second students' graphs) and stops each seed's on val: a seed's next round is made only
while every round so far has raised val accuracy, and the row "val-stopped" is the last
round before val stopped rising (the one of highest val among those made), as a user would
run the alternation without reading test (each round's student is trained beforehand, by
bench/brown_encoder_oracle.py --propagated --views <the round before>).

  DTRAIN_BIN=/tmp/dtrain-r3 .venv/bin/python bench/brown_spread.py --seeds 1 2 3 --rounds \\
      --kinds three-view-256-weighted four-view-256w-weighted round3-256w-weighted round4-256w-weighted \\
      --json bench/results/brown-spread-rounds-weighted.json

--train-students makes the whole alternation one command: before each round after the first,
the students of the round before are trained for the seeds still going (made once; their rows
in <json>-students-<kind>.json). The fresh seeds of docs/results.md:

  DTRAIN_BIN=/tmp/dtrain-f .venv/bin/python bench/brown_spread.py --seeds 4 5 6 --rounds --train-students \\
      --kinds three-view-256-weighted four-view-256w-weighted round3-256w-weighted round4-256w-weighted \\
      --json bench/results/brown-spread-rounds-fresh.json
"""
import argparse
import json
import os
import statistics
import subprocess
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
    ap.add_argument("--rounds", action="store_true",
                    help="--kinds are successive rounds: a seed's next is made only while val rises; "
                    "row val-stopped is its last round before val stopped rising")
    ap.add_argument("--train-students", action="store_true",
                    help="with --rounds: before each round, train the students it reads (bench/brown_encoder_oracle.py "
                    "--propagated --views <the round before> --epochs 30) for the seeds still going; "
                    "their rows in JSON files beside --json")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.train_students:
        if not a.rounds:
            ap.error("--train-students needs --rounds")
        for before, kind in zip(a.kinds, a.kinds[1:]):
            if bp.STUDENT_OF.get(kind) != before:
                ap.error(f"--train-students: round {kind} does not read the student of {before}'s labels "
                         f"(brown_bag_propagate.STUDENT_OF)")
    rows = {}
    # With --rounds: each seed's round of highest val so far, and the seeds whose val fell.
    kept, stopped = {}, set()
    for i, kind in enumerate(a.kinds):
        going = [seed for seed in a.seeds if seed not in stopped]
        if a.train_students and i > 0 and going:
            # This round's students learn the labels of the round before.
            students = [sys.executable, "bench/brown_encoder_oracle.py", "--seeds", *map(str, going), "--accuracies",
                        "--epochs", "30", "--propagated", "--views", a.kinds[i - 1]]
            if a.json:
                students += ["--json", f"{os.path.splitext(a.json)[0]}-students-{a.kinds[i - 1]}.json"]
            subprocess.run(students, check=True)
        for seed in going:
            path, report = bp.views_logits(be.BIN, kind, seed)
            got = bp.chosen_line(report)
            z = bo.read_logits(path)[2]
            # The rows of a kind's logits file are the encoder protocol's unlabeled split
            # (every view holds the same rows; bag kinds read the bag protocol's).
            data = be.prepare(seed) if "oracle" in path else f"runs/brown_bag_ls/seed{seed}/data"
            got["unlabeled_right"] = float(np.mean(z.argmax(1) == bo.hidden_labels(data)))
            rows.setdefault(kind, {})[seed] = got
            print(json.dumps(dict(kind=kind, seed=seed, **got)), flush=True)
            if a.rounds:
                if seed in kept and got["val"] <= kept[seed]["val"]:
                    stopped.add(seed)
                else:
                    kept[seed] = dict(got, kind=kind)
    for seed, got in kept.items():
        rows.setdefault("val-stopped", {})[seed] = got
        print(json.dumps(dict(kind="val-stopped", seed=seed, chosen=got["kind"], val=got["val"],
                              test=got["test"])), flush=True)
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

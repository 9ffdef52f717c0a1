"""Alternating label spreading and a bag student (Iscen et al. 2019, with the cheapest
student dtrain has): Brown genre, 20 labels per class. Per seed, from the spread labels of
a bench/brown_bag_propagate.py kind (its views and file, made when missing):

  student r   configs/brown/spread_student.toml (a bag model from the seed's skip-gram
              embeddings; the argmax of every unlabeled row's spread label, weight 3) on
              labels r-1 (labels 0 are the kind's own); its last checkpoint is kept;
  labels r    `dtrain propagate` over the kind's views plus student r's view (a bag
              checkpoint's pooled embedding: the mean of its table's rows over the row's
              feature ids), the aligned grid chosen on val as for the kind.

for r = 1..--rounds, then one more student on the last labels. Reported per round: the
student's val and test accuracy (inductive), the labels' chosen setting and transductive
test accuracy, and how many unlabeled rows they get right against the hidden labels (a
diagnostic no user has).

  .venv/bin/python bench/brown_bag_alternate.py --kind words-aligned --seeds 1 2 3 --rounds 2 \\
      --json bench/results/brown-bag-alternate-words.json
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import brown_bag_propagate as bp  # noqa: E402
import brown_encoder as be  # noqa: E402
import brown_methods as bm  # noqa: E402
import brown_oracle as bo  # noqa: E402


def student(dt, seed, labels, out):
    """The bag student of the logits file `labels` (made once): its val and test accuracy,
    seconds and last checkpoint."""
    bag = f"runs/brown_bag_ls/seed{seed}"
    metrics = os.path.join(out, "metrics.jsonl")
    ckpts = os.path.join(out, "checkpoints")
    if not (os.path.exists(metrics) and os.path.isdir(ckpts) and os.listdir(ckpts)):
        subprocess.run(["rm", "-rf", out], check=True)
        t0 = time.time()
        args = [dt, "--quiet", "train", "--config", "configs/brown/spread_student.toml"]
        for s in [f'data.dir="{bag}/data"', f'model.init_from="{bag}/pretrain"', f'noisy_student.logits="{labels}"',
                  f'train.out_dir="{out}"', f"train.seed={seed}", "train.keep_checkpoints=1"]:
            args += ["--set", s]
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
        open(os.path.join(out, "seconds"), "w").write(f"{time.time() - t0:.1f}\n")
    recs = be.records(out)
    return dict(val=be.final(recs, "val"), test=be.final(recs, "test"),
                seconds=float(open(os.path.join(out, "seconds")).read()),
                checkpoint=os.path.join(ckpts, sorted(os.listdir(ckpts))[-1]))


def labels_row(path, report, hidden):
    got = bp.chosen_line(report)
    got["unlabeled_right"] = float(np.mean(bo.read_logits(path)[2].argmax(1) == hidden))
    got["path"] = path
    return got


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", default="words-aligned", choices=bp.KINDS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtrain", default=os.environ.get("DTRAIN_BIN", "target/release/dtrain"))
    ap.add_argument("--json")
    a = ap.parse_args()
    dt = a.dtrain
    out = {"kind": a.kind, "seeds": {}}
    for seed in a.seeds:
        bp.prepare(dt, "runs/brown_bag_ls", seed)
        path, views = bp.kind_views(dt, a.kind, seed)
        path, report = bp.spread(dt, path, views)
        data = be.prepare(seed) if "oracle" in path else f"runs/brown_bag_ls/seed{seed}/data"
        hidden = bo.hidden_labels(data)
        rows = [dict(labels=labels_row(path, report, hidden))]
        runs = f"runs/brown_bag_ls/seed{seed}/runs/alternate-{a.kind}"
        for r in range(1, a.rounds + 2):
            st = student(dt, seed, path, os.path.join(runs, f"student{r}"))
            rows[-1]["student"] = st
            print(json.dumps(dict(seed=seed, round=r - 1, labels=rows[-1]["labels"]["test"], student=st["test"])),
                  flush=True)
            if r > a.rounds:
                break
            bag_view = ["--model", st["checkpoint"], "--data", f"runs/brown_bag_ls/seed{seed}/data"]
            path = os.path.join(os.path.dirname(rows[0]["labels"]["path"]), f"alternate-{a.kind}-bag{r}.logits")
            path, report = bp.spread(dt, path, lambda: views() + bag_view)
            rows.append(dict(labels=labels_row(path, report, hidden)))
        out["seeds"][seed] = rows

    def ms(xs):
        return [statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0]
    seeds = list(out["seeds"].values())
    out["summary"] = [
        dict(round=r, labels_test=ms([100 * s[r]["labels"]["test"] for s in seeds]),
             unlabeled_right=ms([100 * s[r]["labels"]["unlabeled_right"] for s in seeds]),
             student_test=ms([100 * s[r]["student"]["test"] for s in seeds]))
        for r in range(a.rounds + 1)
    ]
    for row in out["summary"]:
        print(json.dumps(row))
    out["provenance"] = bm.provenance("python3 bench/brown_bag_alternate.py " + " ".join(sys.argv[1:]))
    if a.json:
        json.dump(out, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()

"""Why the consistency methods fade on Brown genre (20 labels per class, bag model from
scratch): each method's chosen setting (bench/results/brown-methods-long.json, "fixed") run
for 400 labeled epochs, and read back from metrics.jsonl over the run:
  - validation accuracy after 25, 100 and 400 epochs (test after 400);
  - the pseudo-labels' spread: pseudo_label_top_share, the share of the unlabeled rows'
    targets that go to the commonest class (1.0 = every target is one class), its maximum
    from the second labeled epoch on, and the first step where it reaches 0.9 (where dtrain
    warns);
  - the targets' accuracy against the hidden labels (pseudo_label_accuracy), averaged over
    epochs 1-25 and over epochs 300-400.
R-Drop runs twice: with its sym_kl term on unlabeled rows too (its chosen setting) and on
the labeled rows alone (the published form).

  python3 bench/brown_collapse.py --seeds 1 2 3 --json bench/results/brown-collapse.json
  python3 bench/brown_collapse.py --seeds 1 --runs pi_w1 pi_w10 mean_teacher_w0.1 rdrop_w0.1 rdrop_w0.3 \
      --out runs/brown_collapse_weights --json bench/results/brown-collapse-weights.json
"""
import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import brown_methods as bm  # noqa: E402

EPOCHS = 400
STEPS_PER_EPOCH = 19  # 300 labels in batches of 16 (the last one partial)
RUNS = {
    "supervised": ("supervised", []),
    "pi": ("pi", []),
    "mean_teacher": ("mean_teacher", []),
    "temporal": ("temporal", []),
    "rdrop": ("rdrop", []),
    "rdrop_labeled_only": ("rdrop", ["unlabeled.ratio=0"]),
}
# Lower consistency weights than chosen (--runs picks them): the dose behind the drift.
WEIGHT_RUNS = {
    "pi_w1": ("pi", ["consistency.weight=1.0"]),
    "pi_w10": ("pi", ["consistency.weight=10.0"]),
    "mean_teacher_w0.1": ("mean_teacher", ["consistency.weight=0.1"]),
    "rdrop_w0.1": ("rdrop", ["consistency.weight=0.1"]),
    "rdrop_w0.3": ("rdrop", ["consistency.weight=0.3"]),
}


def trajectory(path):
    recs = [json.loads(line) for line in open(path)]
    val = {r["step"]: r["accuracy"] for r in recs if r.get("split") == "val" and r.get("model") is None}
    test = [r["accuracy"] for r in recs if r.get("split") == "test" and r.get("model") is None][-1]
    steps = [r for r in recs if "split" not in r]
    # From the second labeled epoch on, as dtrain's warning: an untrained model's first
    # predictions can all be one class.
    shares = [(r["step"], r["pseudo_label_top_share"]) for r in steps
              if "pseudo_label_top_share" in r and r["step"] > STEPS_PER_EPOCH]
    early = [r["pseudo_label_accuracy"] for r in steps
             if "pseudo_label_accuracy" in r and r["step"] <= 25 * STEPS_PER_EPOCH]
    late = [r["pseudo_label_accuracy"] for r in steps
            if "pseudo_label_accuracy" in r and r["step"] > 300 * STEPS_PER_EPOCH]
    row = {f"val_{e}": val[e * STEPS_PER_EPOCH] for e in (25, 100, 400)}
    row["test_400"] = test
    if shares:
        # An untrained model's targets lean to a class or two for a few epochs: the share
        # is summarised after the first 25 epochs.
        settled = [s for st, s in shares if st > 25 * STEPS_PER_EPOCH]
        row["top_share_median_26_400"] = statistics.median(settled)
        row["top_share_max_26_400"] = max(settled)
        row["top_share_last"] = shares[-1][1]
        row["step_top_share_0.9"] = next((st for st, s in shares if s >= 0.9), None)
        row["pl_acc_1_25"] = statistics.mean(early)
        row["pl_acc_300_400"] = statistics.mean(late)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--data-root", default="runs/brown_pretrain")
    ap.add_argument("--out", default="runs/brown_collapse")
    ap.add_argument("--dtrain", default="target/release/dtrain")
    ap.add_argument("--base-json", default="bench/results/brown-methods-long.json")
    ap.add_argument("--json")
    ap.add_argument("--reuse", action="store_true", help="read the runs already under --out instead of training")
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS) + list(WEIGHT_RUNS))
    a = ap.parse_args()
    fixed = json.load(open(a.base_json))["fixed"]
    result = {"runs": {}, "summary": {}}
    for name in a.runs:
        method, extra = {**RUNS, **WEIGHT_RUNS}[name]
        bm.FIXED[method] = []
        sets = fixed[method] + extra + [f"train.epochs={EPOCHS}"]
        rows = []
        for seed in a.seeds:
            out = os.path.join(a.out, name, f"seed{seed}")
            if not a.reuse:
                bm.train(a.dtrain, method, bm.data_dir(a.data_root, seed), out, seed, sets)
            row = trajectory(os.path.join(out, "metrics.jsonl"))
            row["seed"] = seed
            rows.append(row)
            print(name, seed, row, flush=True)
        result["runs"][name] = {"sets": sets, "seeds": rows}
        summary = {}
        for k in rows[0]:
            vals = [r[k] for r in rows if isinstance(r.get(k), (int, float)) and k != "seed"]
            if vals:
                summary[k] = (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
        result["summary"][name] = summary
    print()
    print("| run | val 25 ep | val 100 ep | val 400 ep | test 400 ep | top share, median 26-400 | max 26-400 "
          "| pl acc 1-25 | pl acc 300-400 |")
    for name, s in result["summary"].items():
        f = lambda k: f"{100 * s[k][0]:.1f} ± {100 * s[k][1]:.1f}" if k in s else "-"
        print(f"| {name} | {f('val_25')} | {f('val_100')} | {f('val_400')} | {f('test_400')} | "
              f"{f('top_share_median_26_400')} | {f('top_share_max_26_400')} | {f('pl_acc_1_25')} | "
              f"{f('pl_acc_300_400')} |")
    if a.json and a.reuse and os.path.exists(a.json):
        # The runs are the ones the earlier command made: keep its provenance.
        result["provenance"] = json.load(open(a.json))["provenance"]
    elif a.json:
        runs = "" if a.runs == list(RUNS) else f" --runs {' '.join(a.runs)} --out {a.out}"
        result["provenance"] = bm.provenance(f"python3 bench/brown_collapse.py --seeds {' '.join(map(str, a.seeds))}{runs}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

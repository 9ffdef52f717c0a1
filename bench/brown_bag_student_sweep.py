"""How much of the spread labels' quality a bag student keeps, over its own settings: the
bag student of bench/brown_bag_propagate.py --students KIND (configs/brown/distill_minilm.toml
from the seed's skip-gram embeddings, its logits swapped for the spread labels), trained
over a grid of the settings that separate it from a plain classifier of those labels, the
setting chosen on val per seed. Brown genre, 20 labels per class.

Grid (2^4 = 16 runs per seed, about 20 s each on 2 cores):
  consistency.kind      kl (soft targets, the fixed recipe) | ce_hard (the argmax)
  consistency.weight    1 | 3 (the fixed recipe)
  model.embed_dropout   0 | 0.5 (the fixed recipe)
  augment               on (deletion, replacement, swap 0.1: the fixed recipe) | off
Everything else is the fixed recipe: 100 epochs, the table at the full learning rate, three
unlabeled rows per labeled row, threshold 0. The grid holds the fixed recipe itself, so
each seed's first row reproduces the student of docs/results.md.

  .venv/bin/python bench/brown_bag_student_sweep.py --kind three-view-256-aligned --seeds 1 2 3 \
      --json bench/results/brown-bag-student-sweep.json
"""
import argparse
import itertools
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(__file__))
import brown_bag_propagate as bp  # noqa: E402
import brown_methods as bm  # noqa: E402

GRID = {
    "consistency.kind": ['"kl"', '"ce_hard"'],
    "consistency.weight": [3.0, 1.0],
    "model.embed_dropout": [0.5, 0.0],
    "augment": ["on", "off"],
}
AUGMENT_OFF = ["augment.deletion=0.0", "augment.replacement=0.0", "augment.swap=0.0"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--kind", default="three-view-256-aligned", choices=bp.KINDS)
    ap.add_argument("--root", default="runs/brown_bag_ls")
    ap.add_argument("--dtrain", default=os.environ.get("DTRAIN_BIN", "target/release/dtrain"))
    ap.add_argument("--json")
    a = ap.parse_args()
    dt = a.dtrain
    bm.CONFIG["distill"] = "configs/brown/distill_minilm.toml"
    out = {"kind": a.kind, "seeds": {}}
    for seed in a.seeds:
        data, pre = bp.prepare(dt, a.root, seed)
        bm.EXTRA["sets"] = lambda _seed: [f'model.init_from="{pre}"']
        path, _ = bp.views_logits(dt, a.kind, seed)
        runs = os.path.join(a.root, f"seed{seed}", "runs", f"{a.kind}-student-sweep")
        sweep = []
        for values in itertools.product(*GRID.values()):
            setting = dict(zip(GRID, values))
            sets = [f'noisy_student.logits="{path}"', "train.epochs=100", "optim.lr_mult.embedding=1.0",
                    f"consistency.kind={setting['consistency.kind']}",
                    f"consistency.weight={setting['consistency.weight']}",
                    f"model.embed_dropout={setting['model.embed_dropout']}"]
            if setting["augment"] == "off":
                sets += AUGMENT_OFF
            name = "-".join(str(v).strip('"') for v in values)
            row = bm.train(dt, "distill", data, os.path.join(runs, name), seed, sets)
            row["setting"] = setting
            sweep.append(row)
            print(json.dumps(dict(seed=seed, **row)), flush=True)
        best = max(sweep, key=lambda r: r["val"])
        out["seeds"][seed] = dict(fixed=sweep[0], chosen=best, sweep=sweep)
        print(json.dumps(dict(seed=seed, fixed=sweep[0]["test"], chosen=best["test"], setting=best["setting"])),
              flush=True)

    def ms(xs):
        return [statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0]
    seeds = list(out["seeds"].values())
    out["summary"] = {
        "fixed_test": ms([s["fixed"]["test"] for s in seeds]),
        "chosen_test": ms([s["chosen"]["test"] for s in seeds]),
        "chosen_minus_fixed": ms([s["chosen"]["test"] - s["fixed"]["test"] for s in seeds]),
    }
    print(json.dumps(out["summary"]))
    out["provenance"] = bm.provenance(
        f"python3 bench/brown_bag_student_sweep.py --kind {a.kind} --seeds {' '.join(map(str, a.seeds))}")
    if a.json:
        json.dump(out, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()

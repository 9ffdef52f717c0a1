"""One setting run by two dtrain binaries, before and after a fix, on the same data: the
paired difference is the fix's effect. Studies (`--study`):

- fgm: FGM with a second pass that takes gradient (R-Drop; Π with the stop-gradient off),
  before and after FGM's g took in the second pass's part (2026-12-07, METHODS.md §9);
  ε in {0.3, 1, 3}, weight 0.3, the method alone beside them.
- augment: UDA and FixMatch (configs/brown/uda.toml, fixmatch.toml), before and after the
  strong view's replacement stopped giving back the same id (2026-12-07, METHODS.md §10),
  at the configs' replacement rate and at 0.3.
- vat: VAT on labeled and unlabeled rows (supervised config, μ 1, no dropout), before and
  after its random direction took normal coordinates (2026-12-07, METHODS.md §9), at the
  two settings docs/results.md's adversarial sweep chose (ε 0.1 with weight 10; ε 1,
  weight 1 with ξ 0.1).

Brown genre, 20 labels per class, bag model from the skip-gram embeddings already made per
seed by bench/brown_bag_propagate.py (runs/brown_bag_ls/seedN/{data,pretrain}), table
learning rate × 0.1 as in configs/brown/pretrained.toml, 50 labeled epochs. Test and val
accuracy at the run's end, per seed, old and new binary.

  python3 bench/brown_before_after.py --study fgm --old /tmp/dtrain-f --new target/release/dtrain \
      --seeds 1 2 3 4 5 6 --json bench/results/brown-fgm-second-pass.json
  python3 bench/brown_before_after.py --study augment --old /tmp/dtrain-f --new target/release/dtrain \
      --seeds 1 2 3 4 5 6 --json bench/results/brown-augment-other-ids.json
  python3 bench/brown_before_after.py --study vat --old /tmp/dtrain-f --new target/release/dtrain \
      --seeds 1 2 3 4 5 6 --json bench/results/brown-vat-normal-direction.json
(the fgm study's JSON was made when this script was bench/brown_fgm_second_pass.py, with
the same code for that study)
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from brown_methods import provenance  # noqa: E402

# Per study: method name → (config, fixed settings); the variants run by both binaries
# (name, settings); whether the method alone runs too (new binary only).
FGM_EPS = [0.3, 1.0, 3.0]
STUDIES = {
    "fgm": {
        "methods": {
            "rdrop": ("configs/brown/rdrop.toml", ["unlabeled.ratio=1"]),
            "pi_no_sg": ("configs/brown/pi.toml", ["pi.stop_gradient_target=false"]),
        },
        "variants": [(f"fgm ε {e}", ['adversarial.kind="fgm"', f"adversarial.epsilon={e}", "adversarial.weight=0.3"])
                     for e in FGM_EPS],
        "alone": True,
    },
    "augment": {
        "methods": {
            "uda": ("configs/brown/uda.toml", []),
            "fixmatch": ("configs/brown/fixmatch.toml", []),
        },
        "variants": [("config's replacement", []), ("replacement 0.3", ["augment.replacement=0.3"])],
        "alone": False,
    },
    "vat": {
        "methods": {
            "vat": ("configs/brown/supervised.toml",
                    ['adversarial.kind="vat"', "unlabeled.ratio=1", "model.embed_dropout=0.0"]),
        },
        "variants": [("ε 0.1, weight 10", ["adversarial.epsilon=0.1", "adversarial.weight=10.0"]),
                     ("ε 1, weight 1, ξ 0.1", ["adversarial.epsilon=1.0", "adversarial.weight=1.0",
                                               "adversarial.xi=0.1"])],
        "alone": False,
    },
}


def run(dt, config, sets, root, seed, out):
    data = os.path.join(root, f"seed{seed}", "data")
    pre = os.path.join(root, f"seed{seed}", "pretrain")
    args = [dt, "--quiet", "train", "--config", config, "--set", f'data.dir="{data}"',
            "--set", f'train.out_dir="{out}"', "--set", f"train.seed={seed}",
            "--set", f'model.init_from="{pre}"', "--set", "optim.lr_mult.embedding=0.1",
            "--set", "train.epochs=50", "--set", "train.keep_checkpoints=1"]
    for s in sets:
        args += ["--set", s]
    subprocess.run(["rm", "-rf", out], check=True)
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    subprocess.run(["rm", "-rf", out], check=True)
    last = {r["split"]: r["accuracy"] for r in recs if r.get("split") in ("val", "test") and r.get("model") is None}
    return {"val": 100 * last["val"], "test": 100 * last["test"]}


def msd(xs):
    return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--study", choices=sorted(STUDIES), default="fgm")
    ap.add_argument("--old", required=True, help="dtrain before the fix")
    ap.add_argument("--new", required=True, help="dtrain with the fix")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--root", default="runs/brown_bag_ls")
    ap.add_argument("--out", default="runs/brown_before_after")
    ap.add_argument("--json")
    a = ap.parse_args()
    study = STUDIES[a.study]
    rows = []
    for method, (config, fixed) in study["methods"].items():
        if study["alone"]:
            base = [run(a.new, config, fixed, a.root, s, f"{a.out}/{method}-s{s}") for s in a.seeds]
            rows.append({"method": method, "variant": "alone", "new": base})
        for name, sets in study["variants"]:
            row = {"method": method, "variant": name}
            for which, dt in (("old", a.old), ("new", a.new)):
                tag = name.replace(" ", "_").replace("'", "")
                row[which] = [run(dt, config, fixed + sets, a.root, s, f"{a.out}/{method}-{tag}-{which}-s{s}")
                              for s in a.seeds]
            rows.append(row)
            diff = [n["test"] - o["test"] for n, o in zip(row["new"], row["old"])]
            print(f"{method} {name}: test old {msd([r['test'] for r in row['old']])}, "
                  f"new {msd([r['test'] for r in row['new']])}, new − old {msd(diff)}", flush=True)
    print("\n| method | variant | test, before the fix | test, after | paired (after − before) | val before / after |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        new = msd([x["test"] for x in r["new"]])
        nv = statistics.mean(x["val"] for x in r["new"])
        if "old" not in r:
            print(f"| {r['method']} | {r['variant']} | | {new[0]:.2f} ± {new[1]:.2f} | | {nv:.2f} |")
            continue
        old = msd([x["test"] for x in r["old"]])
        ov = statistics.mean(x["val"] for x in r["old"])
        d = msd([n["test"] - o["test"] for n, o in zip(r["new"], r["old"])])
        print(f"| {r['method']} | {r['variant']} | {old[0]:.2f} ± {old[1]:.2f} | {new[0]:.2f} ± {new[1]:.2f} "
              f"| {d[0]:+.2f} ± {d[1]:.2f} | {ov:.2f} / {nv:.2f} |")
    if a.json:
        cmd = "python3 " + " ".join(sys.argv)
        with open(a.json, "w") as f:
            json.dump({"provenance": provenance(cmd), "study": a.study, "seeds": a.seeds, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

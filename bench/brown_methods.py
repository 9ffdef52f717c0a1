"""Semi-supervised methods against supervised-only on Brown genre, 20 labels per class.

Two phases:
  sweep   seed 1 only: each method's grid (below); the setting with the best final
          validation accuracy (student, or teacher for Mean Teacher) is chosen;
  seeds   the chosen setting of each method on every seed (split seed = training seed,
          data prepared by bench/brown_pretrain.py under runs/brown_pretrain/seedN/pool/data).
Prints and writes val/test accuracy of student (and teacher), and seconds per run.

  python3 bench/brown_methods.py --seeds 1 2 3 --json bench/results/brown-methods.json
  python3 bench/brown_methods.py --pretrained --seeds 1 2 3 --json bench/results/brown-methods-pretrained.json
  python3 bench/brown_methods.py --pretrained --pretrain-set train.epochs=40 --pretrain-set model.negatives=15 \
      --methods supervised fixmatch uda --seeds 1 2 3 --out runs/brown_methods_pretrained_e40 --json bench/results/brown-methods-pretrained-e40.json
  python3 bench/brown_methods.py --pretrained --pretrain-set train.epochs=40 --pretrain-set model.negatives=15 \
      --methods vat vat_labeled --seeds 1 2 3 --out runs/brown_methods_pretrained_e40 --json bench/results/brown-methods-pretrained-e40.json
  (and --methods vat_xi, the same with ξ = 0.1; these two commands ran the grid of ε in the
  pooled vector's space, {0.01, 0.03, 0.1}, and reproduce only at their recorded revision)
  python3 bench/brown_methods.py --pretrained --pretrain-set train.epochs=40 --pretrain-set model.negatives=15 \
      --methods supervised fgm vat vat_labeled vat_xi --seeds 1 2 3 --out runs/brown_methods_adv_fix \
      --json bench/results/brown-methods-adv-fix.json
  (FGM and VAT with ε over the gathered vectors, METHODS.md §9: EPS_GRID)

With --pretrained every run (Noisy Student's teacher too) starts its embedding table from
skip-gram embeddings pretrained on that seed's train + unlabeled text
(configs/brown/pretrain.toml, made once per seed under runs/brown_pretrain/seedN/pool/pretrain),
with the table's learning rate × 0.1, as configs/brown/pretrained.toml does.

With --epochs-grid the run length is chosen too: each method keeps its chosen setting from
an earlier run's JSON (--base-json) and only `train.epochs` is swept on seed 1's validation
split (EPOCHS_GRID), supervised-only included; the 25-epoch runs had stopped the
self-training methods while their pseudo-labels were still improving.

  python3 bench/brown_methods.py --epochs-grid --methods supervised pi mean_teacher rdrop temporal uda fixmatch \
      --seeds 1 2 3 --json bench/results/brown-methods-long.json
  python3 bench/brown_methods.py --epochs-grid --methods uda --also-grid 'consistency.adaptive_threshold="fixed";"freematch"' \
      --seeds 1 2 3 --json bench/results/brown-methods-long.json
"""
import argparse
import itertools
import json
import os
import statistics
import subprocess
import time

# ε of the adversarial terms, normed over a document's gathered vectors (METHODS.md §9).
EPS_GRID = [0.1, 0.3, 1.0, 3.0]

GRID = {
    "supervised": {"model.embed_dropout": [0.0, 0.3, 0.5]},
    "pi": {"model.embed_dropout": [0.3, 0.5], "consistency.weight": [1.0, 10.0, 100.0],
           "unlabeled.ratio": [1, 4]},
    "mean_teacher": {"model.embed_dropout": [0.3, 0.5], "consistency.weight": [1.0, 10.0, 100.0],
                     "unlabeled.ratio": [1, 4]},
    "rdrop": {"model.embed_dropout": [0.3, 0.5], "consistency.weight": [0.3, 1.0, 3.0],
              "unlabeled.ratio": [0, 1]},
    # The bank needs revisits: with μ = 1 an unlabeled row is drawn at most once in 25
    # labeled epochs, so it never has a target; μ = 16 draws each about 10 times.
    "temporal": {"model.embed_dropout": [0.3, 0.5], "consistency.weight": [1.0, 10.0, 100.0],
                 "unlabeled.ratio": [4, 16]},
    # The published defaults collapse here (docs/results.md): smaller weights, a ramp-up,
    # and distribution alignment (momentum 0.9: the run has ~500 steps).
    "uda": {"consistency.weight": [0.1, 0.3, 1.0], "consistency.ramp_epochs": [0, 10],
            "consistency.distribution_alignment": ["false", "true"]},
    "fixmatch": {"consistency.weight": [0.1, 0.3, 1.0], "consistency.threshold": [0.95, 0.8],
                 "consistency.adaptive_threshold": ['"fixed"', '"freematch"']},
    # The teacher is the chosen supervised run of the same seed (see teacher_logits).
    "noisy_student": {"consistency.weight": [0.3, 1.0, 3.0], "consistency.kind": ['"kl"', '"ce_hard"'],
                      "unlabeled.ratio": [1, 3]},
    # Meta Pseudo Labels, each sign of h with and without the baseline: the teacher's UDA
    # weight and both models' learning rate (the teacher takes the student's [optim]).
    "mpl": {"consistency.weight": [0.0, 1.0], "optim.lr": [0.01, 0.003]},
    "mpl_new_minus_old": {"consistency.weight": [0.0, 1.0], "optim.lr": [0.01, 0.003]},
    "mpl_baseline": {"consistency.weight": [0.0, 1.0], "optim.lr": [0.01, 0.003]},
    "mpl_new_minus_old_baseline": {"consistency.weight": [0.0, 1.0], "optim.lr": [0.01, 0.003]},
    # Pseudo-labels drawn from the teacher's softmax instead of its argmax (the
    # score-function form of the MPL term; what made h useful on two moons, tests/mpl.rs).
    "mpl_sampled": {"consistency.weight": [0.0, 1.0], "optim.lr": [0.01, 0.003]},
    # MPL with METHODS.md §12 step 8: the student's last 5 or 10 epochs on the labels alone
    # (no teacher UDA term, lr 0.01: the best MPL setting above).
    "mpl_finetune": {"mpl.finetune_steps": [95, 190]},
    # The fixed teacher is Noisy Student's (the chosen supervised run of the seed).
    "mpl_reduced": {"optim.lr": [0.01, 0.003], "mpl.reduced_hidden": ["[32]", "[128]"]},
    # VAT (METHODS.md §9) added to supervised training, its KL on every labeled and
    # unlabeled row (μ = 1). ε is normed over a document's gathered vectors (METHODS.md §9;
    # before 2026-12-05 dtrain normed it on the pooled vector, where this grid was
    # {0.01, 0.03, 0.1}, each about 12 times its value in today's units for Brown's 151 ids
    # per document).
    # vat_labeled is the same term on the labeled rows alone (μ = 0): what VAT gains
    # without the unlabeled text.
    "vat": {"adversarial.epsilon": EPS_GRID, "adversarial.weight": [1.0, 3.0, 10.0],
            "train.epochs": [50, 100]},
    # VAT with the probe radius of Miyato et al.'s text VAT (0.1) instead of METHODS.md's
    # 1e-6 (their image default): a finite difference at 1e-6 in f32 amplifies rounding by
    # about 1/ξ (tests/mpi.rs), so the probe direction may be partly noise.
    "vat_xi": {"adversarial.epsilon": EPS_GRID, "adversarial.weight": [1.0, 3.0, 10.0],
               "train.epochs": [50, 100]},
    "vat_labeled": {"adversarial.epsilon": EPS_GRID, "adversarial.weight": [1.0, 3.0, 10.0],
                    "train.epochs": [50, 100]},
    # FGM (METHODS.md §9): the supervised loss again at the embeddings pushed along its own
    # gradient, on the labeled rows (μ = 0), with and without the pooled vector's dropout.
    "fgm": {"adversarial.epsilon": EPS_GRID, "adversarial.weight": [0.3, 1.0],
            "model.embed_dropout": [0.0, 0.5], "train.epochs": [50, 100]},
}
MPL_VARIANTS = {"mpl": [], "mpl_new_minus_old": ['mpl.h_sign="new_minus_old"'],
                "mpl_baseline": ["mpl.baseline=true"],
                "mpl_new_minus_old_baseline": ['mpl.h_sign="new_minus_old"', "mpl.baseline=true"],
                "mpl_sampled": ['mpl.pseudo_labels="sampled"'],
                "mpl_finetune": ["consistency.weight=0.0"]}
# --dropout-grid adds the dropout of the pooled embedding to the grids of the methods
# whose configs fix it (their student's noise), with these values.
DROPOUT_GRID = [0.0, 0.5]
# Unscaled weights in the grid: w_max is what the grid says.
FIXED = {"pi": ["consistency.scale_by_labeled_ratio=false"],
         "mean_teacher": ["consistency.scale_by_labeled_ratio=false"],
         "temporal": ["consistency.scale_by_labeled_ratio=false"],
         "uda": ["consistency.stabiliser_momentum=0.9"],
         "fixmatch": ["consistency.stabiliser_momentum=0.9", "consistency.distribution_alignment=true"],
         "vat": ['adversarial.kind="vat"', "unlabeled.ratio=1", "model.embed_dropout=0.0"],
         "vat_labeled": ['adversarial.kind="vat"', "unlabeled.ratio=0", "model.embed_dropout=0.0"],
         "vat_xi": ['adversarial.kind="vat"', "unlabeled.ratio=1", "model.embed_dropout=0.0", "adversarial.xi=0.1"],
         "fgm": ['adversarial.kind="fgm"', "unlabeled.ratio=0"]}
CONFIG = {"supervised": "configs/brown/supervised.toml", "pi": "configs/brown/pi.toml",
          "mean_teacher": "configs/brown/mean_teacher.toml", "rdrop": "configs/brown/rdrop.toml",
          "temporal": "configs/brown/temporal.toml", "uda": "configs/brown/uda.toml",
          "fixmatch": "configs/brown/fixmatch.toml", "noisy_student": "configs/brown/noisy_student.toml",
          "mpl_reduced": "configs/brown/mpl_reduced.toml", "vat": "configs/brown/supervised.toml",
          "vat_labeled": "configs/brown/supervised.toml", "vat_xi": "configs/brown/supervised.toml",
          "fgm": "configs/brown/supervised.toml"}
for _m, _sets in MPL_VARIANTS.items():
    CONFIG[_m] = "configs/brown/mpl.toml"
    FIXED[_m] = _sets


def data_dir(root, seed):
    return os.path.join(root, f"seed{seed}", "pool", "data")


# --epochs-grid: labeled epochs (475 steps each 25).
EPOCHS_GRID = [25, 50, 100, 200, 400]

# Extra settings of every run (--pretrained fills it per seed).
EXTRA = {"sets": lambda seed: []}


def pretrained_sets(dt, root, seed, pretrain_sets=()):
    """Skip-gram embeddings for a seed's data (made once per recipe), as init_from settings.
    `pretrain_sets` change configs/brown/pretrain.toml's recipe (--pretrain-set)."""
    tag = "".join("-" + x.replace(".", "_").replace("=", "") for x in pretrain_sets)
    pre = os.path.join(root, f"seed{seed}", "pool", "pretrain" + tag)
    if not os.path.exists(os.path.join(pre, "embeddings.safetensors")):
        subprocess.run(["rm", "-rf", pre], check=True)
        subprocess.run([dt, "--quiet", "pretrain", "--config", "configs/brown/pretrain.toml", "--set",
                        f'data.dir="{data_dir(root, seed)}"', "--set", f'train.out_dir="{pre}"', "--set",
                        f"train.seed={seed}", "--set", "train.threads=2", "--set", "train.checkpoint_every=0"]
                       + [x for kv in pretrain_sets for x in ("--set", kv)],
                       check=True, stdout=subprocess.DEVNULL)
    return [f'model.init_from="{pre}"', "optim.lr_mult.embedding=0.1"]


def teacher_logits(dt, root, out_root, seed, supervised_sets, split="unlabeled", method="supervised"):
    """Noisy Student's teacher for a seed: the supervised run (or `method`'s) with the
    given settings, its logits of the unlabeled and train splits exported once (the run is
    deterministic, so a split exported later retrains the same teacher)."""
    prefix = "" if method == "supervised" else f"{method}-"
    name = f"{prefix}seed{seed}.logits" if split == "unlabeled" else f"{prefix}seed{seed}.{split}.logits"
    path = os.path.join(out_root, "teachers", name)
    if not os.path.exists(path):
        out = os.path.join(out_root, "teachers", f"{prefix}seed{seed}")
        subprocess.run(["rm", "-rf", out], check=True)
        args = [dt, "--quiet", "train", "--config", CONFIG[method], "--set", f'data.dir="{data_dir(root, seed)}"',
                "--set", f'train.out_dir="{out}"', "--set", f"train.seed={seed}"]
        for s in EXTRA["sets"](seed) + supervised_sets:
            args += ["--set", s]
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
        ckpt = sorted(os.listdir(os.path.join(out, "checkpoints")))[-1]
        subprocess.run([dt, "export-logits", "--checkpoint", os.path.join(out, "checkpoints", ckpt), "--data",
                        data_dir(root, seed), "--split", split, "--out", path], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run(["rm", "-rf", os.path.join(out, "checkpoints")], check=True)
    return path


def train(dt, method, data, out, seed, sets):
    args = [dt, "--quiet", "train", "--config", CONFIG[method], "--set", f'data.dir="{data}"',
            "--set", f'train.out_dir="{out}"', "--set", f"train.seed={seed}",
            "--set", "train.keep_checkpoints=1"]
    fixed = FIXED.get(method, [])
    for s in EXTRA["sets"](seed) + (fixed(seed) if callable(fixed) else fixed) + sets:
        args += ["--set", s]
    subprocess.run(["rm", "-rf", out], check=True)
    t0 = time.time()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    secs = time.time() - t0
    recs = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    subprocess.run(["rm", "-rf", os.path.join(out, "checkpoints")], check=True)

    def last(split, model=None):
        rs = [r for r in recs if r.get("split") == split and r.get("model") == model]
        return rs[-1]["accuracy"] if rs else None
    row = dict(val=last("val"), test=last("test"), seconds=secs)
    if method == "mean_teacher" or method in MPL_VARIANTS:
        row.update(teacher_val=last("val", "teacher"), teacher_test=last("test", "teacher"))
    steps = [r for r in recs if "split" not in r]
    row["train_docs_per_s"] = statistics.mean(r["docs_per_s"] for r in steps)
    # Milliseconds per optimizer step (forward, backward, update, EMA, bank; no evaluation
    # or checkpoint), the median over the metrics windows.
    row["step_ms"] = statistics.median(r["step_ms"] for r in steps)
    return row


def provenance(command):
    """Where a result came from: the command, date, dtrain's git revision (flagged when src/
    has uncommitted changes), CPU and cores."""
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "src"], capture_output=True, text=True).stdout.strip()
    cpu = open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].split(":", 1)[1].strip()
    return dict(command=command, date=time.strftime("%Y-%m-%d"),
                git=rev + (" (with uncommitted changes to src/)" if dirty else ""), cpu=cpu, cores=os.cpu_count())


def select_key(method, row):
    return row["teacher_val"] if method == "mean_teacher" else row["val"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--data-root", default="runs/brown_pretrain")
    ap.add_argument("--out", default="runs/brown_methods")
    ap.add_argument("--dtrain", default="target/release/dtrain")
    ap.add_argument("--methods", nargs="+", default=list(GRID))
    ap.add_argument("--json")
    ap.add_argument("--pretrained", action="store_true")
    ap.add_argument("--dropout-grid", action="store_true")
    ap.add_argument("--pretrain-set", action="append", default=[], metavar="KEY=VALUE",
                    help="with --pretrained: change the pretraining recipe (its embeddings get their own folder)")
    ap.add_argument("--epochs-grid", action="store_true")
    ap.add_argument("--base-json", help="with --epochs-grid: the JSON whose chosen settings are kept")
    ap.add_argument("--also-grid", action="append", default=[], metavar="KEY=V1;V2",
                    help="with --epochs-grid: sweep this setting too (values separated by ';')")
    a = ap.parse_args()
    if a.epochs_grid:
        default = "bench/results/brown-methods-pretrained.json" if a.pretrained else "bench/results/brown-methods.json"
        chosen = json.load(open(a.base_json or default))["chosen"]
        for m in a.methods:
            if m == "noisy_student" or m not in CONFIG:
                raise SystemExit(f"--epochs-grid does not cover {m}")
            FIXED[m] = FIXED.get(m, []) + chosen[m]
            GRID[m] = {"train.epochs": EPOCHS_GRID}
            for kv in a.also_grid:
                key, values = kv.split("=", 1)
                GRID[m][key] = values.split(";")
    if a.dropout_grid:
        for m in ("uda", "fixmatch", "noisy_student"):
            GRID[m] = {"model.embed_dropout": DROPOUT_GRID, **GRID[m]}
    if a.pretrained:
        EXTRA["sets"] = lambda seed: pretrained_sets(a.dtrain, a.data_root, seed, a.pretrain_set)
        if a.out == "runs/brown_methods":
            a.out = "runs/brown_methods_pretrained"
    result = {"sweep": {}, "chosen": {}, "seeds": {}}
    if a.json and os.path.exists(a.json):
        # Re-running some methods keeps the others' results.
        old = json.load(open(a.json))
        for k in ("sweep", "chosen", "fixed", "seeds", "summary", "provenance"):
            result.setdefault(k, {}).update({m: v for m, v in old.get(k, {}).items() if m not in a.methods})
    for method in a.methods:
        keys = list(GRID[method])
        if method == "noisy_student":
            sup = result["chosen"]["supervised"]
            FIXED["noisy_student"] = lambda seed: [
                f'noisy_student.logits="{teacher_logits(a.dtrain, a.data_root, a.out, seed, sup)}"']
        if method == "mpl_reduced":
            sup = result["chosen"]["supervised"]
            FIXED["mpl_reduced"] = lambda seed: [
                f'mpl.logits="{teacher_logits(a.dtrain, a.data_root, a.out, seed, sup)}"',
                f'mpl.train_logits="{teacher_logits(a.dtrain, a.data_root, a.out, seed, sup, "train")}"']
        best = None
        for values in itertools.product(*(GRID[method][k] for k in keys)):
            sets = [f"{k}={v}" for k, v in zip(keys, values)]
            out = os.path.join(a.out, "sweep", method + "-" + "-".join(str(v).strip('"') for v in values))
            row = train(a.dtrain, method, data_dir(a.data_root, a.seeds[0]), out, a.seeds[0], sets)
            row["sets"] = sets
            print(method, sets, {k: v for k, v in row.items() if k != "sets"}, flush=True)
            result["sweep"].setdefault(method, []).append(row)
            if best is None or select_key(method, row) > select_key(method, best):
                best = row
        result["chosen"][method] = best["sets"]
        if not callable(FIXED.get(method)):
            result.setdefault("fixed", {})[method] = FIXED.get(method, [])
        for seed in a.seeds:
            out = os.path.join(a.out, method, f"seed{seed}")
            row = train(a.dtrain, method, data_dir(a.data_root, seed), out, seed, best["sets"])
            row["seed"] = seed
            result["seeds"].setdefault(method, []).append(row)
        rows = result["seeds"][method]
        summary = {}
        for k in ("val", "test", "teacher_val", "teacher_test", "seconds", "step_ms"):
            vals = [r[k] for r in rows if r.get(k) is not None]
            if vals:
                summary[k] = (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
        result.setdefault("summary", {})[method] = summary
        pct = lambda k, v: v if k in ("seconds", "step_ms") else 100 * v
        print("==", method, best["sets"], {k: f"{pct(k, m):.2f} ± {pct(k, s):.2f}" for k, (m, s) in summary.items()},
              flush=True)
    if a.json:
        result.setdefault("provenance", {})["+".join(a.methods)] = provenance(
            f"python3 bench/brown_methods.py {'--pretrained ' if a.pretrained else ''}{'--dropout-grid ' if a.dropout_grid else ''}{'--epochs-grid ' if a.epochs_grid else ''}{''.join('--pretrain-set ' + x + ' ' for x in a.pretrain_set)}{''.join(repr('--also-grid=' + x) + ' ' for x in a.also_grid)}--methods {' '.join(a.methods)} --seeds {' '.join(map(str, a.seeds))}")
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

"""A MiniLM teacher for the bag model: Noisy Student on Brown genre (20 labels per class)
with targets exported from a fine-tuned encoder instead of the bag model itself.

The oracle (bench/brown_oracle.py) showed that self-training the bag model cannot lift it:
its own pseudo-labels are 24-32% right, and the 30% gap target needs about 46-48%. A
better source of targets is a different, stronger model trained on the same 300 labels:
MiniLM fine-tuned with FixMatch, or Mean Teacher's EMA teacher (bench/brown_encoder.py;
their checkpoints under runs/brown_encoder/seedN/<variant>/checkpoints). Its logits of the
unlabeled split are exported from the encoder's data set (WordPiece ids) and read by a bag
student on the bag data set (hashed n-grams) of the same split: the logits file's rows
fingerprint shows that both preparations hold the same documents in the same rows.

The student starts from the 40-epoch, 15-negative skip-gram embeddings of
bench/results/brown-methods-pretrained-e40.json (its supervised-only figure is the
baseline) and is chosen on seed 1's validation split over GRID, teacher included.
Supervised-only is tuned again over the same run lengths and table learning rates
(BASELINE_GRID, with the dropout grid of bench/brown_methods.py), so that the student's
extra knobs are not what it gains from.

  python3 bench/brown_distill.py --seeds 1 2 3 --json bench/results/brown-distill.json

And the way back (co-training): the chosen bag student of each seed as MiniLM's teacher.
--back exports its logits; bench/brown_encoder.py's ns_bag_* variants train on them.

  python3 bench/brown_distill.py --back --seeds 1 2 3 --json bench/results/brown-distill.json

The encoder checkpoints must exist (python3 bench/brown_encoder.py --seeds N --variants
fixmatch mean_teacher); exporting a seed's unlabeled split takes about 3.5 minutes on 2 cores.
"""
import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
import brown_methods as bm  # noqa: E402

PRETRAIN = ["train.epochs=40", "model.negatives=15"]
TEACHERS = {"fixmatch": [], "mean_teacher": ["--teacher"]}
GRID = {
    "teacher": list(TEACHERS),
    "consistency.kind": ['"kl"', '"ce_hard"'],
    "consistency.weight": [1.0, 3.0],
    "train.epochs": [25, 100],
    "optim.lr_mult.embedding": [0.1, 1.0],
}
BASELINE_GRID = {
    "model.embed_dropout": [0.0, 0.3, 0.5],
    "train.epochs": [25, 100],
    "optim.lr_mult.embedding": [0.1, 1.0],
}


def teacher_logits(dt, seed, teacher, out_root):
    """The encoder teacher's logits of seed's unlabeled split (exported once)."""
    path = os.path.join(out_root, f"seed{seed}-{teacher}.logits")
    if not os.path.exists(path):
        ckdir = f"runs/brown_encoder/seed{seed}/{teacher}/checkpoints"
        ckpt = os.path.join(ckdir, sorted(os.listdir(ckdir))[-1])
        subprocess.run([dt, "--quiet", "export-logits", "--checkpoint", ckpt, "--data",
                        f"runs/brown_encoder/seed{seed}/data", "--out", path] + TEACHERS[teacher],
                       check=True, stdout=open(path + ".txt", "w"))
    return path


def teacher_accuracy(logits):
    """The exported pseudo-labels' accuracy against the hidden labels, as export-logits
    printed it, or None."""
    try:
        for line in open(logits + ".txt"):
            if line.startswith("against the"):
                return float(line.rsplit("accuracy", 1)[1])
    except OSError:
        pass
    return None


def student(dt, seed, out_root, setting):
    """One run of the bag model from pretrained embeddings on `setting`: Noisy Student on
    the encoder teacher's logits, or with teacher None supervised-only (the baseline)."""
    data = bm.data_dir("runs/brown_pretrain", seed)
    sets = bm.pretrained_sets(dt, "runs/brown_pretrain", seed, PRETRAIN)
    # The grid's embedding learning-rate multiplier replaces the default one.
    sets = [s for s in sets if not s.startswith("optim.lr_mult.embedding")]
    sets += [f"{k}={v}" for k, v in setting.items() if k != "teacher"]
    name = "-".join(f"{v}" for v in setting.values()).replace('"', "")
    teacher = setting.get("teacher")
    if teacher is None:
        method, logits = "supervised", None
    else:
        method, logits = "noisy_student", teacher_logits(dt, seed, teacher, out_root)
        sets.append(f'noisy_student.logits="{logits}"')
    out = os.path.join(out_root, "students" if teacher else "supervised", f"seed{seed}-{name}")
    row = bm.train(dt, method, data, out, seed, sets)
    row.update(seed=seed, setting=setting)
    if logits:
        row["teacher_accuracy"] = teacher_accuracy(logits)
    print(json.dumps(row), flush=True)
    return row


def tuned(dt, seeds, out_root, grid):
    """`grid` swept on seed 1, the setting with the best validation accuracy run on every
    seed: (sweep, chosen, rows of the seeds)."""
    keys = list(grid)
    sweep = [student(dt, 1, out_root, dict(zip(keys, vals))) for vals in itertools.product(*grid.values())]
    chosen = max(sweep, key=lambda r: r["val"])["setting"]
    print("chosen on seed 1's validation split:", chosen, flush=True)
    rows = [r for r in sweep if r["setting"] == chosen and 1 in seeds]
    rows += [student(dt, s, out_root, chosen) for s in seeds if s != 1]
    return sweep, chosen, rows


def student_logits(dt, seed, out_root, chosen):
    """The chosen student of `seed` (trained again with its checkpoint: runs are
    deterministic) and its logits of the bag data set's unlabeled split, for the way back:
    the bag student as MiniLM's teacher (bench/brown_encoder.py, variants ns_bag_*)."""
    path = os.path.join(out_root, f"seed{seed}-bag.logits")
    if os.path.exists(path):
        return path
    data = bm.data_dir("runs/brown_pretrain", seed)
    sets = [s for s in bm.pretrained_sets(dt, "runs/brown_pretrain", seed, PRETRAIN)
            if not s.startswith("optim.lr_mult.embedding")]
    sets += [f"{k}={v}" for k, v in chosen.items() if k != "teacher"]
    sets.append(f'noisy_student.logits="{teacher_logits(dt, seed, chosen["teacher"], out_root)}"')
    out = os.path.join(out_root, "back", f"seed{seed}")
    cmd = [dt, "--quiet", "train", "--config", bm.CONFIG["noisy_student"], "--set", f'data.dir="{data}"',
           "--set", f'train.out_dir="{out}"', "--set", f"train.seed={seed}", "--set", "train.keep_checkpoints=1"]
    for x in sets:
        cmd += ["--set", x]
    subprocess.run(["rm", "-rf", out], check=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    ckdir = os.path.join(out, "checkpoints")
    subprocess.run([dt, "--quiet", "export-logits", "--checkpoint", os.path.join(ckdir, sorted(os.listdir(ckdir))[-1]),
                    "--data", data, "--out", path], check=True, stdout=open(path + ".txt", "w"))
    subprocess.run(["rm", "-rf", ckdir], check=True)
    return path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--out", default="runs/brown_distill")
    ap.add_argument("--dtrain", default=os.environ.get("DTRAIN_BIN", "target/release/dtrain"))
    ap.add_argument("--json")
    ap.add_argument("--back", action="store_true",
                    help="only export each seed's chosen student's logits (from --json's chosen setting) "
                         "for bench/brown_encoder.py's ns_bag_* variants")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    if a.back:
        chosen = json.load(open(a.json))["chosen"]
        for s in a.seeds:
            path = student_logits(a.dtrain, s, a.out, chosen)
            print(path, teacher_accuracy(path), flush=True)
        return
    sweep, chosen, rows = tuned(a.dtrain, a.seeds, a.out, GRID)
    # Supervised-only with the same knobs (the run length and the table's learning rate)
    # and the dropout grid of bench/brown_methods.py, chosen the same way.
    base_sweep, base_chosen, base = tuned(a.dtrain, a.seeds, a.out, BASELINE_GRID)
    committed = json.load(open("bench/results/brown-methods-pretrained-e40.json"))["seeds"]["supervised"]
    sd = statistics.stdev if len(rows) > 1 else (lambda _: 0.0)

    def stats(rs, key="test"):
        v = [100 * r[key] for r in sorted(rs, key=lambda r: r["seed"])]
        return dict(mean=statistics.mean(v), sd=sd(v), per_seed=v)
    summary = dict(student=stats(rows), supervised_tuned=stats(base),
                   supervised_committed=stats([r for r in committed if r["seed"] in a.seeds]),
                   student_val=stats(rows, "val"), supervised_tuned_val=stats(base, "val"))
    for k in ("student", "supervised_tuned", "supervised_committed"):
        print(f"{k:>22}: test {summary[k]['mean']:.2f} ± {summary[k]['sd']:.2f}  per seed {summary[k]['per_seed']}")
    if a.json:
        out = dict(sweep=sweep, chosen=chosen, seeds=rows, baseline_sweep=base_sweep,
                   baseline_chosen=base_chosen, baseline_seeds=base, summary=summary,
                   provenance=bm.provenance("python3 bench/brown_distill.py " + " ".join(sys.argv[1:])))
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

"""How good must pseudo-labels be for the encoder? Noisy Student on MiniLM (Brown genre, 20
labels per class, CPU, 64 tokens) with its teacher's pseudo-labels corrected, against the
hidden labels, up to a chosen accuracy: bench/brown_oracle.py's experiment on the encoder.

The teacher is the seed's supervised MiniLM run (bench/brown_encoder.py, variant
"supervised"); its logits of the unlabeled split come from `dtrain export-logits`. For each
accuracy p a random subset of the wrong rows is corrected (the hidden label's logit swapped
with the top one) until a fraction p of the argmaxes is right; "own" is the teacher
unchanged, which is plain Noisy Student on the encoder. The student is a fresh MiniLM from
configs/brown/encoder.toml trained with hard targets (`ce_hard`, λ 1) on three unlabeled
rows per labeled row (about 0.9 passes over the unlabeled split in the 10 labeled epochs),
with the strong augmentation of the WordPiece ids and the encoder's dropout 0.1 as the noise.
This uses labels no user has: it measures the method's ceiling, not a method.

  DTRAIN_BIN=/tmp/dtrain-exp python3 bench/brown_encoder_oracle.py --seeds 1 \
      --json bench/results/brown-encoder-oracle.json

--hidden-labels runs only the all-right case (p = 1) without training the teacher: with
`ce_hard` at threshold 0 the student reads nothing of the teacher's logits but their argmax,
so a file whose argmax is the hidden label (one-hot logits) gives the same run. The file's
header (the data set's identity) is taken from the seed's teacher logits when they exist,
else from the export of a one-step run (`oracle-template`).

  DTRAIN_BIN=/tmp/dtrain-exp python3 bench/brown_encoder_oracle.py --seeds 1 2 3 --hidden-labels \
      --json bench/results/brown-encoder-oracle-all-right.json

--epochs N trains the students for N labeled epochs instead of the config's 10 (so about
0.09·N passes over the unlabeled split); their runs are named with an -eN suffix.

  DTRAIN_BIN=/tmp/dtrain-exp python3 bench/brown_encoder_oracle.py --seeds 1 --hidden-labels --epochs 30

--baseline also trains the supervised run (the 300 labels alone) for the same number of
epochs, named supervised-eN, as the yardstick at that run length (row "supervised").

  DTRAIN_BIN=/tmp/dtrain-exp python3 bench/brown_encoder_oracle.py --seeds 1 --accuracies \
      --epochs 30 --baseline --json bench/results/brown-encoder-oracle-own-e30.json

--propagated replaces the teacher by `dtrain propagate`: label spreading over frozen MiniLM
sentence vectors (models/minilm), k and alpha chosen on val; its report is kept beside the
logits file. --val-target A then sets each seed's threshold from that report: the lowest
probability whose val rows are at least a fraction A right (runs named -propagated-vA).

  DTRAIN_BIN=/tmp/dtrain-prop python3 bench/brown_encoder_oracle.py --seeds 1 2 3 --accuracies \
      --epochs 30 --propagated --val-target 0.667 --json bench/results/brown-encoder-propagated-e30.json

--train-len N (with --propagated) trains the students on the rows cut at N tokens
(runs/brown_encoder/seedN/data-N) with train.group_by_length=50, so that a batch pads to
about its rows' own length; runs named with a -lenN suffix.

  DTRAIN_BIN=/tmp/dtrain-bv .venv/bin/python bench/brown_encoder_oracle.py --seeds 1 --accuracies --epochs 30 \
      --propagated --views three-view-256-aligned --train-len 256

--two-view spreads over two views of the rows instead, MiniLM's vectors and the seed's
skip-gram vectors (bench/brown_bag_propagate.py makes those under runs/brown_bag_ls/seedN),
with propagate's default grid (shift, k, alpha); runs named -propagated2-vA.

  DTRAIN_BIN=/tmp/dtrain-ls4 python3 bench/brown_encoder_oracle.py --seeds 1 --accuracies \
      --epochs 30 --propagated --two-view --val-target 0.667 --json bench/results/brown-encoder-propagated2-e30.json

--views KIND spreads over any kind of bench/brown_bag_propagate.py instead (--two-view is
--views two-view); e.g. three-view-aligned: MiniLM, skip-gram and TF-IDF views with
class-mass alignment chosen on val; runs named -propagated-KIND-vA.

  DTRAIN_BIN=/tmp/dtrain-al python3 bench/brown_encoder_oracle.py --seeds 1 2 3 --accuracies \
      --epochs 30 --propagated --views three-view-aligned --val-target 0.667 \
      --json bench/results/brown-encoder-propagated-3view-aligned-e30.json

One round of alternation (Iscen et al. 2019): the MiniLM student of the
three-view-256-aligned labels at threshold 0 (the run above without --val-target) is
embedded, its vectors become a fourth view (kind four-view-256-aligned) and a fresh
student learns the new labels:

  DTRAIN_BIN=/tmp/dtrain-rv .venv/bin/python bench/brown_encoder_oracle.py --seeds 1 2 3 --accuracies \
      --epochs 30 --propagated --views four-view-256-aligned \
      --json bench/results/brown-encoder-propagated-4view-256-aligned-t0-e30.json

--threshold T keeps only the pseudo-labels whose teacher probability is at least T
(`consistency.threshold`, confidence-filtered Noisy Student); runs named with a -tT suffix.

  DTRAIN_BIN=/tmp/dtrain-exp python3 bench/brown_encoder_oracle.py --seeds 1 --accuracies \
      --epochs 30 --threshold 0.8 --json bench/results/brown-encoder-noisy-student-t0.8-e30.json
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

STUDENT = ['method="noisy_student"', 'consistency.kind="ce_hard"', "consistency.weight=1.0",
           "consistency.temperature=1.0", "consistency.threshold=0.0", "unlabeled.ratio=3",
           "augment.deletion=0.1", "augment.replacement=0.1", "augment.swap=0.1"]
be.VARIANTS["noisy_student"] = STUDENT


def exported_logits(seed, data, name, extra=()):
    """The unlabeled split's logits of the seed's supervised MiniLM run `name` (with the
    settings `extra`), exported once to runs/brown_encoder/seedN/oracle/."""
    path = f"runs/brown_encoder/seed{seed}/oracle/{name}.logits"
    if not os.path.exists(path):
        run = "supervised" if name == "teacher" else f"oracle-{name}"
        be.run("supervised", seed, extra=list(extra), name=run)
        ckpts = f"runs/brown_encoder/seed{seed}/{run}/checkpoints"
        last = sorted(os.listdir(ckpts))[-1]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        subprocess.run([be.BIN, "--quiet", "export-logits", "--checkpoint", os.path.join(ckpts, last),
                        "--data", data, "--split", "unlabeled", "--out", path], check=True,
                       stdout=subprocess.DEVNULL)
    return path


def teacher_logits(seed, data):
    """The seed's supervised MiniLM run's logits of the unlabeled split."""
    return exported_logits(seed, data, "teacher")


def template_logits(seed, data):
    """A logits file of the seed's unlabeled split whose header fits it: the teacher's if
    exported, else a one-step run's (its values are not used)."""
    if os.path.exists(f"runs/brown_encoder/seed{seed}/oracle/teacher.logits"):
        return teacher_logits(seed, data)
    return exported_logits(seed, data, "template", ["train.steps=1"])


def propagated_logits(seed, data, kind="minilm"):
    """`dtrain propagate`'s logits of the seed's unlabeled split, and its val table:
    {threshold: (rows, accuracy)}. "minilm": frozen MiniLM vectors of `data` as they are
    (`--shift raw`, `--align 0`: the grid these runs were first measured with); any other
    `kind` is one of bench/brown_bag_propagate.py, made there (its views read the seed's
    protocol data sets and runs/brown_bag_ls/seedN, which that script makes when missing)."""
    if kind != "minilm":
        path, report = bp.views_logits(be.BIN, kind, seed)
        return path, bo.propagate_val_table(report)
    path = f"runs/brown_encoder/seed{seed}/oracle/propagated.logits"
    report = path[:-len(".logits")] + ".txt"
    if not (os.path.exists(path) and os.path.exists(report)):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # The grid these runs were measured with, before shifts and class-mass alignment.
        args = ["--model", "models/minilm", "--data", data, "--shift", "raw", "--align", "0"]
        out = subprocess.run([be.BIN, "--quiet", "propagate", *args, "--out", path], check=True,
                             capture_output=True, text=True).stdout
        open(report, "w").write(out)
    return path, bo.propagate_val_table(open(report).read())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[1])
    ap.add_argument("--accuracies", type=float, nargs="*", default=[0.5, 0.7, 1.0])
    ap.add_argument("--json")
    ap.add_argument("--hidden-labels", action="store_true",
                    help="only p = 1, from one-hot logits of the hidden labels (no teacher run)")
    ap.add_argument("--epochs", type=int, help="labeled epochs of the students (default: the config's 10)")
    ap.add_argument("--threshold", type=float,
                    help="keep only pseudo-labels at or above this teacher probability (default 0: all)")
    views = ap.add_mutually_exclusive_group()
    views.add_argument("--two-view", action="store_true", help="the same as --views two-view")
    views.add_argument("--views", default="minilm", choices=["minilm"] + bp.KINDS,
                    help="with --propagated: the views spread over (runs named -propagated for minilm, "
                    "-propagated2 for two-view, else -propagated-VIEWS; all but minilm read "
                    "runs/brown_bag_ls/seedN, made when missing by bench/brown_bag_propagate.py's recipe)")
    ap.add_argument("--propagated", action="store_true",
                    help="the teacher is `dtrain propagate` over frozen MiniLM vectors")
    ap.add_argument("--val-target", type=float,
                    help="with --propagated: the threshold is the lowest whose val rows are this fraction right")
    ap.add_argument("--train-len", type=int, default=64,
                    help="the students train on the data set cut at this many tokens (runs/brown_encoder/"
                    "seedN/data-N), with train.group_by_length=50 so batches pad little; runs named -lenN")
    ap.add_argument("--baseline", action="store_true",
                    help="also train the supervised run for --epochs, as the yardstick")
    a = ap.parse_args()
    if a.two_view:
        a.views = "two-view"
    if a.baseline and a.epochs is None:
        ap.error("--baseline trains the supervised run for --epochs: give --epochs")
    longer = [] if a.epochs is None else [f"train.epochs={a.epochs}"]
    suffix = "" if a.epochs is None else f"-e{a.epochs}"
    if a.train_len != 64:
        suffix += f"-len{a.train_len}"
    filtered = [] if a.threshold is None else [f"consistency.threshold={a.threshold}"]
    student_suffix = ("" if a.threshold is None else f"-t{a.threshold}") + suffix
    rows = []
    for seed in a.seeds:
        data = be.prepare(seed)
        if a.baseline:
            row = be.run("supervised", seed, extra=longer, name=f"supervised{suffix}")
            row.update(pseudo_label_accuracy=None, targets="supervised", epochs=a.epochs)
            print(json.dumps(row), flush=True)
            rows.append(row)
        if a.hidden_labels:
            hidden = bo.hidden_labels(data)
            buf, body, z = bo.read_logits(template_logits(seed, data))
            assert len(hidden) == len(z) and (hidden >= 0).all()
            path = f"runs/brown_encoder/seed{seed}/oracle/hidden.logits"
            bo.write_logits(path, buf, body, np.eye(z.shape[1], dtype=np.float32)[hidden])
            row = be.run("noisy_student", seed, extra=[f'noisy_student.logits="{path}"'] + longer + filtered,
                         name=f"oracle-student-hidden{student_suffix}")
            row.update(pseudo_label_accuracy=1.0, targets="hidden", epochs=a.epochs or 10)
            print(json.dumps(row), flush=True)
            rows.append(row)
            continue
        if a.propagated:
            path, table = propagated_logits(seed, data, a.views)
            hidden = bo.hidden_labels(data)
            _, _, z = bo.read_logits(path)
            p = np.exp(z - z.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            name = {"minilm": "propagated", "two-view": "propagated2"}.get(a.views, f"propagated-{a.views}")
            threshold = a.threshold or 0.0
            if a.val_target is not None:
                threshold = bo.lowest_threshold(table, a.val_target)
                name = f"{name}-v{a.val_target}"
            kept = p.max(1) >= threshold
            right = p.argmax(1) == hidden
            at_len = [] if a.train_len == 64 else [f'data.dir="{be.prepare(seed, max_len=a.train_len)}"',
                                                   "train.group_by_length=50"]
            row = be.run("noisy_student", seed, extra=[f'noisy_student.logits="{path}"', f"consistency.threshold={threshold}"]
                         + longer + at_len, name=f"oracle-student-{name}{suffix}")
            row.update(pseudo_label_accuracy=float(right.mean()), targets=name, epochs=a.epochs or 10,
                       threshold=threshold, kept=float(kept.mean()), kept_right=float(right[kept].mean()),
                       val_table={str(t): v for t, v in table.items()})
            print(json.dumps(row), flush=True)
            rows.append(row)
            continue
        own = teacher_logits(seed, data)
        hidden = bo.hidden_labels(data)
        buf, body, z = bo.read_logits(own)
        assert len(hidden) == len(z) and (hidden >= 0).all()
        base = float((z.argmax(1) == hidden).mean())
        print(f"seed {seed}: the teacher's pseudo-labels are {100 * base:.1f}% right on {len(z)} rows", flush=True)
        for target in [None] + [p for p in a.accuracies if p > base]:
            path = own
            if target is not None:
                path = f"runs/brown_encoder/seed{seed}/oracle/p{target}.logits"
                rng = np.random.default_rng([seed, int(round(target * 1000))])
                bo.write_logits(path, buf, body, bo.corrected(z, hidden, target, rng))
            name = "own" if target is None else str(target)
            row = be.run("noisy_student", seed, extra=[f'noisy_student.logits="{path}"'] + longer + filtered,
                         name=f"oracle-student-{name}{student_suffix}")
            row.update(pseudo_label_accuracy=base if target is None else target, targets=name,
                       epochs=a.epochs or 10, threshold=a.threshold or 0.0)
            print(json.dumps(row), flush=True)
            rows.append(row)
    summary = {}
    for k in dict.fromkeys(r["targets"] for r in rows):
        rs = [r for r in rows if r["targets"] == k]
        t = [100 * r["test"] for r in rs]
        pseudo = [100 * r["pseudo_label_accuracy"] for r in rs if r["pseudo_label_accuracy"] is not None]
        summary[k] = dict(pseudo=statistics.mean(pseudo) if pseudo else None,
                          test=statistics.mean(t), test_sd=statistics.stdev(t) if len(t) > 1 else 0.0,
                          seeds=len(t))
        what = f"pseudo-labels {summary[k]['pseudo']:.1f}% right" if pseudo else "the labels alone"
        print(f"{k:>5}: {what} -> test {summary[k]['test']:.2f} ± {summary[k]['test_sd']:.2f} ({len(t)} seeds)")
    if a.json:
        prov = bo.bm.provenance("python3 bench/brown_encoder_oracle.py " + " ".join(sys.argv[1:]))
        json.dump({"provenance": prov, "rows": rows, "summary": summary}, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()

"""Label spreading for the bag model: Brown genre, 20 labels per class, everything from the
seed's own skip-gram embeddings (configs/brown/pretrain.toml with 40 epochs and 15
negatives, the better recipe of docs/results.md).

Per seed:
  supervised   configs/brown/pretrained.toml from the embeddings (embed_dropout 0, the
               setting validation chose in bench/brown_methods.py --pretrained), the
               paired baseline;
  propagate    `dtrain propagate --model <the embeddings>` with its default grid (shift,
               k, alpha chosen on val): a row's vector is the mean of its words' pretrained
               vectors; its transductive test accuracy, and its pseudo-labels of the
               unlabeled split against the hidden labels (a diagnostic no user has);
  student      Noisy Student from the same embeddings on propagate's file: hard targets
               (ce_hard), embed_dropout 0, mu 1 or 3 and lambda in {0.3, 1, 3} chosen on
               val; the threshold is the lowest probability of propagate's val table whose
               val rows are at least --val-target right (fixed before the runs).

  .venv/bin/python bench/brown_bag_propagate.py --seeds 1 2 3 --json bench/results/brown-bag-propagate.json

--students KIND... adds, per seed and kind, a bag student of the labels `dtrain propagate`
spread over several views of the same rows (the file is made by the command below when
missing, its report beside it):

  two-view    MiniLM's pooled vectors (the encoder protocol's data set, 64 WordPiece
              tokens) and these skip-gram vectors:
                dtrain propagate --model models/minilm --data runs/brown_encoder/seedN/data \
                    --model runs/brown_bag_ls/seedN/pretrain --data runs/brown_bag_ls/seedN/data \
                    --out runs/brown_encoder/seedN/oracle/propagated-2view.logits
  three-view  the same and the rows' TF-IDF word vectors (… --tfidf runs/brown_bag_ls/seedN/data,
              out propagated-3view.logits)
  words       the bag protocol's own: skip-gram and TF-IDF vectors, no MiniLM
                dtrain propagate --model runs/brown_bag_ls/seedN/pretrain --data runs/brown_bag_ls/seedN/data \
                    --tfidf runs/brown_bag_ls/seedN/data --out runs/brown_bag_ls/seedN/propagated-words.logits
  These three keep the grid they were first measured with (--align 0); the kinds below
  add class-mass alignment (propagate's default grid: --align 0,0.5,1 chosen on val,
  prior the val split's label frequencies):
  three-view-aligned      as three-view (out propagated-3view-aligned.logits)
  three-view-256-aligned  as three-view, MiniLM reading 256 WordPiece tokens of each row
                          (runs/brown_encoder/seedN/data-256, the protocol's preparation
                          with tokenizer.subword.max_len=256; out propagated-3view-256-aligned.logits)
  words-aligned           as words (out runs/brown_bag_ls/seedN/propagated-words-aligned.logits)
  The kinds below spread again over the vectors of a MiniLM student trained on the
  three-view-256-aligned labels (bench/brown_encoder_oracle.py --propagated --views
  three-view-256-aligned --epochs 30: hard targets on every row; its last checkpoint,
  embedded at 64 tokens, the length it was trained on, into
  runs/brown_encoder/seedN/vectors-student-t0-64.safetensors): one round of the
  alternation of Iscen et al. 2019 (label propagation for deep semi-supervised learning):
  student-view            the student's vectors alone (out propagated-student1.logits)
  four-view-256-aligned   the student's vectors beside the three views of
                          three-view-256-aligned (out propagated-4view-256-aligned.logits)
  student-view-256        as student-view, the student reading 256 tokens of each row
                          (runs/brown_encoder/seedN/data-256, stored in
                          vectors-student-t0-64-at256.safetensors; a checkpoint reads rows
                          cut at another length than its run's since 9c8913f)
                          (out propagated-student1-256.logits)
  four-view-256s-aligned  as four-view-256-aligned with that view
                          (out propagated-4view-256s-aligned.logits)
  round3-256s-aligned     a second round: the vectors of the MiniLM student of the
                          four-view-256-aligned labels (the same recipe; its run
                          oracle-student-propagated-four-view-256-aligned-e30), reading 256
                          tokens, in place of the first student's, beside the three views
                          (out propagated-round3-256s-aligned.logits)
  five-view-256s-bag-aligned  four-view-256s-aligned's views and a fifth: the pooled
                          embedding of a bag student of the three-view-256-aligned labels
                          (configs/brown/spread_student.toml; bench/brown_bag_alternate.py's
                          first student, its checkpoint read as a view)
                          (out propagated-5view-256s-bag-aligned.logits)
  four-view-len256-aligned  as four-view-256s-aligned, the student trained on the 256-token
                          rows too (its run oracle-student-propagated-three-view-256-aligned-
                          e30-len256: the same recipe on runs/brown_encoder/seedN/data-256,
                          with train.group_by_length=50: bench/brown_encoder_oracle.py --train-len 256)
                          (out propagated-4view-len256-aligned.logits)
  The kinds below try the views' weights in the graph's similarity (`propagate --weights`):
  every weighting of 1s and 2s (all 2s left out: only ratios count), val choosing one with
  the rest of the aligned grid:
  four-view-256s-weighted  four-view-256s-aligned's views (15 weightings)
                          (out propagated-4view-256s-weighted.logits)
  three-view-256-weighted  three-view-256-aligned's views (7 weightings)
                          (out propagated-3view-256-weighted.logits)
  words-weighted          words-aligned's views (3 weightings)
                          (out runs/brown_bag_ls/seedN/propagated-words-weighted.logits)
  four-view-256w-aligned  as four-view-256s-aligned, the student trained on the
                          three-view-256-weighted labels (its run
                          oracle-student-propagated-three-view-256-weighted-e30), equal
                          weights (out propagated-4view-256w-aligned.logits)
  four-view-256w-weighted  the same views, 15 weightings (out propagated-4view-256w-weighted.logits)
  round3-256w-weighted    a second round on the weighted labels: the vectors of the MiniLM
                          student of the four-view-256w-weighted labels (the same recipe; its
                          run oracle-student-propagated-four-view-256w-weighted-e30), reading
                          256 tokens, in place of the first student's, 15 weightings
                          (out propagated-round3-256w-weighted.logits)
  round4-256w-weighted    a third round: the student of the round3-256w-weighted labels in
                          its place (run oracle-student-propagated-round3-256w-weighted-e30)
                          (out propagated-round4-256w-weighted.logits)

MiniLM's view is read from runs/brown_encoder/seedN/vectors-minilm-{64,256}.safetensors,
stored once by `dtrain embed --model models/minilm --data <the data set> --out <it>` when
missing (propagate then writes the same file as with --model models/minilm, in seconds).
(--two-view is --students two-view.) The student is configs/brown/distill_minilm.toml with
the settings bench/brown_distill.py chose for a MiniLM teacher (soft targets at weight 3,
100 epochs, the table at the full learning rate; fixed, not tuned again here), its logits
swapped for the spread labels.
"""
import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import brown_encoder as be  # noqa: E402
import brown_methods as bm  # noqa: E402
import brown_oracle as bo  # noqa: E402

PRETRAIN = ["train.epochs=40", "model.negatives=15"]
# The views of --students (see views_logits).
KINDS = ["two-view", "three-view", "words", "three-view-aligned", "three-view-256-aligned", "words-aligned",
         "student-view", "four-view-256-aligned", "student-view-256", "four-view-256s-aligned",
         "round3-256s-aligned", "five-view-256s-bag-aligned", "four-view-len256-aligned",
         "four-view-256s-weighted", "three-view-256-weighted", "words-weighted", "four-view-256w-aligned",
         "four-view-256w-weighted", "round3-256w-weighted", "round4-256w-weighted"]
# The rounds of the weighted alternation: a kind's fourth view is the MiniLM student of this
# kind's spread labels (bench/brown_encoder_oracle.py --propagated --views <it> --epochs 30).
STUDENT_OF = {"four-view-256w-weighted": "three-view-256-weighted",
              "round3-256w-weighted": "four-view-256w-weighted",
              "round4-256w-weighted": "round3-256w-weighted"}
STUDENT_GRID = {"consistency.weight": [0.3, 1.0, 3.0], "unlabeled.ratio": [1, 3]}


def sh(*args, **kw):
    return subprocess.run(list(args), check=True, **kw)


def prepare(dt, root, seed):
    """The seed's data set and embeddings (made once)."""
    data = os.path.join(root, f"seed{seed}", "data")
    pre = os.path.join(root, f"seed{seed}", "pretrain")
    if not os.path.exists(os.path.join(data, "manifest.json")):
        sh("rm", "-rf", data)
        sh(dt, "--quiet", "prepare", "--config", "configs/brown/prepare.toml", "--input", "data/brown_genre.tsv.gz",
           "--set", f"split.seed={seed}", "--out", data, stdout=subprocess.DEVNULL)
    if not os.path.exists(os.path.join(pre, "embeddings.safetensors")):
        sh("rm", "-rf", pre)
        args = [dt, "--quiet", "pretrain", "--config", "configs/brown/pretrain.toml", "--set", f'data.dir="{data}"',
                "--set", f'train.out_dir="{pre}"', "--set", f"train.seed={seed}", "--set", "train.threads=2",
                "--set", "train.checkpoint_every=0"]
        for s in PRETRAIN:
            args += ["--set", s]
        sh(*args, stdout=subprocess.DEVNULL)
    return data, pre


def stored(dt, model, data, out):
    """`out`: the rows' vectors of `data` by `model`, stored by `dtrain embed --data` when
    missing (propagate reads them as the view, writing what embedding afresh writes)."""
    if not os.path.exists(out):
        sh(dt, "--quiet", "embed", "--model", model, "--data", data, "--out", out, stdout=subprocess.DEVNULL)
    return out


def propagate(dt, root, seed, data, pre):
    """propagate's logits file and printed report (made once)."""
    path = os.path.join(root, f"seed{seed}", "propagated.logits")
    report = path[:-len(".logits")] + ".txt"
    if not (os.path.exists(path) and os.path.exists(report)):
        out = sh(dt, "--quiet", "propagate", "--model", pre, "--data", data, "--align", "0", "--out", path,
                 capture_output=True, text=True).stdout
        open(report, "w").write(out)
    return path, open(report).read()


def chosen_line(report):
    """The chosen setting's shift, k, alpha, val accuracy (and --align power, and the views'
    weights, in reports that have them) and the transductive test accuracy."""
    line = next(x for x in report.splitlines() if "<- chosen" in x)
    shift, k, alpha, val = line.split()[:4]
    got = dict(shift=shift, k=int(k), alpha=float(alpha))
    if "<- chosen: weights " in line:
        # Several --weights: the chosen weighting comes first.
        weights, rest = line.split("<- chosen: weights ")[1].split(", ", 1)
        got["weights"] = [float(w) for w in weights.split(",")]
        line = line.split("<- chosen: ")[0] + "<- chosen: " + rest
    if "<- chosen: align " in line:
        # One val column per --align power; the chosen power and its val accuracy follow.
        align, val = line.split("<- chosen: align ")[1].split(", val accuracy ")
        got["align"] = float(align)
    got.setdefault("align", 0.0)
    test = next(x for x in report.splitlines() if x.startswith("test accuracy of the chosen setting"))
    return dict(got, val=float(val), test=float(test.split(":")[1].split()[0]))


def views_logits(dt, kind, seed):
    """The seed's labels spread over the views of `kind` (see the module doc), made once:
    the logits file's path and propagate's report."""
    path, views = kind_views(dt, kind, seed)
    return spread(dt, path, views)


def spread(dt, path, views):
    """`dtrain propagate` of the views `views()` gives (its arguments) into `path`, made once:
    the path and propagate's report (kept beside it)."""
    report = path[:-len(".logits")] + ".txt"
    if not (os.path.exists(path) and os.path.exists(report)):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        out = sh(dt, "--quiet", "propagate", *views(), "--out", path, capture_output=True, text=True).stdout
        open(report, "w").write(out)
    return path, open(report).read()


def kind_views(dt, kind, seed):
    """The logits file of `kind`'s spread labels for the seed, and a function giving its
    views' propagate arguments (making what they read when missing)."""
    bag = f"runs/brown_bag_ls/seed{seed}"
    oracle = f"runs/brown_encoder/seed{seed}/oracle"

    def minilm(max_len):
        # The encoder protocol's data set (made with $DTRAIN_BIN when missing), and MiniLM's
        # vectors of its rows, stored once.
        data = be.prepare(seed, max_len=max_len)
        vectors = f"runs/brown_encoder/seed{seed}/vectors-minilm-{max_len}.safetensors"
        return ["--model", stored(dt, "models/minilm", data, vectors), "--data", data]
    def student(max_len=64, labels="three-view-256-aligned", trained_on=64):
        # The MiniLM student of the `labels` kind's spread labels (threshold 0, 30 epochs,
        # trained on `trained_on` tokens): its last checkpoint's vectors of the data set cut
        # at `max_len` tokens, stored once.
        data = be.prepare(seed, max_len=max_len)
        run = f"oracle-student-propagated-{labels}-e30" + ("" if trained_on == 64 else f"-len{trained_on}")
        ckpts = f"runs/brown_encoder/seed{seed}/{run}/checkpoints"
        last = os.path.join(ckpts, sorted(os.listdir(ckpts))[-1])
        at = "" if max_len == 64 else f"-at{max_len}"
        of = "" if labels == "three-view-256-aligned" else f"-{labels}"
        vectors = f"runs/brown_encoder/seed{seed}/vectors-student{of}-t0-{trained_on}{at}.safetensors"
        return ["--model", stored(dt, last, data, vectors), "--data", data]
    def bag_student():
        # The bag student of the three-view-256-aligned labels (bench/brown_bag_alternate.py's
        # first student of that kind; trained there when missing): its pooled embedding.
        run = f"{bag}/runs/alternate-three-view-256-aligned/student1/checkpoints"
        if not os.path.isdir(run):
            sh(sys.executable, "bench/brown_bag_alternate.py", "--kind", "three-view-256-aligned", "--seeds", str(seed),
               "--rounds", "0", "--dtrain", dt)
        return ["--model", os.path.join(run, sorted(os.listdir(run))[-1]), "--data", f"{bag}/data"]
    def words():
        # The bag protocol's data set and skip-gram vectors (made once: a fresh seed's too).
        data, pre = prepare(dt, "runs/brown_bag_ls", seed)
        return ["--model", pre, "--data", data]
    def tfidf():
        return ["--tfidf", prepare(dt, "runs/brown_bag_ls", seed)[0]]
    # The kinds measured before class-mass alignment existed keep their grid (--align 0).
    plain = ["--align", "0"]

    def weighted(m):
        # Every weighting of m views by 1s and 2s but all 2s (the same graph as all 1s).
        return [a for w in itertools.product([1, 2], repeat=m) if set(w) != {2}
                for a in ("--weights", ",".join(map(str, w)))]

    def student_round():
        # The views of one round of the weighted alternation: the MiniLM student of the spread
        # labels of the round before (STUDENT_OF), reading 256 tokens, beside the three views,
        # 15 weightings.
        return student(256, STUDENT_OF[kind]) + minilm(256) + words() + tfidf() + weighted(4)
    path, views = {
        "two-view": (f"{oracle}/propagated-2view.logits", lambda: minilm(64) + words() + plain),
        "three-view": (f"{oracle}/propagated-3view.logits", lambda: minilm(64) + words() + tfidf() + plain),
        "words": (f"{bag}/propagated-words.logits", lambda: words() + tfidf() + plain),
        "three-view-aligned": (f"{oracle}/propagated-3view-aligned.logits", lambda: minilm(64) + words() + tfidf()),
        "three-view-256-aligned": (f"{oracle}/propagated-3view-256-aligned.logits",
                                   lambda: minilm(256) + words() + tfidf()),
        "words-aligned": (f"{bag}/propagated-words-aligned.logits", lambda: words() + tfidf()),
        "student-view": (f"{oracle}/propagated-student1.logits", student),
        "four-view-256-aligned": (f"{oracle}/propagated-4view-256-aligned.logits",
                                  lambda: student() + minilm(256) + words() + tfidf()),
        "student-view-256": (f"{oracle}/propagated-student1-256.logits", lambda: student(256)),
        "four-view-256s-aligned": (f"{oracle}/propagated-4view-256s-aligned.logits",
                                   lambda: student(256) + minilm(256) + words() + tfidf()),
        "round3-256s-aligned": (f"{oracle}/propagated-round3-256s-aligned.logits",
                                lambda: student(256, "four-view-256-aligned") + minilm(256) + words() + tfidf()),
        "five-view-256s-bag-aligned": (f"{oracle}/propagated-5view-256s-bag-aligned.logits",
                                       lambda: student(256) + minilm(256) + words() + tfidf() + bag_student()),
        "four-view-len256-aligned": (f"{oracle}/propagated-4view-len256-aligned.logits",
                                     lambda: student(256, trained_on=256) + minilm(256) + words() + tfidf()),
        "four-view-256s-weighted": (f"{oracle}/propagated-4view-256s-weighted.logits",
                                    lambda: student(256) + minilm(256) + words() + tfidf() + weighted(4)),
        "three-view-256-weighted": (f"{oracle}/propagated-3view-256-weighted.logits",
                                    lambda: minilm(256) + words() + tfidf() + weighted(3)),
        "words-weighted": (f"{bag}/propagated-words-weighted.logits", lambda: words() + tfidf() + weighted(2)),
        "four-view-256w-aligned": (f"{oracle}/propagated-4view-256w-aligned.logits",
                                   lambda: student(256, "three-view-256-weighted") + minilm(256) + words() + tfidf()),
        "four-view-256w-weighted": (f"{oracle}/propagated-4view-256w-weighted.logits", student_round),
        "round3-256w-weighted": (f"{oracle}/propagated-round3-256w-weighted.logits", student_round),
        "round4-256w-weighted": (f"{oracle}/propagated-round4-256w-weighted.logits", student_round),
    }[kind]
    return path, views


def spread_student(dt, kind, seed, data, runs):
    """The seed's labels spread over the views of `kind` and the bag student trained on them."""
    path, report = views_logits(dt, kind, seed)
    spread = chosen_line(report)
    hidden = bo.hidden_labels(data)
    _, _, z = bo.read_logits(path)
    spread["unlabeled_right"] = float((z.argmax(1) == hidden).mean())
    sets = [f'noisy_student.logits="{path}"', 'consistency.kind="kl"', "consistency.weight=3.0",
            "train.epochs=100", "optim.lr_mult.embedding=1.0", "model.embed_dropout=0.5"]
    saved = bm.CONFIG.get("distill")
    bm.CONFIG["distill"] = "configs/brown/distill_minilm.toml"
    try:
        student = bm.train(dt, "distill", data, os.path.join(runs, f"{kind}-student"), seed, sets)
    finally:
        if saved is None:
            del bm.CONFIG["distill"]
    print(json.dumps({"seed": seed, kind: spread["test"], f"{kind}_student": student["test"]}), flush=True)
    return dict(propagate=spread, student=student)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--root", default="runs/brown_bag_ls")
    ap.add_argument("--dtrain", default=os.environ.get("DTRAIN_BIN", "target/release/dtrain"))
    ap.add_argument("--val-target", type=float, default=0.667)
    ap.add_argument("--students", nargs="+", default=[], choices=KINDS)
    ap.add_argument("--two-view", action="store_true", help="the same as --students two-view")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.two_view and "two-view" not in a.students:
        a.students.insert(0, "two-view")
    dt = a.dtrain
    out = {"seeds": {}}
    for seed in a.seeds:
        data, pre = prepare(dt, a.root, seed)
        bm.EXTRA["sets"] = lambda _seed: [f'model.init_from="{pre}"', "optim.lr_mult.embedding=0.1",
                                          "model.embed_dropout=0.0"]
        runs = os.path.join(a.root, f"seed{seed}", "runs")
        sup = bm.train(dt, "supervised", data, os.path.join(runs, "supervised"), seed, [])
        path, report = propagate(dt, a.root, seed, data, pre)
        spread = chosen_line(report)
        table = bo.propagate_val_table(report)
        threshold = bo.lowest_threshold(table, a.val_target)
        hidden = bo.hidden_labels(data)
        _, _, z = bo.read_logits(path)
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        right = p.argmax(1) == hidden
        kept = p.max(1) >= threshold
        spread.update(unlabeled_right=float(right.mean()), threshold=threshold, kept=float(kept.mean()),
                      kept_right=float(right[kept].mean()),
                      val_table={str(t): v for t, v in table.items()})
        fixed = [f'noisy_student.logits="{path}"', f"consistency.threshold={threshold}",
                 'consistency.kind="ce_hard"']
        sweep = []
        for values in itertools.product(*STUDENT_GRID.values()):
            sets = [f"{k}={v}" for k, v in zip(STUDENT_GRID, values)]
            name = "student-" + "-".join(s.replace(".", "_").replace("=", "") for s in sets)
            row = bm.train(dt, "noisy_student", data, os.path.join(runs, name), seed, fixed + sets)
            row["sets"] = sets
            sweep.append(row)
            print(json.dumps(dict(seed=seed, **row)), flush=True)
        best = max(sweep, key=lambda r: r["val"])
        out["seeds"][seed] = dict(supervised=sup, propagate=spread, student=best, student_sweep=sweep)
        for kind in a.students:
            out["seeds"][seed][kind.replace("-", "_")] = spread_student(dt, kind, seed, data, runs)
        print(json.dumps(dict(seed=seed, supervised=sup["test"], propagate=spread["test"], student=best["test"],
                              student_sets=best["sets"])), flush=True)
    seeds = list(out["seeds"].values())

    def ms(xs):
        return [statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0]
    out["summary"] = {
        "supervised_test": ms([s["supervised"]["test"] for s in seeds]),
        "propagate_test": ms([s["propagate"]["test"] for s in seeds]),
        "student_test": ms([s["student"]["test"] for s in seeds]),
        "propagate_gain": ms([s["propagate"]["test"] - s["supervised"]["test"] for s in seeds]),
        "student_gain": ms([s["student"]["test"] - s["supervised"]["test"] for s in seeds]),
        "unlabeled_right": ms([s["propagate"]["unlabeled_right"] for s in seeds]),
    }
    for kind in a.students:
        k = kind.replace("-", "_")
        out["summary"].update({
            f"{k}_test": ms([s[k]["propagate"]["test"] for s in seeds]),
            f"{k}_unlabeled_right": ms([s[k]["propagate"]["unlabeled_right"] for s in seeds]),
            f"{k}_student_test": ms([s[k]["student"]["test"] for s in seeds]),
            f"{k}_student_gain": ms([s[k]["student"]["test"] - s["supervised"]["test"] for s in seeds]),
        })
    print(json.dumps(out["summary"]))
    out["provenance"] = bm.provenance(
        f"python3 bench/brown_bag_propagate.py --seeds {' '.join(map(str, a.seeds))} --val-target {a.val_target}"
        + (f" --students {' '.join(a.students)}" if a.students else ""))
    if a.json:
        json.dump(out, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()

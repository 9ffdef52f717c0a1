"""Pretrained MiniLM on Brown genre, 20 labels per class: supervised fine-tuning and
semi-supervised methods on top, on the CPU, with paragraphs cut to 64 WordPiece tokens.

Every seed N prepares its own split (split seed = training seed, as bench/brown_methods.py)
under runs/brown_encoder/seedN/data, then runs each variant from configs/brown/encoder.toml
plus the variant's settings. A run whose metrics.jsonl already holds its test record is
read, not run again. Prints and writes val/test accuracy (student, and teacher where there
is one) and seconds per run.

  python3 bench/brown_encoder.py --seeds 1 2 3 --variants supervised uda \
      --json bench/results/brown-encoder.json
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import time

VARIANTS = {
    "supervised": [],
    # UDA (METHODS.md §9): sharpened (T 0.4), masked (0.8) weak-view targets on a strong
    # view of the WordPiece ids; one unlabeled row per labeled row.
    "uda": ['method="uda"', "unlabeled.ratio=1", 'consistency.kind="kl"', "consistency.weight=1.0",
            "consistency.temperature=0.4", "consistency.threshold=0.8"],
    # Training-signal annealing (METHODS.md §1, exp schedule): a labeled row whose p_y
    # exceeds η_t leaves the loss, slowing the over-confident fit of 300 labels that makes
    # UDA's mask pass wrong pseudo-labels; with its supervised-only control.
    "uda_tsa": ['method="uda"', "unlabeled.ratio=1", 'consistency.kind="kl"', "consistency.weight=1.0",
                "consistency.temperature=0.4", "consistency.threshold=0.8", 'loss.tsa="exp"'],
    "supervised_tsa": ['loss.tsa="exp"'],
    "mean_teacher": ['method="mean_teacher"', "unlabeled.ratio=1", "consistency.weight=10.0",
                     "consistency.scale_by_labeled_ratio=false"],
    "fixmatch": ['method="fixmatch"', "unlabeled.ratio=1", "consistency.threshold=0.95"],
    # Meta Pseudo Labels with two MiniLMs (the teacher takes the student's model and
    # optimizer), one unlabeled row per labeled row, no teacher UDA term (λ 0, as the bag
    # model's MPL chose on validation).
    "mpl": ['method="mpl"', "unlabeled.ratio=1", "consistency.weight=0.0"],
    # BERT's attention-probability dropout (MiniLM's config: 0.1), off in encoder.toml.
    "supervised_attn_dropout": ["model.encoder.attention_dropout=0.1"],
    # The ceiling: every training label of the split (no labels_per_class), 2 epochs.
    "all_labels": ["train.epochs=2", "train.eval_every=100000"],
    # Supervised fine-tuning from MiniLM after masked-LM continued pretraining on the seed's
    # train + unlabeled paragraphs (configs/brown/mlm.toml: 1 epoch, lr 5e-5), made once per
    # seed under runs/brown_encoder/seedN/mlm.
    "mlm_supervised": [],
    # FixMatch (as "fixmatch") from the same masked-LM encoder.
    "mlm_fixmatch": ['method="fixmatch"', "unlabeled.ratio=1", "consistency.threshold=0.95"],
    # Supervised fine-tuning after masked-LM pretraining whose fresh head first trains
    # alone for one pass over the text (MLM_RECIPES["head"]).
    "mlm_head_supervised": [],
    # Mean Teacher (as "mean_teacher") and UDA (as "uda") from the head-warm-up masked-LM
    # encoder.
    "mlm_head_mean_teacher": ['method="mean_teacher"', "unlabeled.ratio=1", "consistency.weight=10.0",
                              "consistency.scale_by_labeled_ratio=false"],
    "mlm_head_uda": ['method="uda"', "unlabeled.ratio=1", 'consistency.kind="kl"', "consistency.weight=1.0",
                     "consistency.temperature=0.4", "consistency.threshold=0.8"],
    # MPL (as "mpl": two encoders, both from the masked-LM encoder) from the same encoder.
    "mlm_head_mpl": ['method="mpl"', "unlabeled.ratio=1", "consistency.weight=0.0"],
}
# Masked-LM recipes on top of configs/brown/mlm.toml. all-MiniLM-L6-v2 ships no MLM head:
# "head" trains the fresh head alone (encoder frozen) for 684 steps, one pass over the
# seed's train + unlabeled paragraphs at batch 16, at 1e-3, before the usual epoch.
MLM_RECIPES = {"": [], "head": ["mlm.head_warmup_steps=684", "mlm.head_warmup_lr=0.001"]}
# Variants that start from the seed's masked-LM encoder, and its recipe.
FROM_MLM = {"mlm_supervised": "", "mlm_fixmatch": "", "mlm_head_supervised": "head", "mlm_head_mean_teacher": "head",
            "mlm_head_uda": "head", "mlm_head_mpl": "head"}
# Variants trained on a split that keeps every label.
ALL_LABELS = {"all_labels"}
BIN = os.environ.get("DTRAIN_BIN", "./target/release/dtrain")


def prepare(seed, all_labels=False, max_len=64):
    """The seed's data set (made once): MiniLM's WordPiece ids cut at `max_len` tokens (the
    protocol's 64 unless asked; another length is named data-N)."""
    data = (f"runs/brown_encoder/seed{seed}/data" + ("-all" if all_labels else "")
            + ("" if max_len == 64 else f"-{max_len}"))
    # The all-labels split is configs/brown/prepare.toml without labels_per_class.
    config = [] if all_labels else ["--config", "configs/brown/prepare.toml"]
    if not os.path.exists(os.path.join(data, "manifest.json")):
        subprocess.run([BIN, "--quiet", "prepare"] + config +
                       ["--input", "data/brown_genre.tsv.gz", "--out", data,
                        "--set", f"split.seed={seed}",
                        "--set", "tokenizer.subword.path=models/minilm/tokenizer.json",
                        "--set", f"tokenizer.subword.max_len={max_len}"], check=True, stdout=subprocess.DEVNULL)
    return data


def records(out):
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path)]


def final(recs, split, model=None):
    rows = [r for r in recs if r.get("split") == split and r.get("model") == model]
    return rows[-1]["accuracy"] if rows else None


def mlm_encoder(seed, data, recipe=""):
    """The seed's masked-LM continued pretraining of MiniLM with MLM_RECIPES[recipe] (made
    once); its encoder dir."""
    out = f"runs/brown_encoder/seed{seed}/mlm" + (f"-{recipe}" if recipe else "")
    enc = os.path.join(out, "encoder")
    if not os.path.exists(os.path.join(enc, "DONE")):
        subprocess.run(["rm", "-rf", out], check=True)
        t0 = time.time()
        subprocess.run([BIN, "--quiet", "pretrain", "--config", "configs/brown/mlm.toml",
                        "--set", f'data.dir="{data}"', "--set", f'train.out_dir="{out}"',
                        "--set", f"train.seed={seed}"] + [x for kv in MLM_RECIPES[recipe] for x in ("--set", kv)],
                       check=True, stdout=subprocess.DEVNULL)
        json.dump({"seconds": time.time() - t0}, open(os.path.join(out, "wall.json"), "w"))
    return enc


def run(variant, seed, cached_only=False, extra=(), name=None):
    """One run of `variant` (plus the settings `extra`) under runs/brown_encoder/seedN/NAME
    (NAME defaults to the variant), or its cached result."""
    out = f"runs/brown_encoder/seed{seed}/{name or variant}"
    recs = records(out)
    if cached_only and final(recs, "test") is None:
        return None
    data = prepare(seed, variant in ALL_LABELS)
    secs = None
    if final(recs, "test") is None:
        if os.path.exists(out):
            subprocess.run(["rm", "-rf", out], check=True)
        sets = [f'data.dir="{data}"', f'train.out_dir="{out}"', f"train.seed={seed}"] + VARIANTS[variant] + list(extra)
        if variant in FROM_MLM:
            sets.append(f'model.encoder.pretrained="{mlm_encoder(seed, data, FROM_MLM[variant])}"')
        cmd = [BIN, "--quiet", "train", "--config", "configs/brown/encoder.toml"]
        for s in sets:
            cmd += ["--set", s]
        t0 = time.time()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        secs = time.time() - t0
        json.dump({"seconds": secs}, open(os.path.join(out, "wall.json"), "w"))
        recs = records(out)
    else:
        wall = os.path.join(out, "wall.json")
        secs = json.load(open(wall))["seconds"] if os.path.exists(wall) else None
    steps = [r for r in recs if "step_ms" in r]
    return {
        "variant": name or variant, "seed": seed, "seconds": secs,
        "val": final(recs, "val"), "test": final(recs, "test"),
        "teacher_val": final(recs, "val", "teacher"), "teacher_test": final(recs, "test", "teacher"),
        "step_ms": statistics.median(r["step_ms"] for r in steps) if steps else None,
    }


def summary(rows, key):
    xs = [100 * r[key] for r in rows if r[key] is not None]
    if not xs:
        return None
    return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0, len(xs))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--variants", nargs="+", default=["supervised", "uda"])
    ap.add_argument("--json")
    ap.add_argument("--cached-only", action="store_true",
                    help="report the runs already finished; run nothing")
    a = ap.parse_args()
    rows = [r for v in a.variants for s in a.seeds if (r := run(v, s, a.cached_only)) is not None]
    print(f"{'variant':14} {'val':>14} {'test':>14} {'teacher test':>14} {'s/run':>7} {'step ms':>8}")
    table = {}
    for v in a.variants:
        rs = [r for r in rows if r["variant"] == v]
        cells = {k: summary(rs, k) for k in ["val", "test", "teacher_test"]}
        table[v] = cells
        fmt = lambda c: f"{c[0]:6.2f} ± {c[1]:4.2f}" if c else "—"
        secs = [r["seconds"] for r in rs if r["seconds"]]
        ms = [r["step_ms"] for r in rs if r["step_ms"]]
        print(f"{v:14} {fmt(cells['val']):>14} {fmt(cells['test']):>14} {fmt(cells['teacher_test']):>14} "
              f"{statistics.mean(secs) if secs else 0:7.0f} {statistics.median(ms) if ms else 0:8.0f}")
    if a.json:
        rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout.strip()
        prov = {"command": "python3 bench/brown_encoder.py " + " ".join(
                    ["--seeds"] + [str(s) for s in a.seeds] + ["--variants"] + a.variants + ["--json", a.json]
                    + (["--cached-only"] if a.cached_only else [])),
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git_revision": rev,
                "machine": f"{platform.machine()}, {os.cpu_count()} cpus", "device": "cpu"}
        json.dump({"provenance": prov, "runs": rows, "summary": table}, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()

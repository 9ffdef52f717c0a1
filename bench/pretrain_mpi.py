"""Skip-gram pretraining across MPI ranks on Brown genre (the 12k-paragraph pool), against
one process: words/s, and the classifier's accuracy when initialised from each result.
Per seed (the split seed, the pretraining seed and the training seed together), on the data
sets bench/brown_pretrain.py prepares (runs/brown_pretrain/seedS/pool/data), each run
  1x2               one process, 2 Hogwild threads (docs/results.md's pretraining table)
  WxT:SYNC          W ranks x T threads, merging their tables every SYNC words per rank
then configs/brown/pretrained.toml from each. Prints a table and writes JSON.

  python3 bench/pretrain_mpi.py --seeds 1 2 3 --runs 1x2 2x1:20000 4x1:20000 --json OUT.json
"""
import argparse
import json
import os
import statistics
import subprocess
import time


def sh(*cmd, env=None):
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--runs", nargs="+", default=["1x2", "2x1:20000", "4x1:20000"])
    ap.add_argument("--data", default="runs/brown_pretrain/seed{seed}/pool/data")
    ap.add_argument("--out", default="runs/pretrain_mpi")
    ap.add_argument("--dtrain", default="target/release/dtrain")
    ap.add_argument("--json")
    a = ap.parse_args()
    env = dict(os.environ, DTRAIN_BIN=os.path.abspath(a.dtrain))
    runs = [(r, r.split(":")) for r in a.runs]
    rows = []
    for seed in a.seeds:
        data = a.data.format(seed=seed)
        for name, spec in runs:
            world, threads = (int(x) for x in spec[0].split("x"))
            out = os.path.join(a.out, f"seed{seed}", name.replace(":", "_"))
            pre = os.path.join(out, "pretrain")
            sh("rm", "-rf", out)
            sets = ["--set", f'data.dir="{data}"', "--set", f'train.out_dir="{pre}"', "--set", f"train.seed={seed}",
                    "--set", "train.checkpoint_every=0"]
            t0 = time.time()
            sets += ["--set", f"train.threads={threads}"]
            if world == 1:
                sh(a.dtrain, "--quiet", "pretrain", "--config", "configs/brown/pretrain.toml", *sets)
            else:
                sh("launch/mpirun", "-n", str(world), "pretrain", "--config", "configs/brown/pretrain.toml", *sets,
                   "--set", f"train.sync_words={spec[1]}", env=env)
            wall = time.time() - t0
            recs = [json.loads(l) for l in open(os.path.join(pre, "metrics.jsonl"))]
            secs = sum(r["seconds"] for r in recs)
            wps = sum(r["words_per_s"] * r["seconds"] for r in recs) / secs
            tr = os.path.join(out, "train")
            sh(a.dtrain, "--quiet", "train", "--config", "configs/brown/pretrained.toml", "--set", f'data.dir="{data}"',
               "--set", f'train.out_dir="{tr}"', "--set", f"train.seed={seed}", "--set", f'model.init_from="{pre}"')
            m = [json.loads(l) for l in open(os.path.join(tr, "metrics.jsonl"))]
            test = [r for r in m if r.get("split") == "test"][-1]
            val = [r for r in m if r.get("split") == "val"][-1]
            row = dict(seed=seed, run=name, words_per_s=wps, train_seconds=secs, wall_seconds=wall,
                       final_loss=recs[-1]["loss"], test_accuracy=test["accuracy"],
                       test_macro_f1=test["macro_f1"], val_accuracy=val["accuracy"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    for name, _ in runs:
        mine = [r for r in rows if r["run"] == name]
        s = {}
        for k in ("test_accuracy", "test_macro_f1", "val_accuracy", "words_per_s", "final_loss"):
            xs = [r[k] * (100 if "acc" in k or "f1" in k else 1) for r in mine]
            s[k] = [statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0]
        summary[name] = s
        print(f"{name:20} test {s['test_accuracy'][0]:5.1f} ± {s['test_accuracy'][1]:.1f}  "
              f"val {s['val_accuracy'][0]:5.1f} ± {s['val_accuracy'][1]:.1f}  "
              f"{s['words_per_s'][0] / 1e3:6.0f}k words/s  loss {s['final_loss'][0]:.3f}")
    if a.json:
        json.dump(dict(runs=rows, summary=summary), open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()

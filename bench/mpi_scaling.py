"""Training step time on 1 and 2 MPI ranks (CPU backend) on Brown genre, 20 labels per class,
for supervised, Mean Teacher and FixMatch (configs/brown/*.toml), plus the check that both
world sizes reach the same test accuracy. On a 2-core machine: 1 rank × 2 rayon threads,
1 rank × 1 thread, and 2 ranks × 1 thread.

  python3 bench/mpi_scaling.py --steps 300 --json bench/results/mpi-step-time.json

Step time is metrics.jsonl's step_ms (forward, backward, all-reduce, update; evaluation and
checkpoints excluded), the mean over the run's logging windows after the first.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

BIN = "target/release/dtrain"
DATA = "runs/brown20/data"
ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
           OMPI_MCA_plm="isolated")


def sh(cmd, env=None):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.strip()


def run(method, world, threads, steps):
    out = f"runs/mpi_scaling/{method}-w{world}-t{threads}"
    subprocess.run(["rm", "-rf", out], check=True)
    cmd = ["mpirun", "-n", str(world), "--oversubscribe", "--bind-to", "none", BIN, "train",
           "--config", f"configs/brown/{method}.toml", "--quiet",
           "--set", f'train.out_dir="{out}"', "--set", f"train.steps={steps}",
           "--set", "train.log_every=50", "--set", f"train.eval_every={steps}"]
    t = time.time()
    subprocess.run(cmd, check=True, capture_output=True, env=dict(ENV, RAYON_NUM_THREADS=str(threads)))
    wall = time.time() - t
    recs = [json.loads(l) for l in open(f"{out}/metrics.jsonl")]
    steps_ms = [r["step_ms"] for r in recs if "step_ms" in r][1:]
    test = [r for r in recs if r.get("split") == "test" and "model" not in r][-1]
    return {"method": method, "world": world, "threads_per_rank": threads,
            "step_ms": statistics.mean(steps_ms), "wall_s": wall,
            "test_accuracy": test["accuracy"], "test_loss": test["loss"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--methods", nargs="+", default=["supervised", "mean_teacher", "fixmatch"])
    ap.add_argument("--json")
    a = ap.parse_args()
    if not os.path.exists(f"{DATA}/manifest.json"):
        sh([BIN, "prepare", "--quiet", "--config", "configs/brown/prepare.toml",
            "--input", "data/brown_genre.tsv.gz", "--out", DATA])
    rows = []
    for m in a.methods:
        for world, threads in [(1, 2), (1, 1), (2, 1)]:
            r = run(m, world, threads, a.steps)
            rows.append(r)
            print(f"{m:<13} W={world} threads/rank={threads}: {r['step_ms']:.3f} ms/step, "
                  f"test accuracy {r['test_accuracy']:.4f} (loss {r['test_loss']:.6f}), {r['wall_s']:.1f} s")
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    doc = {"command": " ".join(["python3"] + sys.argv), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "git_revision": sh(["git", "rev-parse", "--short=12", "HEAD"]),
           "machine": f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.machine()}",
           "mpirun": sh(["mpirun", "--version"]).splitlines()[0], "steps": a.steps, "rows": rows}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=1)
        print("wrote", a.json)


if __name__ == "__main__":
    main()

"""MiniLM students trained on 64 tokens, evaluated on rows cut at more: `dtrain eval` of each
run's last checkpoint on the val and test splits of the encoder protocol's data set at 64
tokens (the run's own length) and at --max-len (bench/brown_encoder.py's preparation with
tokenizer.subword.max_len=N; a checkpoint reads rows cut at another length than its run's,
within its positions, since 9c8913f). Val says which length to read at; test is the check.
Rows already in the --json file (same run, seed and --max-len) are kept, not evaluated again,
so the file can be filled in as runs finish.

  DTRAIN_BIN=/tmp/dtrain-len2 .venv/bin/python bench/brown_read_longer.py --seeds 1 2 3 \\
      --runs oracle-student-propagated-three-view-256-aligned-e30 \\
      --json bench/results/brown-encoder-read-256.json
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
import brown_encoder as be  # noqa: E402
import brown_methods as bm  # noqa: E402


def evaluate(checkpoint, data, split):
    out = subprocess.run([be.BIN, "--quiet", "eval", "--checkpoint", checkpoint, "--data", data, "--split", split,
                          "--json"], check=True, capture_output=True, text=True).stdout
    got = json.loads(out)
    return dict(accuracy=got["accuracy"], macro_f1=got["macro_f1"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--runs", nargs="+", required=True, help="run names under runs/brown_encoder/seedN")
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--json")
    a = ap.parse_args()
    rows, earlier = [], []
    if a.json and os.path.exists(a.json):
        kept = json.load(open(a.json))
        rows = [r for r in kept["rows"] if f"test_{a.max_len}" in r]
        # The invocations that filled the file in before this one.
        earlier = kept.get("earlier", []) + [kept["provenance"]]
    for name in a.runs:
        for seed in a.seeds:
            if any(r["run"] == name and r["seed"] == seed for r in rows):
                continue
            ckpts = f"runs/brown_encoder/seed{seed}/{name}/checkpoints"
            last = os.path.join(ckpts, sorted(os.listdir(ckpts))[-1])
            row = dict(run=name, seed=seed, checkpoint=last)
            for length in (64, a.max_len):
                data = be.prepare(seed, max_len=length)
                for split in ("val", "test"):
                    row[f"{split}_{length}"] = evaluate(last, data, split)
            print(json.dumps(row), flush=True)
            rows.append(row)
    summary = {}
    rows.sort(key=lambda r: (a.runs.index(r["run"]) if r["run"] in a.runs else len(a.runs), r["seed"]))
    for name in dict.fromkeys(r["run"] for r in rows):
        rs = [r for r in rows if r["run"] == name]
        summary[name] = {}
        for length in (64, a.max_len):
            t = [100 * r[f"test_{length}"]["accuracy"] for r in rs]
            v = [100 * r[f"val_{length}"]["accuracy"] for r in rs]
            sd = statistics.stdev(t) if len(t) > 1 else 0.0
            summary[name][str(length)] = dict(val=statistics.mean(v), test=statistics.mean(t), test_sd=sd)
            print(f"{name} at {length} tokens: val {statistics.mean(v):.2f}, test {statistics.mean(t):.2f} ± {sd:.2f}")
    if a.json:
        prov = bm.provenance("python3 bench/brown_read_longer.py " + " ".join(sys.argv[1:]))
        json.dump({"provenance": prov, "earlier": earlier, "rows": rows, "summary": summary}, open(a.json, "w"),
                  indent=1)


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# Masked-LM pretraining of MiniLM on 1 and 2 ranks (Brown genre at 64 WordPiece tokens, 20
# full steps of 16 documents, no warm-up): wall time and tokens/s of one process with 2
# threads, one with 1 thread, and 2 ranks of 1 thread (launch/mpirun); then how far the
# 2-rank run's losses and encoder are from one process's.
set -euo pipefail
cd "$(dirname "$0")/.."
B=${B:-target/release/dtrain}; D=${D:-/tmp/bwp}; O=${O:-/tmp/mlmranks}; PY=${PY:-.venv/bin/python}
rm -rf "$O"; mkdir -p "$O"
A=(--config configs/brown/mlm.toml --set data.dir="\"$D\"" --set mlm.steps=20 --set mlm.warmup_steps=0
   --set mlm.log_every=1)
run() { # name, command…
  local name=$1; shift
  /usr/bin/time -f "$name: %e s wall" "$@" --set train.out_dir="\"$O/$name\"" | grep "masked-LM:"
}
run one-2threads env RAYON_NUM_THREADS=2 "$B" pretrain "${A[@]}"
run one-1thread env RAYON_NUM_THREADS=1 "$B" pretrain "${A[@]}"
run two-ranks env DTRAIN_BIN="$B" launch/mpirun -n 2 pretrain "${A[@]}"
"$PY" - "$O" <<'PY'
import json, sys, numpy as np
from safetensors.numpy import load_file
o = sys.argv[1]
rec = lambda n: [json.loads(l) for l in open(f"{o}/{n}/metrics.jsonl")]
a, b = rec("one-1thread"), rec("two-ranks")
d = max(abs(x["loss"] - y["loss"]) / abs(x["loss"]) for x, y in zip(a, b))
same_acc = sum(x["masked_accuracy"] == y["masked_accuracy"] for x, y in zip(a, b))
print(f"steps {len(a)}: loss {a[0]['loss']:.4f} -> {a[-1]['loss']:.4f} (one process), "
      f"{b[0]['loss']:.4f} -> {b[-1]['loss']:.4f} (2 ranks); largest relative loss difference {d:.1e}; "
      f"masked accuracy equal on {same_acc} of {len(a)} steps")
ta, tb = load_file(f"{o}/one-1thread/encoder/model.safetensors"), load_file(f"{o}/two-ranks/encoder/model.safetensors")
init = load_file("models/minilm/model.safetensors")
start = lambda k: init.get(k, init.get("bert." + k, np.zeros_like(ta[k])))
# The difference against the tensor's norm, and against how far one process moved it
# (the head starts from a fresh init that is not in models/minilm: measured from zero).
rows = []
for k in ta:
    diff = np.linalg.norm(ta[k].astype(np.float64) - tb[k])
    moved = np.linalg.norm(ta[k].astype(np.float64) - start(k))
    rows.append((diff / max(np.linalg.norm(ta[k]), 1e-30), diff / max(moved, 1e-30), k))
# The attention keys' biases have no gradient in exact arithmetic (softmax ignores a
# constant added to every score): they hold rounding noise, reported apart.
keys = [r for r in rows if r[2].endswith("attention.self.key.bias")]
rest = [r for r in rows if r not in keys]
for name, rs in [(f"{len(rest)} tensors", rest), (f"the {len(keys)} key biases", keys)]:
    print(f"2 ranks vs one process, {name}: largest ||a-b||/||a|| {max(r[0] for r in rs):.1e} "
          f"(median {np.median([r[0] for r in rs]):.1e}); largest ||a-b||/||a-init|| {max(r[1] for r in rs):.1e} "
          f"({max(rs, key=lambda r: r[1])[2]}; median {np.median([r[1] for r in rs]):.1e})")
PY

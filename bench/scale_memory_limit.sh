#!/usr/bin/env bash
# Training on a corpus larger than the run's memory limit, as under Slurm's --mem: each
# binary runs FixMatch (DA + FreeMatch, λ 0.1) for STEPS steps on DATA inside a memory
# cgroup of LIMIT bytes, after the page cache is dropped, timed by GNU time (wall, peak
# RSS, file system inputs). Needs root and a cgroup memory controller (v1 or v2).
#   bash bench/scale_memory_limit.sh DATA LIMIT STEPS BINARY...
# bench/results/scale-5m.md: DATA = bench/scale.sh's data set made from 20,000,000
# documents (8.1 GB), LIMIT = 3 GiB, STEPS = 1000.
set -euo pipefail
cd "$(dirname "$0")/.."
data=$(realpath "$1") limit=$2 steps=$3
shift 3
if [ -d /sys/fs/cgroup/memory ]; then
  cg=/sys/fs/cgroup/memory/dtrain-bench; mkdir -p $cg; echo "$limit" > $cg/memory.limit_in_bytes
else
  cg=/sys/fs/cgroup/dtrain-bench; mkdir -p $cg; echo "$limit" > $cg/memory.max
fi
out=$(mktemp -d)
for bin in "$@"; do
  echo "== $bin: $steps steps on $data, memory limit $limit bytes, page cache dropped"
  rm -rf "$out/run"
  sync; echo 3 > /proc/sys/vm/drop_caches
  (
    echo $BASHPID > $cg/cgroup.procs
    exec /usr/bin/time -f "peak RSS %M kB, wall %e s, file system inputs %I x 512 bytes, major faults %F" \
      "$bin" train --quiet --config configs/brown/fixmatch.toml --set "data.dir=\"$data\"" \
      --set "train.out_dir=\"$out/run\"" --set train.steps="$steps" --set consistency.distribution_alignment=true \
      --set consistency.stabiliser_momentum=0.9 --set consistency.weight=0.1 \
      --set 'consistency.adaptive_threshold="freematch"'
  ) 2>&1 | grep -E "^trained|peak RSS|^student"
done
rm -rf "$out"

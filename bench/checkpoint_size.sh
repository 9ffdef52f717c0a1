#!/usr/bin/env bash
# Checkpoint size and cost (bench/results/checkpoint-by-rows.md): Brown genre with 20 labels
# per class (split seed 1), configs/brown/supervised.toml and fixmatch.toml (25 epochs of 19
# steps, lazy Adam on a 2^20 × 100 table), a checkpoint every epoch or every 5, for each
# binary given; then one binary resumes another's checkpoint. Each run timed by GNU time;
# the final checkpoint's files sized with `du -b`, its weights compared with `cmp`.
#   bash bench/checkpoint_size.sh DIR BINARY...
# (e.g. a build of the commit before the change, then target/release/dtrain)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$1; shift
mkdir -p "$dir"
first=$(realpath "$1")
[ -f "$dir/data/manifest.json" ] || "$first" prepare --quiet --force --config configs/brown/prepare.toml \
  --input ../shared/data/brown_genre.tsv.gz --out "$dir/data"
i=0
for bin in "$@"; do
  bin=$(realpath "$bin"); i=$((i + 1))
  for run in supervised:19 supervised:0 fixmatch:95; do
    cfg=${run%%:*}; every=${run#*:}; out="$dir/b$i-$cfg-$every"
    rm -rf "$out"
    echo "== binary $i ($bin, $("$bin" --version)): $cfg, checkpoint_every = $every"
    /usr/bin/time -f "wall %e s, peak RSS %M kB" "$bin" train --quiet --config "configs/brown/$cfg.toml" \
      --set data.dir="\"$dir/data\"" --set train.out_dir="\"$out\"" --set train.checkpoint_every="$every" 2>&1 |
      grep -E "^wall|^test:"
    last=$(ls -d "$out"/checkpoints/step-* | tail -1)
    du -b "$last"/*.safetensors; du -sb "$out/checkpoints"
    if [ "$i" != 1 ]; then
      cmp "$last/model.safetensors" "$dir/b1-$cfg-$every/checkpoints/$(basename "$last")/model.safetensors"
      echo "final weights: the same bits as binary 1's"
    fi
  done
done
# The last binary resumes the first one's second-to-last checkpoint of the per-epoch run.
out="$dir/b1-supervised-19"
rm -rf "$(ls -d "$out"/checkpoints/step-* | tail -1)"
echo "== binary $i resumes binary 1's $(basename "$(ls -d "$out"/checkpoints/step-* | tail -1)")"
"$bin" train --quiet --config configs/brown/supervised.toml --set data.dir="\"$dir/data\"" \
  --set train.out_dir="\"$out\"" --set train.checkpoint_every=19 --resume auto > /dev/null
last=$(ls -d "$out"/checkpoints/step-* | tail -1)
cmp "$last/model.safetensors" "$dir/b$i-supervised-19/checkpoints/$(basename "$last")/model.safetensors" &&
  echo "final weights after the resume: the same bits as an uninterrupted run"
du -b "$last/optimizer.safetensors"

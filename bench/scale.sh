#!/usr/bin/env bash
# Scale runs on a large unlabeled corpus (bench/results/scale-5m.md): prepare Brown genre
# (20 labels per class) with N unlabeled documents, train FixMatch (distribution alignment,
# FlexMatch) and Temporal Ensembling on it and on Brown alone, and predict the whole corpus;
# each command timed by GNU time (peak resident memory, wall seconds).
#   bash bench/scale.sh [N (default 5000000)] [DIR (default /tmp/scale)]
# Needs a release build (DTRAIN_BIN, default target/release/dtrain) and /usr/bin/time.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-5000000} dir=${2:-/tmp/scale}
bin=$(realpath "${DTRAIN_BIN:-target/release/dtrain}")
mkdir -p "$dir"
t() { echo "== $*"; /usr/bin/time -f "peak RSS %M kB, wall %e s" "$@"; }
[ -f "$dir/unlabeled.txt" ] || python3 bench/scale_corpus.py "$n" "$dir/unlabeled.txt"
brown=../shared/data/brown_genre.tsv.gz
t "$bin" prepare --quiet --force --config configs/brown/prepare.toml --input "$brown" --unlabeled "$dir/unlabeled.txt" --out "$dir/data"
t "$bin" prepare --quiet --force --config configs/brown/prepare.toml --input "$brown" --out "$dir/base"
for method in fixmatch temporal; do
  for data in base data; do
    for steps in 1 4000; do
      rm -rf "$dir/run"
      sets=(--set "data.dir=\"$dir/$data\"" --set "train.out_dir=\"$dir/run\"" --set train.steps=$steps)
      [ $method = fixmatch ] && sets+=(--set consistency.distribution_alignment=true --set 'consistency.adaptive_threshold="flexmatch"')
      t "$bin" train --quiet --config configs/brown/$method.toml "${sets[@]}" 2>&1 | grep -E "^==|peak RSS|^trained"
    done
  done
done
rm -rf "$dir/run"
t "$bin" train --quiet --config configs/brown/fixmatch.toml --set "data.dir=\"$dir/data\"" --set "train.out_dir=\"$dir/run\"" \
  --set train.steps=4000 --set consistency.distribution_alignment=true --set 'consistency.stabiliser_momentum=0.9' \
  --set consistency.weight=0.1 --set 'consistency.adaptive_threshold="freematch"' 2>&1 | grep -E "^==|peak RSS|^trained|^student"
t "$bin" predict --quiet --checkpoint "$dir/run/checkpoints/step-000004000" --input "$dir/unlabeled.txt" --output "$dir/pseudo.jsonl"
wc -l < "$dir/pseudo.jsonl"

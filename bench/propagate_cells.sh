#!/usr/bin/env bash
# Label spreading's neighbour search, exact against k-means cells (bench/results/propagate-cells.md):
# Brown genre (20 labels per class, split seed 1) with the shared 100k sentences, and with a
# million two-sentence documents (bench/scale_corpus.py), as unlabeled rows; one view (the
# seed-1 skip-gram embeddings of docs/results.md), one setting (k 10, alpha 0.9, no shift,
# the default alignment powers). Each command timed by GNU time.
#   bash bench/propagate_cells.sh [DIR (default /tmp/knn)]
# With EXACT_MILLION=1 it also runs the exact search on the million rows (about 10 minutes
# since 24d2727), first, and compares the cells' labels with its labels.
# Needs a release build (DTRAIN_BIN, default target/release/dtrain), /usr/bin/time, and
# runs/brown_bag_ls/seed1/pretrain (bench/brown_bag_propagate.py --seeds 1 makes it).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-/tmp/knn}
bin=$(realpath "${DTRAIN_BIN:-target/release/dtrain}")
mkdir -p "$dir"
t() { echo "== $*"; /usr/bin/time -f "peak RSS %M kB, wall %e s" "$@"; }
prep=(--quiet --force --config configs/brown/prepare.toml --input ../shared/data/brown_genre.tsv.gz --set split.seed=1)
[ -f "$dir/d116k/manifest.json" ] || t "$bin" prepare "${prep[@]}" --unlabeled ../shared/data/nlp_corpus_en_sentences.txt.gz --out "$dir/d116k"
[ -f "$dir/u1m.txt" ] || python3 bench/scale_corpus.py 1000000 "$dir/u1m.txt"
[ -f "$dir/d1m/manifest.json" ] || t "$bin" prepare "${prep[@]}" --unlabeled "$dir/u1m.txt" --out "$dir/d1m"
view=(--model runs/brown_bag_ls/seed1/pretrain --k 10 --alpha 0.9 --shift raw)
# The share of the unlabeled rows two runs' pseudo-labels give the same label.
agree() { python3 -c "import json,sys; a,b=[[json.loads(l)['label'] for l in open(f)] for f in sys.argv[1:]]; print(f'unlabeled rows labeled as by the exact search: {sum(x==y for x,y in zip(a,b))/len(a):.4f}')" "$1" "$2"; }
report() { grep -E "nearest neighbours in|recall|<- chosen|test accuracy|known labels" "$1" | cut -c1-220; }
t "$bin" --quiet propagate "${view[@]}" --data "$dir/d116k" --out "$dir/exact.logits" --pseudo-labels "$dir/exact.jsonl" > "$dir/exact.txt"
report "$dir/exact.txt"
for p in 8 16 32; do
  t "$bin" --quiet propagate "${view[@]}" --data "$dir/d116k" --search cells --probes $p --out "$dir/c$p.logits" --pseudo-labels "$dir/c$p.jsonl" > "$dir/c$p.txt"
  report "$dir/c$p.txt"
  agree "$dir/exact.jsonl" "$dir/c$p.jsonl"
done
if [ "${EXACT_MILLION:-0}" = 1 ]; then
  t "$bin" --quiet propagate "${view[@]}" --data "$dir/d1m" --out "$dir/mexact.logits" --pseudo-labels "$dir/mexact.jsonl" > "$dir/mexact.txt"
  report "$dir/mexact.txt"
fi
for p in 16 32; do
  t "$bin" --quiet propagate "${view[@]}" --data "$dir/d1m" --search cells --probes $p --out "$dir/m$p.logits" --pseudo-labels "$dir/m$p.jsonl" > "$dir/m$p.txt"
  report "$dir/m$p.txt"
  if [ -f "$dir/mexact.jsonl" ]; then
    agree "$dir/mexact.jsonl" "$dir/m$p.jsonl"
  fi
done

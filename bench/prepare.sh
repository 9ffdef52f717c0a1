#!/usr/bin/env bash
# Records `dtrain prepare` throughput into bench/results/ (JSON per case + prepare.md).
# Run from the repository root on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
D=./target/release/dtrain
R=bench/results
$D bench prepare --config configs/brown/prepare.toml --input data/brown_genre.tsv.gz --repeat 10 --json $R/prepare-brown.json
$D bench prepare --config configs/brown/prepare.toml --input data/brown_genre.tsv.gz --char-ngrams 3..6 --repeat 10 --json $R/prepare-brown-charngrams.json
$D bench prepare --unlabeled data/nlp_corpus_en_sentences.txt.gz --repeat 10 --json $R/prepare-corpus.json
RAYON_NUM_THREADS=1 $D bench prepare --unlabeled data/nlp_corpus_en_sentences.txt.gz --repeat 10 --json $R/prepare-corpus-1thread.json
python3 bench/report_prepare.py > $R/prepare.md

#!/usr/bin/env bash
# Masked-LM checkpoints on MiniLM: wall time of 20 steps without checkpoints and with one
# every 2 steps; a checkpoint's files; a run stopped at step 9 and resumed against the
# uninterrupted one (cmp of the encoders).
set -euo pipefail
B=${B:-target/release/dtrain}; D=${D:-/tmp/bwp}; O=${O:-/tmp/mlmck}
rm -rf "$O"; mkdir -p "$O"
A=(--config configs/brown/mlm.toml --set data.dir="\"$D\"" --set mlm.steps=20 --set mlm.warmup_steps=0 --quiet)
for e in 0 2; do
  /usr/bin/time -f "checkpoint_every=$e: %e s wall" "$B" pretrain "${A[@]}" --set train.out_dir="\"$O/e$e\"" --set mlm.checkpoint_every=$e >/dev/null
done
"$B" pretrain "${A[@]}" --set train.out_dir="\"$O/cut\"" --set mlm.checkpoint_every=2 --stop-after 9 >/dev/null
ls -l "$O/cut/checkpoints/step-000000009"
du -sh "$O/cut/checkpoints"/*
"$B" pretrain "${A[@]}" --set train.out_dir="\"$O/cut\"" --set mlm.checkpoint_every=2 --resume auto
cmp "$O/cut/encoder/model.safetensors" "$O/e0/encoder/model.safetensors" && echo "resumed encoder == uninterrupted encoder (cmp)"

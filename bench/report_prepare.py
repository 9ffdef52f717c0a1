"""Writes bench/results/prepare.md from the JSON files that bench/prepare.sh records."""
import json
import os

R = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CASES = [
    ("prepare-brown.json", "Brown genre, 20 labels/class (demo config)"),
    ("prepare-brown-charngrams.json", "Brown genre, + char n-grams 3..6"),
    ("prepare-corpus.json", "100k sentences, unlabeled only"),
    ("prepare-corpus-1thread.json", "100k sentences, RAYON_NUM_THREADS=1 (tokenizing on 1 thread; the reader thread still runs)"),
]
rows = [(f, label, json.load(open(os.path.join(R, f)))) for f, label in CASES]
p = rows[0][2]["provenance"]
print("# `dtrain prepare` throughput\n")
print(f"- date: {p['date']}; git revision: `{p['git_revision']}`; machine: {p['cpu']}, {p['os']}, "
      "2 cores (the project's standard 2-core, 24 GiB machine)")
print("- method: `dtrain bench prepare` runs the whole `prepare` (read, gunzip, parse, tokenize, "
      "de-duplicate, split, write shards and manifest, fsync, rename) once as warm-up, then 10 timed "
      "runs into a temporary directory; MB = 10^6 bytes of uncompressed input text.")
print("- the machine is shared and noisy: quote medians; runs of the same command on the same day "
      "have differed by up to 25%.")
print("- reproduce: `bash bench/prepare.sh` (runs the commands below and rewrites this file).\n")
print("| input | text MB | documents | token ids | median s | MB/s (min / median / max) | documents/s (median) | raw JSON |")
print("|---|---|---|---|---|---|---|---|")
for f, label, d in rows:
    m = d["mb_per_s"]
    print(f"| {label} | {d['text_bytes'] / 1e6:.1f} | {d['documents']:,} | {d['token_ids']:,} | "
          f"{d['seconds']['median']:.3f} | {m['min']:.1f} / **{m['median']:.1f}** / {m['max']:.1f} | "
          f"{d['docs_per_s']['median']:,.0f} | [{f}]({f}) |")
print("\nCommands (from the repository root, after `cargo build --release`):\n```sh")
for f, label, d in rows:
    prefix = "RAYON_NUM_THREADS=1 " if "1thread" in f else ""
    print(prefix + d["provenance"]["command"].replace("./target/release/dtrain", "dtrain"))
print("```")

by = {f: d for f, _, d in rows}
two, one = by["prepare-corpus.json"]["mb_per_s"]["median"], by["prepare-corpus-1thread.json"]["mb_per_s"]["median"]
plain, grams = by["prepare-brown.json"], by["prepare-brown-charngrams.json"]
print(f"""
What limits it:
- Two threads give {two / one:.2f}x over one on the corpus ({two:.1f} vs {one:.1f} MB/s). Reading and
  gunzip run on their own thread, and tokenizing is parallel over chunks of 8,192 lines. The
  in-order stage runs on the main thread between chunks: de-duplication, sample ids and shard
  writing.
- Short documents cost more per byte: the corpus averages
  {by['prepare-corpus.json']['text_bytes'] / by['prepare-corpus.json']['documents']:.0f} bytes per sentence, Brown
  {plain['text_bytes'] / plain['documents']:.0f} per paragraph. The per-document work is the likely
  cause (allocation, the de-duplication key, column pushes). This has not been profiled.
- Character n-grams 3..6 multiply the ids by {grams['token_ids'] / plain['token_ids']:.1f} and cut the
  throughput by {plain['mb_per_s']['median'] / grams['mb_per_s']['median']:.1f}x.
- Word sequences (shard format 2, for pretraining) halved the throughput. At `7f5382592768`,
  before them, the four rows ran at 43.8, 26.0, 39.2 and 24.5 MB/s. The parallel stage now
  also copies every word's text, and the in-order stage interns every word in the
  vocabulary (a hash lookup per word, about a million on Brown), which a profile showed at
  about 10% of the run with SipHash before switching to XXH3. Moving the interning off the
  in-order stage (per-chunk vocabularies merged in order) is the next step.""")

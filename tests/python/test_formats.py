"""Cross-language check of dtrain's documented on-disk formats.

Written from the documentation alone (src/data/tokenize.rs, src/data/shard.rs,
src/data/manifest.rs), this re-implements the hashing tokenizer for the characters used
below, parses the shard layout and recomputes every checksum, then compares with what
`dtrain prepare` wrote. If the code drifts from its documentation, this fails.
"""

import json
import os
import subprocess
import sys
import tempfile
import unittest

import xxhash

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dtrain_ref import read_shard, read_vocab, tokenize, words  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DTRAIN = os.path.join(ROOT, "target", "release", "dtrain")

TEXTS = [
    ("news", "The Fulton County Grand Jury said Friday an investigation produced `` no evidence ''."),
    ("fiction", "Don't stop -- it's hard-fought, 1,000 times over-all; U.S. 3.14!"),
    ("news", "北京は東京より大きい。 Mixed 中文 text"),
    ("fiction", "CAPITALS and lower, a_b c'd e\u2019f ... ?!"),
    ("news", "x"),
    ("fiction", "हिन्दी தமிழ் שָׁלוֹם café ex\u00adample zero\u200bwidth 葛\U000E0100城 ｶﾀｶﾅ สวัสดีครับ"),
]


class FormatTest(unittest.TestCase):
    def prepare(self, out, extra):
        with tempfile.NamedTemporaryFile("w", suffix=".tsv", delete=False, encoding="utf-8") as f:
            for label, text in TEXTS:
                f.write(f"{label}\t{text}\n")
        cmd = [DTRAIN, "prepare", "--quiet", "--input", f.name, "--out", out,
               "--test-fraction", "0", "--val-fraction", "0", "--shards", "2", *extra]
        subprocess.run(cmd, check=True, capture_output=True)
        with open(os.path.join(out, "manifest.json"), encoding="utf-8") as f:
            return json.load(f)

    def check(self, extra):
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "ds")
            manifest = self.prepare(out, extra)
            spec = manifest["tokenizer"]
            self.assertEqual(manifest["labels"], ["fiction", "news"])
            # The manifest checksum: xxh3_64 of the pretty JSON with checksum set to "".
            body = dict(manifest, checksum="")
            text = json.dumps(body, indent=2, ensure_ascii=False)
            self.assertEqual(manifest["checksum"], f"{xxhash.xxh3_64_intdigest(text.encode()):016x}")
            seen = 0
            vocab = read_vocab(os.path.join(out, "vocab.bin"))
            self.assertEqual(len(vocab), manifest["vocab"]["words"])
            for info in manifest["splits"]["train"]["shards"]:
                shard = read_shard(os.path.join(out, info["file"]))
                self.assertEqual(f"{shard['checksum']:016x}", info["checksum"])
                self.assertEqual(f"{shard['tok_hash']:016x}", manifest["tokenizer_hash"])
                for ids, ws, label, sid, hidden in zip(shard["docs"], shard["words"], shard["labels"],
                                                       shard["sample_ids"], shard["hidden"]):
                    want_label, text = TEXTS[sid]
                    self.assertEqual(ids, tokenize(text, spec), f"ids of {text!r}")
                    self.assertEqual([vocab[w] for w in ws], words(text, spec), f"words of {text!r}")
                    self.assertEqual(manifest["labels"][label], want_label)
                    self.assertEqual(hidden, -1)
                    seen += 1
            self.assertEqual(seen, len(TEXTS))

    def test_defaults(self):
        self.check([])

    def test_char_ngrams_trigrams_seed_and_small_buckets(self):
        self.check(["--char-ngrams", "2..5", "--word-ngrams", "3", "--buckets", "1000",
                    "--cjk-ngrams", "3", "--set", "tokenizer.hash_seed=12345", "--max-words", "9"])

    def test_keep_case(self):
        self.check(["--keep-case"])


if __name__ == "__main__":
    unittest.main()

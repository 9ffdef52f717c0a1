"""A trained dtrain checkpoint, read with Python's safetensors library and re-implemented
in numpy from the documented tensor names (src/model/bag.rs) and tokenizer spec (the
model's `dtrain` metadata), gives the probabilities `dtrain predict` prints, within 1e-5."""

import json
import os
import subprocess
import sys
import tempfile
import unittest

import numpy as np
from safetensors import safe_open

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dtrain_ref import tokenize  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DTRAIN = os.path.join(ROOT, "target", "release", "dtrain")


def gelu(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


ACT = {"relu": lambda x: np.maximum(x, 0.0), "tanh": np.tanh, "gelu": gelu}


def forward(path, texts):
    """Class probabilities of `texts` from the checkpoint directory `path`."""
    with safe_open(os.path.join(path, "model.safetensors"), framework="numpy") as f:
        meta = json.loads(f.metadata()["dtrain"])
        t = {name: f.get_tensor(name).astype(np.float64) for name in f.keys()}
    spec = meta["model"]
    table = t["embedding.weight"]
    assert table.shape == (spec["buckets"], spec["dim"])
    out = []
    for text in texts:
        ids = tokenize(text, meta["tokenizer"])
        x = table[ids].mean(axis=0)
        for k in range(len(spec["hidden"])):
            x = ACT[spec["activation"]](t[f"hidden.{k}.weight"] @ x + t[f"hidden.{k}.bias"])
        z = t["output.weight"] @ x + t["output.bias"]
        p = np.exp(z - z.max())
        out.append(p / p.sum())
    return meta["labels"], np.array(out)


TRAIN = [
    ("sport", "the team won the match with a late goal"),
    ("sport", "a great game for the home side and the fans"),
    ("sport", "the striker scored twice in the second half"),
    ("sport", "the coach praised the players after the win"),
    ("politics", "the minister announced a new budget today"),
    ("politics", "parliament voted on the proposed law"),
    ("politics", "the election campaign enters its final week"),
    ("politics", "voters will decide the future of the government"),
    ("science", "the telescope observed a distant galaxy"),
    ("science", "researchers measured the speed of the reaction"),
    ("science", "a new species of beetle was described"),
    ("science", "the experiment confirmed the physical theory"),
]
QUERIES = [
    "the players won the game",
    "a new law from the government",
    "scientists observed the galaxy",
    "Mixed CASE text, with punctuation! and 北京 too",
]


class ForwardTest(unittest.TestCase):
    def check(self, model_sets):
        with tempfile.TemporaryDirectory() as d:
            tsv = os.path.join(d, "train.tsv")
            with open(tsv, "w", encoding="utf-8") as f:
                for label, text in TRAIN * 3:
                    f.write(f"{label}\t{text} {len(text)}\n")
            data, run = os.path.join(d, "data"), os.path.join(d, "run")
            subprocess.run([DTRAIN, "prepare", "--quiet", "--input", tsv, "--out", data, "--test-fraction", "0.2",
                            "--val-fraction", "0", "--shards", "1", "--char-ngrams", "2..4", "--buckets", "5000"],
                           check=True, capture_output=True)
            cfg = os.path.join(d, "run.toml")
            with open(cfg, "w") as f:
                f.write(f'[data]\ndir = "{data}"\n[train]\nout_dir = "{run}"\nbatch_size = 4\nsteps = 40\n'
                        f'[optim]\nlr = 0.05\n[model]\ndim = 12\n' + model_sets)
            subprocess.run([DTRAIN, "train", "--quiet", "--config", cfg], check=True, capture_output=True)
            ckpt = os.path.join(run, "checkpoints", "step-000000040")
            queries = os.path.join(d, "q.txt")
            with open(queries, "w", encoding="utf-8") as f:
                f.write("\n".join(QUERIES) + "\n")
            preds = os.path.join(d, "p.jsonl")
            subprocess.run([DTRAIN, "predict", "--checkpoint", ckpt, "--input", queries, "--output", preds,
                            "--top-k", "3"], check=True, capture_output=True)
            with open(preds) as f:
                rows = [json.loads(line) for line in f]
            labels, probs = forward(ckpt, QUERIES)
            self.assertEqual(len(rows), len(QUERIES))
            for row, p in zip(rows, probs):
                for entry in row["top"]:
                    self.assertAlmostEqual(entry["p"], p[labels.index(entry["label"])], delta=1e-5)
                self.assertEqual(row["label"], labels[int(np.argmax(p))])
                self.assertAlmostEqual(sum(p), 1.0, delta=1e-9)
            # The model learned something: the first three queries get their own class.
            self.assertEqual([r["label"] for r in rows[:3]], ["sport", "politics", "science"])

    def test_linear_model(self):
        self.check("")

    def test_hidden_layers(self):
        self.check('hidden = [16, 8]\nactivation = "gelu"\nhidden_dropout = 0.1\n')


if __name__ == "__main__":
    unittest.main()

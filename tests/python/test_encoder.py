"""Pretrained MiniLM (models/minilm, from launch/fetch-model) through `dtrain embed` gives the
same mean-pooled vectors as an independent numpy re-implementation of BERT that reads the
same safetensors file with Python's safetensors library, within 1e-4, for English and
Chinese texts, batched with padding."""

import json
import math
import os
import subprocess
import unittest

import numpy as np
from safetensors import safe_open

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DTRAIN = os.path.join(ROOT, "target", "release", "dtrain")
MODEL = os.path.join(ROOT, "models", "minilm")

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Semi-supervised learning doesn't need many labels, only a lot of unlabeled text!",
    "北京是中国的首都",
]

ERF = np.vectorize(math.erf)


def layer_norm(x, g, b, eps):
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def bert_mean_pooled(ids, t, cfg):
    """BERT (post-LN, exact GELU) on one unpadded sequence, mean-pooled, in float64."""
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    d = h // heads
    eps = cfg["layer_norm_eps"]
    n = len(ids)
    x = t["embeddings.word_embeddings.weight"][ids] + t["embeddings.position_embeddings.weight"][:n] \
        + t["embeddings.token_type_embeddings.weight"][0]
    x = layer_norm(x, t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"], eps)
    for k in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{k}."

        def lin(name, v):
            return v @ t[p + name + ".weight"].T + t[p + name + ".bias"]

        q, kk, v = (lin(f"attention.self.{w}", x).reshape(n, heads, d).transpose(1, 0, 2)
                    for w in ("query", "key", "value"))
        s = q @ kk.transpose(0, 2, 1) / math.sqrt(d)
        s = np.exp(s - s.max(axis=-1, keepdims=True))
        s /= s.sum(axis=-1, keepdims=True)
        ctx = (s @ v).transpose(1, 0, 2).reshape(n, h)
        x = layer_norm(x + lin("attention.output.dense", ctx), t[p + "attention.output.LayerNorm.weight"],
                       t[p + "attention.output.LayerNorm.bias"], eps)
        inner = lin("intermediate.dense", x)
        inner = 0.5 * inner * (1.0 + ERF(inner / math.sqrt(2.0)))
        x = layer_norm(x + lin("output.dense", inner), t[p + "output.LayerNorm.weight"],
                       t[p + "output.LayerNorm.bias"], eps)
    return x.mean(axis=0)


class EncoderTest(unittest.TestCase):
    def test_minilm_pooled_outputs_match_numpy(self):
        self.assertTrue(os.path.exists(os.path.join(MODEL, "model.safetensors")),
                        "models/minilm is missing: run launch/fetch-model minilm")
        with open(os.path.join(MODEL, "config.json")) as f:
            cfg = json.load(f)
        with safe_open(os.path.join(MODEL, "model.safetensors"), framework="numpy") as f:
            t = {name: f.get_tensor(name).astype(np.float64) for name in f.keys()}
        out = subprocess.run([DTRAIN, "embed", "--model", MODEL, *TEXTS], check=True, capture_output=True, text=True)
        rows = [json.loads(line) for line in out.stdout.splitlines()]
        self.assertEqual([r["text"] for r in rows], TEXTS)
        worst = 0.0
        for r in rows:
            want = bert_mean_pooled(r["ids"], t, cfg)
            got = np.array(r["pooled"])
            self.assertEqual(got.shape, (cfg["hidden_size"],))
            worst = max(worst, float(np.abs(got - want).max()))
        print(f"MiniLM pooled outputs: largest difference from numpy {worst:.2e}")
        self.assertLess(worst, 1e-4)


if __name__ == "__main__":
    unittest.main()

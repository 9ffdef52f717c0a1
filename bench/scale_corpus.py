"""A large unlabeled corpus for scale runs: N documents, each two sentences of the shared
100k-sentence corpus drawn at random with a fixed seed, so that nearly all are distinct
(prepare drops the few that repeat).

  python3 bench/scale_corpus.py 5000000 /tmp/scale/unlabeled-5m.txt
"""
import gzip
import random
import sys


def main():
    n, out = int(sys.argv[1]), sys.argv[2]
    src = "../shared/data/nlp_corpus_en_sentences.txt.gz"
    sentences = [line.rstrip("\n") for line in gzip.open(src, "rt", encoding="utf-8")]
    r = random.Random(7)
    with open(out, "w", encoding="utf-8") as f:
        for _ in range(n):
            f.write(sentences[r.randrange(len(sentences))] + " " + sentences[r.randrange(len(sentences))] + "\n")


if __name__ == "__main__":
    main()

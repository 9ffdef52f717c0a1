"""Trains fastText's supervised classifier as the dtrain comparisons do (dim 100, word
bigrams, 25 epochs): `python bench/fasttext_train.py TRAIN_FILE THREADS`."""
import sys

import fasttext

fasttext.train_supervised(sys.argv[1], dim=100, wordNgrams=2, epoch=25, thread=int(sys.argv[2]), verbose=0)

"""A text corpus as TF-IDF features: the input of the text classifier under every layout.

The vocabulary is the `data.vocabulary` words found in the most training documents (ties:
alphabetical). A document's features are scikit-learn's `TfidfVectorizer` defaults with that
vocabulary: raw counts times idf = ln((1 + n) / (1 + df)) + 1 over the n training documents,
each row then scaled to unit length. Under vertical partitioning by vocabulary a rank's
features are only its own words' counts (`features`: its columns of the vocabulary), and the
rows' lengths are completed by one sum of squares over the vertical group (`reduce_stats`).
Which words form the vocabulary every process finds alike, from every training document's
words (`shardwise words` is the distributed count).
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np

from shardwise.config_sections import DataConfig
from shardwise.data.sources import Dataset, StatsReduce, preprocess_record, split_indices
from shardwise.data.text import Corpus, load_corpus, words
from shardwise.errors import ShardwiseError

_PREPARED: dict[str, tuple] = {}


def _prepared(data: DataConfig):
    """(corpus, each document's words, training rows, validation rows, vocabulary, document
    frequencies), once per process."""
    key = repr(dataclasses.astuple(data))
    if key in _PREPARED:
        return _PREPARED[key]
    corpus = load_corpus(data)
    found = [words(doc) for doc in corpus.docs]
    train, val = split_indices(corpus.labels, data.val_fraction)
    df = Counter()
    for i in train:
        df.update(set(found[i]))
    vocab = sorted(df, key=lambda w: (-df[w], w))[: data.vocabulary]
    if not vocab:
        raise ShardwiseError("data.name", f"the {data.name} corpus' training documents hold no word")
    _PREPARED.clear()  # one corpus kept
    _PREPARED[key] = corpus, found, train, val, vocab, np.asarray([df[w] for w in vocab], np.float64)
    return _PREPARED[key]


def prepared(data: DataConfig) -> tuple[Corpus, list, np.ndarray, np.ndarray, list, np.ndarray]:
    return _prepared(data)


def vocabulary_size(data: DataConfig) -> int:
    return len(prepared(data)[4])


def tfidf_rows(found: list[list[str]], vocab: list[str], idf: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Counts times idf of the vocabulary's `columns` only (float64, not yet scaled)."""
    index = {vocab[c]: j for j, c in enumerate(columns)}
    out = np.zeros((len(found), len(columns)), np.float64)
    for row, doc in enumerate(found):
        for w in doc:
            j = index.get(w)
            if j is not None:
                out[row, j] += 1.0
    return out * idf[columns]


def text_dataset(
    data: DataConfig,
    *,
    features: np.ndarray | None = None,
    reduce_stats: StatsReduce | None = None,
) -> Dataset:
    corpus, found, train, val, vocab, df = prepared(data)
    idf = np.log((1.0 + len(train)) / (1.0 + df)) + 1.0
    columns = np.arange(len(vocab)) if features is None else np.asarray(features)
    x = tfidf_rows(found, vocab, idf, columns)
    squares = (x * x).sum(axis=1)
    if reduce_stats is not None:
        squares = reduce_stats(squares)
    length = np.sqrt(squares)
    x = (x / np.where(length > 0, length, 1.0)[:, None]).astype(np.float32)
    in_shape = (len(vocab),)
    record = preprocess_record(in_shape, corpus.classes)
    y = corpus.labels
    return Dataset(x[train], y[train], x[val], y[val], len(corpus.classes), in_shape, features, record)

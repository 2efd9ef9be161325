"""A small labelled corpus the tests write as a folder of text files (a sub-folder per class),
and scikit-learn's view of it: its words, and its TF-IDF features with the documented
vocabulary (the words in the most training documents, ties alphabetical), as an .npz the
plain PyTorch loop reads."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import torch

TOPICS = {
    "astronomy": "star planet orbit telescope comet galaxy moon nebula".split(),
    "cooking": "oven flour butter recipe simmer garlic onion salt".split(),
    "sailing": "boat wind sail harbour keel mast tide anchor".split(),
}
COMMON = ("the a of and to in is it that was for on are with as at be this have from or one had by word but not "
          "what all were we when your can said there use an each which she do how their if will up other about "
          "out many then them these so some her would make like him into time has look two more write go see "
          "número café naïve").split()  # fmt: skip


def write_folder(root: Path, per_class: int = 60, seed: int = 3) -> tuple[list[str], np.ndarray, list[str]]:
    """The corpus as files, and its documents and labels in the source's order (classes
    sorted, then file names)."""
    rng = np.random.default_rng(seed)
    docs, labels, classes = [], [], sorted(TOPICS)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            n = int(rng.integers(6, 30))
            words = [
                TOPICS[name][int(rng.integers(8))] if rng.random() < 0.2 else COMMON[int(rng.integers(len(COMMON)))]
                for _ in range(n)
            ]
            if rng.random() < 0.3:  # another class's word now and then: not trivially separable
                words.append(TOPICS[classes[(c + 1) % 3]][int(rng.integers(8))].upper())
            text = " ".join(words) + ("." if i % 2 else "!\n")
            (root / name / f"{i:04d}.txt").write_text(text, encoding="utf-8")
            docs.append(text)
            labels.append(c)
    return docs, np.asarray(labels), classes


def sklearn_words(docs: list[str]) -> tuple[Counter, Counter]:
    """(occurrences, documents) per word as scikit-learn's default analyzer finds them."""
    from sklearn.feature_extraction.text import CountVectorizer

    analyze = CountVectorizer().build_analyzer()
    occurrences, documents = Counter(), Counter()
    for doc in docs:
        found = analyze(doc)
        occurrences.update(found)
        documents.update(set(found))
    return occurrences, documents


def sklearn_features(docs: list[str], labels: np.ndarray, vocabulary: int, val_fraction: float = 0.2):
    """(train rows, val rows, vocabulary, TF-IDF matrix of every document, unscaled matrix)
    from scikit-learn alone."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.model_selection import train_test_split

    train, val = train_test_split(np.arange(len(labels)), test_size=val_fraction, random_state=0, stratify=labels)
    _, df = sklearn_words([docs[i] for i in train])
    vocab = sorted(df, key=lambda w: (-df[w], w))[:vocabulary]
    fitted = TfidfVectorizer(vocabulary=vocab).fit([docs[i] for i in train])
    raw = TfidfVectorizer(vocabulary=vocab, norm=None).fit([docs[i] for i in train])
    return train, val, vocab, fitted.transform(docs).toarray(), raw.transform(docs).toarray()


def as_npz(path: Path, docs: list[str], labels: np.ndarray, vocabulary: int) -> str:
    train, val, _, x, _ = sklearn_features(docs, labels, vocabulary)
    x = x.astype(np.float32)
    np.savez(path, x=x[train], y=labels[train].astype(np.int64), x_val=x[val], y_val=labels[val].astype(np.int64))
    return str(path)


class PlainBag(torch.nn.Module):
    """The bag model as plain torch: its first layer the product of the TF-IDF row and the
    embedding table (shardwise sums the embeddings of the row's nonzero words instead)."""

    def __init__(self, words: int, classes: int, hidden: list[int]):
        super().__init__()
        table = torch.nn.EmbeddingBag(words, hidden[0], mode="sum")  # (its initialisation draws first)
        torch.nn.init.uniform_(table.weight, -1.0 / math.sqrt(hidden[0]), 1.0 / math.sqrt(hidden[0]))
        self.features = torch.nn.Sequential(torch.nn.Module(), torch.nn.ReLU())
        self.features[0].bag = table
        layers, width = [], hidden[0]
        for h in hidden[1:]:
            layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
            width = h
        self.head = torch.nn.Sequential(*layers, torch.nn.Linear(width, classes))

    def forward(self, x):
        return self.head(self.features[1](x @ self.features[0].bag.weight))

"""Text corpora as documents and their classes, and the tokeniser every text path uses.

Four sources, one shape (`Corpus`): `fortunes`, the fortune files Debian's `fortunes`
package installs (BSD licence; one class per file, one document per fortune); `synthetic_text`,
seeded documents of made-up words, each drawn from its own seed so any share of a corpus of any
size is made without the rest; `text_folder`, a sub-folder per class of UTF-8 `.txt` files;
and `sql_text`, a table's text column (`data/sql_text.py`).

`share=(part, parts)` takes only that contiguous share of the documents, and reads only what
it takes where the source allows (a folder's files, a table's key range, a synthetic
document's seed): what one rank of `shardwise words` counts.

A word is what scikit-learn's default `token_pattern` finds in the lowercased text: two or
more word characters (`(?u)\\b\\w\\w+\\b`), so its vectorisers see the same words.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shardwise.config_sections import DataConfig
from shardwise.errors import ShardwiseError
from shardwise.ranges import even_bounds

TOKEN = re.compile(r"(?u)\b\w\w+\b")
FORTUNES = Path("/usr/share/games/fortunes")
FORTUNES_INSTALL = "apt-get install fortunes (make train and make test install it)"


def words(doc: str) -> list[str]:
    return TOKEN.findall(doc.lower())


@dataclass
class Corpus:
    docs: list[str]
    labels: np.ndarray  # int64, an index into classes
    classes: list[str]
    total: int  # documents in the whole corpus (docs holds only a share of them with `share`)


def check_text_source(data: DataConfig) -> None:
    """The user's mistakes a text source can show without reading its documents."""
    if data.name == "fortunes":
        for name in data.categories:
            if not (FORTUNES / name).is_file():
                have = sorted(p.name for p in FORTUNES.glob("*") if p.suffix == "" and p.is_file())
                hint = f" (there: {', '.join(have[:12])})" if have else f"; {FORTUNES_INSTALL}"
                raise ShardwiseError("data.categories", f"no fortune file {name!r} in {FORTUNES}{hint}")
    elif data.name == "text_folder":
        _folder_files(Path(data.path))
    elif data.name == "sql_text":
        from shardwise.data.sql_text import inspect_text

        inspect_text(data)


def load_corpus(data: DataConfig, share: tuple[int, int] | None = None) -> Corpus:
    check_text_source(data)
    if data.name == "fortunes":
        return _fortunes(data, share)
    if data.name == "synthetic_text":
        return _synthetic(data, share)
    if data.name == "text_folder":
        return _folder(Path(data.path), share)
    from shardwise.data.sql_text import read_text

    return read_text(data, share)


def _slice(total: int, share: tuple[int, int] | None) -> range:
    if share is None:
        return range(total)
    return range(*even_bounds(total, share[1])[share[0]])


def _fortunes(data: DataConfig, share: tuple[int, int] | None) -> Corpus:
    docs, labels = [], []
    for c, name in enumerate(data.categories):
        raw = (FORTUNES / name).read_bytes().decode("utf-8", errors="replace")
        found = [d.strip() for d in raw.split("\n%\n")]
        docs += [d for d in found if d and d != "%"]
        labels += [c] * (len(docs) - len(labels))
    keep = _slice(len(docs), share)
    return Corpus([docs[i] for i in keep], np.asarray(labels, np.int64)[keep], list(data.categories), len(docs))


def _folder_files(root: Path) -> tuple[list[str], list[tuple[int, Path]]]:
    if not root.is_dir():
        raise ShardwiseError("data.path", f"no such folder {str(root)!r}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ShardwiseError("data.path", f"{str(root)!r} has no sub-folder: put each class's .txt files in its own")
    files = []
    for c, name in enumerate(classes):
        found = sorted((root / name).glob("*.txt"))
        if not found:
            raise ShardwiseError("data.path", f"class folder {str(root / name)!r} holds no .txt file")
        files += [(c, f) for f in found]
    return classes, files


def _folder(root: Path, share: tuple[int, int] | None) -> Corpus:
    classes, files = _folder_files(root)
    keep = _slice(len(files), share)
    docs = []
    for i in keep:
        try:
            docs.append(files[i][1].read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ShardwiseError("data.path", f"{files[i][1]} is not UTF-8 text (byte {e.start})") from None
    return Corpus(docs, np.asarray([files[i][0] for i in keep], np.int64), classes, len(files))


SYLLABLES = [a + b for a in "bdfgklmnprstvz" for b in ("a", "e", "i", "o", "u", "ai", "ou")]
COMMON_WORDS, TOPIC_WORDS, TOPIC_SHARE, CORPUS_SEED = 2000, 40, 0.15, 20  # (every train.seed: one corpus)


@dataclass(frozen=True)
class MadeUpWords:
    common: list[str]  # shared by every class, drawn by a Zipf law (cdf)
    topics: list[list[str]]  # each class's own
    cdf: np.ndarray


def synthetic_words(classes: int) -> MadeUpWords:
    rng = np.random.default_rng([CORPUS_SEED, classes])
    made: dict[str, None] = {}
    while len(made) < COMMON_WORDS + classes * TOPIC_WORDS:
        made.setdefault("".join(rng.choice(SYLLABLES, size=int(rng.integers(2, 5)))), None)
    every = list(made)
    topics = every[COMMON_WORDS:]
    zipf = 1.0 / np.arange(1, COMMON_WORDS + 1) ** 1.1
    return MadeUpWords(
        every[:COMMON_WORDS], [topics[c * TOPIC_WORDS : (c + 1) * TOPIC_WORDS] for c in range(classes)],
        np.cumsum(zipf / zipf.sum()),
    )  # fmt: skip


def synthetic_document(i: int, classes: int, mean_words: int, made: MadeUpWords) -> tuple[str, int]:
    """Document `i` and its class, from its own seed alone: shared words by a Zipf law, and
    TOPIC_SHARE of them from its class's own words."""
    rng = np.random.default_rng([CORPUS_SEED, 11, i])
    label = int(rng.integers(classes))
    n = 3 + int(rng.poisson(max(mean_words - 3, 1)))
    picks = np.searchsorted(made.cdf, rng.random(n), side="right").clip(max=COMMON_WORDS - 1)
    topical = rng.random(n) < TOPIC_SHARE
    own = rng.integers(TOPIC_WORDS, size=n)
    topic = made.topics[label]
    return " ".join(topic[o] if t else made.common[p] for p, t, o in zip(picks, topical, own, strict=True)), label


def _synthetic(data: DataConfig, share: tuple[int, int] | None) -> Corpus:
    made = synthetic_words(data.classes)
    docs = [synthetic_document(i, data.classes, data.words_per_document, made) for i in _slice(data.samples, share)]
    labels = np.asarray([d[1] for d in docs], np.int64)
    return Corpus([d[0] for d in docs], labels, [str(c) for c in range(data.classes)], data.samples)

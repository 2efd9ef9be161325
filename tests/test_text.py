"""Text sources and their TF-IDF features, against scikit-learn's own vectoriser; the bag
model's first layer against a plain matrix product."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
import torch
from text_corpus import sklearn_features, write_folder

from shardwise.config import load_config
from shardwise.data import load_source
from shardwise.data.text import FORTUNES, load_corpus


def _data(**overrides):
    return load_config(None, {f"data.{k}": str(v) for k, v in overrides.items()}).data


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    docs, labels, classes = write_folder(root)
    return root, docs, labels, classes


def test_a_folders_documents_are_its_files_a_class_per_sub_folder(folder):
    root, docs, labels, classes = folder
    corpus = load_corpus(_data(name="text_folder", path=root))
    assert corpus.docs == docs and corpus.labels.tolist() == labels.tolist() and corpus.classes == classes
    shares = [load_corpus(_data(name="text_folder", path=root), share=(r, 3)) for r in range(3)]
    assert sum((s.docs for s in shares), []) == docs  # each file read by one share, in order
    assert [len(s.docs) for s in shares] == [60, 60, 60] and all(s.total == 180 for s in shares)


def test_the_features_are_scikit_learns_tfidf_with_the_documented_vocabulary(folder):
    root, docs, labels, _ = folder
    train, val, vocab, want, _ = sklearn_features(docs, labels, vocabulary=40)
    got = load_source(_data(name="text_folder", path=root, vocabulary=40), seed=0)
    assert got.in_shape == (40,) and got.num_classes == 3
    np.testing.assert_allclose(got.x_train, want[train], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got.x_val, want[val], rtol=1e-6, atol=1e-7)
    assert got.y_train.tolist() == labels[train].tolist()


def test_a_vertical_rank_counts_only_its_words_and_completes_the_lengths_by_a_sum(folder):
    """A rank's columns are its share of scikit-learn's matrix; the only thing it learns of
    the other words is each document's sum of squares, through the vertical group's sum."""
    root, docs, labels, _ = folder
    train, val, _, want, raw = sklearn_features(docs, labels, vocabulary=40)
    mine = np.arange(13, 29)
    seen = []

    def others_added(squares):  # the vertical group's sum, here from scikit-learn's own counts
        seen.append(squares.copy())
        return (raw**2).sum(axis=1)

    got = load_source(_data(name="text_folder", path=root, vocabulary=40), seed=0, features=mine,
                      reduce_stats=others_added)  # fmt: skip
    np.testing.assert_allclose(seen[0], (raw[:, mine] ** 2).sum(axis=1), rtol=1e-9)
    np.testing.assert_allclose(got.x_train, want[train][:, mine], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got.x_val, want[val][:, mine], rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not (FORTUNES / "computers").is_file(), reason="make installs Debian's fortunes package")
def test_the_fortunes_corpus_is_a_class_per_file_a_document_per_fortune():
    corpus = load_corpus(_data(name="fortunes"))
    assert corpus.classes == ["computers", "politics", "science", "songs-poems"]
    counts = np.bincount(corpus.labels)
    for c, name in enumerate(corpus.classes):  # strfile's index of each file: a big-endian header, count second
        assert counts[c] == int.from_bytes((FORTUNES / f"{name}.dat").read_bytes()[4:8], "big") > 600
    first = (FORTUNES / "science").read_text(errors="replace").split("\n%\n")[0]
    assert corpus.docs[counts[:2].sum()] == first.strip()


def test_synthetic_documents_come_from_their_own_seeds():
    data = _data(name="synthetic_text", samples=500, classes=4, words_per_document=20)
    whole = load_corpus(data)
    shares = [load_corpus(data, share=(r, 2)) for r in range(2)]
    assert sum((s.docs for s in shares), []) == whole.docs
    assert np.concatenate([s.labels for s in shares]).tolist() == whole.labels.tolist()
    assert set(whole.labels.tolist()) == {0, 1, 2, 3}
    assert 15 < np.mean([len(d.split()) for d in whole.docs]) < 25


def _table(path, rows):
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, topic TEXT, body TEXT)")
    con.executemany("INSERT INTO notes VALUES (?, ?, ?)", rows)
    con.commit()
    con.close()
    return f"sqlite:///{path}"


def test_a_tables_text_column_is_a_corpus_read_by_key_ranges(tmp_path, folder):
    _, docs, labels, classes = folder
    keys = np.random.default_rng(0).permutation(np.arange(10, 10 + 3 * len(docs), 3))  # gaps, any insert order
    url = _table(tmp_path / "t.db", [(int(k), classes[y], d) for k, y, d in zip(keys, labels, docs, strict=True)])
    data = _data(name="sql_text", url=url, table="notes", label_column="topic", text_column="body", page_rows=7)
    whole = load_corpus(data)
    order = np.argsort(keys)
    assert whole.docs == [docs[i] for i in order] and whole.labels.tolist() == labels[order].tolist()
    shares = [load_corpus(data, share=(r, 4)) for r in range(4)]
    assert sum((s.docs for s in shares), []) == whole.docs
    assert [len(s.docs) for s in shares] == [45, 45, 45, 45]


@pytest.mark.parametrize("rows, overrides, message", [
    ([(1, "a", "x y")], {"text_column": "text"}, "data.text_column: 'notes' has no column 'text' (it has id, topic"),
    ([(1, "a", "x y"), (2, "b", b"\x01")], {}, "data.text_column: column 'body' of 'notes' holds b'\\x01' at key 2"),
    ([(1, "a", "x y"), (2, "b", None)], {}, "data.text_column: column 'body' of 'notes' holds None at key 2, not text"),
    ([(1, "a", "x y"), (2, None, "z w")], {}, "data.label_column: column 'topic' of 'notes' is empty at key 2"),
], ids=["no-column", "bytes", "null-text", "null-label"])  # fmt: skip
def test_a_text_table_that_cannot_be_read_is_refused_in_one_line(tmp_path, capfd, rows, overrides, message):
    from refusals import refused_in_one_line

    url = _table(tmp_path / "bad.db", rows)
    settings = {"data.name": "sql_text", "data.url": url, "data.table": "notes", "data.label_column": "topic",
                "data.text_column": "body", "model.name": "mlp", "model.hidden": "", **overrides}  # fmt: skip
    refused_in_one_line(tmp_path, capfd, {k if "." in k else f"data.{k}": v for k, v in settings.items()}, message)


def test_a_folder_that_is_not_a_corpus_is_refused_in_one_line(tmp_path, capfd):
    from refusals import refused_in_one_line

    (tmp_path / "c" / "a").mkdir(parents=True)
    (tmp_path / "c" / "a" / "1.txt").write_bytes(b"caf\xe9 latin-1")
    base = {"data.name": "text_folder", "model.name": "mlp"}
    refused_in_one_line(tmp_path, capfd, {**base, "data.path": str(tmp_path / "c")}, "1.txt is not UTF-8 text (byte 3)")
    (tmp_path / "c" / "b").mkdir()
    refused_in_one_line(tmp_path, capfd, {**base, "data.path": str(tmp_path / "c")}, "/c/b' holds no .txt file")
    refused_in_one_line(tmp_path, capfd, {**base, "data.path": str(tmp_path / "x")}, "data.path: no such folder")
    refused_in_one_line(tmp_path, capfd, {"data.name": "fortunes", "data.categories": "computers,nothere"},
                        "data.categories: no fortune file 'nothere'")  # fmt: skip
    refused_in_one_line(tmp_path, capfd, {"data.name": "fortunes", "data.categories": "computers,../../etc/passwd"},
                        "data.categories: must name distinct fortune files")  # fmt: skip
    refused_in_one_line(tmp_path, capfd, {"data.name": "fortunes", "model.name": "bag", "parallel.vertical": "2"},
                        "parallel.vertical: =2 with model.name=bag: the bag's table is not split")  # fmt: skip


def test_a_text_tables_key_must_be_an_integer(tmp_path, capfd):
    from refusals import refused_in_one_line

    con = sqlite3.connect(tmp_path / "k.db")
    con.execute("CREATE TABLE notes (id REAL, topic TEXT, body TEXT)")
    con.executemany("INSERT INTO notes VALUES (?, ?, ?)", [(1.0, "a", "x y"), (2.5, "b", "z w")])
    con.commit()
    con.close()
    settings = {"data.name": "sql_text", "data.url": f"sqlite:///{tmp_path / 'k.db'}", "data.table": "notes",
                "data.label_column": "topic", "data.text_column": "body", "model.name": "mlp"}  # fmt: skip
    refused_in_one_line(tmp_path, capfd, settings, "data.key: column 'id' of 'notes' holds 1.0, not an integer")


def test_the_bags_first_layer_is_the_product_of_the_features_and_its_table():
    from shardwise.models.bag import WeightedBag

    torch.manual_seed(0)
    x = torch.rand(6, 50) * (torch.rand(6, 50) < 0.1)
    x[3] = 0.0  # a document with none of the vocabulary's words
    bag = WeightedBag(50, 8)
    out = bag(x)
    torch.testing.assert_close(out, x @ bag.bag.weight)
    out.sum().backward()
    torch.testing.assert_close(bag.bag.weight.grad, x.sum(0)[:, None].expand(50, 8))

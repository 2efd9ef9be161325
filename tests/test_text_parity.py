"""The text classifier under every layout ends with the weights of a plain PyTorch loop on
scikit-learn's TF-IDF features of the same corpus; and the linear model's accuracy on the
fortunes is within a point of scikit-learn's LogisticRegression on those features."""

from __future__ import annotations

import pytest
from parity import TOL, assert_all_ranks_match, plain_train, train_weights
from text_corpus import as_npz, write_folder

from shardwise.data.text import FORTUNES

VOCABULARY = 60


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    docs, labels, _ = write_folder(root / "corpus")
    return str(root / "corpus"), as_npz(root / "features.npz", docs, labels, VOCABULARY)


@pytest.mark.parametrize("model, layout, ranks", [
    ({}, {}, [0, 1]),
    ({}, {"parallel.vertical": "2"}, [0, 1]),
    ({"model.hidden": "16"}, {"parallel.tp": "2"}, [0, 1]),
    ({}, {"parallel.mode": "ps"}, [0, 1, 2]),
    ({"model.name": "bag", "model.hidden": "12,8"}, {}, [0, 1]),
], ids=["dp2", "vertical2-by-vocabulary", "tp2-head", "ps-2-workers", "bag-dp2"])  # fmt: skip
def test_the_text_classifier_ends_with_the_plain_loops_weights(pool, corpus, model, layout, ranks):
    folder, npz = corpus
    model = {"model.name": "mlp", "model.hidden": "", "train.lr": "0.5", **model}
    text = {"data.name": "text_folder", "data.path": folder, "data.vocabulary": str(VOCABULARY)}
    want = plain_train({"data.name": "npz", "data.path": npz, **model})[0]
    states = pool.run(train_weights, {**text, **model, **layout}, ranks=ranks)
    assert_all_ranks_match(want, states, TOL)
    start = plain_train({"data.name": "npz", "data.path": npz, **model, "train.lr": "1e-30"})[0]
    assert max((want[k] - start[k]).abs().max().item() for k in want) > 1e-2  # far beyond the tolerance


def _accuracy(overrides, *, group):
    from parity import train_summary

    return train_summary(overrides, group=group)["val_accuracy"]


@pytest.mark.skipif(not (FORTUNES / "computers").is_file(), reason="make installs Debian's fortunes package")
def test_the_linear_model_is_within_a_point_of_scikit_learns_logistic_regression(pool):
    from sklearn.linear_model import LogisticRegression

    from shardwise.config import load_config
    from shardwise.data import load_source

    settings = {
        "data.name": "fortunes",
        "model.name": "mlp",
        "model.hidden": "",
        "train.steps": "2000",
        "train.lr": "2.0",
        "train.batch_size": "64",
        "train.warmup_steps": "20",
    }  # examples/fortunes.toml
    mine = pool.run(_accuracy, settings, ranks=[0])[0]
    data = load_source(load_config(None, settings).data, seed=0)
    theirs = LogisticRegression(C=10.0, max_iter=2000).fit(data.x_train, data.y_train).score(data.x_val, data.y_val)
    assert abs(mine - theirs) < 0.01, (mine, theirs)
    assert theirs > 0.69

"""`shardwise words`: the counts merged across ranks equal one process's count of the whole
corpus by scikit-learn's analyzer, each word on exactly one rank."""

from __future__ import annotations

import json
import zlib

import cli_fork
import pytest
from text_corpus import sklearn_words, write_folder


def _read_tsv(path):
    rows = [line.split("\t") for line in path.read_text().splitlines()]
    return {w: (int(c), int(d)) for w, c, d in rows}


@pytest.mark.parametrize("nproc", [2, 3])
def test_the_counts_merged_across_ranks_are_one_process_count(tmp_path, nproc):
    docs, _, _ = write_folder(tmp_path / "corpus", per_class=40)
    out = tmp_path / "run"
    if nproc == 2:  # the source named on the command line
        source = ["--data.name", "text_folder", "--data.path", str(tmp_path / "corpus")]
    else:  # or in a config file
        (tmp_path / "words.toml").write_text(f'[data]\nname = "text_folder"\npath = "{tmp_path / "corpus"}"\n')
        source = [str(tmp_path / "words.toml")]
    done = cli_fork.run(["words", *source, "--nproc", str(nproc), "--top", "7", "--out", str(out)])
    assert done.returncode == 0, done.stderr
    occurrences, documents = sklearn_words(docs)
    parts = sorted((out / "counts").glob("part-*.tsv"))
    assert [p.name for p in parts] == [f"part-{r:05d}.tsv" for r in range(nproc)]
    merged = {}
    for rank, part in enumerate(parts):
        mine = _read_tsv(part)
        assert all(zlib.crc32(w.encode()) % nproc == rank for w in mine)  # its own words only
        assert not merged.keys() & mine.keys()
        merged |= mine
    assert merged == {w: (occurrences[w], documents[w]) for w in occurrences}
    want = sorted(occurrences, key=lambda w: (-occurrences[w], w))[:7]
    top = (out / "words.tsv").read_text().splitlines()
    assert top[0] == "word\tcount\tdocuments"
    assert [line.split("\t")[0] for line in top[1:]] == want
    summary = json.loads((out / "summary.json").read_text())
    assert summary["documents"] == 120 and summary["words"] == sum(occurrences.values())
    assert summary["distinct_words"] == len(occurrences) and summary["ranks"] == nproc
    assert want[0] in done.stdout and "counted by" in done.stdout


def test_words_of_a_source_that_is_not_text_is_refused_in_one_line(tmp_path):
    done = cli_fork.run(["words", "--data.name", "digits", "--out", str(tmp_path / "run")])
    assert done.returncode == 2
    assert done.stderr.strip() == "shardwise: data.name: shardwise words counts a text source (fortunes, " \
                                  "synthetic_text, text_folder, sql_text), not digits"  # fmt: skip
    assert not (tmp_path / "run").exists()

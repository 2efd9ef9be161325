"""SQL tables as training data (SQLite here; tests/test_postgres.py runs a PostgreSQL
server): each rank reads only its rows and its columns, every row once an epoch whatever
the number of ranks, on from a checkpoint's read position, and the rows are the table's,
as sqlite3 reads them, standardised with the training rows' statistics."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from sql_tables import SQL_JOB, digits_sqlite, plain_loop, reference_split

from shardwise.config import DataConfig
from shardwise.data.sql_loader import build_sql_rank_data
from shardwise.errors import ShardwiseError
from shardwise.job import run

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    return digits_sqlite(tmp_path_factory.mktemp("sql") / "digits.db")


def _cfg(path: Path, **kw) -> DataConfig:
    return DataConfig(name="sql", url=f"sqlite:///{path}", table="digits", **kw)


def _ranks(cfg: DataConfig, dp: int, *, batch: int = 32, **kw):
    return [build_sql_rank_data(cfg, global_batch=batch, grad_accum=1, dp_rank=r, dp=dp, seed=0, device=CPU, **kw)
            for r in range(dp)]  # fmt: skip


def _step(ranks, step: int) -> np.ndarray:
    """The keys of a step's global batch, in rank order."""
    for r in ranks:
        r.micro_batches(step)
    return np.concatenate([r.last_keys for r in ranks])


def _all(path: Path, columns: str = "id, label") -> np.ndarray:
    con = sqlite3.connect(path)
    try:
        return np.array(con.execute(f"SELECT {columns} FROM digits ORDER BY id").fetchall(), dtype=np.float64)
    finally:
        con.close()


def test_rows_are_the_tables_standardised_and_the_split_is_the_keys(table):
    """One epoch of each shard is each of its rows once; training and validation rows part
    the table, about data.val_fraction of it validation, every class in both; a step's rows
    are the table's (read here by sqlite3), standardised per column with the training rows'
    mean and deviation, their labels the table's."""
    (data,) = _ranks(_cfg(table, page_rows=50, shards=4), 1)
    whole = _all(table, "id, label, " + ", ".join(f"p{i}" for i in range(64)))
    by_key = {int(row[0]): row for row in whole}
    shards = [s.take(s.rows.rows)[0] for s in data.streams]  # a whole epoch of each
    for j, keys in enumerate(shards):
        assert len(set(keys.tolist())) == len(keys) == data.streams[j].rows.rows, f"shard {j}"
    train = set(np.concatenate(shards).tolist())
    val_labels = np.concatenate([y.numpy() for _, y in data.val_batches()])
    val = set(data.val_keys.tolist())
    assert not train & val and train | val == set(by_key)
    assert 0.17 < len(val) / len(by_key) < 0.23 and len(val_labels) == len(val) == data.val_rows
    assert set(val_labels.tolist()) == set(range(10)) == {int(by_key[k][1]) for k in train}
    rows = np.array([by_key[k][2:] for k in sorted(train)])
    mean, std = rows.mean(axis=0), rows.std(axis=0)
    std = np.where(std < 1e-6, 1.0, std + 1e-6)  # a constant column (the digits' corners) divided by 1
    assert (std == 1.0).sum() >= 1
    data.close()
    (data,) = _ranks(_cfg(table, page_rows=50, shards=4), 1)
    x, y = data.micro_batches(0)[0]
    want = (np.array([by_key[int(k)][2:] for k in data.last_keys]) - mean) / std
    np.testing.assert_allclose(x.numpy(), want, rtol=1e-5, atol=1e-5)
    assert y.tolist() == [int(by_key[int(k)][1]) for k in data.last_keys]
    data.close()


def test_a_column_constant_over_the_training_rows_is_divided_by_one(tmp_path):
    """A feature that is 0 in every training row and 5 in one validation row reads 5 there
    (scikit-learn's StandardScaler does the same), not 5 millionths-of-a-deviation apart."""
    rng = np.random.default_rng(0)
    rows = [(k, int(k % 3), float(rng.standard_normal()), 0.0) for k in range(1, 201)]
    db = _bad_table(tmp_path / "c.db", "id INTEGER PRIMARY KEY, label INTEGER, a REAL, c REAL", rows)
    cfg = DataConfig(name="sql", url=f"sqlite:///{db}", table="t")
    (data,) = _ranks(cfg, 1, batch=8)
    list(data.val_batches())
    key = int(data.val_keys[0])
    data.close()
    con = sqlite3.connect(db)
    con.execute("UPDATE t SET c = 5 WHERE id = ?", (key,))
    con.commit()
    con.close()
    (data,) = _ranks(cfg, 1, batch=8)
    x = torch.cat([x for x, _ in data.val_batches()])
    assert float(x[0, 1]) == 5.0 and data.preprocess["standardize"]["std"][1] == 1.0
    data.close()


def test_a_steps_rows_are_the_same_on_any_number_of_ranks(table):
    """data.shards = 4: each step takes 8 rows of every shard, so its global batch is the
    same rows (in shard order) on 1, 2 or 4 ranks, across pages and the epoch's end."""
    cfg = _cfg(table, page_rows=50, shards=4)
    runs = [_ranks(cfg, dp) for dp in (1, 2, 4)]
    for step in range(50):  # an epoch is 45 steps of a shard's 359 or 360 rows
        one, *others = (_step(ranks, step) for ranks in runs)
        for keys in others:
            np.testing.assert_array_equal(keys, one, err_msg=f"step {step}")
    for ranks in runs:
        for r in ranks:
            r.close()


def _positions(ranks) -> dict[str, torch.Tensor]:
    return {k: v for r in ranks for k, v in r.position_tensors().items()}


def test_a_resume_reads_on_from_the_checkpoints_position_on_any_number_of_ranks(table):
    """Stopped mid-page on 2 ranks, resumed on 4, stopped after the epoch's end, resumed on
    1: every step's rows are those of the run that never stopped."""
    cfg = _cfg(table, page_rows=50, shards=4)
    whole = _ranks(cfg, 1)
    want = [_step(whole, step) for step in range(60)]
    got, ranks, positions = [], None, None
    for dp, (start, stop) in zip((2, 4, 1), ((0, 23), (23, 48), (48, 60)), strict=True):
        ranks = _ranks(cfg, dp, positions=positions, start=start)
        got += [_step(ranks, step) for step in range(start, stop)]
        positions = _positions(ranks)
        for r in ranks:
            r.close()
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_array_equal(a, b, err_msg=f"step {step}")
    # a position that the step and batch do not make (another batch size) is refused
    with pytest.raises(ShardwiseError, match="rows used at the checkpoint, not the 96"):
        _ranks(cfg, 1, batch=16, positions=positions, start=24)
    with pytest.raises(ShardwiseError, match="read the table with data.shards=4: resume with data.shards=4"):
        _ranks(_cfg(table, page_rows=50, shards=8), 1, positions=positions, start=60)
    with pytest.raises(ShardwiseError, match="read the table with data.page_rows=50: resume with data.page_rows=50"):
        _ranks(_cfg(table, page_rows=64, shards=4), 1, positions=positions, start=60)
    # without data.shards, a resume reads in the checkpoint's 4 shards (on 2 ranks here)
    again = _ranks(_cfg(table, page_rows=50), 2, positions=positions, start=60)
    np.testing.assert_array_equal(_step(again, 60), _step(whole, 60))
    for r in again:
        r.close()
    # a position found from the step alone (a parameter server's workers keep none) is the saved one
    for start in (7, 23, 45, 59):
        (found,) = _ranks(cfg, 1, positions={}, start=start)
        (fresh,) = _ranks(cfg, 1)
        for step in range(start):
            fresh.micro_batches(step)
        assert [s.pos for s in found.streams] == [s.pos for s in fresh.streams], start
        found.close()
        fresh.close()
    for r in whole:
        r.close()


def test_vertical_ranks_select_only_their_own_columns(table, monkeypatch):
    """Statements as SQLite ran them (its trace callback): each of two vertical ranks reads
    the key, the label and its own 32 columns, never the other's."""
    traced: list[list[str]] = []
    connect = sqlite3.connect

    def traced_connect(*args, **kwargs):
        conn = connect(*args, **kwargs)
        conn.set_trace_callback(traced[-1].append)
        return conn

    monkeypatch.setattr(sqlite3, "connect", traced_connect)
    cfg = _cfg(table, page_rows=50)
    for part in (np.arange(32), np.arange(32, 64)):
        traced.append([])
        (data,) = _ranks(cfg, 1, features=part)
        for step in range(20):
            data.micro_batches(step)
        assert len(list(data.val_batches())) == 1
        data.close()
    mine = [{f'"p{i}"' for i in range(32)}, {f'"p{i}"' for i in range(32, 64)}]
    for rank, statements in enumerate(traced):
        # (a query that reads no row names no column: the description of the table's columns)
        assert all('"p' not in s for s in statements if "LIMIT 0" in s)
        selects = [s for s in statements if s.lstrip().upper().startswith("SELECT") and '"p' in s]
        assert len(selects) > 10, statements
        for s in selects:
            assert not any(c in s for c in mine[1 - rank]), f"rank {rank} read another rank's column: {s}"
        assert all(any(c in s for s in selects) for c in mine[rank])


def test_the_next_page_is_read_in_the_background(table, monkeypatch):
    """The first page of each shard is read when asked for; every later one by the reader's
    own thread while the step before it runs."""
    (data,) = _ranks(_cfg(table, page_rows=40, shards=2), 1)
    read, threads = data.reader.read, []

    def recorded(*args, **kwargs):
        import threading

        threads.append(threading.current_thread().name)
        return read(*args, **kwargs)

    for stream in data.streams:
        stream.read = recorded
    for step in range(40):  # 16 rows of each shard a step: 16 pages of 40 each
        data.micro_batches(step)
    assert len(threads) > 16
    assert threads.count("MainThread") == 2, threads  # each shard's first page
    assert all(name.startswith("shardwise-sql") for name in threads if name != "MainThread")
    data.close()


def _bad_table(path: Path, create: str, rows: list[tuple]) -> Path:
    con = sqlite3.connect(path)
    con.execute(f"CREATE TABLE t ({create})")
    con.executemany(f"INSERT INTO t VALUES ({', '.join('?' * len(rows[0]))})", rows)
    con.commit()
    con.close()
    return path


@pytest.mark.parametrize("create, rows, overrides, message", [
    ("id INTEGER, label INTEGER, a REAL", [(1, 0, 1.0)], {"data.table": "nothere"},
     "data.table: sqlite:///{db} refused reading 'nothere': no such table: nothere"),
    ("id INTEGER, label INTEGER, a REAL", [(1, 0, 1.0)], {"data.feature_columns": "a,b"},
     "data.feature_columns: 't' has no column 'b' (it has id, label, a)"),
    ("id INTEGER, label INTEGER, a REAL", [(1, 0, 1.0), (2, 1, "abc")], {},
     "data.feature_columns: column 'a' of 't' holds 'abc' at key 2, not a finite number"),
    ("id INTEGER, label INTEGER, a REAL", [(1, 0, 1.0), (2, None, 2.0)], {},
     "data.label_column: column 'label' of 't' is empty at key 2"),
    ("id INTEGER, label INTEGER, a REAL", [(1, 0, 1.0), (1, 1, 2.0)], {},
     "data.key: column 'id' of 't' repeats a value (1 distinct in 2 rows)"),
    ("id REAL, label INTEGER, a REAL", [(1.5, 0, 1.0)], {}, "data.key: column 'id' of 't' holds 1.5, not an integer"),
    ("id INTEGER, label INTEGER, a REAL", [(1, 0, 1.0)], {"data.query": "SELEC id FROM t", "data.table": ""},
     "data.query: sqlite:///{db} refused reading data.query: near \"FROM\": syntax error"),
    ("id INTEGER, label INTEGER, a REAL", [(1, 0, 1.0)], {"data.url": "postgresql://me:secret@localhost/db"},
     "data.url: holds a password, which the run would save in its config: put it in PGPASSWORD or ~/.pgpass"),
], ids=["no-table", "no-column", "text-feature", "no-label", "repeated-key", "real-key", "bad-query",
        "password"])  # fmt: skip
def test_a_table_that_cannot_be_read_is_refused_in_one_line(tmp_path, capfd, create, rows, overrides, message):
    from refusals import refused_in_one_line

    db = _bad_table(tmp_path / "bad.db", create, rows)
    settings = {"data.name": "sql", "data.url": f"sqlite:///{db}", "data.table": "t", "model.name": "mlp", **overrides}
    refused_in_one_line(tmp_path, capfd, {k: v for k, v in settings.items() if v}, message.format(db=db))


def _sql_job(overrides: dict[str, str], *, group):
    from parity import BASE

    from shardwise.config import load_config

    return run(load_config(None, {**BASE, **overrides}), group=group).state_dict


@pytest.mark.parametrize("layout, ranks", [
    ({}, [0, 1]),
    ({"parallel.vertical": "2"}, [0, 1, 2, 3]),
    # two servers (the second loads no data, but shares in finding the key ranges) and two workers
    ({"parallel.mode": "ps", "parallel.servers": "2"}, [0, 1, 2, 3]),
], ids=["dp2", "vertical2-dp2", "ps-2-servers"])  # fmt: skip
def test_training_on_a_table_ends_with_the_plain_loops_weights(pool, table, layout, ranks):
    from parity import TOL

    url = f"sqlite:///{table}"
    got = pool.run(_sql_job, {**SQL_JOB, "data.url": url, **layout}, ranks=ranks)[0]
    want = plain_loop(_cfg(table, page_rows=50, shards=4))
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], **TOL, msg=key)


def test_a_killed_run_and_a_resume_on_more_ranks_use_every_row_as_the_whole_run(pool, table, tmp_path):
    """Rank 1 killed at step 7 of 12 (checkpoints every 3): the restart reads on from step
    6's read positions and ends with the weights of the run that was not stopped; so does a
    resume of step 6 on 4 ranks."""
    import os

    import cli_fork
    from parity import BASE, TOL
    from safetensors.torch import load_file

    url = f"sqlite:///{table}"
    args = [a for k, v in {**BASE, **SQL_JOB, "data.url": url}.items() for a in (f"--{k}", v)]
    args += ["--train.checkpoint_every", "3", "--max-restarts", "1", "--out", str(tmp_path / "run")]
    done = cli_fork.run(["train", "--nproc", "2", *args], env={**os.environ, "SHARDWISE_FAULT": "1:7:kill"})
    assert done.returncode == 0, done.stderr
    assert "restart 1 of 1 from step-00000006" in done.stderr
    whole = pool.run(_sql_job, {**SQL_JOB, "data.url": url}, ranks=[0, 1])[0]
    killed = load_file(str(tmp_path / "run" / "model.safetensors"))
    resumed = pool.run(_sql_job, {**SQL_JOB, "data.url": url, "run.resume": str(tmp_path / "run" / "checkpoints" /
                                  "step-00000006")}, ranks=[0, 1, 2, 3])[0]  # fmt: skip
    for key in whole:
        torch.testing.assert_close(killed[key], whole[key], **TOL, msg=key)
        torch.testing.assert_close(resumed[key], whole[key], **TOL, msg=key)


def test_the_whole_table_in_one_process_is_what_the_ranks_read(table):
    """`shardwise plan` and `evaluate` take the table whole: the same validation rows, in the
    same order, standardised alike, and the same training rows as a run's ranks read."""
    from shardwise.data.sql_whole import load_table

    cfg = _cfg(table, page_rows=50, shards=4)
    whole = load_table(cfg)
    (data,) = _ranks(cfg, 1)
    val = list(data.val_batches())
    np.testing.assert_array_equal(whole.x_val, np.concatenate([x.numpy() for x, _ in val]))
    np.testing.assert_array_equal(whole.y_val, np.concatenate([y.numpy() for _, y in val]))
    assert whole.preprocess == data.preprocess and whole.num_classes == 10 and whole.in_shape == (64,)
    assert len(whole.y_train) == sum(s.rows.rows for s in data.streams)
    data.close()


@pytest.mark.parametrize("keys", [
    [-(7**i) for i in range(1, 20)] + [2**31 + 5 * i for i in range(300)] + [2**62 - i for i in range(300)],
    [1000 * i for i in range(1, 1001)],
    [10_000 * i for i in range(1, 1001)],
], ids=["negative-and-large", "every-1000th", "every-10000th"])  # fmt: skip
def test_the_validation_split_is_the_documented_hash_of_the_key(tmp_path, keys):
    """The database's split is the documented hash computed here in Python, for negative keys,
    keys past 2^31 and 2^62, and keys in arithmetic progression (a hash of the low digits
    would put every 10,000th key on the same side); about a fifth of them in validation."""
    rows = [(k, i % 3, float(i)) for i, k in enumerate(keys)]
    db = _bad_table(tmp_path / "k.db", "id INTEGER PRIMARY KEY, label INTEGER, a REAL", rows)
    (data,) = _ranks(DataConfig(name="sql", url=f"sqlite:///{db}", table="t"), 1, batch=2)
    list(data.val_batches())
    assert set(data.val_keys.tolist()) == reference_split(keys)
    assert 0.15 < len(data.val_keys) / len(keys) < 0.25
    data.close()


@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
def test_an_infinite_feature_is_refused(tmp_path, value):
    from shardwise.data import sql

    db = _bad_table(tmp_path / "i.db", "id INTEGER PRIMARY KEY, label INTEGER, a REAL", [(1, 0, 1.0), (2, 1, value)])
    with pytest.raises(ShardwiseError, match=f"column 'a' of 't' holds {value} at key 2, not a finite number"):
        sql.inspect(DataConfig(name="sql", url=f"sqlite:///{db}", table="t"))

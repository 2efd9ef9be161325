"""An SQL table in a real PostgreSQL server, started by these tests on a free loopback
port (tests/sql_tables.py): the same rows and weights as the same table in SQLite, each
vertical rank's statements in the server's own log naming only its columns, a dropped
connection opened again, a text column refused by its declared type."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sql_tables import COLUMNS, SQL_JOB, digits_postgres, plain_loop, reference_split

from shardwise.bench import postgres
from shardwise.config import DataConfig
from shardwise.data import sql
from shardwise.data.sql_loader import build_sql_rank_data
from shardwise.errors import ShardwiseError
from shardwise.job import run

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def server():
    with postgres.running() as s:
        digits_postgres(s)
        yield s


def _cfg(server, **kw) -> DataConfig:
    return DataConfig(name="sql", url=server.url, table="digits", page_rows=50, shards=4, **kw)


def _sql_job(overrides: dict[str, str], *, group):
    from parity import BASE

    from shardwise.config import load_config

    return run(load_config(None, {**BASE, **overrides}), group=group).state_dict


def test_vertical_ranks_read_only_their_columns_as_the_servers_log_shows(pool, server):
    """vertical = 2 on 2 ranks: the weights of the plain loop; in the server's statement log
    each rank (its connections named shardwise-rankN) selected the key, the label and its
    own 32 columns, never the other's."""
    from parity import TOL

    got = pool.run(_sql_job, {**SQL_JOB, "data.url": server.url, "parallel.vertical": "2"}, ranks=[0, 1])[0]
    want = plain_loop(_cfg(server))
    for key in want:
        torch.testing.assert_close(got[key], want[key], **TOL, msg=key)
    mine = [{f'"{c}"' for c in COLUMNS[:32]}, {f'"{c}"' for c in COLUMNS[32:]}]
    for rank in (0, 1):
        statements = [s for s in server.statements(f"shardwise-rank{rank}") if '"p' in s]
        assert len(statements) > 10, server.log.read_text()[-2000:]
        for s in statements:
            assert not any(c in s for c in mine[1 - rank]), f"rank {rank} read another rank's column: {s}"
        assert all(any(c in s for s in statements) for c in mine[rank])


def test_the_same_rows_as_sqlite_and_a_dropped_connection_is_opened_again(server, tmp_path):
    """The same table in SQLite and in PostgreSQL gives each step the same rows (the split
    and the shards are computed alike by both); the server ending every connection of a
    reader (its own and its background thread's) mid-run costs it nothing."""
    from sql_tables import digits_sqlite

    lite = DataConfig(name="sql", url=f"sqlite:///{digits_sqlite(tmp_path / 'd.db')}", table="digits",
                      page_rows=50, shards=4)  # fmt: skip
    a = build_sql_rank_data(lite, global_batch=32, grad_accum=1, dp_rank=0, dp=1, seed=0, device=CPU)
    b = build_sql_rank_data(_cfg(server), global_batch=32, grad_accum=1, dp_rank=0, dp=1, seed=0, device=CPU,
                            name="shardwise-dropped")  # fmt: skip
    for step in range(30):
        if step == 12:
            ended = server.run("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                               "WHERE application_name = 'shardwise-dropped'")  # fmt: skip
            assert len(ended) >= 1
        xa, ya = a.micro_batches(step)[0]
        xb, yb = b.micro_batches(step)[0]
        np.testing.assert_array_equal(a.last_keys, b.last_keys, err_msg=f"step {step}")
        torch.testing.assert_close(xa, xb, rtol=1e-5, atol=1e-5)
        assert torch.equal(ya, yb)
    a.close()
    b.close()


def test_a_text_column_is_refused_by_its_declared_type(server):
    server.run("CREATE TABLE notes (id INTEGER PRIMARY KEY, label INTEGER, a DOUBLE PRECISION, b TEXT)")
    server.run("INSERT INTO notes VALUES (1, 0, 1.0, 'x')")
    with pytest.raises(ShardwiseError, match=r"data.feature_columns: column 'b' of 'notes' is not a number \(text\)"):
        sql.inspect(DataConfig(name="sql", url=server.url, table="notes"))


def test_a_query_that_would_write_is_refused_by_the_server(server):
    """Sessions are read-only: a query that moves a sequence (a write) is refused."""
    server.run("CREATE TABLE kept (id INTEGER PRIMARY KEY, label INTEGER, a DOUBLE PRECISION)")
    server.run("INSERT INTO kept VALUES (1, 0, 1.0), (2, 1, 2.0)")
    server.run("CREATE SEQUENCE moved")
    query = "SELECT id, label, a + nextval('moved') AS a FROM kept"
    with pytest.raises(ShardwiseError, match=r"refused reading data.query: cannot execute nextval\(\) in a read-only"):
        sql.inspect(DataConfig(name="sql", url=server.url, query=query))
    assert server.run("SELECT last_value, is_called FROM moved") == [(1, False)]


def test_a_query_with_question_marks_a_schemas_table_and_an_int4_key(server):
    """A `?` and a `%` in the user's query stay the query's (not parameter marks); a table
    named schema.table is found; an INTEGER key splits as the documented hash says."""
    server.run("CREATE SCHEMA lab")
    server.run("CREATE TABLE lab.marks (id INTEGER PRIMARY KEY, label TEXT, a DOUBLE PRECISION, note TEXT)")
    rows = [(k, "yes?" if k % 2 else "no%", float(k), "x") for k in range(-300, 300, 3)]
    server.run("INSERT INTO lab.marks VALUES (%s, %s, %s, %s)", rows)
    query = "SELECT id, label, a FROM lab.marks WHERE label LIKE '%?' OR label LIKE 'no%'"
    for cfg in (DataConfig(name="sql", url=server.url, query=query),
                DataConfig(name="sql", url=server.url, table="lab.marks", feature_columns=["a"])):  # fmt: skip
        sql.inspect(cfg)
        data = build_sql_rank_data(cfg, global_batch=4, grad_accum=1, dp_rank=0, dp=1, seed=0, device=CPU)
        assert data.preprocess["classes"] == ["no%", "yes?"]
        data.micro_batches(0)
        list(data.val_batches())
        assert set(data.val_keys.tolist()) == reference_split([r[0] for r in rows])
        data.close()


def test_a_nan_feature_is_refused(server):
    server.run("CREATE TABLE nans (id BIGINT PRIMARY KEY, label INTEGER, a DOUBLE PRECISION)")
    server.run("INSERT INTO nans VALUES (1, 0, 1.0), (2, 1, 'NaN')")
    with pytest.raises(ShardwiseError, match="column 'a' of 'nans' holds nan at key 2, not a finite number"):
        sql.inspect(DataConfig(name="sql", url=server.url, table="nans"))


def test_a_table_gone_mid_run_is_a_failure_to_restart_from_not_a_users_mistake(server):
    """A query that fails after the start raises DataReadError (the rank exits 1, and
    --max-restarts restarts it from its checkpoint), not ShardwiseError (exit 2, which
    also ends restarts)."""
    from shardwise.data.sql_loader import DataReadError

    server.run("CREATE TABLE going AS SELECT * FROM digits")
    cfg = DataConfig(name="sql", url=server.url, table="going", page_rows=50, shards=4)
    data = build_sql_rank_data(cfg, global_batch=32, grad_accum=1, dp_rank=0, dp=1, seed=0, device=CPU)
    data.micro_batches(0)
    server.run("ALTER TABLE going RENAME TO gone")
    with pytest.raises(DataReadError, match="refused reading 'going': relation \"going\" does not exist") as e:
        for step in range(1, 30):
            data.micro_batches(step)
    assert not isinstance(e.value, ShardwiseError)
    data.close()


def test_a_text_column_is_a_corpus_its_shares_read_only_their_key_ranges(server, tmp_path):
    """sql_text on the server: the documents in key order, each of 3 shares its own range;
    a column that is not text is refused by its declared type."""
    from text_corpus import write_folder

    from shardwise.data.text import check_text_source, load_corpus

    docs, labels, classes = write_folder(tmp_path / "corpus", per_class=20)
    server.run("CREATE TABLE texts (id BIGINT PRIMARY KEY, topic TEXT, body TEXT, n INTEGER)")
    server.run("INSERT INTO texts VALUES (%s, %s, %s, 1)",
               [(1000 - 7 * i, classes[y], d) for i, (y, d) in enumerate(zip(labels, docs, strict=True))])  # fmt: skip
    data = DataConfig(name="sql_text", url=server.url, table="texts", label_column="topic", text_column="body",
                      page_rows=16)  # fmt: skip
    check_text_source(data)
    whole = load_corpus(data)
    assert whole.docs == docs[::-1] and whole.classes == classes  # keys fall as the files go
    shares = [load_corpus(data, share=(r, 3)) for r in range(3)]
    assert sum((s.docs for s in shares), []) == whole.docs and [len(s.docs) for s in shares] == [20, 20, 20]
    with pytest.raises(ShardwiseError, match=r"data.text_column: column 'n' of 'texts' is not text \(int4\)"):
        check_text_source(DataConfig(name="sql_text", url=server.url, table="texts", label_column="topic",
                                     text_column="n"))  # fmt: skip

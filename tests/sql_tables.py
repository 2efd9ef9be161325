"""Tables for the SQL tests: scikit-learn's digits in SQLite and in a PostgreSQL server
(`shardwise/bench/postgres.py`: started by the tests themselves with `initdb` and `pg_ctl`
from the system's package, which `make test` installs where it is missing), and the plain
PyTorch loop the runs are checked against."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import torch
import torch.nn.functional as F

SQL_JOB = {"model.name": "mlp", "model.hidden": "32", "data.name": "sql", "data.table": "digits",
           "data.shards": "4", "data.page_rows": "50"}  # fmt: skip
COLUMNS = [f"p{i}" for i in range(64)]


def digit_rows(rows: int | None = None) -> list[tuple]:
    """(id, label, p0..p63) of each digit: ids 7, 10, 13, ... (not the row numbers)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    data, target = bunch.data[:rows], bunch.target[:rows]
    return [(3 * i + 7, int(y), *map(float, x)) for i, (x, y) in enumerate(zip(data, target, strict=True))]


def digits_sqlite(path: Path) -> Path:
    con = sqlite3.connect(path)
    con.execute(
        f"CREATE TABLE digits (id INTEGER PRIMARY KEY, label INTEGER, {', '.join(c + ' REAL' for c in COLUMNS)})"
    )
    con.executemany(f"INSERT INTO digits VALUES ({', '.join('?' * 66)})", digit_rows())
    con.commit()
    con.close()
    return path


def digits_postgres(server) -> None:
    pixels = ", ".join(f"{c} DOUBLE PRECISION" for c in COLUMNS)
    server.run(f"CREATE TABLE digits (id BIGINT PRIMARY KEY, label INTEGER, {pixels})")
    server.run(f"INSERT INTO digits VALUES ({', '.join(['%s'] * 66)})", digit_rows())


def plain_loop(cfg) -> dict[str, torch.Tensor]:
    """The reference: a plain PyTorch loop on each step's rows, as one reader of the table
    `cfg` (a DataConfig) reads them for the whole batch (checked against the table itself by
    tests/test_sql.py), sharing nothing with shardwise's training but the MLP class."""
    from parity import BASE, DEFAULTS, _factor, plain_model

    from shardwise.data.sql_loader import build_sql_rank_data

    o = {**DEFAULTS, **BASE, **SQL_JOB}
    data = build_sql_rank_data(cfg, global_batch=int(o["train.batch_size"]), grad_accum=1, dp_rank=0, dp=1,
                               seed=0, device=torch.device("cpu"))  # fmt: skip
    torch.manual_seed(0)
    model = plain_model(o, (64,), 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=float(o["train.lr"]), momentum=float(o["train.momentum"]))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _factor(o))
    for step in range(int(o["train.steps"])):
        ((x, y),) = data.micro_batches(step)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        scheduler.step()
    data.close()
    return {k: v.detach() for k, v in model.state_dict().items()}

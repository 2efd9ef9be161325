"""Tables for the SQL tests: scikit-learn's digits in SQLite and in a PostgreSQL server
(`shardwise/bench/postgres.py`: started by the tests themselves with `initdb` and `pg_ctl`
from the system's package, which `make test` installs where it is missing), and the plain
PyTorch loop the runs are checked against."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
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


def reference_split(keys: list[int], fraction: float = 0.2) -> set[int]:
    """The validation keys by the documented hash, in Python: the key mod 2^31 - 1, times
    742938285 mod 2^31 - 1, scaled to 10,000 buckets by its high part; below the fraction."""
    m = 2**31 - 1
    return {k for k in keys if (k % m) * 742938285 % m * 10_000 // m < round(fraction * 10_000)}


def _table(url: str) -> dict[int, tuple]:
    """Every row of `digits`, by key, read here with the driver itself."""
    query = f"SELECT id, label, {', '.join(COLUMNS)} FROM digits"
    if url.startswith("sqlite:///"):
        con = sqlite3.connect(url.removeprefix("sqlite:///"))
        found = con.execute(query).fetchall()
        con.close()
    else:
        import psycopg

        with psycopg.connect(url) as conn:
            found = conn.execute(query).fetchall()
    return {int(r[0]): r[1:] for r in found}


def plain_loop(cfg) -> dict[str, torch.Tensor]:
    """The reference: a plain PyTorch loop sharing nothing with shardwise's training but
    the MLP class, on rows read here by the driver, split by the documented hash and
    standardised here with the training rows' statistics; from shardwise only the order
    (each step's keys, as one reader of the table `cfg` takes them for the whole batch:
    that order's contract is tests/test_sql.py's)."""
    from parity import BASE, DEFAULTS, _factor, plain_model

    from shardwise.data.sql_loader import build_sql_rank_data

    o = {**DEFAULTS, **BASE, **SQL_JOB}
    table = _table(cfg.url)
    train = sorted(set(table) - reference_split(list(table)))
    pixels = np.array([table[k][1:] for k in train], dtype=np.float64)
    mean, std = pixels.mean(axis=0), pixels.std(axis=0)
    std = np.where(std <= 1e-9 * np.maximum(1.0, np.abs(mean)), 1.0, std + 1e-6)
    order = build_sql_rank_data(cfg, global_batch=int(o["train.batch_size"]), grad_accum=1, dp_rank=0, dp=1,
                                seed=0, device=torch.device("cpu"))  # fmt: skip
    torch.manual_seed(0)
    model = plain_model(o, (64,), 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=float(o["train.lr"]), momentum=float(o["train.momentum"]))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _factor(o))
    for step in range(int(o["train.steps"])):
        order.micro_batches(step)
        keys = order.last_keys.tolist()
        assert set(keys) <= set(train)
        x = torch.from_numpy(((np.array([table[k][1:] for k in keys]) - mean) / std).astype(np.float32))
        y = torch.tensor([int(table[k][0]) for k in keys])
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        scheduler.step()
    order.close()
    return {k: v.detach() for k, v in model.state_dict().items()}

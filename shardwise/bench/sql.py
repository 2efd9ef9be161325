"""Reading an SQL table as `data.name = "sql"` does, in SQLite and in PostgreSQL (a server
of the bench's own, `bench/postgres.py`): a table of ROWS rows x 64 float columns.

- rows per second per rank, the data-parallel ranks (1, 2, 4) reading at once, each in a
  process of its own, through the product's reader (keyset pages, the next one fetched in
  the background);
- keyset against OFFSET paging: PAGES pages spread over the table, one query each, read
  alternately;
- with 1, 2 and 4 vertical ranks, what one rank reads a row: from PostgreSQL, the bytes
  that crossed the loopback link while it read (the server's answers: its own columns,
  the key and the label, as text, with the protocol's framing); from SQLite, the file
  bytes its process read (`rchar` of /proc/self/io: a row store reads whole rows,
  whatever the columns selected).
"""

from __future__ import annotations

import multiprocessing
import sqlite3
import statistics
import time
from pathlib import Path

import numpy as np

from shardwise.bench.common import Bench, alternate

ROWS, WIDTH = 1_000_000, 64
READ = 100_000  # rows each rank reads in the rows-per-second measure
PAGES = 20  # pages of the keyset / OFFSET comparison
PAGE_ROWS = 1024


def _chunks(rows: int, size: int = 50_000):
    rng = np.random.default_rng(0)
    for start in range(0, rows, size):
        n = min(size, rows - start)
        x = rng.standard_normal((n, WIDTH))
        labels = rng.integers(0, 10, n)
        yield [(start + i + 1, int(labels[i]), *x[i].tolist()) for i in range(n)]


def _create(columns: str) -> str:
    return f"CREATE TABLE t (id BIGINT PRIMARY KEY, label INTEGER, {columns})"


def sqlite_table(path: Path, rows: int) -> str:
    con = sqlite3.connect(path)
    con.execute(_create(", ".join(f"c{i} REAL" for i in range(WIDTH))))
    for chunk in _chunks(rows):
        con.executemany(f"INSERT INTO t VALUES ({', '.join('?' * (WIDTH + 2))})", chunk)
    con.commit()
    con.close()
    return f"sqlite:///{path}"


def postgres_table(server, rows: int) -> str:
    import psycopg

    server.run(_create(", ".join(f"c{i} DOUBLE PRECISION" for i in range(WIDTH))))
    with psycopg.connect(server.url) as conn, conn.cursor() as cur:
        with cur.copy("COPY t FROM STDIN") as copy:
            for chunk in _chunks(rows):
                for row in chunk:
                    copy.write_row(row)
        cur.execute("ANALYZE t")
    return server.url


def _cfg(url: str, shards: int):
    from shardwise.config import DataConfig

    return DataConfig(name="sql", url=url, table="t", shards=shards, page_rows=PAGE_ROWS)


def _read(args) -> tuple[float, float, float]:
    """One rank reading `rows` rows: (seconds, bytes the loopback link carried meanwhile, bytes
    its process read from files, the page fetched ahead included); the set-up (the shards' key
    ranges, the statistics) not timed."""
    import torch

    from shardwise.data.sql_loader import build_sql_rank_data

    url, dp, rank, features, rows = args
    torch.set_num_threads(1)
    batch = 256 * dp
    data = build_sql_rank_data(_cfg(url, dp), global_batch=batch, grad_accum=1, dp_rank=rank, dp=dp, seed=0,
                               device=torch.device("cpu"), features=features)  # fmt: skip
    before, link, started = _rchar(), _loopback(), time.perf_counter()
    for step in range(rows // 256):
        data.micro_batches(step)
    seconds = time.perf_counter() - started
    data.close()  # waits for the page fetched ahead: its bytes counted every time, not when it won the race
    read, sent = _rchar() - before, _loopback() - link
    return seconds, float(sent), float(read)


def _loopback() -> int:
    """Bytes the loopback link carried so far (the machine's: the bench reads alone)."""
    path = Path("/sys/class/net/lo/statistics/rx_bytes")
    return int(path.read_text()) if path.exists() else 0


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def _ranks(pool, url: str, dp: int, rows: int, parts=None) -> list[tuple[float, float, float]]:
    jobs = [(url, dp, r, None, rows) for r in range(dp)] if parts is None else [(url, 1, 0, p, rows) for p in parts]
    return pool.map(_read, jobs)


def _pages(url: str, rows: int, keyset: bool) -> float:
    """Seconds to read PAGES pages spread over the table, one query each."""
    from shardwise.data.sql import PARAM as m
    from shardwise.data.sql import Connection

    conn = Connection(url, "shardwise-bench")
    marks = [round(rows * i / PAGES) for i in range(PAGES)]
    started = time.perf_counter()
    for mark in marks:
        if keyset:
            conn.rows(f"SELECT * FROM t WHERE id > {m} ORDER BY id LIMIT {m}", (mark, PAGE_ROWS))
        else:
            conn.rows(f"SELECT * FROM t ORDER BY id LIMIT {m} OFFSET {m}", (PAGE_ROWS, mark))
    seconds = time.perf_counter() - started
    conn.close()
    return seconds


def run(b: Bench) -> None:
    from shardwise.bench import postgres

    rows = b.options.get("sql_rows") or ROWS
    read = min(READ, rows // 8)
    with postgres.running() as server, multiprocessing.get_context("spawn").Pool(4) as pool:
        started = time.perf_counter()
        urls = {"sqlite": sqlite_table(b.work / "t.db", rows), "postgresql": postgres_table(server, rows)}
        b.console.print(f"[bold]sql[/]: {rows:,} rows x {WIDTH} columns in SQLite and PostgreSQL "
                        f"({time.perf_counter() - started:.0f} s to fill)")  # fmt: skip
        for db, url in urls.items():
            _database(b, pool, db, url, rows, read)


def _database(b: Bench, pool, db: str, url: str, rows: int, read: int) -> None:
    how = f"{rows:,} x {WIDTH} float64 table, pages of {PAGE_ROWS}"
    for dp in (1, 2, 4):
        rates = [read / s for _ in range(b.repeats // 2 or 1) for s, _, _ in _ranks(pool, url, dp, read)]
        b.console.print(f"  {db}, {dp} rank(s) reading at once: {statistics.median(rates):,.0f} rows/s a rank "
                        f"({min(rates):,.0f} - {max(rates):,.0f})")  # fmt: skip
        b.record("sql", f"{db}: rows/s a rank, {dp} reading", rates, unit="rows/s", how=how)
    times = alternate({"keyset": lambda _: _pages(url, rows, True), "offset": lambda _: _pages(url, rows, False)},
                      b.repeats, b.console, unit=1e3)  # fmt: skip
    for side, seconds in times.items():
        b.record("sql", f"{db}: {side} paging, rows/s", [PAGES * PAGE_ROWS / s for s in seconds], unit="rows/s",
                 how=f"{PAGES} pages spread over the table, one query each")  # fmt: skip
    for vertical in (1, 2, 4):
        parts = [np.array_split(np.arange(WIDTH), vertical)[0]] if vertical > 1 else [None]
        found = [_ranks(pool, url, 1, read, parts)[0] for _ in range(b.repeats // 2 or 1)]
        k = 2 if db == "sqlite" else 1
        what = "file bytes a row" if db == "sqlite" else "link bytes a row"
        b.record("sql", f"{db}: vertical {vertical}, {what}", [f[k] / read for f in found], unit="bytes",
                 how="rchar of the rank's process" if k == 2 else "loopback bytes while the rank read")  # fmt: skip
        b.console.print(f"  {db}, vertical {vertical}: {statistics.median(f[k] for f in found) / read:.0f} {what}, "
                        f"{statistics.median(read / f[0] for f in found):,.0f} rows/s")  # fmt: skip

"""SQL tables as training data: SQLite through the standard library's `sqlite3`,
PostgreSQL through `psycopg`; no protocol of our own.

A row is a sample: a unique integer key (`data.key`), a label (`data.label_column`, whose
distinct values, sorted, are the classes) and numeric feature columns. The database does
the work that touches every row: the validation split is a hash of the key it computes
(the same function in both databases, so a table gives the same split in either), the
training rows' key ranges per shard come from its `NTILE` window, and the per-column
standardisation statistics from its `AVG`. A rank then reads only its own rows, one page at
a time by keyset (`WHERE key > last ORDER BY key LIMIT n`: an index range scan, where
OFFSET would scan every skipped row again), and only its own columns.

Connections open lazily in the process that uses them, one per thread (never inherited
through a fork), read-only (SQLite's mode=ro, PostgreSQL's default_transaction_read_only),
and a dropped connection is opened again once. A password never goes
in the config (the run saves its config): PostgreSQL reads it from PGPASSWORD or
~/.pgpass.
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from shardwise.config import DataConfig
from shardwise.errors import ShardwiseError

CONNECT_TIMEOUT_S, RECONNECT_AFTER_S = 10, 1.0
# a parameter's place in a statement shardwise writes, made each driver's own mark (sqlite3's
# ?, psycopg's %s) only where it stands: a ? or % in the user's query stays theirs
PARAM = "\x00"
HASH_BUCKETS = 10_000  # the validation split's resolution: val_fraction in steps of 0.01%
# identifier quoting and the numeric types PostgreSQL declares (pg_type OIDs: int2, int4,
# int8, float4, float8, numeric)
PG_INTEGER, PG_NUMERIC = {20, 21, 23}, {20, 21, 23, 700, 701, 1700}


def quoted(name: str) -> str:
    """A column's name, or a table's (`schema.table` quoted part by part), as an identifier."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))


MODULUS, MULTIPLIER = 2147483647, 742938285  # 2^31 - 1 and a multiplier of Fishman and Moore's


def key_hash(key: str) -> str:
    """A hash of the integer key, computed by the database, in [0, HASH_BUCKETS): the key
    mod 2^31 - 1, times 742938285 mod 2^31 - 1 (a full-period multiplier of the Lehmer
    generator, Fishman and Moore 1986), scaled to the buckets by its high part (the low
    digits of such a product repeat over keys in arithmetic progression); 64-bit integers
    in both databases, so a table splits alike in either."""
    k, m = f"CAST({quoted(key)} AS BIGINT)", MODULUS  # an INTEGER (int4) key times the multiplier overflows
    return f"((((({k} % {m}) + {m}) % {m}) * {MULTIPLIER} % {m}) * {HASH_BUCKETS} / {m})"


def python_key_hash(key: int) -> int:
    """`key_hash` in Python (the tests' reference)."""
    return ((key % MODULUS) * MULTIPLIER % MODULUS) * HASH_BUCKETS // MODULUS


@dataclass(frozen=True)
class SqlSource:
    """What a rank needs to query a table: from `data.*` (`source`)."""

    url: str
    relation: str  # the quoted table, or the query as a sub-select
    where: str  # the table or query named, for messages
    key: str
    label: str
    columns: tuple[str, ...]  # every feature column, in the input's order
    page_rows: int
    val_fraction: float

    @property
    def dialect(self) -> str:
        return urlsplit(self.url).scheme.split("+")[0]

    def split(self, val: bool) -> str:
        """The SQL condition of the validation rows (`val`) or the training rows."""
        cut = round(self.val_fraction * HASH_BUCKETS)
        return f"{key_hash(self.key)} {'<' if val else '>='} {cut}"

    def selected(self, columns: tuple[str, ...]) -> str:
        return ", ".join(quoted(c) for c in (self.key, self.label, *columns))


def source(cfg: DataConfig, columns: tuple[str, ...] = ()) -> SqlSource:
    """The source `cfg` names (its feature columns `columns` once known: `inspect`)."""
    relation = f"({cfg.query}) AS src" if cfg.query else quoted(cfg.table)
    where = "data.query" if cfg.query else repr(cfg.table)
    columns = columns or tuple(cfg.feature_columns)
    return SqlSource(cfg.url, relation, where, cfg.key, cfg.label_column, columns, cfg.page_rows, cfg.val_fraction)


def check_url(url: str) -> None:
    parts = urlsplit(url)
    scheme = parts.scheme.split("+")[0]
    if scheme not in ("sqlite", "postgresql", "postgres"):
        raise ShardwiseError("data.url", f"{shown(url)!r}: expected sqlite:///PATH or postgresql://USER@HOST/DB")
    if parts.password:
        raise ShardwiseError(
            "data.url", "holds a password, which the run would save in its config: put it in PGPASSWORD or ~/.pgpass"
        )
    if scheme == "sqlite" and not Path(sqlite_path(url)).is_file():
        raise ShardwiseError("data.url", f"no such SQLite file {sqlite_path(url)!r}")


def shown(url: str) -> str:
    """The URL without any password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")).geturl()


def sqlite_path(url: str) -> str:
    """sqlite:///relative.db and sqlite:////absolute.db, as SQLAlchemy reads them."""
    return url.split(":///", 1)[1] if ":///" in url else ""


class Connection:
    """A connection per thread of this process, opened on first use, opened again once when
    the server dropped it. `name`: how the server's log names it (PostgreSQL's
    application_name)."""

    def __init__(self, url: str, name: str = "shardwise"):
        self.url, self.name = url, name
        self._local = threading.local()
        self.dialect = urlsplit(url).scheme.split("+")[0]

    def _open(self):
        here = getattr(self._local, "conn", None)
        if here is not None and self._local.pid == os.getpid():
            return here
        if self.dialect == "sqlite":
            import sqlite3

            conn = sqlite3.connect(f"file:{sqlite_path(self.url)}?mode=ro", uri=True)
        else:
            import psycopg

            # read-only sessions: a query that would write is refused by the server
            options = "-c default_transaction_read_only=on"
            conn = psycopg.connect(self.url, application_name=self.name, autocommit=True, options=options,
                                   connect_timeout=CONNECT_TIMEOUT_S)  # fmt: skip
        self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None and self._local.pid == os.getpid():
            try:
                conn.close()
            except Exception:  # already gone with the server
                pass

    def rows(self, sql: str, params: tuple | None = None) -> tuple[list[tuple], list[tuple]]:
        """(rows, the cursor's description) of `sql`, with `params` in its PARAM marks where
        given; once more, a second later, on a dropped connection."""
        if params is not None:
            sql = sql.replace("%", "%%").replace(PARAM, "%s") if self.dialect != "sqlite" else sql.replace(PARAM, "?")
        for attempt in (0, 1):
            conn = self._open()
            try:
                cursor = conn.cursor()
                if params is None:
                    cursor.execute(sql)
                else:
                    cursor.execute(sql, params)
                return cursor.fetchall(), list(cursor.description or [])
            except Exception:
                if attempt or not _dropped(conn):
                    raise
                self.close()
                time.sleep(RECONNECT_AFTER_S)
        raise AssertionError("unreachable")


def _dropped(conn) -> bool:
    """Whether `conn` is gone after an error (the server restarted, an administrator ended
    the session), as opposed to a statement the database refused: psycopg marks such a
    connection closed or broken; an SQLite file has no connection to lose."""
    return bool(getattr(conn, "closed", False) or getattr(conn, "broken", False))


def refused(e: Exception, src: SqlSource, field: str) -> ShardwiseError:
    """A database error as one line, naming the table or query."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return ShardwiseError(field, f"{shown(src.url)} refused reading {src.where}: {text}")


def feature_names(cfg: DataConfig, conn: Connection | None = None) -> tuple[str, ...]:
    """The feature columns of the table or query `cfg` names, from its description alone."""
    if cfg.feature_columns:
        return tuple(cfg.feature_columns)
    src = source(cfg)
    own = conn is None
    conn = conn or Connection(cfg.url, "shardwise-check")
    try:
        _, description = conn.rows(f"SELECT * FROM {src.relation} LIMIT 0")
    except Exception as e:
        raise refused(e, src, "data.query" if cfg.query else "data.table") from None
    finally:
        if own:
            conn.close()
    return tuple(d[0] for d in description if d[0] not in (src.key, src.label))


@dataclass(frozen=True)
class Schema:
    columns: tuple[str, ...]  # the feature columns
    classes: tuple  # the label's distinct values, sorted


def inspect(cfg: DataConfig) -> Schema:
    """Check the table or query `cfg` names from the database's side (the launcher, before
    any rank starts): every named column there, the key a unique integer, every feature a
    number and no value missing; one line naming the table, the column and the value where
    not."""
    check_url(cfg.url)
    src = source(cfg)
    conn = Connection(cfg.url, "shardwise-check")
    try:
        return _inspect(conn, src, cfg)
    finally:
        conn.close()


def describe(conn: Connection, cfg: DataConfig) -> Schema:
    """What a rank needs of the table: its feature columns (from the description of a query
    that reads no row, where data.feature_columns does not name them) and the classes."""
    columns = feature_names(cfg, conn)
    src = source(cfg, columns)
    try:
        labels = [r[0] for r in conn.rows(f"SELECT DISTINCT {quoted(src.label)} FROM {src.relation}")[0]]
    except Exception as e:
        raise refused(e, src, "data.label_column") from None
    return Schema(columns, tuple(sorted(labels)))


def _inspect(conn: Connection, src: SqlSource, cfg: DataConfig) -> Schema:
    field = "data.query" if cfg.query else "data.table"
    try:
        _, description = conn.rows(f"SELECT * FROM {src.relation} LIMIT 0")
    except Exception as e:
        raise refused(e, src, field) from None
    names = [d[0] for d in description]
    for what, name in (("data.key", src.key), ("data.label_column", src.label), *[
            ("data.feature_columns", c) for c in src.columns]):  # fmt: skip
        if name not in names:
            raise ShardwiseError(what, f"{src.where} has no column {name!r} (it has {', '.join(names[:12])})")
    columns = src.columns or tuple(n for n in names if n not in (src.key, src.label))
    if not columns:
        raise ShardwiseError("data.feature_columns", f"{src.where} has no column besides the key and the label")
    src = source(cfg, columns)
    types = {d[0]: d for d in description}
    if src.dialect != "sqlite":  # declared types: a text column is refused before any row is read
        for name in (src.key, *columns):
            allowed = PG_INTEGER if name == src.key else PG_NUMERIC
            if types[name][1] not in allowed:
                field = "data.key" if name == src.key else "data.feature_columns"
                kind = "an integer" if name == src.key else "a number"
                declared = getattr(types[name], "type_display", types[name][1])  # psycopg's name of the type
                raise ShardwiseError(field, f"column {name!r} of {src.where} is not {kind} ({declared})")
    _check_values(conn, src, field)
    try:
        total, distinct = conn.rows(f"SELECT COUNT(*), COUNT(DISTINCT {quoted(src.key)}) FROM {src.relation}")[0][0]
        labels = [r[0] for r in conn.rows(f"SELECT DISTINCT {quoted(src.label)} FROM {src.relation}")[0]]
    except Exception as e:
        raise refused(e, src, field) from None
    if distinct != total:
        raise ShardwiseError(
            "data.key", f"column {src.key!r} of {src.where} repeats a value ({distinct} distinct in {total} rows)"
        )
    if len({type(v) for v in labels}) > 1:
        raise ShardwiseError("data.label_column", f"column {src.label!r} of {src.where} mixes types: {labels[:4]}")
    return Schema(columns, tuple(sorted(labels)))


def _check_values(conn: Connection, src: SqlSource, field: str) -> None:
    """The first row with a missing value, a key that is not an integer or a feature that is
    not a finite number (SQLite keeps any value in any column), one scan of the table."""
    k, label = quoted(src.key), quoted(src.label)
    if src.dialect == "sqlite":  # (SQLite keeps a NaN as NULL)
        bad = [f"typeof({k}) != 'integer'", f"{label} IS NULL"]
        bad += [f"typeof({quoted(c)}) NOT IN ('integer', 'real') OR ABS({quoted(c)}) > 1.7e308" for c in src.columns]
    else:
        bad = [f"{quoted(c)} IS NULL" for c in (src.key, src.label, *src.columns)]
        bad += [f"CAST({quoted(c)} AS DOUBLE PRECISION) IN ('NaN', 'Infinity', '-Infinity')" for c in src.columns]
    try:
        found, _ = conn.rows(f"SELECT {src.selected(src.columns)} FROM {src.relation} WHERE {' OR '.join(bad)} LIMIT 1")
    except Exception as e:
        raise refused(e, src, field) from None
    if not found:
        return
    row = dict(zip((src.key, src.label, *src.columns), found[0], strict=True))
    key = row[src.key]
    if not isinstance(key, int) or isinstance(key, bool):
        raise ShardwiseError("data.key", f"column {src.key!r} of {src.where} holds {key!r}, not an integer")
    if row[src.label] is None:
        raise ShardwiseError("data.label_column", f"column {src.label!r} of {src.where} is empty at key {key}")
    for c in src.columns:
        value = row[c]
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if value is None or (src.dialect == "sqlite" and not number) or not math.isfinite(float(value)):
            raise ShardwiseError(  # (PostgreSQL declared the column's type: a number)
                "data.feature_columns", f"column {c!r} of {src.where} holds {value!r} at key {key}, not a finite number"
            )


@dataclass(frozen=True)
class KeyRange:
    """The rows of one shard: keys in (after, last], `rows` of them, `labels` per class."""

    after: int
    last: int
    rows: int
    labels: dict


def key_ranges(conn: Connection, src: SqlSource, parts: int, *, val: bool) -> list[KeyRange]:
    """The training (or validation: `val`) rows cut into `parts` consecutive key ranges of
    sizes that differ by one at most, the larger first (the database's NTILE), each with its
    rows per label."""
    k, label = quoted(src.key), quoted(src.label)
    sql = (
        f"SELECT part, {label}, MIN({k}), MAX({k}), COUNT(*) FROM (SELECT {k}, {label}, NTILE({int(parts)}) "
        f"OVER (ORDER BY {k}) AS part FROM {src.relation} WHERE {src.split(val)}) AS cut GROUP BY part, {label}"
    )
    by_part: dict[int, list[tuple]] = {}
    for part, value, low, high, count in conn.rows(sql)[0]:
        by_part.setdefault(int(part), []).append((value, int(low), int(high), int(count)))
    if len(by_part) < parts:
        split = "validation" if val else "training"
        raise ShardwiseError("data.shards", f"{src.where} has {sum(r[3] for v in by_part.values() for r in v)} "
                             f"{split} rows, fewer than the {parts} parts it is cut into")  # fmt: skip
    ranges, after = [], None
    for part in range(1, parts + 1):
        found = by_part[part]
        low, high = min(r[1] for r in found), max(r[2] for r in found)
        after = low - 1 if after is None else after
        ranges.append(KeyRange(after, high, sum(r[3] for r in found), {r[0]: r[3] for r in found}))
        after = high
    return ranges


def column_stats(conn: Connection, src: SqlSource, columns: tuple[str, ...]) -> tuple[list[float], list[float]]:
    """(mean, variance) of each of `columns` over the training rows, in float64: the mean,
    then the mean squared deviation from it (two passes: E[x^2] - E[x]^2 loses a column with
    a large offset, a timestamp's, to cancellation)."""
    as_float = [f"CAST({quoted(c)} AS DOUBLE PRECISION)" for c in columns]
    where = f"FROM {src.relation} WHERE {src.split(False)}"
    means = [float(v) for v in conn.rows(f"SELECT {', '.join(f'AVG({f})' for f in as_float)} {where}")[0][0]]
    deviations = ", ".join(f"AVG(({f} - {m!r}) * ({f} - {m!r}))" for f, m in zip(as_float, means, strict=True))
    return means, [float(v) for v in conn.rows(f"SELECT {deviations} {where}")[0][0]]


def page(conn: Connection, src: SqlSource, columns: tuple[str, ...], rows: KeyRange, after: int, limit: int,
         *, val: bool = False) -> list[tuple]:  # fmt: skip
    """Up to `limit` rows of `rows`' range after key `after`, in key order: key, label and
    `columns` (keyset paging)."""
    k, m = quoted(src.key), PARAM
    sql = (
        f"SELECT {src.selected(columns)} FROM {src.relation} WHERE {src.split(val)} AND {k} > {m} AND {k} <= {m} "
        f"ORDER BY {k} LIMIT {m}"
    )
    return conn.rows(sql, (after, rows.last, limit))[0]

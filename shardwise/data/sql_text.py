"""A table's text column as a corpus (`data.name = "sql_text"`): a row is a document, its
label the class (the distinct values, sorted), read in key order one keyset page at a time.
A share of the rows (`shardwise words`' rank) is one of `parts` consecutive key ranges of
near-equal size that the database cuts (its NTILE), and the rank reads only that range.
"""

from __future__ import annotations

import numpy as np

from shardwise.config_sections import DataConfig
from shardwise.data.sql import PARAM, PG_INTEGER, Connection, check_url, quoted, refused, source
from shardwise.errors import ShardwiseError

PG_TEXT = {25, 1042, 1043}  # pg_type OIDs: text, char(n), varchar(n)


def inspect_text(data: DataConfig) -> None:
    """Every named column there, the key a unique integer; one line naming what is not."""
    check_url(data.url)
    src = source(data, (data.text_column,))
    field = _field(data)
    conn = Connection(data.url, "shardwise-check")
    try:
        try:
            _, description = conn.rows(f"SELECT * FROM {src.relation} LIMIT 0")
        except Exception as e:
            raise refused(e, src, field) from None
        names = [d[0] for d in description]
        for what, name in (("data.key", data.key), ("data.label_column", data.label_column),
                           ("data.text_column", data.text_column)):  # fmt: skip
            if name not in names:
                raise ShardwiseError(what, f"{src.where} has no column {name!r} (it has {', '.join(names[:12])})")
        if src.dialect != "sqlite" and description[names.index(data.key)][1] not in PG_INTEGER:
            raise ShardwiseError("data.key", f"column {data.key!r} of {src.where} is not an integer")
        if src.dialect != "sqlite" and description[names.index(data.text_column)][1] not in PG_TEXT:
            declared = getattr(description[names.index(data.text_column)], "type_display", "?")
            raise ShardwiseError("data.text_column", f"column {data.text_column!r} of {src.where} is not text "
                                 f"({declared})")  # fmt: skip
        _check_rows(conn, src, data)
    finally:
        conn.close()


def _check_rows(conn: Connection, src, data: DataConfig) -> None:
    """The key unique integers, and the first row without a label or a text, one line naming it."""
    k, label, body = quoted(data.key), quoted(data.label_column), quoted(data.text_column)
    field = _field(data)
    not_text = f" OR typeof({body}) != 'text' OR typeof({k}) != 'integer'" if src.dialect == "sqlite" else ""
    try:
        total, distinct = conn.rows(f"SELECT COUNT(*), COUNT(DISTINCT {k}) FROM {src.relation}")[0][0]
        bad = conn.rows(f"SELECT {k}, {label}, {body} FROM {src.relation} WHERE {label} IS NULL OR {body} IS NULL"
                        f"{not_text} ORDER BY {k} LIMIT 1")[0]  # fmt: skip
    except Exception as e:
        raise refused(e, src, field) from None
    if distinct != total:
        raise ShardwiseError("data.key", f"column {data.key!r} of {src.where} repeats a value ({distinct} distinct "
                             f"in {total} rows)")  # fmt: skip
    if total == 0:
        raise ShardwiseError(field, f"{src.where} has no row")
    if bad:
        key, value, doc = bad[0]
        if not isinstance(key, int) or isinstance(key, bool):
            raise ShardwiseError("data.key", f"column {data.key!r} of {src.where} holds {key!r}, not an integer")
        if value is None:
            raise ShardwiseError(
                "data.label_column", f"column {data.label_column!r} of {src.where} is empty at key {key}"
            )
        raise ShardwiseError(
            "data.text_column", f"column {data.text_column!r} of {src.where} holds {doc!r} at key {key}, not text"
        )


def read_text(data: DataConfig, share: tuple[int, int] | None):
    from shardwise.data.text import Corpus

    src = source(data, (data.text_column,))
    field = _field(data)
    k, label, body = quoted(data.key), quoted(data.label_column), quoted(data.text_column)
    conn = Connection(data.url)
    try:
        try:
            classes = sorted(r[0] for r in conn.rows(f"SELECT DISTINCT {label} FROM {src.relation}")[0])
            total = conn.rows(f"SELECT COUNT(*) FROM {src.relation}")[0][0][0]
            after, last = _key_range(conn, src.relation, k, share)
            rows = []
            while True:
                page = conn.rows(
                    f"SELECT {k}, {label}, {body} FROM {src.relation} WHERE {k} > {PARAM} AND {k} <= {PARAM} "
                    f"ORDER BY {k} LIMIT {PARAM}",
                    (after, last, data.page_rows),
                )[0]
                rows += page
                if len(page) < data.page_rows:
                    break
                after = page[-1][0]
        except Exception as e:
            raise refused(e, src, field) from None
    finally:
        conn.close()
    for key, value, doc in rows:  # (checked before the run: a row changed since)
        if not isinstance(doc, str) or value is None:
            raise ShardwiseError("data.text_column", f"{src.where} has no text or no label at key {key}")
    index = {c: i for i, c in enumerate(classes)}
    labels = np.asarray([index[r[1]] for r in rows], np.int64)
    return Corpus([r[2] for r in rows], labels, [str(c) for c in classes], int(total))


def _key_range(conn: Connection, relation: str, k: str, share: tuple[int, int] | None) -> tuple[int, int]:
    """(after, last]: the keys of this share (every key without one)."""
    low, high = conn.rows(f"SELECT MIN({k}), MAX({k}) FROM {relation}")[0][0]
    if share is None:
        return int(low) - 1, int(high)
    part, parts = share
    cut = conn.rows(
        f"SELECT part, MIN({k}), MAX({k}) FROM (SELECT {k}, NTILE({int(parts)}) OVER (ORDER BY {k}) AS part "
        f"FROM {relation}) AS cut GROUP BY part ORDER BY part"
    )[0]
    ends = {int(p): (int(lo), int(hi)) for p, lo, hi in cut}
    if part + 1 not in ends:  # fewer rows than shares: this one is empty
        return int(high), int(high)
    return ends[part + 1][0] - 1, ends[part + 1][1]


def _field(data: DataConfig) -> str:
    return "data.query" if data.query else "data.table"

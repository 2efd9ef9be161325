"""An SQL table whole, in one process: what `shardwise plan` and `shardwise evaluate` take
(`data/sources.py` `load_source`), with the same split, statistics and classes as a run's
ranks read it (`data/sql_loader.py`)."""

from __future__ import annotations

import numpy as np
import torch

from shardwise.config import DataConfig
from shardwise.data import sql
from shardwise.data.sources import Dataset, preprocess_record
from shardwise.data.sql_loader import Reader, _standardisation
from shardwise.errors import ShardwiseError


def load_table(cfg: DataConfig) -> Dataset:
    """The whole table as arrays, in key order, in this process: what `shardwise plan` and
    `shardwise evaluate` take (the same split, statistics and classes as a run's ranks)."""
    conn = sql.Connection(cfg.url, "shardwise")
    try:
        schema = sql.describe(conn, cfg)
        src = sql.source(cfg, schema.columns)
        train, val = sql.key_ranges(conn, src, 1, val=False)[0], sql.key_ranges(conn, src, 1, val=True)[0]
        mean, variance = sql.column_stats(conn, src, schema.columns)
    except ShardwiseError:
        raise
    except Exception as e:
        raise sql.refused(e, src, "data.url") from None
    finally:
        conn.close()
    mean, std, record = _standardisation(len(schema.columns), train.rows, None, mean, variance, None)
    reader = Reader(src, schema.columns, schema.classes, mean, std, device=torch.device("cpu"), dtype=torch.float32,
                    name="shardwise")  # fmt: skip
    try:
        (x_tr, y_tr), (x_va, y_va) = (_whole(reader, rows, val) for rows, val in ((train, False), (val, True)))
    finally:
        reader.close()
    width = len(schema.columns)
    preprocess = preprocess_record((width,), [str(c) for c in schema.classes], standardize=record)
    return Dataset(x_tr, y_tr, x_va, y_va, len(schema.classes), (width,), None, preprocess)


def _whole(reader: Reader, rows: sql.KeyRange, val: bool) -> tuple[np.ndarray, np.ndarray]:
    pages, after = [], rows.after
    while True:
        page = reader.read(rows, after, 65536, val=val)
        pages.append(page)
        if not page.full:
            return np.concatenate([p.x for p in pages]), np.concatenate([p.labels for p in pages])
        after = page.last

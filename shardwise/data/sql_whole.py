"""An SQL table whole, in one process: what `shardwise plan` and `shardwise evaluate` take
(`data/sources.py` `load_source`), with the same split, statistics and classes as a run's
ranks read it (`data/sql_loader.py`)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from shardwise.config import DataConfig
from shardwise.data import sql
from shardwise.data.sources import Dataset
from shardwise.data.sql_loader import Reader, build_sql_rank_data


def load_table(cfg: DataConfig) -> Dataset:
    """The whole table as arrays, in key order, in this process: what `shardwise plan` and
    `shardwise evaluate` take; read by one rank's reader of one shard, so the split, the
    statistics and the classes are a run's."""
    data = build_sql_rank_data(dataclasses.replace(cfg, shards=1), global_batch=1, grad_accum=1, dp_rank=0, dp=1,
                               seed=0, device=torch.device("cpu"))  # fmt: skip
    try:
        (x_tr, y_tr), (x_va, y_va) = (
            _whole(data.reader, data.streams[0].rows, False),
            _whole(data.reader, data.val, True),
        )
    finally:
        data.close()
    record = data.preprocess
    return Dataset(x_tr, y_tr, x_va, y_va, len(record["classes"]), tuple(record["in_shape"]), None, record)


def _whole(reader: Reader, rows: sql.KeyRange, val: bool) -> tuple[np.ndarray, np.ndarray]:
    pages, after = [], rows.after
    while True:
        page = reader.read(rows, after, 65536, val=val)
        pages.append(page)
        if not page.full:
            return np.concatenate([p.x for p in pages]), np.concatenate([p.labels for p in pages])
        after = page.last

"""One rank's rows of an SQL table, read while it trains (`data.name = "sql"`).

The training rows are cut into `data.shards` key ranges (default: the data-parallel
degree) by the database (`data/sql.py` `key_ranges`); a data-parallel rank owns shards/dp
of them, and every step takes batch/shards rows from each shard, so a step's global batch
is the same rows whatever the number of ranks. Each shard is read page by page in key
order, `data.page_rows` rows a query, epoch after epoch; a page's rows are used in an
order drawn from (train.seed, shard, epoch, page), and the next page is fetched by a
background thread while this one is used, so the step does not wait on the database.

A shard's read position (epoch, the key its page starts after, the page's number, the
rows of it used, the rows used in all) goes into every checkpoint, one small tensor per
shard; a resume, on any number of ranks that divides the shards, reads on from there, so
every row is used as often as in the run that was not stopped.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from shardwise.config import DataConfig
from shardwise.data import sql
from shardwise.data.loader import VAL_BATCH, _val_batch_count, val_sizes
from shardwise.data.report import counts_report
from shardwise.data.sampler import check_batch_layout
from shardwise.data.sources import StatsReduce, preprocess_record
from shardwise.errors import ShardwiseError

POSITIONS = "data/sql/"  # a checkpoint's tensors of the table's read positions
POSITION = POSITIONS + "shard-{:05d}"  # one per shard: its Position, then its Reading


class DataReadError(RuntimeError):
    """The database failed a rank mid-run (after the launcher's checks): the run stops with
    the rank's error, and `--max-restarts` restarts it from its checkpoint."""


@dataclass
class Position:
    after: int  # the key this page starts after
    epoch: int = 0
    page: int = 0  # the page's number within the epoch
    offset: int = 0  # rows of this page used
    used: int = 0  # rows of this shard used in all

    def tensor(self, reading: tuple[int, ...]) -> torch.Tensor:
        """As a checkpoint keeps it, with how the table was read (`Reading.key`)."""
        return torch.tensor([self.epoch, self.after, self.page, self.offset, self.used, *reading], dtype=torch.int64)

    @classmethod
    def of(cls, t: torch.Tensor) -> tuple[Position, tuple[int, ...]]:
        epoch, after, page, offset, used, *reading = (int(v) for v in t.tolist())
        return cls(after, epoch, page, offset, used), tuple(reading)


@dataclass(frozen=True)
class Reading:
    """How a shard's rows are read: what a read position means only under the same."""

    shards: int
    page_rows: int
    val_cut: int  # the validation split's hash buckets
    rows: sql.KeyRange

    @property
    def key(self) -> tuple[int, ...]:
        return (self.shards, self.page_rows, self.val_cut, self.rows.after, self.rows.last, self.rows.rows)


@dataclass
class Page:
    keys: np.ndarray
    labels: np.ndarray
    x: np.ndarray
    last: int  # its largest key: the next page starts after it
    full: bool  # as many rows as a page holds (a shorter page ends the epoch)


class ShardStream:
    """One shard's training rows, epoch after epoch, one page ahead."""

    def __init__(self, read, index: int, reading: Reading, seed: int, pos: Position, pool):
        self.read, self.index, self.reading, self.seed = read, index, reading, seed
        self.rows, self.page_rows = reading.rows, reading.page_rows
        self.pos, self.pool = pos, pool
        self._page: Page | None = None
        self._ahead: tuple[int, Future] | None = None

    def _fetch(self, after: int) -> Page:
        if self._ahead is not None and self._ahead[0] == after:
            found = self._ahead[1].result()
        else:
            found = self.read(self.rows, after, self.page_rows)
        if not len(found.keys):
            raise DataReadError(f"data.table: shard {self.index} found no rows after key {after}: the table changed")
        # the next page, fetched while this one is used
        nxt = self.rows.after if self._ends(found) else found.last
        self._ahead = (nxt, self.pool.submit(self.read, self.rows, nxt, self.page_rows))
        order = np.random.default_rng([self.seed, self.index, self.pos.epoch, self.pos.page]).permutation(
            len(found.keys)
        )
        return Page(found.keys[order], found.labels[order], found.x[order], found.last, found.full)

    def _ends(self, page: Page) -> bool:
        return not page.full or page.last == self.rows.last

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The next `n` rows: (keys, labels, features)."""
        parts = []
        while n > 0:
            if self._page is None:
                self._page = self._fetch(self.pos.after)
            page, pos = self._page, self.pos
            m = min(n, len(page.keys) - pos.offset)
            parts.append((page.keys[pos.offset : pos.offset + m], page.labels[pos.offset : pos.offset + m],
                          page.x[pos.offset : pos.offset + m]))  # fmt: skip
            pos.offset, pos.used, n = pos.offset + m, pos.used + m, n - m
            if pos.offset == len(page.keys):  # on to the next page, or the next epoch
                if self._ends(page):
                    self.pos = Position(self.rows.after, pos.epoch + 1, 0, 0, pos.used)
                else:
                    self.pos = Position(page.last, pos.epoch, pos.page + 1, 0, pos.used)
                self._page = None
        return tuple(np.concatenate(p) for p in zip(*parts, strict=True))


class SqlRankData:
    """A rank's view of an SQL table, as `loader.RankData` gives one of arrays: its share
    of each step, cut into micro-batches, and its slice of the validation rows."""

    def __init__(self, reader: Reader, streams: list[ShardStream], *, per_shard: int, grad_accum: int, start: int,
                 val: sql.KeyRange, val_rows: int, dp_rank: int, dp: int, report: dict, preprocess: dict):  # fmt: skip
        self.reader, self.streams, self.per_shard, self.grad_accum = reader, streams, per_shard, grad_accum
        self.val, self.val_rows, self.dp_rank, self.dp = val, val_rows, dp_rank, dp
        self.device, self.dtype, self.report, self.preprocess = reader.device, reader.dtype, report, preprocess
        self.next_step = start
        self.last_keys = np.zeros(0, dtype=np.int64)  # the rows the last step used, by key
        self.val_keys = np.zeros(0, dtype=np.int64)  # and the validation rows, once read
        self._served: tuple[int, list] | None = None
        self._val: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def micro_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's rows of step `step`: steps in order (the last one again is kept)."""
        if self._served is not None and self._served[0] == step:
            return self._served[1]
        if step != self.next_step:
            raise AssertionError(f"rows of step {step} asked for, the next is {self.next_step}")
        keys, labels, x = (np.concatenate(p) for p in zip(*(s.take(self.per_shard) for s in self.streams), strict=True))
        self.last_keys, self.next_step = keys, step + 1
        xs = torch.from_numpy(x).to(self.device, self.dtype).chunk(self.grad_accum)
        ys = torch.from_numpy(labels).to(self.device).chunk(self.grad_accum)
        self._served = (step, list(zip(xs, ys, strict=True)))
        return self._served[1]

    def example(self) -> torch.Tensor:
        """A micro-batch of this rank's next step (what a pipeline profiles its layers on)."""
        return self.micro_batches(self.next_step)[0][0]

    def val_sizes(self) -> list[int]:
        return val_sizes(self.val_rows, self.dp)

    def val_batches(self, batch: int = VAL_BATCH) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's key range of the validation rows, read once, in as many batches as
        every other rank's."""
        if self._val is None:
            count = _val_batch_count(self.val_rows, self.dp, batch)
            sizes = val_sizes(self.val.rows, count)
            self._val, after, keys = [], self.val.after, []
            for size in sizes:
                page = self.reader.read(self.val, after, size, val=True)
                after = page.last
                x = torch.from_numpy(page.x).to(self.device, self.dtype)
                self._val.append((x, torch.from_numpy(page.labels).to(self.device)))
                keys.append(page.keys)
            self.val_keys = np.concatenate(keys)
        yield from self._val

    def position_tensors(self) -> dict[str, torch.Tensor]:
        """Each of this rank's shards' read position, for the checkpoint."""
        return {POSITION.format(s.index): s.pos.tensor(s.reading.key) for s in self.streams}

    def close(self) -> None:
        self.reader.close()


class Reader:
    """Pages of rows as arrays: the features standardised with the training rows' statistics,
    the labels as class numbers; reads on this thread or the background one."""

    def __init__(self, src: sql.SqlSource, columns: tuple[str, ...], classes: tuple, mean, std, *,
                 device: torch.device, dtype: torch.dtype, name: str):  # fmt: skip
        self.src, self.columns, self.device, self.dtype = src, columns, device, dtype
        self.classes = {value: i for i, value in enumerate(classes)}
        self.mean, self.std = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
        self.conn = sql.Connection(src.url, name)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="shardwise-sql")

    def read(self, rows: sql.KeyRange, after: int, limit: int, *, val: bool = False) -> Page:
        try:
            found = sql.page(self.conn, self.src, self.columns, rows, after, limit, val=val)
        except Exception as e:  # mid-run: a failure to restart from the checkpoint, not the user's mistake
            raise DataReadError(str(sql.refused(e, self.src, "data.url"))) from None
        keys = np.fromiter((r[0] for r in found), dtype=np.int64, count=len(found))
        try:
            labels = np.fromiter((self.classes[r[1]] for r in found), dtype=np.int64, count=len(found))
        except KeyError as e:
            raise DataReadError(f"data.label_column: {self.src.where} holds a new label {e.args[0]!r}") from None
        x = np.array([r[2:] for r in found], dtype=np.float64).reshape(len(found), len(self.columns))
        x = ((x - self.mean) / self.std).astype(np.float32)
        return Page(keys, labels, x, int(keys[-1]) if len(keys) else after, len(found) == limit)

    def nth_key(self, rows: sql.KeyRange, n: int) -> int:
        """The key of the `n`-th training row (from 0) of `rows`, in key order: one OFFSET
        query, where a resume finds a page's start without a checkpoint's position."""
        k, m = sql.quoted(self.src.key), sql.PARAM
        query = (f"SELECT {k} FROM {self.src.relation} WHERE {self.src.split(False)} AND {k} > {m} AND {k} <= {m} "
                 f"ORDER BY {k} LIMIT 1 OFFSET {m}")  # fmt: skip
        return int(self.conn.rows(query, (rows.after, rows.last, n))[0][0][0])

    def close(self) -> None:
        """The background thread's connection closed by that thread, after what it reads now."""
        self.pool.submit(self.conn.close)
        self.pool.shutdown(wait=True, cancel_futures=False)
        self.conn.close()


@dataclass(frozen=True)
class TablePlan:
    """What every rank of a job reads the table by, found once (by one rank, then shared:
    `job.py`) so that all agree even while the table changes: its columns and classes,
    the training rows' key ranges per shard and the validation rows' per data-parallel rank."""

    schema: sql.Schema
    shards: tuple[sql.KeyRange, ...]
    vals: tuple[sql.KeyRange, ...]

    def to_json(self) -> dict:
        def ranges(rs):
            return [[r.after, r.last, r.rows, list(r.labels.items())] for r in rs]

        return {"columns": list(self.schema.columns), "classes": list(self.schema.classes),
                "shards": ranges(self.shards), "vals": ranges(self.vals)}  # fmt: skip

    @classmethod
    def of(cls, d: dict) -> TablePlan:
        def ranges(rs):
            return tuple(sql.KeyRange(a, b, n, {k: v for k, v in labels}) for a, b, n, labels in rs)

        return cls(sql.Schema(tuple(d["columns"]), tuple(d["classes"])), ranges(d["shards"]), ranges(d["vals"]))

    def val_range(self, dp_rank: int, dp: int) -> sql.KeyRange:
        """Rank `dp_rank`'s validation rows of `dp`: its own part, or all of them on one rank."""
        if dp == len(self.vals):
            return self.vals[dp_rank]
        assert dp == 1, (dp, len(self.vals))
        labels: dict = {}
        for r in self.vals:
            for k, v in r.labels.items():
                labels[k] = labels.get(k, 0) + v
        return sql.KeyRange(self.vals[0].after, self.vals[-1].last, sum(r.rows for r in self.vals), labels)


def shard_count(cfg: DataConfig, positions: dict[str, torch.Tensor] | None, dp: int) -> int:
    """data.shards, else the checkpoint's (a resume reads in the shards it was read in), else dp."""
    saved = [Position.of(t)[1][0] for k, t in (positions or {}).items() if k.startswith(POSITIONS)]
    return cfg.shards or (saved[0] if saved else dp)


def table_plan(cfg: DataConfig, shards: int, dp: int, name: str = "shardwise") -> TablePlan:
    conn = sql.Connection(cfg.url, name)
    try:  # the launcher checked the table (`sql.inspect`)
        schema = sql.describe(conn, cfg)
        src = sql.source(cfg, schema.columns)
        train, vals = sql.key_ranges(conn, src, shards, val=False), sql.key_ranges(conn, src, dp, val=True)
    except ShardwiseError:
        raise
    except Exception as e:
        raise sql.refused(e, sql.source(cfg), "data.url") from None
    finally:
        conn.close()
    return TablePlan(schema, tuple(train), tuple(vals))


def build_sql_rank_data(
    cfg: DataConfig,
    *,
    global_batch: int,
    grad_accum: int,
    dp_rank: int,
    dp: int,
    seed: int,
    device: torch.device,
    features: np.ndarray | None = None,
    reduce_stats: StatsReduce | None = None,
    positions: dict[str, torch.Tensor] | None = None,
    start: int = 0,
    microbatches: int = 1,
    dtype: torch.dtype = torch.float32,
    name: str = "shardwise",
    plan: TablePlan | None = None,
) -> SqlRankData:
    """Rank `dp_rank`'s rows of the table `cfg` names, by `plan` (found here where not
    given), reading on from `positions` (a checkpoint's, at step `start`); with `features`
    (vertical) only those columns, whose statistics this rank finds itself."""
    plan = plan or table_plan(cfg, shard_count(cfg, positions, dp), dp, name)
    schema, shards, num_shards = plan.schema, plan.shards, len(plan.shards)
    check_batch_layout(
        global_batch=global_batch, grad_accum=grad_accum, dp=dp, shards=num_shards, microbatches=microbatches
    )
    src = sql.source(cfg, schema.columns)
    own = schema.columns if features is None else tuple(schema.columns[i] for i in features)
    conn = sql.Connection(cfg.url, name)
    try:
        mean, variance = sql.column_stats(conn, src, own)
    except Exception as e:
        raise sql.refused(e, src, "data.url") from None
    finally:
        conn.close()
    train_rows = sum(r.rows for r in shards)
    mean, std, record = _standardisation(len(schema.columns), train_rows, features, mean, variance, reduce_stats)
    reader = Reader(src, own, schema.classes, mean, std, device=device, dtype=dtype, name=name)
    k = num_shards // dp
    mine = range(dp_rank * k, (dp_rank + 1) * k)
    streams = []
    for i in mine:
        reading = Reading(num_shards, cfg.page_rows, round(cfg.val_fraction * sql.HASH_BUCKETS), shards[i])
        pos = _position(positions, i, reading, start * global_batch // num_shards, reader.nth_key)
        streams.append(ShardStream(reader.read, i, reading, seed, pos, reader.pool))
    report = _report(shards, schema.classes, dp)
    preprocess = preprocess_record((len(schema.columns),), [str(c) for c in schema.classes], standardize=record)
    val, val_rows = plan.val_range(dp_rank, dp), sum(v.rows for v in plan.vals)
    return SqlRankData(reader, streams, per_shard=global_batch // num_shards, grad_accum=grad_accum, start=start,
                       val=val, val_rows=val_rows, dp_rank=dp_rank, dp=dp, report=report,
                       preprocess=preprocess)  # fmt: skip


def _position(positions: dict[str, torch.Tensor] | None, index: int, reading: Reading, used: int,
              nth_key) -> Position:  # fmt: skip
    """Shard `index`'s position after `used` of its rows: a checkpoint's (`positions`), which
    must have read the table as this run does; else found from `used` (a parameter
    server's workers keep none): the page and offset it makes, the page's start by one
    query for the key before it (`nth_key`)."""
    name = POSITION.format(index)
    if positions is None or name not in positions:
        if positions is not None and any(k.startswith(POSITIONS) for k in positions):
            raise ShardwiseError("resume", f"the checkpoint holds no read position of the table's shard {index}")
        rows = reading.rows
        epoch, at = divmod(used, rows.rows)
        page, offset = divmod(at, reading.page_rows)
        after = nth_key(rows, page * reading.page_rows - 1) if page else rows.after
        return Position(after, epoch, page, offset, used)
    pos, saved = Position.of(positions[name])
    names = ("data.shards", "data.page_rows", "data.val_fraction")
    for what, now, then in zip(names, reading.key[:3], saved[:3], strict=True):
        if now != then:
            shown = f"{then / sql.HASH_BUCKETS:g}" if what == "data.val_fraction" else then
            raise ShardwiseError(what, f"differs from the checkpoint's, which read the table with {what}={shown}: "
                                 f"resume with {what}={shown}")  # fmt: skip
    if saved[3:] != reading.key[3:]:
        now = reading.rows
        raise ShardwiseError("resume", f"the table's training rows changed since the checkpoint (shard {index}: keys "
                             f"({saved[3]}, {saved[4]}], {saved[5]} rows then; ({now.after}, {now.last}], "
                             f"{now.rows} now): its read position names other rows")  # fmt: skip
    if pos.used != used:
        raise ShardwiseError("resume", f"shard {index} of the table had {pos.used} rows used at the checkpoint, "
                             f"not the {used} its step and batch make: the batch size changed")  # fmt: skip
    return pos


def _standardisation(width: int, rows: int, features, mean, variance, reduce_stats):
    """Each of `width` features' mean and standard deviation over the `rows` training rows
    (`data/sources.py`'s, but 1 for a constant column); a vertical rank has its own columns'
    and adds the others' over the vertical group (`reduce_stats`: each column is one rank's,
    the others add zeros), so every rank saves the whole record."""
    cols = np.arange(width) if features is None else np.asarray(features)
    stats = np.zeros((3, width))
    stats[0, cols], stats[1, cols], stats[2, cols] = rows, np.asarray(mean), np.asarray(variance)
    if reduce_stats is not None:
        stats = reduce_stats(stats)
    whole_mean, whole_std = stats[1], np.sqrt(np.maximum(stats[2], 0.0))
    # a column constant over the training rows is divided by 1, as scikit-learn's StandardScaler
    # does: a validation row's other value there would otherwise grow a million-fold
    constant = whole_std <= 1e-9 * np.maximum(1.0, np.abs(whole_mean))
    whole_std = np.where(constant, 1.0, whole_std + 1e-6)
    record = {"per": "feature", "mean": whole_mean.tolist(), "std": whole_std.tolist()}
    return whole_mean[cols], whole_std[cols], record


def _report(shards: list[sql.KeyRange], classes: tuple, dp: int) -> dict:
    """Each data-parallel rank's training rows per class, over its shards."""
    k = len(shards) // dp
    return counts_report([np.array([sum(s.labels.get(c, 0) for s in shards[r * k : (r + 1) * k]) for c in classes])
                          for r in range(dp)])  # fmt: skip

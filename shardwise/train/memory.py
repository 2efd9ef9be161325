"""What each rank holds: parameter, gradient and optimizer-state bytes, measured.

Counts the tensors a rank owns (a DTensor's local shard, a split layer's
slice); buffers inside DDP's gradient buckets and FSDP's all-gather scratch
space are not counted.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from rich.table import Table
from torch import nn

from shardwise.parallel.splits import local_bytes
from shardwise.topology import ParallelDims
from shardwise.train.optim import optimizer_state_tensors

COLUMNS = ("parameters", "gradients", "optimizer")


def rank_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> list[int]:
    params = list(model.parameters())
    state = optimizer_state_tensors(optimizer) if optimizer is not None else []
    return [local_bytes(params), local_bytes(p.grad for p in params), local_bytes(state)]


def gather_rows(values: list[int], group: dist.ProcessGroup) -> list[list[int]]:
    """Every rank's `values`, in group rank order (a collective)."""
    mine = torch.tensor(values, dtype=torch.int64)
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, mine, group=group)
    return [r.tolist() for r in rows]


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def render_memory(rows: list[list[int]], dims: ParallelDims, *, whole_model_bytes: int, title: str) -> Table:
    table = Table(title=title)
    table.add_column("rank", justify="right")
    table.add_column("coordinates")
    shown = [c for c, col in enumerate(COLUMNS) if any(r[c] for r in rows) or col == "parameters"]
    for c in shown:
        table.add_column(COLUMNS[c], justify="right")
    table.add_column("parameters / whole model", justify="right")
    for rank, row in enumerate(rows):
        coords = " ".join(f"{a}{i}" for a, i in dims.coords(rank).items() if getattr(dims, a) > 1) or "-"
        table.add_row(str(rank), coords, *(_mib(row[c]) for c in shown), f"{row[0] / whole_model_bytes:.3f}")
    return table


def memory_records(rows: list[list[int]], dims: ParallelDims) -> list[dict]:
    return [
        {"rank": r, **dims.coords(r), **{f"{c}_bytes": v for c, v in zip(COLUMNS, row, strict=True)}}
        for r, row in enumerate(rows)
    ]

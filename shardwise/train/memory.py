"""What each rank holds: parameter, gradient and optimizer-state bytes, counted and measured.

Counted: the tensors a rank owns (a DTensor's local shard, a split layer's
slice); buffers inside DDP's gradient buckets and FSDP's all-gather scratch
space are not counted, so this is what a layout promises.

Measured: the process's peak resident memory during the run, from the kernel
(VmHWM, reset at the start of the run on Linux), next to its resident memory
at the start; on a GPU, the caching allocator's peak. These include what the
count leaves out (communication buffers, activations, the data set, Python),
so they are what a layout delivers.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

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


MEASURED = ("rss_start", "rss_peak", "gpu_peak")


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def start_measuring(device: torch.device) -> int:
    """Reset the peak counters (Linux: `5` to /proc/self/clear_refs resets VmHWM; the GPU
    allocator's peak) and return this process's resident bytes now."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss = _status_kib("VmRSS")
    return rss * 1024 if rss is not None else 0


def measured_bytes(device: torch.device, rss_start: int) -> list[int]:
    """[resident at the start, peak resident since, GPU allocator peak] in bytes."""
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        peak = hwm * 1024
    else:  # no /proc: the process's lifetime peak (kilobytes on Linux, bytes on macOS)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    gpu = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return [rss_start, peak, gpu]


def gather_rows(values: list[int], group: dist.ProcessGroup) -> list[list[int]]:
    """Every rank's `values`, in group rank order (a collective)."""
    mine = torch.tensor(values, dtype=torch.int64)
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, mine, group=group)
    return [r.tolist() for r in rows]


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def render_memory(
    rows: list[list[int]],
    dims: ParallelDims,
    *,
    whole_model_bytes: int,
    title: str,
    measured: list[list[int]] | None = None,
) -> Table:
    table = Table(title=title)
    table.add_column("rank", justify="right")
    table.add_column("coordinates")
    shown = [c for c, col in enumerate(COLUMNS) if any(r[c] for r in rows) or col == "parameters"]
    for c in shown:
        table.add_column(COLUMNS[c], justify="right")
    table.add_column("parameters / whole model", justify="right")
    if measured is not None:
        table.add_column("peak RSS", justify="right")
        table.add_column("RSS growth", justify="right")
        if any(m[2] for m in measured):
            table.add_column("GPU peak", justify="right")
    for rank, row in enumerate(rows):
        coords = " ".join(f"{a}{i}" for a, i in dims.coords(rank).items() if getattr(dims, a) > 1) or "-"
        cells = [*(_mib(row[c]) for c in shown), f"{row[0] / whole_model_bytes:.3f}"]
        if measured is not None:
            start, peak, gpu = measured[rank]
            cells += [_mib(peak), _mib(max(0, peak - start))] + ([_mib(gpu)] if any(m[2] for m in measured) else [])
        table.add_row(str(rank), coords, *cells)
    return table


def memory_records(rows: list[list[int]], dims: ParallelDims, measured: list[list[int]] | None = None) -> list[dict]:
    """Per rank: the counted bytes (`parameters_bytes`, ...) and the measured ones
    (`rss_start_bytes`, `rss_peak_bytes`, `gpu_peak_bytes`)."""
    records = []
    for r, row in enumerate(rows):
        record = {"rank": r, **dims.coords(r), **{f"{c}_bytes": v for c, v in zip(COLUMNS, row, strict=True)}}
        if measured is not None:
            record |= {f"{c}_bytes": v for c, v in zip(MEASURED, measured[r], strict=True)}
        records.append(record)
    return records

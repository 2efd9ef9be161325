"""All-reduce bus bandwidth over the link, 1 KiB to 64 MiB.

NPROC ranks (on the emulated cluster: hosts 0 and 1) all-reduce a float32
tensor (sum) with gloo; each size runs 2 warm-up rounds and then at least 20
rounds (5 above 1 MiB), each timed from a barrier to the slowest rank's end.
Bus bandwidth is nccl-tests' definition, algbw x 2(n-1)/n with algbw =
bytes / time: the rate each rank's link must carry for a ring all-reduce, so
on a shaped link it is compared with the link's rate (1.0 = the link is full).
"""

from __future__ import annotations

from rich.table import Table

from shardwise.bench.common import Bench
from shardwise.cluster.probe import measure

SIZES = [2**k for k in range(10, 27, 2)]  # 1 KiB .. 64 MiB
NPROC = 2


def _size(n: int) -> str:
    return f"{n // 2**20} MiB" if n >= 2**20 else f"{n // 2**10} KiB"


def run(b: Bench) -> None:
    from shardwise.procs import free_port

    b.console.print(f"[bold]allreduce[/]: gloo all-reduce (sum, float32), {NPROC} ranks ({b.where})")
    raw = measure(b.placement, pattern="allreduce", sizes=SIZES, repeats=b.repeats, world=NPROC, port=free_port())
    factor = 2 * (NPROC - 1) / NPROC
    rate = b.placement.cluster.rate_bps if b.placement.cluster else None
    table = Table(title="bus bandwidth, median (min - max) over the rounds")
    for col in ("size", "rounds", "Gbit/s", "/ link rate" if rate else ""):
        table.add_column(col, justify="right")
    for row in raw["sizes"]:
        n = row["bytes"]
        busbw = [n * 8 / t * factor for t in row["seconds"]]  # bits per second
        how = f"{NPROC} ranks" if n == SIZES[0] else ""
        if rate:
            text = b.record("allreduce", f"bus bandwidth / link rate, {_size(n)}", [x / rate for x in busbw], how=how)
        else:
            text = ""
            b.record("allreduce", f"bus bandwidth Gbit/s, {_size(n)}", [x / 1e9 for x in busbw], unit="Gbit/s", how=how)
        gbit = sorted(x / 1e9 for x in busbw)
        table.add_row(_size(n), str(len(busbw)), f"{gbit[len(gbit) // 2]:.3f} ({gbit[0]:.3f} - {gbit[-1]:.3f})", text)
    b.console.print(table)

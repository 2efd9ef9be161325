"""One rank of a link measurement: timed point-to-point ping-pong or all-reduce over gloo.

Run as ranks placed by `shardwise.cluster.placement` (torchrun's environment):

    python -m shardwise.cluster.probe_worker --pattern pingpong --sizes 1024,1048576 --out probe.json

pingpong: rank 0 sends n bytes to rank 1, which sends them back; the one-way time
is half the round trip. Other ranks, if any, wait at the final barrier.
allreduce: every rank all-reduces (sum) a float32 tensor of n bytes (allreduce_bf16,
allreduce_fp16: of that type, whose sums gloo computes at its own rate); allgather and
reducescatter: every rank gathers (reduces and scatters) a flat tensor of n bytes, as
FSDP and ZeRO do. overlap: an all-reduce of 16 MiB issued beside compute (a
memory-bound matrix product, as small-batch training is on a CPU), each round timed three
ways, alone, the compute alone, and the two together. sync: a small all-reduce after each
of a chain of matrix products, against the chain alone (what a band's exchanges cost).
Each size gets a few warm-up rounds and then `repeats` timed rounds; rank 0
writes every timed round, the hostnames and addresses of the ranks as JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist

from shardwise.comm.collectives import all_gather_json
from shardwise.procs import exit_now
from shardwise.rendezvous import init_from_env

WARMUP = 2
# the half-precision all-reduces' largest size: their rate is fitted from two sizes (a slow
# link takes seconds over the largest, and every run's link is probed once per placement)
HALF_MAX_BYTES = 2**24
OVERLAP_BYTES = 2**24  # the overlap's all-reduce: of a DDP bucket's order (torch's default cap is 25 MiB)


def rounds_for(size: int, repeats: int) -> int:
    """Many rounds for the small messages, whose times jitter with the scheduler's
    wake-ups; fewer for the big ones, which are slow and steady."""
    return max(repeats, 20) if size <= 2**20 else max(5, repeats // 4)


def pingpong(size: int, rounds: int) -> list[float]:
    rank = dist.get_rank()
    buf = torch.zeros(max(size // 4, 1), dtype=torch.float32)
    times = []
    for i in range(WARMUP + rounds):
        started = time.perf_counter()
        if rank == 0:
            dist.send(buf, 1)
            dist.recv(buf, 1)
        elif rank == 1:
            dist.recv(buf, 0)
            dist.send(buf, 0)
        if i >= WARMUP:
            times.append((time.perf_counter() - started) / 2)
    return times


def _timed(run, rounds: int, warmup: int = WARMUP) -> list[float]:
    """Seconds of `run()` on every rank at once, the slowest rank's, per round, after
    `warmup` rounds not counted."""
    times = []
    for i in range(warmup + rounds):
        dist.barrier()
        started = time.perf_counter()
        run()
        elapsed = torch.tensor([time.perf_counter() - started], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the collective ends when its slowest rank does
        if i >= warmup:
            times.append(elapsed.item())
    return times


def allreduce(size: int, rounds: int, dtype: torch.dtype = torch.float32) -> list[float]:
    buf = torch.ones(max(size // dtype.itemsize, 1), dtype=dtype)
    return _timed(lambda: dist.all_reduce(buf), rounds)


def _flat(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    world = dist.get_world_size()
    whole = torch.ones(max(size // 4 // world, 1) * world, dtype=torch.float32)
    return whole, torch.ones(whole.numel() // world, dtype=torch.float32)


def allgather(size: int, rounds: int) -> list[float]:
    whole, piece = _flat(size)
    return _timed(lambda: dist.all_gather_into_tensor(whole, piece), rounds)


def reducescatter(size: int, rounds: int) -> list[float]:
    whole, piece = _flat(size)
    return _timed(lambda: dist.reduce_scatter_tensor(piece, whole), rounds)


def overlap(size: int, rounds: int) -> list[float]:
    """The share of an all-reduce's time hidden by compute beside it, 1 - (together -
    compute alone) / all-reduce alone, from the medians of `rounds` alternated rounds of
    each (one value, in a list as the other patterns' times are)."""
    buf = torch.ones(max(size // 4, 1), dtype=torch.float32)
    x, w = torch.randn(8, 2048), torch.randn(2048, 2048)  # 16 MiB of weights: streamed from memory
    alone = statistics.median(allreduce(size, 3))
    one = statistics.median(_timed(lambda: x @ w, 5))
    repeat = max(1, round(alone / max(one, 1e-6)))

    def compute() -> None:
        for _ in range(repeat):
            x @ w

    def both() -> None:
        work = dist.all_reduce(buf, async_op=True)
        compute()
        work.wait()

    runs, kinds = ([], [], []), (lambda: dist.all_reduce(buf), compute, both)
    _timed(both, 0)  # warm: each kind's first call; after it, the kinds alternate round by round
    for _ in range(max(7, rounds)):
        for times, run in zip(runs, kinds, strict=True):
            times += _timed(run, 1, warmup=0)
    ar, c, b = (statistics.median(t) for t in runs)
    return [1 - (b - c) / ar]


SYNC_BYTES = 4096  # a small exchange: a norm's statistics, a few halo rows
SYNC_CHAIN = 20  # exchanges in a row, each after a layer's compute, as a band's step runs them


def sync(size: int, rounds: int) -> list[float]:
    """What one small exchange costs ranks that compute between exchanges, beyond the
    compute: chains of a matrix product (a millisecond or two, as a layer of a band) then
    an all-reduce of `size` bytes, against the same chains without the all-reduces, in
    alternated rounds; (the medians' difference) / exchanges, one value in a list. Where
    the ranks fill the cores, each exchange waits for the peer's scheduler and compute."""
    buf = torch.ones(max(size // 4, 1), dtype=torch.float32)
    x, w = torch.randn(64, 512), torch.randn(512, 512)

    def chain(exchange: bool):
        def run() -> None:
            for _ in range(SYNC_CHAIN):
                x @ w
                if exchange:
                    dist.all_reduce(buf)

        return run

    alone, together = [], []
    _timed(chain(True), 0)
    for _ in range(max(7, rounds // 3)):
        alone += _timed(chain(False), 1, warmup=0)
        together += _timed(chain(True), 1, warmup=0)
    return [max(0.0, statistics.median(together) - statistics.median(alone)) / SYNC_CHAIN]


PATTERNS = {
    "pingpong": pingpong,
    "allreduce": allreduce,
    "allgather": allgather,
    "reducescatter": reducescatter,
    "overlap": overlap,
    "sync": sync,
}
HALF = {"allreduce_bf16": torch.bfloat16, "allreduce_fp16": torch.float16}  # all-reduces of half-precision entries
PATTERNS |= {name: functools.partial(allreduce, dtype=dtype) for name, dtype in HALF.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pattern", required=True, help=f"one or more of {', '.join(PATTERNS)}, comma-separated")
    parser.add_argument("--sizes", required=True, help="message sizes in bytes, comma-separated")
    parser.add_argument("--collective-sizes", help="sizes for the collectives, if not --sizes")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    init_from_env("gloo")  # the job's own store, where the launcher gave a secret
    where = {"rank": dist.get_rank(), "hostname": socket.gethostname(), "ifname": os.environ.get("GLOO_SOCKET_IFNAME")}
    everyone = all_gather_json(where, dist.group.WORLD)
    sizes = [int(n) for n in args.sizes.split(",")]
    collective = [int(n) for n in args.collective_sizes.split(",")] if args.collective_sizes else sizes
    at = {"pingpong": sizes, "overlap": [OVERLAP_BYTES], "sync": [SYNC_BYTES]}
    at |= {name: [n for n in collective if n <= HALF_MAX_BYTES] for name in HALF}
    by_pattern = {
        name: [
            {"bytes": n, "seconds": PATTERNS[name](n, rounds_for(n, args.repeats))} for n in at.get(name, collective)
        ]
        for name in args.pattern.split(",")
    }
    if dist.get_rank() == 0:
        found = {"pattern": args.pattern, "world": dist.get_world_size(), "ranks": everyone}
        with open(args.out, "w") as f:  # `sizes`: the first pattern's
            json.dump({**found, "sizes": next(iter(by_pattern.values())), "by_pattern": by_pattern}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_now(0)

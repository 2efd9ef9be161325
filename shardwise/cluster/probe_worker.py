"""One rank of a link measurement: timed point-to-point ping-pong or all-reduce over gloo.

Run as ranks placed by `shardwise.cluster.placement` (torchrun's environment):

    python -m shardwise.cluster.probe_worker --pattern pingpong --sizes 1024,1048576 --out probe.json

pingpong: rank 0 sends n bytes to rank 1, which sends them back; the one-way time
is half the round trip. Other ranks, if any, wait at the final barrier.
allreduce: every rank all-reduces (sum) a float32 tensor of n bytes.
Each size gets a few warm-up rounds and then `repeats` timed rounds; rank 0
writes every timed round, the hostnames and addresses of the ranks as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time

import torch
import torch.distributed as dist

from shardwise.comm.collectives import all_gather_json
from shardwise.procs import exit_now

WARMUP = 2


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


def allreduce(size: int, rounds: int) -> list[float]:
    buf = torch.ones(max(size // 4, 1), dtype=torch.float32)
    times = []
    for i in range(WARMUP + rounds):
        dist.barrier()
        started = time.perf_counter()
        dist.all_reduce(buf)
        elapsed = torch.tensor([time.perf_counter() - started], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the collective ends when its slowest rank does
        if i >= WARMUP:
            times.append(elapsed.item())
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pattern", choices=["pingpong", "allreduce"], required=True)
    parser.add_argument("--sizes", required=True, help="message sizes in bytes, comma-separated")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    where = {"rank": dist.get_rank(), "hostname": socket.gethostname(), "ifname": os.environ.get("GLOO_SOCKET_IFNAME")}
    everyone = all_gather_json(where, dist.group.WORLD)
    measure = pingpong if args.pattern == "pingpong" else allreduce
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        results.append({"bytes": size, "seconds": measure(size, rounds_for(size, args.repeats))})
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump({"pattern": args.pattern, "world": dist.get_world_size(), "ranks": everyone, "sizes": results}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_now(0)

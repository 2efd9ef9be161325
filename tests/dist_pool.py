"""A pool of long-lived worker processes with one gloo process group, reused by
every multi-process test so each test pays milliseconds, not process start-up.

`pool.run(fn, *args, ranks=[0, 1])` calls `fn(*args, group=G)` on the listed
ranks, G being a process group over exactly those ranks, and returns their
results in rank order. A task that fails or overruns its deadline tears the
pool down (its ranks may be stuck in a collective); the next task starts a
fresh one.
"""

from __future__ import annotations

import os
import queue
import socket
import traceback

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(rank: int, world: int, port: int, tasks, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.pop("SHARDWISE_FAULT", None)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    groups: dict[tuple[int, ...], object] = {}
    while (task := tasks.get()) is not None:
        fn, args, kwargs, ranks = task
        try:
            if ranks not in groups:  # every rank takes part in creating every group, in the same order
                groups[ranks] = dist.new_group(list(ranks))
            out = fn(*args, group=groups[ranks], **kwargs) if rank in ranks else None
            results.put((rank, True, out))
        except BaseException:
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class DistPool:
    def __init__(self, world_size: int):
        self.world_size = world_size
        self._procs: list = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = _free_port()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(target=_serve, args=(r, self.world_size, port, self._tasks[r], self._results), daemon=True)
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()

    def run(self, fn, *args, ranks: list[int] | None = None, timeout: float = 120.0, **kwargs) -> list:
        if not self._procs or not all(p.is_alive() for p in self._procs):
            self.close()
            self._start()
        members = tuple(ranks if ranks is not None else range(self.world_size))
        for q in self._tasks:
            q.put((fn, args, kwargs, members))
        got: dict[int, object] = {}
        errors: list[str] = []
        try:
            while len(got) + len(errors) < self.world_size:
                rank, ok, out = self._results.get(timeout=timeout)
                if ok:
                    got[rank] = out
                else:
                    errors.append(f"rank {rank}:\n{out}")
                    break
        except queue.Empty:
            errors.append(f"no answer within {timeout} s from ranks {sorted(set(range(self.world_size)) - set(got))}")
        if errors:
            self.close()
            raise RuntimeError("task failed on the pool: " + "\n".join(errors))
        return [got[r] for r in members]

    def close(self) -> None:
        for q in getattr(self, "_tasks", []):
            try:
                q.put(None)
            except (OSError, ValueError):
                pass
        for p in self._procs:
            p.join(timeout=2)
            if p.is_alive():
                p.kill()
                p.join()
        self._procs = []

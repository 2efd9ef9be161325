"""`shardwise serve RUN --nproc N`: the run's model cut into a layout across N ranks (data
parallel replicas, tensor parallel, a pipeline, spatial bands, vertical slices: whatever
`--parallel.*` names, as training cuts it), behind the HTTP front in the launcher's process
(serve/link.py), which outlives them.

Every rank builds the layout as a training rank does (`job.build_layout`) from the run's
weights. Rank 0 connects to the front and takes its batches; for each it broadcasts the batch
(a header: command and samples; then the prepared inputs, whole) to every rank, and every rank
runs the layout's own prediction pass (`runner.predict`, the pass `--run.predictions` and
`evaluate --nproc` use) on its cut of it: its slice of the batch under data parallelism, its
columns under vertical partitioning, its band of rows under spatial partitioning. The
probabilities come back in the batch's order on rank 0, which sends them to the front. A batch
smaller than the data-parallel degree is padded with copies of its last sample, the copies'
answers dropped. While no batch comes, rank 0 broadcasts that it is still there, so the others'
broadcasts never time out. When the front closes the link (it stops), rank 0 broadcasts the
stop, and every rank leaves together. Ctrl-C is the front's to handle: the ranks ignore it.

A pipeline and nothing else (`--parallel.pp N` on N ranks) is served a batch a stage instead
(serve/stages.py: up to N batches in flight), unless serve.pipelined is false. Every rank
tells rank 0 its weights' bytes: the largest is checked against serve.memory_per_rank.
"""

from __future__ import annotations

import os
import signal
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from shardwise.config import Config
from shardwise.data.loader import RankData
from shardwise.data.sources import Dataset, take_features
from shardwise.parallel.splits import local_bytes
from shardwise.procs import PLACEMENT_ENV
from shardwise.serve.stages import IDLE, RUN, STOP, Stage, pipelined

IDLE_S = 20.0  # rank 0 says it is still there this often: the others' broadcasts never time out


class RankServer:
    """One rank's part: the layout, and its cut of a broadcast batch."""

    def __init__(self, cfg: Config, *, device: torch.device):
        from shardwise.job import build_layout, set_up
        from shardwise.topology import ParallelDims, RankMesh
        from shardwise.train.faults import FaultPlan

        self.dims = ParallelDims.resolve(cfg.parallel, dist.get_world_size())  # (not ps: api.serve_on_ranks)
        timeout = timedelta(seconds=cfg.train.collective_timeout_s)
        self.mesh = RankMesh.build(self.dims, dist.group.WORLD, timeout=timeout, device_type=device.type)
        self.setup = set_up(cfg, self.mesh, device=device)
        self.parameters = sum(p.numel() for p in self.setup.model.parameters())  # whole, before any cut
        self.idle_s = min(IDLE_S, cfg.train.collective_timeout_s / 3)
        where = os.environ.get(PLACEMENT_ENV, "")  # the launcher's words, e.g. emulated cluster 'sw': 2 ranks on ...
        self.described = f"{self.dims.layout} on {dist.get_world_size()} ranks" + (f" ({where})" if where else "")
        self.layout = build_layout(cfg, self.mesh, self.setup, device=device, faults=FaultPlan(dist.get_rank(), ""))
        self.device, self.dtype = device, getattr(torch, cfg.train.dtype)
        self.in_shape = tuple(self.setup.data.dataset.in_shape)
        self.classes = self.setup.data.dataset.num_classes
        module = self.layout.local_model  # its weights and buffers, its shards only where they are cut
        held = torch.tensor([local_bytes([*module.parameters(), *module.buffers()])], dtype=torch.float64)
        dist.all_reduce(held, op=dist.ReduceOp.MAX)
        self.hello = {"parameters": self.parameters, "layout": self.described, "held_bytes": float(held)}

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The whole batch's class probabilities (on rank 0 at least), every rank taking part."""
        cut = self.setup.cut
        mine = take_features(x.numpy(), cut.features, self.in_shape)  # vertical: its columns
        batch = cut.rows(Dataset(mine[:0], np.zeros(0, np.int64), mine, np.zeros(len(mine), np.int64), self.classes,
                                 self.in_shape, cut.features))  # spatial: its band of rows  # fmt: skip
        rank_data = RankData(batch, None, self.mesh.coords.get("dp", 0), self.dims.dp, 1, self.device, {},
                             self.dtype)  # fmt: skip
        return self.layout.runner.predict(rank_data)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Rank 0: broadcast a batch, take part, answer."""
        n = len(x)
        pad = (-n) % self.dims.dp
        if pad:
            x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
        dist.broadcast(torch.tensor([RUN, len(x)], dtype=torch.int64), 0)
        batch = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        dist.broadcast(batch, 0)
        return self.predict(batch)[:n].double().cpu().numpy()

    def lead(self, front) -> None:
        """Rank 0: the front's batches, each through every rank, until the front closes the link."""
        while True:
            if not front.poll(self.idle_s):
                dist.broadcast(torch.tensor([IDLE, 0], dtype=torch.int64), 0)
                continue
            try:
                x = front.recv()
            except EOFError:  # the front stops
                return
            front.send(self.forward(x))

    def follow(self) -> None:
        """Ranks but 0: take part in each batch rank 0 broadcasts, until it says stop."""
        while True:
            header = torch.zeros(2, dtype=torch.int64)
            dist.broadcast(header, 0)
            if int(header[0]) == STOP:
                return
            if int(header[0]) == IDLE:
                continue
            batch = torch.empty((int(header[1]), *self.in_shape), dtype=torch.float32)
            dist.broadcast(batch, 0)
            self.predict(batch)

    def stop(self) -> None:
        dist.broadcast(torch.tensor([STOP, 0], dtype=torch.int64), 0)

    def close(self) -> None:
        if self.setup.data is not None:
            self.setup.data.close()
        self.mesh.close()


def serve_rank(cfg: Config, *, device: torch.device) -> None:
    """This rank's part in serving the model `cfg` names under its layout."""
    from multiprocessing import AuthenticationError

    from shardwise.serve.link import connect_to_front

    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the front answers what is in flight, then stops us
    server = RankServer(cfg, device=device)
    try:
        if cfg.serve.pipelined and pipelined(server.dims):
            stage = Stage(server.layout.runner, idle_s=server.idle_s)
            stage.lead(server.hello) if stage.first else stage.follow()
            return
        if dist.get_rank() != 0:
            server.follow()
            return
        try:
            front = connect_to_front({**server.hello, "role": "both"})
        except (OSError, EOFError, AuthenticationError):  # the front has stopped already
            server.stop()
            return
        with front:
            server.lead(front)
        server.stop()  # (not after a failed batch: the launcher stops and restarts the ranks)
    finally:
        server.close()

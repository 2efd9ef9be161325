"""`shardwise serve RUN --nproc N`: the run's model cut into a layout across N ranks (data
parallel replicas, tensor parallel, a pipeline, spatial bands, vertical slices: whatever
`--parallel.*` names, as training cuts it), with the HTTP front on rank 0.

Every rank builds the layout as a training rank does (`job.build_layout`) from the run's
weights. Rank 0 serves (`front.listen_and_serve`); its batcher's forward pass broadcasts the
batch (a header: command and samples; then the prepared inputs, whole) to every rank, and
every rank runs the layout's own prediction pass (`runner.predict`, the pass `--run.predictions`
and `evaluate --nproc` use) on its cut of it: its slice of the batch under data parallelism,
its columns under vertical partitioning, its band of rows under spatial partitioning. The
probabilities come back in the batch's order on rank 0. A batch smaller than the data-parallel
degree is padded with copies of its last sample, the copies' answers dropped. When rank 0's
server stops (SIGTERM), it broadcasts the stop, and every rank leaves together.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from shardwise.config import Config
from shardwise.data.loader import RankData
from shardwise.data.sources import Dataset, take_features

RUN, STOP, IDLE = 1, 0, 2
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
        self.layout = build_layout(cfg, self.mesh, self.setup, device=device, faults=FaultPlan(dist.get_rank(), ""))
        self.device, self.dtype = device, getattr(torch, cfg.train.dtype)
        self.in_shape = tuple(self.setup.data.dataset.in_shape)
        self.classes = self.setup.data.dataset.num_classes
        self.lock = threading.Lock()  # one broadcast sequence at a time: a batch's, or the heartbeat's
        self.last = time.monotonic()
        self.stopped = threading.Event()

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
        """Rank 0: broadcast a batch, take part, answer (the batcher's thread)."""
        n = len(x)
        pad = (-n) % self.dims.dp
        if pad:
            x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
        with self.lock:
            self.last = time.monotonic()
            try:
                dist.broadcast(torch.tensor([RUN, len(x)], dtype=torch.int64), 0)
                batch = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
                dist.broadcast(batch, 0)
                return self.predict(batch)[:n].double().cpu().numpy()
            except BaseException:  # the ranks' collectives no longer line up: the server cannot go on
                traceback.print_exc()
                print("shardwise serve: rank 0's forward pass failed; the server stops", file=sys.stderr, flush=True)
                os._exit(1)

    def heartbeat(self) -> None:
        """Rank 0, a thread: an IDLE header whenever no batch went for IDLE_S."""
        while not self.stopped.wait(1.0):
            with self.lock:
                if not self.stopped.is_set() and time.monotonic() - self.last >= self.idle_s:
                    dist.broadcast(torch.tensor([IDLE, 0], dtype=torch.int64), 0)
                    self.last = time.monotonic()

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
        with self.lock:
            self.stopped.set()
            dist.broadcast(torch.tensor([STOP, 0], dtype=torch.int64), 0)

    def close(self) -> None:
        if self.setup.data is not None:
            self.setup.data.close()
        self.mesh.close()


def serve_rank(cfg: Config, *, run_folder: Path, device: torch.device) -> None:
    """This rank's part in serving `run_folder`'s model under `cfg`'s layout."""
    from shardwise.scoring import preprocess_of
    from shardwise.serve.front import listen_and_serve
    from shardwise.serve.model import ServedModel, describe

    torch.set_num_threads(1)
    if dist.get_rank() != 0:  # the others stop when rank 0 says so, after the requests in flight
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    server = RankServer(cfg, device=device)
    try:
        if dist.get_rank() != 0:
            server.follow()
            return
        record = preprocess_of(run_folder / "model.safetensors")
        about = describe(run_folder, cfg, record, parameters=server.parameters,
                         layout=f"{server.dims.layout} on {dist.get_world_size()} ranks")  # fmt: skip
        beating = threading.Thread(target=server.heartbeat, name="shardwise-serve-heartbeat", daemon=True)
        beating.start()
        try:
            listen_and_serve(ServedModel(cfg.model.name, server.forward, record, about), cfg.serve)
        finally:
            server.stop()
            beating.join()
    finally:
        server.close()


def serving_config(cfg: Config, run_folder: Path) -> Config:
    """The run's config as the serving ranks take it: its weights, no training."""
    train = dataclasses.replace(cfg.train, steps=0)
    return dataclasses.replace(cfg, train=train, model=dataclasses.replace(cfg.model, weights=str(
        (run_folder / "model.safetensors").resolve())))  # fmt: skip

"""The yardstick: a plain torch DDP training script, as a user would write it.

Same model class, data, global batch, optimizer and world size as the
shardwise run it is compared with; nothing of shardwise's launcher, data
plan, logging or loop. Run under torchrun:

    torchrun --nproc-per-node 2 -m shardwise.bench.torch_ddp_reference --steps 120 --out t.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from shardwise.config import DataConfig, ModelConfig
from shardwise.data.sources import load_source
from shardwise.models import build_model
from shardwise.procs import exit_now


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    data = load_source(DataConfig(), seed=0)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    model = DistributedDataParallel(build_model(ModelConfig(), data.in_shape, data.num_classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    local = args.batch_size // world
    generator = torch.Generator().manual_seed(rank)

    times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        idx = torch.randint(len(y), (local,), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"step_time_s": statistics.median(times[5:])}, f)
    dist.barrier()  # leave together, as the shardwise worker does
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_now(0)

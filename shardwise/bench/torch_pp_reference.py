"""The yardstick for pipelining: torch.distributed.pipelining driven directly.

The same MLP (built by shardwise's registry, same seed) cut at the same layer
as the shardwise run, one stage per rank, under torch's GPipe or 1F1B schedule
with plain SGD on random batches; nothing of shardwise's loop. Run under torchrun:

    torchrun --nproc-per-node 2 -m shardwise.bench.torch_pp_reference --cut 0,3 --out t.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from shardwise.config import ModelConfig
from shardwise.models import build_model
from shardwise.parallel.pipeline import model_layers
from shardwise.procs import exit_now


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--schedule", choices=["gpipe", "1f1b"], default="1f1b")
    parser.add_argument("--features", type=int, default=1024)
    parser.add_argument("--hidden", default="2048,2048,2048")
    parser.add_argument("--cut", required=True, help="first layer of each stage, e.g. 0,3")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="mlp", hidden=[int(h) for h in args.hidden.split(",")]), (args.features,), 10)
    layers = [m for _, m in model_layers(model)]
    bounds = [int(c) for c in args.cut.split(",")] + [len(layers)]
    module = nn.Sequential(*layers[bounds[rank] : bounds[rank + 1]])
    stage = PipelineStage(module, rank, world, torch.device("cpu"))
    kind = ScheduleGPipe if args.schedule == "gpipe" else Schedule1F1B
    schedule = kind(stage, n_microbatches=args.microbatches, loss_fn=F.cross_entropy)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)
    generator = torch.Generator().manual_seed(0)  # every rank draws the same batch

    times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        x = torch.randn(args.batch_size, args.features, generator=generator)
        y = torch.randint(10, (args.batch_size,), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        if rank == 0:
            schedule.step(x)
        elif rank == world - 1:
            schedule.step(target=y, losses=[])
        else:
            schedule.step()
        optimizer.step()
        times.append(time.perf_counter() - started)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"step_time_s": statistics.median(times[5:])}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_now(0)

"""One side of `shardwise bench spatial`: a conv stack on a large image, whole or in bands.

Run under torchrun; with N processes every feature map is cut into N bands of
rows. Reports the median step time (forward, backward, SGD step) and the
bytes of the activations this rank saves for the backward pass (tensors
packed by autograd during the forward, each storage counted once): the memory
that spatial partitioning divides.

    torchrun --nproc-per-node 2 -m shardwise.bench.spatial_worker --size 1024 --out t.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from shardwise.config import ModelConfig
from shardwise.models import build_model
from shardwise.parallel.part import Part
from shardwise.parallel.spatial import apply_spatial
from shardwise.procs import exit_now
from shardwise.ranges import even_bounds
from shardwise.topology import RankMesh


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--channels", default="8,16,32")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    in_shape = (3, args.size, args.size)
    torch.manual_seed(0)
    widths = [int(c) for c in args.channels.split(",")]
    model = build_model(ModelConfig(name="resnet", channels=widths, norm="group"), in_shape, 10)
    apply_spatial(Part(model), RankMesh.single("spatial", dist.group.WORLD if world > 1 else None), in_shape=in_shape)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    a, b = even_bounds(args.size, world)[rank]

    times, saved = [], 0
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    for _ in range(args.steps):
        x = torch.randn(args.batch_size, *in_shape, generator=generator)[:, :, a:b].contiguous()
        y = torch.randint(10, (args.batch_size,), generator=generator)
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        storages.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = F.cross_entropy(model(x), y)
        saved = sum(storages.values())
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    per_rank = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(per_rank, torch.tensor([saved]))
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"step_time_s": statistics.median(times[2:]), "saved_bytes": [int(t) for t in per_rank]}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_now(0)

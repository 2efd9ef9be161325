"""The yardstick for tensor parallelism: torch's own DTensor `parallelize_module`.

The same MLP (built by shardwise's registry, same seed) split the same way,
column then row in pairs, and the odd last layer whole on every rank where it has
at most `NARROW` outputs (the classifier, as shardwise's `tp_roles` keeps it), else
column-wise with its output gathered; plain SGD on random batches. Nothing of
shardwise's loop. Run under torchrun:

    torchrun --nproc-per-node 2 -m shardwise.bench.torch_tp_reference --hidden 4096,4096 --out t.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from shardwise.config import ModelConfig
from shardwise.models import build_model
from shardwise.parallel.tensor import NARROW
from shardwise.procs import exit_now


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--features", type=int, default=1024)
    parser.add_argument("--hidden", default="4096,4096")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    torch.manual_seed(0)
    hidden = [int(h) for h in args.hidden.split(",")]
    model = build_model(ModelConfig(name="mlp", hidden=hidden), (args.features,), 10)
    names = [n for n, m in model.head.named_children() if isinstance(m, torch.nn.Linear)]
    plan = {}
    for k in range(0, len(names) - 1, 2):
        plan[names[k]], plan[names[k + 1]] = ColwiseParallel(), RowwiseParallel()
    if len(names) % 2 and model.head.get_submodule(names[-1]).out_features > NARROW:
        plan[names[-1]] = ColwiseParallel(output_layouts=Replicate())
    parallelize_module(model.head, mesh, plan)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    generator = torch.Generator().manual_seed(0)  # every rank draws the same batch

    times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        x = torch.randn(args.batch_size, args.features, generator=generator)
        y = torch.randint(10, (args.batch_size,), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            local = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]
            held = sum(t.numel() * t.element_size() for t in local)
            json.dump({"step_time_s": statistics.median(times[5:]), "parameters_bytes": held}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_now(0)

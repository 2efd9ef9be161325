"""The yardstick: a plain torch DDP training script, as a user would write it.

Same model class, data, global batch, optimizer and world size as the
shardwise run it is compared with; nothing of shardwise's launcher, data
plan, logging or loop. Run under torchrun:

    torchrun --nproc-per-node 2 -m shardwise.bench.torch_ddp_reference --steps 120 --out t.json

`--powersgd RANK` registers torch's own PowerSGD communication hook (error feedback and
warm start, torch's defaults) for the compression bench's yardstick.
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
    parser.add_argument("--model", default="convnet")
    parser.add_argument("--hidden", default="", help="hidden widths, comma-separated (default: the model's)")
    parser.add_argument("--powersgd", type=int, default=0, help="torch's PowerSGD hook of this rank (0: none)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    model_cfg = ModelConfig(name=args.model)
    if args.hidden:
        model_cfg.hidden = [int(w) for w in args.hidden.split(",")]

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    data = load_source(DataConfig(), seed=0)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    model = DistributedDataParallel(build_model(model_cfg, data.in_shape, data.num_classes))
    if args.powersgd:
        model.register_comm_hook(*powersgd_hook(args.powersgd))
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


def powersgd_hook(rank: int):
    """torch's `powerSGD_hook`, compressing from the third step (its first two go whole:
    start_powerSGD_iter = 2, the least torch takes with error feedback), each bucket's average
    waited for before autograd hands over the next. The wait is needed on gloo: the hook
    starts its second and third all-reduces from the callbacks of the first, on gloo's
    thread, while autograd starts the next bucket's from its own, so two ranks can issue
    them in different orders (a collective mismatch, or a hang). One bucket at a time keeps
    one order on every rank; shardwise's own hook averages each bucket before returning
    too."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

    state = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=rank, start_powerSGD_iter=2)

    def hook(state, bucket):  # unannotated: DDP checks annotations as objects
        fut = psgd.powerSGD_hook(state, bucket)
        fut.wait()
        return fut

    return state, hook


if __name__ == "__main__":
    main()
    exit_now(0)

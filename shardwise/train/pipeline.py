"""One training step through a pipeline of stages, with torch's own schedules.

The stage module (wrapped for data parallelism if dp > 1) runs under
`torch.distributed.pipelining`: `ScheduleGPipe` (Huang et al., "GPipe", 2019:
all forwards, then all backwards) or `Schedule1F1B` (Narayanan et al.,
"PipeDream", 2019; Megatron's non-interleaved schedule: after a warm-up, one
forward and one backward in turn, so a stage holds at most P micro-batches of
activations). Each micro-batch's loss is the mean over its samples and the
schedule divides the gradients by M, so a step equals one process on the whole
batch. Evaluation passes activations forward with plain point-to-point sends.

Every stage times each micro-batch's forward and backward (wall clock, so the
stages of one machine share a time base); :mod:`shardwise.train.timeline`
turns these into the bubble fraction and a Gantt chart.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.table import Table
from torch import Tensor, nn

from shardwise import p2p_ring
from shardwise.comm.collectives import recv_tensor, send_tensor
from shardwise.comm.flat import average_gradients
from shardwise.data.loader import RankData
from shardwise.parallel.data import unwrap
from shardwise.train.evaluate import gather_rows, score, summarize
from shardwise.train.loop import mean_over

if TYPE_CHECKING:  # imported where a pipeline is built: it pulls in torch._dynamo, a second per process
    from torch.distributed.pipelining import PipelineStage


FAULT_TAG = 77  # the tag of a receive that an injected deadlock waits on


class PipelineRunner:
    def __init__(
        self,
        module: nn.Module,
        *,
        stage: int,
        stages: int,
        group: dist.ProcessGroup,
        dp_group: dist.ProcessGroup | None,
        microbatches: int,
        schedule: str,
        device: torch.device,
        shapes: tuple[tuple[int, ...], tuple[int, ...]],
        dtype: torch.dtype = torch.float32,
        compressor=None,
    ):
        """`shapes`: one micro-batch's input and output of this stage (parallel/pipeline.py:
        stage_shapes); given, torch exchanges no pickled metadata between stages."""
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        self.module, self.stage_index, self.num_stages = module, stage, stages
        self.group, self.dp_group, self.device, self.dtype = group, dp_group, device, dtype
        self.compressor = compressor  # comm/compress.py: how the stage's gradients are averaged, if not exactly
        self.first, self.last = stage == 0, stage == stages - 1
        # activations between stages carry gradients back; the first stage's input is data
        inputs = torch.empty(shapes[0], device=device, dtype=dtype, requires_grad=not self.first)
        outputs = torch.empty(shapes[1], device=device, dtype=dtype, requires_grad=True)
        p2p_ring.install()  # the schedules' sends and receives, for the launcher's reading of a hang
        self.stage = PipelineStage(module, stage, stages, device, input_args=inputs, output_args=outputs, group=group)
        kind = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
        self.schedule = kind(self.stage, n_microbatches=microbatches, loss_fn=F.cross_entropy, scale_grads=True)
        self.events: list[tuple] = []  # (step, kind 0 forward / 1 backward, micro-batch, start, end)
        self.steps = 0
        self._time(self.stage, "forward_one_chunk", 0)
        self._time(self.stage, "backward_one_chunk", 1)

    def _time(self, stage: PipelineStage, method: str, kind: int) -> None:
        inner = getattr(stage, method)

        def timed(chunk: int, *args, **kwargs):
            started = time.time()
            out = inner(chunk, *args, **kwargs)
            self.events.append((self.steps, kind, chunk, started, time.time()))
            return out

        setattr(stage, method, timed)

    def forward_backward(self, micro: list[tuple[Tensor, Tensor]]) -> Tensor:
        (x, y), losses = micro[0], []
        args = (x,) if self.first else ()
        self.schedule.step(*args, target=y if self.last else None, losses=losses if self.last else None)
        self.steps += 1
        # data parallelism for a stage: one all-reduce of all its gradients once the pipeline
        # drained (DDP around a stage trips over its own bucket rebuild when the first step
        # runs every forward before any backward, as GPipe does)
        average_gradients(list(self.module.named_parameters()), self.dp_group, self.compressor)
        if self.last:
            return torch.stack([loss.detach() for loss in losses]).mean()
        return torch.zeros((), device=self.device)

    def receive_first(self) -> None:
        """An injected fault (train/faults.py `deadlock`): wait for a message from the next stage
        (the last stage: the one before) under a tag no schedule sends with, as a stage whose
        schedule put a receive before its send would; its neighbour waits on it in turn."""
        peer = self.stage_index - 1 if self.last else self.stage_index + 1
        source = dist.get_global_rank(self.group, peer)
        buffer = torch.empty(1, device=self.device)
        p2p_ring.record("recv", source, FAULT_TAG, buffer)
        dist.recv(buffer, source, group=self.group, tag=FAULT_TAG)

    def mean_loss(self, value: Tensor) -> float:
        """The last stage's loss, shared with its pipeline, then averaged over data parallelism."""
        value = value.clone()
        dist.broadcast(value, src=dist.get_global_rank(self.group, self.num_stages - 1), group=self.group)
        return mean_over(self.dp_group, value)

    @torch.no_grad()
    def evaluate(self, data: RankData) -> dict[str, float]:
        module = unwrap(self.module)
        module.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)
        prev = dist.get_global_rank(self.group, self.stage_index - 1) if not self.first else None
        nxt = dist.get_global_rank(self.group, self.stage_index + 1) if not self.last else None
        for x, y in data.val_batches():
            h = x if self.first else recv_tensor(prev, self.group, self.device, self.dtype)
            h = module(h)
            if self.last:
                totals += score(h, y)
            else:
                send_tensor(h, nxt, self.group)
        module.train()
        if self.dp_group is not None:
            dist.all_reduce(totals, group=self.dp_group)
        dist.broadcast(totals, src=dist.get_global_rank(self.group, self.num_stages - 1), group=self.group)
        return summarize(totals, None)

    def predict(self, data: RankData) -> Tensor:
        return _pipeline_predict(self, data)


@torch.no_grad()
def _pipeline_predict(runner: PipelineRunner, data: RankData) -> Tensor:
    """The last stage's class probabilities, gathered over data parallelism and handed to
    every stage of the pipeline (broadcast: the last stage knows the shape)."""
    module = unwrap(runner.module)
    module.eval()
    prev = dist.get_global_rank(runner.group, runner.stage_index - 1) if not runner.first else None
    nxt = dist.get_global_rank(runner.group, runner.stage_index + 1) if not runner.last else None
    rows = []
    for x, _ in data.val_batches():
        h = x if runner.first else recv_tensor(prev, runner.group, runner.device, runner.dtype)
        h = module(h)
        if runner.last:
            rows.append(torch.softmax(h.double(), dim=1))
        else:
            send_tensor(h, nxt, runner.group)
    module.train()
    last = dist.get_global_rank(runner.group, runner.num_stages - 1)
    shape = torch.zeros(2, dtype=torch.int64, device=runner.device)
    if runner.last:
        probs = gather_rows(torch.cat(rows), data, runner.dp_group)
        shape += torch.tensor(probs.shape, device=runner.device)
    dist.broadcast(shape, src=last, group=runner.group)
    if not runner.last:
        probs = torch.empty(tuple(shape.tolist()), dtype=torch.float64, device=runner.device)
    dist.broadcast(probs, src=last, group=runner.group)
    return probs


def render_cut(rows: list[dict], dims, by: str) -> Table:
    """The chosen cut: each stage's layers and its share of the measured time and the weights."""
    table = Table(title=f"pipeline: {dims.pp} stages cut by {by}, {dims.microbatches} micro-batches")
    for col in ("stage", "layers", "time share", "parameter share", "activations / micro-batch"):
        table.add_column(col, justify="right" if col != "layers" else "left")
    for r in rows:
        table.add_row(
            str(r["stage"]),
            f"{r['layers']} ({r['num_layers']})",
            f"{r['time_share']:.1%}",
            f"{r['param_share']:.1%}",
            f"{r['activation_bytes'] / 2**10:,.1f} KiB",
        )
    return table

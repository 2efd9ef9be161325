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
from shardwise.parallel.pipeline import SCHEDULES, StageCut
from shardwise.parallel.pipeline_cost import BACKWARD, FORWARD, WEIGHT  # an event's kind
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
        stage: StageCut,
        dp_group: dist.ProcessGroup | None,
        microbatches: int,
        schedule: str,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        compressor=None,
    ):
        """`module`: the rank's part, all its stages' layers; `stage.chunks` each stage's layers
        and the shapes of one micro-batch entering and leaving it (given, torch exchanges no
        pickled metadata between stages)."""
        from torch.distributed.pipelining import PipelineStage, schedules

        self.module, self.stage_index, self.num_stages = module, stage.index, stage.stages
        self.group, self.dp_group, self.device, self.dtype = stage.group, dp_group, device, dtype
        self.compressor = compressor  # comm/compress.py: how the stage's gradients are averaged, if not exactly
        self.ranks = stage.ranks  # the pipeline rank of every stage
        # one stage a rank: the part itself (checkpointed or not as it is); several: each its own
        # module over the part's layers (parallel/recompute.py checkpoints each, if at all)
        several = len(stage.chunks) > 1
        self.chunks = [(s, chunk if several else module) for s, chunk, _ in stage.chunks]
        count = len(self.ranks)
        self.first, self.last = self.ranks[0] == stage.index, self.ranks[-1] == stage.index
        p2p_ring.install()  # the schedules' sends and receives, for the launcher's reading of a hang
        self.stages = []
        for (s, chunk), (_, _, shapes) in zip(self.chunks, stage.chunks, strict=True):
            # activations between stages carry gradients back; the first stage's input is data
            inputs = torch.empty(shapes[0], device=device, dtype=dtype, requires_grad=s > 0)
            outputs = torch.empty(shapes[1], device=device, dtype=dtype, requires_grad=True)
            self.stages.append(
                PipelineStage(chunk, s, count, device, input_args=inputs, output_args=outputs, group=stage.group)
            )
        kind = getattr(schedules, SCHEDULES[schedule])
        single = len(self.stages) == 1 and schedule in ("gpipe", "1f1b")
        stages = self.stages[0] if single else self.stages
        self.schedule = kind(stages, n_microbatches=microbatches, loss_fn=F.cross_entropy, scale_grads=True)
        self.events: list[tuple] = []  # (step, kind, micro-batch, start, end, stage)
        self.steps = 0
        for s, pipe_stage in zip(self.chunks, self.stages, strict=True):
            self._time(pipe_stage, s[0], "forward_one_chunk", FORWARD)
            self._time(pipe_stage, s[0], "backward_one_chunk", BACKWARD)
            self._time(pipe_stage, s[0], "backward_weight_one_chunk", WEIGHT)

    def _time(self, stage: PipelineStage, index: int, method: str, kind: int) -> None:
        inner = getattr(stage, method)

        def timed(chunk: int, *args, **kwargs):
            started = time.time()
            out = inner(chunk, *args, **kwargs)
            self.events.append((self.steps, kind, chunk, started, time.time(), index))
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
        """An injected fault (train/faults.py `deadlock`): wait for a message from the next rank
        (the last rank: the one before) under a tag no schedule sends with, as a stage whose
        schedule put a receive before its send would; its neighbour waits on it in turn."""
        peer = self.stage_index - 1 if self.stage_index == self.num_stages - 1 else self.stage_index + 1
        source = dist.get_global_rank(self.group, peer)
        buffer = torch.empty(1, device=self.device)
        p2p_ring.record("recv", source, FAULT_TAG, buffer)
        dist.recv(buffer, source, group=self.group, tag=FAULT_TAG)

    @property
    def last_rank(self) -> int:
        """The global rank holding the last stage (it has the loss and the outputs)."""
        return dist.get_global_rank(self.group, self.ranks[-1])

    def mean_loss(self, value: Tensor) -> float:
        """The last stage's loss, shared with its pipeline, then averaged over data parallelism."""
        value = value.clone()
        dist.broadcast(value, src=self.last_rank, group=self.group)
        return mean_over(self.dp_group, value)

    def forward_only(self, x: Tensor) -> Tensor | None:
        """`x` through every stage, the activations passed on with plain sends: the last stage's
        output on the rank holding it, None on the others (which take no input: only the rank
        of the first stage reads `x`)."""
        h = x
        for s, chunk in self.chunks:
            if s > 0 and self.ranks[s - 1] != self.stage_index:
                source = dist.get_global_rank(self.group, self.ranks[s - 1])
                h = recv_tensor(source, self.group, self.device, self.dtype)
            h = chunk(h)
            if s + 1 < len(self.ranks) and self.ranks[s + 1] != self.stage_index:
                send_tensor(h, dist.get_global_rank(self.group, self.ranks[s + 1]), self.group)
        return h if self.last else None

    @torch.no_grad()
    def evaluate(self, data: RankData) -> dict[str, float]:
        self.module.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)
        for x, y in data.val_batches():
            out = self.forward_only(x)
            if out is not None:
                totals += score(out, y)
        self.module.train()
        if self.dp_group is not None:
            dist.all_reduce(totals, group=self.dp_group)
        dist.broadcast(totals, src=self.last_rank, group=self.group)
        return summarize(totals, None)

    def predict(self, data: RankData) -> Tensor:
        return _pipeline_predict(self, data)


@torch.no_grad()
def _pipeline_predict(runner: PipelineRunner, data: RankData) -> Tensor:
    """The last stage's class probabilities, gathered over data parallelism and handed to
    every stage of the pipeline (broadcast: the last stage knows the shape)."""
    runner.module.eval()
    rows = []
    for x, _ in data.val_batches():
        out = runner.forward_only(x)
        if out is not None:
            rows.append(torch.softmax(out.double(), dim=1))
    runner.module.train()
    last = runner.last_rank
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
    on = f" on {dims.pp} ranks ({dims.schedule})" if dims.virtual > 1 else ""
    table = Table(title=f"pipeline: {len(rows)} stages{on} cut by {by}, {dims.microbatches} micro-batches")
    for col in ("stage", "layers", "time share", "parameter share", "activations / micro-batch"):
        table.add_column(col, justify="right" if col != "layers" else "left")
    for r in rows:
        table.add_row(
            f"{r['stage']} (rank {r['rank']})" if dims.virtual > 1 else str(r["stage"]),
            f"{r['layers']} ({r['num_layers']})",
            f"{r['time_share']:.1%}",
            f"{r['param_share']:.1%}",
            f"{r['activation_bytes'] / 2**10:,.1f} KiB",
        )
    return table

"""apply_layout(model, mesh, ...) -> Layout: the one place the strategies are composed.

The composition order, written here once (ARCHITECTURE.md):

1. the pipeline cut: a stage is a sub-model (parallel/pipeline.py);
2. per stage, the layer partitioning: vertical takes the input layer
   (parallel/vertical.py), tensor parallelism the fully-connected head
   (parallel/tensor.py), spatial the convolution stack (parallel/spatial.py).
   Split layers hold plain local tensors, so what follows treats them like any other;
3. activation checkpointing of the part's layers as the partitioning left them
   (parallel/recompute.py): their collectives run again in the recompute;
4. the data-parallel wrapper, outermost: DDP or FSDP2 (parallel/data.py), ZeRO-1's
   sharded optimizer state (parallel/zero.py), or the parameter server's roles
   (parallel/param_server.py).

Every strategy keeps one contract, `apply_<strategy>(part, mesh, *, ...) -> Part`
(parallel/part.py), and one that does not apply to the mesh returns the part as
it came, so every layout walks the same steps. The :class:`Layout` that comes out
is what the job runs: the part of the model this rank holds, the runner of one
step on it, and what the run needs the whole of (the full weights, a
checkpoint's logical tensors, the memory table, the layout's own summary).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from shardwise.checkpoint.state import load_optimizer, logical_model, logical_optimizer
from shardwise.comm.compress import CompressionSettings
from shardwise.comm.flat import named_views
from shardwise.config import DataConfig, ParallelConfig, TrainConfig
from shardwise.data.features import vertical_parts
from shardwise.data.sources import Dataset, take_rows
from shardwise.errors import ShardwiseError
from shardwise.parallel.data import apply_data_parallel, unwrap
from shardwise.parallel.param_server import ServerSettings
from shardwise.parallel.part import Part
from shardwise.parallel.pipeline import apply_pipeline, gather_stages
from shardwise.parallel.ps_layout import apply_parameter_server
from shardwise.parallel.ps_protocol import load_flat
from shardwise.parallel.recompute import apply_checkpointing
from shardwise.parallel.spatial import apply_spatial
from shardwise.parallel.splits import Split, full_state_dict
from shardwise.parallel.tensor import apply_tensor_parallel
from shardwise.parallel.vertical import apply_vertical
from shardwise.parallel.zero import apply_zero
from shardwise.ranges import even_bounds
from shardwise.topology import ParallelDims, RankMesh
from shardwise.train.faults import FaultPlan
from shardwise.train.loop import ModelRunner, Runner
from shardwise.train.memory import rank_bytes
from shardwise.train.optim import build_optimizer
from shardwise.train.pipeline import PipelineRunner, render_cut
from shardwise.train.timeline import bubble_summary, gather_events


@dataclass
class DataCut:
    """What of the data this rank loads, as the layout cuts it: only its input columns
    (`features`, vertical; their standardisation statistics then add up over `reduce_stats`)
    and only its band of each image's rows (spatial, cut by :meth:`rows`)."""

    parts: list[np.ndarray] | None  # every vertical rank's columns (None: whole samples)
    features: np.ndarray | None  # this rank's
    reduce_stats: Callable | None
    band: tuple[int, int] | None  # (this rank's band index, the number of bands)

    def rows(self, dataset: Dataset) -> Dataset:
        """This rank's rows of every image (all of them without spatial partitioning)."""
        if self.band is None:
            return dataset
        if len(dataset.in_shape) != 3:
            raise ShardwiseError("parallel.spatial", f"needs images (C, H, W), the data has shape {dataset.in_shape}")
        index, bands = self.band
        return take_rows(dataset, *even_bounds(dataset.in_shape[1], bands)[index])


def data_cut(mesh: RankMesh, data: DataConfig, parallel: ParallelConfig) -> DataCut:
    parts = vertical_parts(data, parallel)
    features = parts[mesh.coords["vertical"]] if parts else None
    band = (mesh.coords["spatial"], mesh.size("spatial")) if mesh.size("spatial") > 1 else None
    return DataCut(parts, features, _summer(mesh.groups["vertical"]), band)


def _summer(group: dist.ProcessGroup | None):
    """Adds up NumPy arrays over `group` (the vertical ranks' data statistics)."""
    if group is None:
        return None

    def reduce(stats):
        total = torch.from_numpy(stats.copy())
        dist.all_reduce(total, group=group)
        return total.numpy()

    return reduce


def holds_whole_model(mesh: RankMesh) -> bool:
    """Whether this rank needs the whole model's weights and the data: all but the
    parameter servers after the first, which hold only their slice (server 0 scores
    the weights and hands the others their slices); colocated, every rank is a worker too."""
    return mesh.coords.get("server", -1) <= 0 or mesh.dims.colocated


@dataclass
class Layout:
    dims: ParallelDims
    part: Part
    runner: Runner | None  # None on a parameter server's server
    whole: dict[str, Tensor]  # every tensor of the whole model (meta: names, shapes, dtypes)

    @property
    def model(self) -> nn.Module:
        """This rank's part of the model, as it runs (inside any data-parallel wrapper)."""
        return self.part.model

    @property
    def local_model(self) -> nn.Module:
        """This rank's part under the model's own parameter names (no data-parallel wrapper)."""
        return unwrap(self.model)

    @property
    def splits(self) -> dict[str, Split]:
        return self.part.splits

    @property
    def sum_groups(self) -> list:
        return self.part.sum_groups

    @property
    def role(self) -> str:
        """train (every all-reduce layout), server or worker (a parameter server), or
        colocated (both: parallel.colocate)."""
        if self.part.server is not None and self.part.client is not None:
            return "colocated"
        return "server" if self.part.server else "worker" if self.part.client else "train"

    def build_optimizer(self, train: TrainConfig) -> torch.optim.Optimizer:
        """The optimizer of this rank's part (sharded over ZeRO-1's group where it applies)."""
        return build_optimizer(train, self.model, zero_group=self.part.zero_group)

    def load_state(self, optimizer: torch.optim.Optimizer | None, tensors: dict[str, Tensor], **positions) -> None:
        """Put a checkpoint's logical optimizer state into this layout (the weights went
        into the whole model before it was cut). A server also takes the run's position."""
        if self.part.server is not None:
            self.part.server.load_state(self.local_model, tensors, **positions)
        elif optimizer is not None:
            load_optimizer(self.local_model, optimizer, self.splits, tensors)

    def logical_tensors(self, optimizer: torch.optim.Optimizer | None) -> dict[str, Tensor]:
        """`model/NAME` and `optim/KEY/NAME`, whole, as a checkpoint holds them (a collective
        of the ranks that hold pieces of them)."""
        if self.part.server is not None:
            return self.part.server.logical_state(self.local_model)
        part = self.local_model
        return logical_model(part, self.splits) | logical_optimizer(part, optimizer, self.splits)

    def full_state(self) -> dict[str, Tensor]:
        """The whole model's final weights on every rank (a collective)."""
        if self.part.server is not None or self.part.client is not None:
            return self._served_state()
        state = full_state_dict(self.local_model, self.splits)
        stage = self.part.stage
        if stage is None:
            return state
        return gather_stages(state, self.whole, stage.owner, group=stage.group)

    def _served_state(self) -> dict[str, Tensor]:
        """A parameter server's final weights: a worker's model holds them already (server 0
        sent them); a server cuts them from the gathered flat vector."""
        model, server = self.local_model, self.part.server
        if server is not None:
            if any(p.is_meta for p in model.parameters()):  # a server without the whole model
                return named_views(server.final, list(model.named_parameters()))
            load_flat(model, server.final)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def reports(self) -> list:
        """What the layout shows before training starts (a pipeline's cut), as rich renderables."""
        stage = self.part.stage
        return [render_cut(stage.rows, self.dims, stage.cut_by)] if stage is not None else []

    def memory(self, optimizer: torch.optim.Optimizer | None = None) -> list[int]:
        """The bytes this rank holds of parameters, gradients and optimizer state."""
        return rank_bytes(self.local_model, optimizer)

    def summary(self) -> tuple[dict, list]:
        """The layout's own summary keys (a pipeline's cut and bubble, the units checkpointed) and the last step's
        timeline of a pipeline (a collective of the stages)."""
        stage = self.part.stage
        # activation checkpointing: the units of this rank's part (rank 0's, in the summary)
        own = {"checkpointed_units": self.part.checkpointed} if self.part.checkpointed else {}
        if isinstance(self.part.model, DistributedDataParallel):  # the buckets DDP made (parallel.bucket_mb)
            info = self.part.model._get_ddp_logging_data()  # rebuilt after the first step, in its order
            sizes = str(info.get("rebuilt_bucket_sizes" if info.get("has_rebuilt_buckets") else "bucket_sizes", ""))
            own["ddp_bucket_bytes"] = [int(x) for x in sizes.split(",") if x.strip()]
        if stage is None or self.runner is None:
            return own, []
        timeline = gather_events(self.runner.events, stage.group)
        pipeline = {"cut": stage.rows, "cut_by": stage.cut_by, **bubble_summary(timeline, self.dims)}
        return {"pipeline": pipeline, **own}, timeline


def apply_layout(
    model: nn.Module,
    mesh: RankMesh,
    *,
    in_shape: tuple[int, ...],
    features: list[np.ndarray] | None,
    example: Callable[[], Tensor],
    device: torch.device,
    faults: FaultPlan,
    server: ServerSettings,
    compression: CompressionSettings | None = None,
    deterministic: bool = False,
    checkpointing: str = "none",
) -> Layout:
    """This rank's layout: the strategies applied to `model` in the one order, and the
    runner of a step. `features`: the vertical split of the input (None without);
    `example()`: one micro-batch of this rank's data (the pipeline profiles on it);
    `deterministic` (train.deterministic): a pipeline is cut by its layers' sizes, not the clock;
    `checkpointing` (train.activation_checkpointing, resolved): none or layers."""
    dims = mesh.dims
    whole = {k: v.detach().to("meta") for k, v in model.state_dict().items()}
    part = Part(model)
    part = apply_pipeline(part, mesh, example=example(), by_size=deterministic) if dims.pp > 1 else part
    if features is not None:
        part = apply_vertical(part, mesh, features=features, in_shape=in_shape)
    part = apply_tensor_parallel(part, mesh)
    part = apply_spatial(part, mesh, in_shape=in_shape)
    part = apply_checkpointing(part, checkpointing)
    part = apply_data_parallel(part, mesh, device=device, compression=compression)
    part = apply_zero(part, mesh)
    part = apply_parameter_server(part, mesh, settings=server)
    return Layout(dims, part, _runner(part, mesh, device=device, faults=faults), whole)


def _runner(part: Part, mesh: RankMesh, *, device: torch.device, faults: FaultPlan) -> Runner | None:
    """How a step runs on the part: through the pipeline's schedule, or forward and
    backward per micro-batch on the whole (or split) model; a server runs none."""
    if part.server is not None:
        return None
    stage = part.stage
    if stage is None:
        return ModelRunner(part.model, dp_group=mesh.groups["dp"], faults=faults, band_sum=part.band_sum)
    return PipelineRunner(
        part.model,
        stage=stage,
        dp_group=mesh.groups["dp"],
        microbatches=mesh.dims.microbatches,
        schedule=mesh.dims.schedule,
        device=device,
        dtype=next(part.model.parameters()).dtype,
        compressor=part.compressor,
    )

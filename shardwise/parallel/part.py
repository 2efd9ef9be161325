"""The one contract every strategy keeps: `apply_<strategy>(part, mesh, *, ...) -> Part`.

A :class:`Part` is what this rank holds of the model while the strategies are
applied, in the order `layout.py` writes once. Each `apply_*` takes the part as
the strategies before it left it and returns it changed: the module this rank
runs (cut, with layers replaced, or wrapped), the parameters it holds in
pieces (`splits`), the groups whose ranks hold disjoint parameters (the
gradient norm adds up over them), and the facts a later strategy or the run
needs (the pipeline stage, the group ZeRO-1 shards the optimizer over, a
parameter server's role). A strategy that does not apply to the mesh (its
axis has size 1) returns the part as it came.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    import torch.distributed as dist

    from shardwise.comm.compress import Compressor
    from shardwise.parallel.param_server import ParameterServer
    from shardwise.parallel.pipeline import StageCut
    from shardwise.parallel.ps_protocol import WorkerClient
    from shardwise.parallel.splits import Split


@dataclass
class Part:
    model: nn.Module
    splits: dict[str, Split] = field(default_factory=dict)
    sum_groups: list[dist.ProcessGroup] = field(default_factory=list)
    stage: StageCut | None = None  # a pipeline stage: which one, and how the model was cut
    zero_group: dist.ProcessGroup | None = None  # ZeRO-1: the optimizer state is sharded over it
    server: ParameterServer | None = None  # a parameter server's server role
    client: WorkerClient | None = None  # a parameter server's worker role
    compressor: Compressor | None = None  # how the dp axis averages gradients, if compressed
    # spatial: the banded layers' parameters, whose gradients each rank holds its band's
    # share of, and the group they are summed over after the backward (a sum commutes
    # with the data-parallel average of each share)
    band_sum: tuple[dist.ProcessGroup, list[nn.Parameter]] | None = None
    checkpointed: int = 0  # activation checkpointing: the units whose forward the backward runs again

    def but(self, **changes) -> Part:
        """A copy with `changes` (the strategies return new parts, never edit the one given)."""
        return replace(self, **changes)

"""How ranks map to parallel axes: the one place that knows.

:class:`ParallelDims` is validated once from the config and the world size and
then passed explicitly; no module keeps global process groups. The launcher
calls :meth:`ParallelDims.resolve` before starting any worker (no torch
import), so a layout that does not fit the world size fails in a blink.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from shardwise.config import ParallelConfig
from shardwise.errors import ShardwiseError

if TYPE_CHECKING:
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of each parallel axis; their product is the world size."""

    dp: int
    world_size: int

    @classmethod
    def resolve(cls, cfg: ParallelConfig, world_size: int) -> ParallelDims:
        if world_size < 1:
            raise ShardwiseError("nproc", f"must be at least 1, got {world_size}")
        dp = world_size if cfg.dp is None else cfg.dp
        if dp < 1:
            raise ShardwiseError("parallel.dp", f"must be at least 1, got {dp}")
        if dp != world_size:
            raise ShardwiseError("parallel.dp", f"dp={dp} does not equal the world size {world_size} (--nproc)")
        return cls(dp=dp, world_size=world_size)

    @property
    def layout(self) -> str:
        """A short name of the layout, e.g. `dp=2`."""
        return f"dp={self.dp}"

    def build_mesh(self, device_type: str, group: dist.ProcessGroup | None = None) -> DeviceMesh:
        """A mesh over `group` (default: the world) with one named axis per parallel degree."""
        import torch.distributed as dist
        from torch.distributed.device_mesh import DeviceMesh

        group = group or dist.group.WORLD
        assert dist.get_world_size(group) == self.world_size, "group size differs from the resolved world"
        return DeviceMesh.from_group(group, device_type, mesh_dim_names=("dp",))

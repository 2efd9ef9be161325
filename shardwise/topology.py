"""How ranks map to parallel axes: the one place that knows.

:class:`ParallelDims` is validated once from the config and the world size and
then passed explicitly; no module keeps global process groups. The launcher
calls :meth:`ParallelDims.resolve` before starting any worker (no torch
import), so a layout that does not fit the world size fails in a blink.

Ranks are laid out on a grid of shape (dp, pp, spatial, vertical, tp), the last
axis varying fastest: tensor-parallel peers, which talk on every layer, get
neighbouring ranks (the same machine under torchrun's numbering), pipeline
neighbours exchange one activation per micro-batch, and data-parallel peers,
which talk once per step, are the farthest.

With a parameter server (parallel.mode=ps) the first `servers` ranks are the
servers and the grid holds the workers only: worker i is rank servers + i.
Colocated (parallel.colocate), every rank is both: worker i and server i are rank i.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING

from shardwise.config import ParallelConfig
from shardwise.errors import ShardwiseError

if TYPE_CHECKING:
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

AXES = ("dp", "pp", "spatial", "vertical", "tp")  # slowest to fastest varying


MULTI_STAGE = ("interleaved", "zero-bubble", "zbv")  # schedules of several stages a rank


def _pipeline_schedule(cfg: ParallelConfig) -> tuple[int, int]:
    """(micro-batches, stages a rank) of a pipeline's schedule, or one line saying why not."""
    microbatches = cfg.microbatches or 2 * cfg.pp
    if cfg.schedule == "1f1b" and microbatches < cfg.pp:
        raise ShardwiseError(
            "parallel.microbatches",
            f"1f1b needs at least one micro-batch per stage: {microbatches} < parallel.pp={cfg.pp} "
            "(use more micro-batches or parallel.schedule=gpipe)",
        )
    virtual = cfg.virtual_stages
    if cfg.schedule not in MULTI_STAGE:
        if virtual not in (None, 1):
            raise ShardwiseError(
                "parallel.virtual_stages",
                f"={virtual} with parallel.schedule={cfg.schedule}: one stage a rank; several need "
                "parallel.schedule=interleaved, zero-bubble or zbv",
            )
        return microbatches, 1
    virtual = 2 if virtual is None else virtual
    if cfg.schedule == "zbv" and virtual != 2:
        raise ShardwiseError("parallel.virtual_stages", f"={virtual}: zbv places exactly 2 stages on each rank")
    if virtual < 1:
        raise ShardwiseError("parallel.virtual_stages", f"must be at least 1, got {virtual}")
    rounds = max(1, microbatches // cfg.pp)  # torch's interleaved schedules go in rounds of about pp micro-batches
    if cfg.schedule != "zbv" and microbatches % rounds:
        raise ShardwiseError(
            "parallel.microbatches",
            f"={microbatches}: {cfg.schedule} takes the micro-batches in rounds of parallel.pp={cfg.pp}, so they must "
            f"be a multiple of {rounds} (e.g. {rounds * cfg.pp})",
        )
    if cfg.schedule == "zbv" and microbatches < cfg.pp:
        raise ShardwiseError(
            "parallel.microbatches",
            f"zbv needs at least one micro-batch per rank: {microbatches} < parallel.pp={cfg.pp}",
        )
    return microbatches, virtual


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of each parallel axis; their product is the world size."""

    dp: int
    world_size: int
    tp: int = 1
    vertical: int = 1
    pp: int = 1
    microbatches: int = 1
    spatial: int = 1
    servers: int = 0  # parameter-server ranks, before the grid of workers
    colocated: bool = False  # parameter server: every rank is a worker and a server (servers = dp = world)
    shard: str = "none"  # what data-parallel ranks shard: none, optimizer (ZeRO-1), full (FSDP2)
    schedule: str = "1f1b"  # the pipeline's schedule
    virtual: int = 1  # pipeline stages a rank holds (the model is cut into pp x virtual)
    bucket_bytes: int | None = None  # DDP's gradient buckets (parallel.bucket_mb); None: torch's own

    @classmethod
    def resolve(cls, cfg: ParallelConfig, world_size: int) -> ParallelDims:
        """The layout `cfg` asks for on `world_size` ranks, or one line saying why it cannot be."""
        if world_size < 1:
            raise ShardwiseError("nproc", f"must be at least 1, got {world_size}")
        if cfg.mode == "ps":
            return cls._resolve_ps(cfg, world_size)
        vertical = cfg.vertical
        for key, value in (("parallel.tp", cfg.tp), ("parallel.vertical", vertical)):
            if value < 1:
                raise ShardwiseError(key, f"must be at least 1, got {value}")
        if cfg.pp > 1 and (cfg.tp > 1 or vertical > 1):
            raise ShardwiseError(
                "parallel.pp",
                f"={cfg.pp} with parallel.tp={cfg.tp} / parallel.vertical={vertical}: pipeline stages compose "
                "with data parallelism only (so far)",
            )
        if cfg.spatial > 1 and (cfg.pp > 1 or cfg.tp > 1 or vertical > 1 or cfg.shard == "full"):
            raise ShardwiseError(
                "parallel.spatial",
                f"={cfg.spatial} composes with data parallelism (shard none or optimizer) only, so far",
            )
        if cfg.pp > 1 and cfg.shard == "full":
            raise ShardwiseError("parallel.shard", f"full with parallel.pp={cfg.pp}: not supported yet, use optimizer")
        model_ranks = cfg.tp * vertical * cfg.pp * cfg.spatial
        if cfg.dp is None:
            if world_size % model_ranks:
                key = next(
                    (k for k, v in (("parallel.pp", cfg.pp), ("parallel.spatial", cfg.spatial)) if v > 1),
                    "parallel.tp" if cfg.tp > 1 else "parallel.vertical",
                )
                raise ShardwiseError(
                    key,
                    f"parallel.pp={cfg.pp} x parallel.spatial={cfg.spatial} x parallel.tp={cfg.tp} x "
                    f"parallel.vertical={vertical} = {model_ranks} "
                    f"does not divide the world size {world_size} (--nproc)",
                )
            dp = world_size // model_ranks
        else:
            dp = cfg.dp
        if dp < 1:
            raise ShardwiseError("parallel.dp", f"must be at least 1, got {dp}")
        if dp * model_ranks != world_size:
            raise ShardwiseError(
                "parallel.dp",
                f"dp={dp} x pp={cfg.pp} x spatial={cfg.spatial} x tp={cfg.tp} x vertical={vertical} "
                f"= {dp * model_ranks} "
                f"does not equal the world size {world_size} (--nproc)",
            )
        microbatches, virtual = _pipeline_schedule(cfg) if cfg.pp > 1 else (1, 1)
        if cfg.bucket_mb is not None and not cfg.bucket_mb > 0:
            raise ShardwiseError("parallel.bucket_mb", f"must be > 0, got {cfg.bucket_mb}")
        return cls(
            dp=dp,
            world_size=world_size,
            tp=cfg.tp,
            vertical=vertical,
            pp=cfg.pp,
            microbatches=microbatches,
            spatial=cfg.spatial,
            shard=cfg.shard,
            schedule=cfg.schedule,
            virtual=virtual,
            bucket_bytes=None if cfg.bucket_mb is None else int(cfg.bucket_mb * 2**20),
        )

    @classmethod
    def _resolve_ps(cls, cfg: ParallelConfig, world_size: int) -> ParallelDims:
        vertical, servers = cfg.vertical, cfg.servers
        others = {"parallel.tp": cfg.tp, "parallel.pp": cfg.pp, "parallel.spatial": cfg.spatial}
        for key, value in {**others, "parallel.vertical": vertical}.items():
            if value > 1:
                raise ShardwiseError(key, f"={value} with parallel.mode=ps: a parameter server runs data parallel only")
        if cfg.shard != "none":
            raise ShardwiseError(
                "parallel.shard", f"={cfg.shard} with parallel.mode=ps: the servers already shard weights and optimizer"
            )
        if cfg.colocate:
            return cls._resolve_colocated(cfg, world_size)
        workers = world_size - servers
        if workers < 1:
            raise ShardwiseError(
                "parallel.servers", f"={servers} leaves no worker among {world_size} ranks (--nproc): use more ranks"
            )
        if cfg.dp is not None and cfg.dp != workers:
            raise ShardwiseError(
                "parallel.dp", f"={cfg.dp}, but {world_size} ranks - {servers} servers = {workers} workers (--nproc)"
            )
        return cls(dp=workers, world_size=world_size, servers=servers)

    @classmethod
    def _resolve_colocated(cls, cfg: ParallelConfig, world_size: int) -> ParallelDims:
        """Every rank a worker and the server of one slice."""
        if world_size < 2:
            raise ShardwiseError("parallel.colocate", f"=true needs at least 2 ranks (--nproc), got {world_size}")
        for key, value, default in (("parallel.servers", cfg.servers, 1), ("parallel.dp", cfg.dp, None)):
            if value not in (default, world_size):
                raise ShardwiseError(
                    key, f"={value} with parallel.colocate=true: every one of the {world_size} ranks is one"
                )
        return cls(dp=world_size, world_size=world_size, servers=world_size, colocated=True)

    @property
    def first_worker(self) -> int:
        """The rank (in the layout's group) of a parameter server's worker 0."""
        return 0 if self.colocated else self.servers

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, axis) for axis in AXES)

    @property
    def layout(self) -> str:
        """A short name of the layout, e.g. `dp=2` or `dp=2 x tp=2`."""
        if self.colocated:
            return f"ps: {self.servers} colocated servers and workers"
        if self.servers:
            return f"ps: {self.servers} server{'s' * (self.servers > 1)} x {self.dp} worker{'s' * (self.dp > 1)}"
        parts = [f"{axis}={getattr(self, axis)}" for axis in AXES if getattr(self, axis) > 1]
        return " x ".join(parts) or "dp=1"

    @property
    def replicated_gradients(self) -> bool:
        """Whether every rank holds the whole gradient, equal on all, once it is reduced:
        data parallelism alone, the parameters whole (`shard` none) or only the
        optimizer state sharded (ZeRO-1 steps its slice of the whole reduced gradient)."""
        return self.world_size == self.dp and not self.servers and self.shard != "full"

    def coords(self, index: int) -> dict[str, int]:
        """The coordinates of the `index`-th rank of the grid on each axis."""
        out: dict[str, int] = {}
        for axis, size in zip(reversed(AXES), reversed(self.shape), strict=True):
            index, out[axis] = divmod(index, size)
        return {axis: out[axis] for axis in AXES}

    def peers(self, index: int, axis: str) -> list[int]:
        """Grid indices of the ranks that share every coordinate with `index` except `axis`."""
        pos = AXES.index(axis)
        stride = math.prod(self.shape[pos + 1 :])
        first = index - self.coords(index)[axis] * stride
        return [first + k * stride for k in range(self.shape[pos])]


@dataclass
class RankMesh:
    """This rank's process group and coordinate on each axis of the layout, and the
    layout as one N-D torch DeviceMesh with named axes (what FSDP2 and DTensor take).

    Axes of size 1 have no group (None) and no mesh dimension; an axis that spans the
    whole layout reuses the parent group; the others get groups created here (every
    rank of the world creates every slice's group, in one order, as torch's
    init_device_mesh does) and released by :meth:`close`. The mesh is made from these
    groups, so a layout over some of the world's ranks (the Python API, the tests'
    pool) needs no call from the others.
    """

    dims: ParallelDims
    groups: dict[str, dist.ProcessGroup | None]
    coords: dict[str, int]
    _created: list = field(default_factory=list)
    parent: dist.ProcessGroup | None = None  # the group of the whole layout
    mesh: DeviceMesh | None = None  # the axes of size > 1; None where there are none
    mesh_names: dict[str, str] = field(default_factory=dict)  # axis -> its name in `mesh`

    @classmethod
    def build(
        cls,
        dims: ParallelDims,
        parent: dist.ProcessGroup | None = None,
        *,
        timeout: timedelta | None = None,
        device_type: str = "cpu",
    ) -> RankMesh:
        """`timeout`: how long a collective on the new groups may wait (default: torch's);
        `device_type`: what the mesh's tensors live on (cpu, cuda)."""
        import torch.distributed as dist

        parent = parent or dist.group.WORLD
        ranks = dist.get_process_group_ranks(parent)
        assert len(ranks) == dims.world_size, "group size differs from the resolved world"
        me = ranks.index(dist.get_rank())
        if dims.servers:
            return cls._build_ps(dims, parent, ranks, me, timeout)
        groups: dict[str, dist.ProcessGroup | None] = {}
        created = []
        for axis in AXES:  # every rank walks the axes and their slices in the same order
            size = getattr(dims, axis)
            if size == 1:
                groups[axis] = None
            elif size == dims.world_size:
                groups[axis] = parent
            else:
                # torch.distributed.new_group is a collective of the whole world: every
                # rank creates every slice's group, keeping the one it belongs to
                assert len(ranks) == dist.get_world_size(), "a layout with several axes needs the whole world"
                slices = sorted({tuple(dims.peers(i, axis)) for i in range(dims.world_size)})
                for members in slices:
                    pg = dist.new_group([ranks[i] for i in members], timeout=timeout, group_desc=axis)
                    created.append(pg)
                    if me in members:
                        groups[axis] = pg
        # where ranks hold different gradients, the per-step agreement on finite gradients
        # gets a group of its own where it can: a rank that skips it then waits in another
        # group's collective instead of feeding it mismatched data, and every rank times out
        # cleanly. Equal gradients need no agreement: every rank decides alike on its own.
        replicated = dims.replicated_gradients
        groups["agree"] = None if replicated else parent
        if not replicated and len(ranks) == dist.get_world_size() and len(ranks) > 1:
            groups["agree"] = dist.new_group(ranks, timeout=timeout, group_desc="agree")
            created.append(groups["agree"])
        out = cls(dims, groups, dims.coords(me), created, parent)
        out._make_mesh(ranks, device_type)
        return out

    def _make_mesh(self, ranks: list[int], device_type: str) -> None:
        """One DeviceMesh over the axes of size > 1, from their groups. Its axis names carry
        the groups' own names: torch compares meshes by ranks and names and caches what
        DTensor computed for a mesh, so a later job in the same process (the Python API,
        the tests) with equal ranks would otherwise find the cache holding groups already
        destroyed."""
        import torch
        from torch.distributed.device_mesh import DeviceMesh

        axes = [axis for axis in AXES if self.groups[axis] is not None]
        if not axes:
            return
        grid = torch.tensor(ranks, dtype=torch.int).view(*self.dims.shape)
        grid = grid.view(*[self.size(axis) for axis in axes])  # size-1 axes dropped
        tag = "+".join(self.groups[axis].group_name for axis in axes)
        self.mesh_names = {axis: f"{axis}@{tag}" for axis in axes}
        names = tuple(self.mesh_names[axis] for axis in axes)
        self.mesh = DeviceMesh.from_group([self.groups[a] for a in axes], device_type, mesh=grid, mesh_dim_names=names)
        for axis in axes:  # the sub-groups, as the mesh holds them
            self.groups[axis] = self.mesh.get_group(self.mesh_names[axis])

    @classmethod
    def _build_ps(cls, dims: ParallelDims, parent, ranks: list[int], me: int, timeout) -> RankMesh:
        """Servers and workers. Workers talk only to servers, point to point on the
        parent group; the servers, when several, get a group of their own (to add up
        the gradient norm and gather the weights). Colocated, the servers are the whole
        layout and take the parent group. Coordinates say which server or worker this
        rank is (-1: not one)."""
        import torch.distributed as dist

        groups: dict[str, dist.ProcessGroup | None] = {axis: None for axis in AXES}
        groups["servers"] = None
        created = []
        if dims.colocated:
            groups["servers"] = parent
            coords = {axis: 0 for axis in AXES} | {"server": me, "dp": me}
            return cls(dims, groups, coords, created, parent)
        if dims.servers > 1:
            assert len(ranks) == dist.get_world_size(), "several servers need the whole world"
            pg = dist.new_group(ranks[: dims.servers], timeout=timeout, group_desc="servers")
            created.append(pg)
            if me < dims.servers:
                groups["servers"] = pg
        coords = {axis: 0 for axis in AXES}
        coords["server"] = me if me < dims.servers else -1
        coords["dp"] = me - dims.servers if me >= dims.servers else -1
        return cls(dims, groups, coords, created, parent)

    @classmethod
    def single(cls, axis: str, group: dist.ProcessGroup | None) -> RankMesh:
        """A mesh of one axis over an existing group (None: size 1), creating no group:
        for applying one strategy alone (benchmarks, tests of one strategy)."""
        import torch.distributed as dist

        size = dist.get_world_size(group) if group is not None else 1
        dims = ParallelDims(world_size=size, **{"dp": 1, axis: size})
        groups: dict[str, dist.ProcessGroup | None] = {a: None for a in AXES}
        groups[axis] = group if size > 1 else None
        coords = {a: 0 for a in AXES}
        coords[axis] = dist.get_rank(group) if group is not None else 0
        return cls(dims, groups, coords, [], group)

    def size(self, axis: str) -> int:
        return getattr(self.dims, axis)

    def device_mesh(self, axis: str) -> DeviceMesh:
        """The layout's mesh cut to `axis` (a one-axis DeviceMesh, what FSDP2 takes)."""
        assert self.mesh is not None and axis in self.mesh_names, f"axis {axis} has size 1"
        return self.mesh[self.mesh_names[axis]]

    def close(self) -> None:
        import torch.distributed as dist

        for group in self._created:
            if group is not dist.GroupMember.NON_GROUP_MEMBER:
                dist.destroy_process_group(group)
        self._created.clear()

"""The parameter server as a layout: which ranks get a server, a worker's client, or both
(parallel/param_server.py has the protocol)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shardwise.errors import ShardwiseError
from shardwise.parallel import ps_protocol as proto
from shardwise.parallel.param_server import ParameterServer, ServerSettings
from shardwise.parallel.part import Part
from shardwise.parallel.ps_protocol import LocalEnd, WorkerClient

if TYPE_CHECKING:
    from shardwise.topology import RankMesh


def apply_parameter_server(part: Part, mesh: RankMesh, *, settings: ServerSettings) -> Part:
    """A worker gets the client that pushes its gradients and pulls fresh weights; a server
    gets its slice of the flat parameters and the optimizer for it. Only server 0 builds the
    whole model: it hands every other server its slice, so those build the model on the
    meta device, for names and shapes alone (server 0's goes there too once its slice is
    cut, holding weights only while it scores: train/ps_loop.py score_flat). Colocated,
    every rank gets both, holds the whole model as its worker and cuts its own slice."""
    dims = mesh.dims
    if not dims.servers:
        return part
    if any(True for _ in part.model.buffers()):
        raise ShardwiseError(
            "parallel.mode",
            "=ps: the model has buffers (running statistics), which the servers do not keep: use allreduce",
        )
    if mesh.coords["server"] < 0:
        client = WorkerClient(part.model, servers=dims.servers, group=mesh.parent, method=settings.push)
        return part.but(client=client)
    index = mesh.coords["server"]
    local = LocalEnd(index) if dims.colocated else None
    server = ParameterServer(
        part.model,
        initial=proto.initial_slice(part.model, mesh),
        index=index,
        servers=dims.servers,
        workers=dims.dp,
        group=mesh.parent,
        servers_group=mesh.groups["servers"],
        settings=settings,
        first_worker=dims.first_worker,
        local=local,
    )
    if local is None:
        return part.but(server=server)
    client = WorkerClient(part.model, servers=dims.servers, group=mesh.parent, method=settings.push, local=local)
    return part.but(server=server, client=client)

"""Each rank's own record of its point-to-point sends and receives: torch's flight recorder
keeps gloo's collectives but not its sends and receives in this torch, so a pipeline's
deadlock would leave the launcher nothing to read.

A ring of the last RING_SIZE calls: send or receive, the peer (global rank), the tag,
shape and dtype, and the call's number within its stream (the same direction, peer and
tag), which is how the launcher matches a receive with its send (hangs.py). The pipeline
schedules' sends and receives (torch.distributed.pipelining's `_batch_p2p`, which every
schedule of this torch calls) and shardwise's own are recorded; `install` is called once
a rank has its process group.
"""

from __future__ import annotations

import collections
import itertools

import torch
import torch.distributed as dist

RING_SIZE = 2000
RING: collections.deque = collections.deque(maxlen=RING_SIZE)
_latest: dict[tuple, dict] = {}  # each stream's last call (its count too), whatever the ring dropped
_order = itertools.count()


def record(op: str, peer: int, tag: int, tensor: torch.Tensor) -> None:
    """Note a send or receive (`op`) with global rank `peer` as it is posted."""
    key = (op, peer, tag)
    seq = _latest[key]["seq"] + 1 if key in _latest else 1
    entry = {"id": next(_order), "op": op, "peer": peer, "tag": tag, "seq": seq,
             "size": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}  # fmt: skip
    RING.append(entry)
    _latest[key] = entry


def _peer(p: dist.P2POp) -> int:
    return p.peer if p.peer is not None else dist.get_global_rank(p.group, p.group_peer)


def install() -> None:
    """Record the pipeline schedules' sends and receives from now on in this process."""
    from torch.distributed.pipelining import schedules

    inner = schedules._batch_p2p
    if getattr(inner, "shardwise_recorded", False):
        return

    def recorded(p2p_ops: list, desc: str | None = None):
        for p in p2p_ops:
            record("send" if p.op is dist.isend else "recv", _peer(p), p.tag, p.tensor)
        return inner(p2p_ops, desc)

    recorded.shardwise_recorded = True
    schedules._batch_p2p = recorded


def entries() -> list[dict]:
    """The last RING_SIZE calls, after the streams' last calls the ring has dropped (a quiet
    stream's): in the order they were posted, each stream's last call among them, which is what
    hangs.p2p_knot matches."""
    oldest = RING[0]["id"] if RING else 0
    dropped = sorted((e for e in _latest.values() if e["id"] < oldest), key=lambda e: e["id"])
    return dropped + list(RING)

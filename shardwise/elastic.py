"""Elastic jobs: `shardwise train --nproc MIN:MAX` goes on with fewer ranks when a host is
lost, and grows back when it returns.

A rank that fails is restarted as ever (`--max-restarts`), from the newest checkpoint. Before
the restart the launcher looks at the hosts the ranks ran on: where one is unreachable (on
the emulated cluster: its link is down) and does not come back within
`train.rejoin_timeout_s`, the job goes on without it, with the ranks the other hosts held (at
least MIN), resharding the checkpoint for the smaller world as any resume does. While it runs
smaller, the launcher looks every second for the lost hosts; once they are all back and the
job has written a checkpoint since it shrank, it stops the ranks and starts all MAX again
from that checkpoint (growing is not a failure: it takes none of `--max-restarts`).

Since the global batch does not depend on the number of data-parallel ranks and the data
order is a function of the seed and the step, the steps a smaller job takes are the steps
the full one would have taken: the run ends with the failure-free run's weights (to the
rounding of a sum taken in another order), no sample skipped or repeated.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from shardwise.checkpoint.manifest import latest_checkpoint
from shardwise.cluster.placement import Placement
from shardwise.errors import ShardwiseError
from shardwise.hangs import ranks_in_words

POLL_S = 0.5  # how often a lost host is looked at while the launcher waits for it
LOOK_S = 1.0  # how often, while the job runs smaller


@dataclass(frozen=True)
class Elastic:
    min_ranks: int
    max_ranks: int
    rejoin_timeout_s: float


def parse_nproc(text: str) -> tuple[int, int]:
    """`N` or `MIN:MAX`."""
    low, sep, high = str(text).partition(":")
    try:
        least, most = int(low), int(high if sep else low)
    except ValueError:
        raise ShardwiseError("nproc", f"{text!r}: expected a number of ranks, N, or MIN:MAX") from None
    if least < 1:
        raise ShardwiseError("nproc", f"must be at least 1, got {text}")
    if least > most:
        raise ShardwiseError("nproc", f"{text!r}: MIN is more than MAX")
    return least, most


def lost_hosts(placement: Placement) -> list[int]:
    """The hosts of `placement` that cannot be reached now (none on this machine alone)."""
    if placement.cluster is None:
        return []
    from shardwise.cluster.netns import link_up

    return [h for h in placement.used if not link_up(placement.cluster, h)]


def cut_off(placement: Placement, nproc: int) -> tuple[int, str] | None:
    """Where a job failed while a host's link is down: the first of its ranks, and in words
    that they were cut off and the others waited (None: every host is reachable)."""
    try:
        lost = lost_hosts(placement)
    except (OSError, ValueError, subprocess.SubprocessError):  # `ip` could not say: the failure as it was
        return None
    ranks = [r for r in range(nproc) if placement.host(r) in lost]
    if not ranks:
        return None
    c = placement.cluster
    hosts = ", ".join(f"{c.namespace(h)} ({c.address(h)})" for h in lost)
    others = [r for r in range(nproc) if r not in ranks]
    waited = f" and {ranks_in_words(others)} timed out waiting for it" if others else ""
    also = f" (with {ranks_in_words(ranks[1:])})" if len(ranks) > 1 else ""
    return ranks[0], f"was cut off{also}: the link of host {hosts} is down{waited}"


def shrink(placement: Placement, nproc: int, elastic: Elastic, fits) -> tuple[Placement, int, str]:
    """After a failure: where the job goes on, on how many ranks, and a note saying why.
    `fits(n)`: whether the layout and the batch can be cut for n ranks (the job goes on with
    the most ranks the hosts left can hold that fit)."""
    lost = lost_hosts(placement)
    deadline = time.monotonic() + elastic.rejoin_timeout_s
    while lost and time.monotonic() < deadline:
        time.sleep(POLL_S)
        lost = lost_hosts(placement)
    if not lost:
        return placement, nproc, ""
    kept = tuple(h for h in placement.used if h not in lost)
    left = sum(1 for r in range(nproc) if placement.host(r) not in lost)
    ranks = next((n for n in range(left, elastic.min_ranks - 1, -1) if fits(n)), 0)
    names = ", ".join(placement.cluster.hostname(h) for h in lost)
    if not ranks:
        raise ShardwiseError("nproc", f"{names} lost: no world of {elastic.min_ranks} to {left} rank(s), the most the "
                             "hosts left hold, fits the layout and the batch")  # fmt: skip
    kept = kept[:ranks]
    why = f" (of the {left} the hosts left hold: {left} do not fit the layout and batch)" if ranks < left else ""
    note = (f"{names} lost (unreachable for {elastic.rejoin_timeout_s:g} s): going on with {ranks} rank(s) on "
            f"{len(kept)} host(s){why}")  # fmt: skip
    return Placement(placement.cluster, kept), ranks, note


class Regrow:
    """Asked by the supervisor while the job runs smaller than it may: whether to stop it now
    to grow back (every host reachable again, and a checkpoint written since it shrank)."""

    def __init__(self, full: Placement, now: Placement, checkpoints: Path):
        self.full, self.smaller, self.checkpoints = full, now != full, checkpoints
        self.since, self.next_look = time.time(), time.monotonic() + LOOK_S

    def __call__(self) -> bool:
        if not self.smaller or time.monotonic() < self.next_look:
            return False
        self.next_look = time.monotonic() + LOOK_S
        return latest_checkpoint(self.checkpoints, since=self.since) is not None and not lost_hosts(self.full)

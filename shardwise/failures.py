"""What failed when a job's ranks fail together, and which rank caused it: each rank's own
record of its error (worker.py writes it), a rank that died without a word, and a rank that
stopped answering while the others timed out waiting for it. The launcher (launch.py) asks;
hangs.py then adds which collective the rings disagree on. Nothing here imports torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from shardwise import procs as contract
from shardwise.survivors import Survivors


@dataclass
class RankFailure:
    rank: int
    exit_code: int
    message: str = ""
    traceback: str = ""
    kind: str = ""  # the rank's record: usage, error, peer-lost or timed-out ("": it left none)
    step: int | None = None  # where the rank was, if it was in the loop
    phase: str | None = None
    survivors: Survivors | None = None  # the ranks kept alive to serve their state (survivors.py)

    @property
    def fallout(self) -> bool:
        """The rank failed because a peer vanished or stopped answering."""
        return self.kind in (contract.PEER_LOST, contract.TIMED_OUT)


def recorded_failure(rank: int, exit_code: int, path: Path) -> RankFailure:
    """What a failed rank recorded in its error file (worker.py: torchelastic's format,
    our record beside it); a rank that died without a word recorded nothing."""
    try:
        data = json.loads(path.read_text())
        record, callstack = data["shardwise"], data["message"]["extraInfo"]["py_callstack"]
    except (OSError, ValueError, KeyError, TypeError):
        return RankFailure(rank, exit_code)
    return RankFailure(
        rank, exit_code, record["message"], callstack, record["kind"], record.get("step"), record.get("phase")
    )


def cause_of(failures: list[RankFailure]) -> RankFailure:
    """Of ranks seen failing together, the one that caused it: a rank with its own
    error first, then a rank that died without a word (killed, crashed, exited),
    and only then a rank that merely lost its peers or timed out waiting for them."""

    def rank_of(f: RankFailure) -> int:
        if f.kind and not f.fallout:
            return 0
        return 1 if not f.kind else 2

    origin = min(failures, key=rank_of)
    if not origin.message:
        origin.message = f"exited with status {origin.exit_code}"
    return origin


STALLED = -1000  # RankFailure.exit_code of a rank that stopped answering (it did not exit)
REGROW = -1001  # ... of an elastic job stopped to grow back onto hosts that returned


def stalled_rank(procs: list, failures: list[RankFailure]) -> RankFailure | None:
    """The rank that stopped answering, when every failure is a timeout or a lost peer.

    A rank still alive while the others gave up (stopped, or stuck) is the one; if
    every rank exited, the one whose position differs from the others' (it skipped
    a collective and ran ahead)."""
    if not failures or not all(f.fallout for f in failures):
        return None
    where = [f for f in failures if f.step is not None]
    detail = f" in {where[0].phase} of step {where[0].step}" if where else ""
    names = [str(f.rank) for f in failures]
    waited = f"rank {names[0]}" if len(names) == 1 else f"ranks {', '.join(names[:-1])} and {names[-1]}"
    failed = {f.rank for f in failures}  # those alive among them hold their state (survivors.py)
    alive = [r for r, p in enumerate(procs) if p.poll() is None and r not in failed]
    stopped = [r for r in alive if contract.process_state(procs[r].pid) == "T"]
    if stopped or alive:
        how = "its process is stopped" if stopped else "it never reached the collective"
        message = f"stopped answering ({how}): {waited} timed out waiting for it{detail}"
        return RankFailure((stopped or alive)[0], STALLED, message, "")
    positions = {f.rank: (f.step, f.phase) for f in where}
    if len(set(positions.values())) > 1:
        counts: dict = {}
        for pos in positions.values():
            counts[pos] = counts.get(pos, 0) + 1
        odd = [r for r, pos in positions.items() if counts[pos] == 1]
        culprit = max(odd, key=lambda r: positions[r][0])  # on a tie, the one that ran ahead
        others = sorted({pos for r, pos in positions.items() if r != culprit})
        step, phase = others[0]
        message = (
            "skipped a collective or called it out of order: "
            f"it was at step {positions[culprit][0]} ({positions[culprit][1]}) "
            f"while the others waited in {phase} of step {step}"
        )
        return RankFailure(culprit, STALLED, message, "")
    return None

"""The launcher's side of recovery from the survivors' memory (peer_state.py is the ranks').

With `train.recovery = "peer"` and restarts to come, a rank that loses a peer records its
error and holds: it stays alive, serving its state. The launcher counts a rank that holds as
failed even while its process lives (`held`), keeps the ranks that announced a
state server (`Survivors`), hands their addresses to the ranks it starts next, and stops them
once every new rank has taken the state (or the start ends). Nothing here imports torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from shardwise import procs as contract
from shardwise.files import write_atomic
from shardwise.hangs import ranks_in_words


def announced(error_file: Path) -> Path:
    return Path(str(error_file) + contract.PEER_SUFFIX)


def announce(path: Path, host: str, port: int) -> None:
    """A rank says where it serves its state (peer_state.py), in `announced(its error file)`."""
    write_atomic(path, json.dumps({"addr": host, "port": port}))


def endpoint_of(path: Path) -> str | None:
    """The `addr:port` a rank announced in `path`, or None."""
    try:
        record = json.loads(path.read_text())
        return f"{record['addr']}:{int(record['port'])}"
    except (OSError, ValueError, KeyError, TypeError):
        return None


def held(procs: list, error_files: list[Path]) -> set[int]:
    """The ranks alive that lost a peer and hold their state, their error and ring recorded."""
    return {
        r for r, p in enumerate(procs) if p.poll() is None and Path(f"{error_files[r]}{contract.HELD_SUFFIX}").exists()
    }


def could_serve(procs: list, error_files: list[Path]) -> set[int]:
    """The ranks running (not stopped) that announced a state server."""
    return {
        r
        for r, p in enumerate(procs)
        if p.poll() is None and announced(error_files[r]).exists() and contract.process_state(p.pid) != "T"
    }


@dataclass
class Survivors:
    """Ranks of a start that failed, still alive and serving their state: rank -> process,
    its `addr:port`, its host; and the secret of that start."""

    procs: dict[int, object] = field(default_factory=dict)
    endpoints: dict[int, str] = field(default_factory=dict)
    hosts: dict[int, int] = field(default_factory=dict)
    secret: str = ""

    @classmethod
    def keep(cls, procs: list, error_files: list[Path], placement, secret: str, culprit: int) -> Survivors:
        """The ranks to keep alive: running (not stopped), announced, not the failure's culprit
        as finally named (hangs.py may name another rank than the first to fail)."""
        kept = cls(secret=secret)
        for r in sorted(could_serve(procs, error_files) - {culprit}):
            endpoint = endpoint_of(announced(error_files[r]))
            if endpoint:
                kept.procs[r], kept.endpoints[r], kept.hosts[r] = procs[r], endpoint, placement.host(r)
        return kept

    def on(self, placement) -> Survivors:
        """Those on hosts `placement` uses (the others are stopped: nobody can reach them)."""
        used = set(placement.used)
        gone = [r for r in self.procs if self.hosts[r] not in used]
        contract.stop_ranks([self.procs.pop(r) for r in gone])
        for r in gone:
            self.endpoints.pop(r), self.hosts.pop(r)
        return self

    def words(self) -> str:
        return f"the memory of {ranks_in_words(sorted(self.procs))}" if self.procs else ""

    def env(self) -> dict[str, str]:
        if not self.procs:
            return {}
        return {
            contract.SURVIVORS_ENV: ",".join(self.endpoints[r] for r in sorted(self.endpoints)),
            contract.SURVIVORS_SECRET_ENV: self.secret,
        }

    def taken(self, error_files: list[Path]) -> bool:
        """Whether every rank of the new start has taken its state and serves its own."""
        return all(announced(f).exists() for f in error_files)

    def stop(self) -> None:
        contract.stop_ranks(list(self.procs.values()))
        self.procs.clear()

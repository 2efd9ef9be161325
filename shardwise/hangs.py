"""What a stuck job's ranks were doing: torch's flight recorder (TORCH_FR_BUFFER_SIZE, which
covers gloo and NCCL in this torch) keeps each rank's last collectives (process group,
sequence number, operation, sizes, dtypes); a rank that fails dumps its ring beside its
error record (worker.py), as does a rank that gloo aborts in C++ (a peer's message of another
size than its own call's), and the launcher compares the rings.

The first disagreement, per process group in sequence order, names the culprit: the ranks
that called one thing against the others, or the ranks that never called what the others
did. E.g. "rank 1 called all_reduce #57 on group 2 (4096 float32) while ranks 0 and 2
called all_gather #57". The rings go to OUT/logs/rankR-collectives.json. Torch-free: the
launcher reads JSON.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
from pathlib import Path

RING_SIZE = "2000"  # collectives each rank's flight recorder keeps
DUMP_SUFFIX = ".collectives.json"  # beside a rank's error file
DTYPES = {"Float": "float32", "Double": "float64", "Half": "float16", "BFloat16": "bfloat16", "Long": "int64",
          "Int": "int32", "Byte": "uint8", "Bool": "bool"}  # fmt: skip


def _call(entry: dict) -> str:
    op = str(entry.get("profiling_name", "?")).split(":")[-1]
    sizes = " ".join("x".join(str(d) for d in s) or "scalar" for s in entry.get("input_sizes") or [])
    dtypes = ",".join(sorted({DTYPES.get(d, str(d).lower()) for d in entry.get("input_dtypes") or []}))
    return f"{op}|{sizes} {dtypes}".strip()


def ranks_in_words(ranks: list[int]) -> str:
    names = [str(r) for r in sorted(ranks)]
    return f"rank {names[0]}" if len(names) == 1 else f"ranks {', '.join(names[:-1])} and {names[-1]}"


def _group(name: str, desc: str) -> str:
    """A process group in words: shardwise names its groups by axis (topology.py)."""
    if desc == "default_pg":
        return "the default group"
    return f"the {desc} group" if desc and desc != "undefined" else f"group {name}"


@dataclasses.dataclass
class _Odd:
    """A group's first disagreement: the fewest ranks' call there ("" where they made none)
    and the others' calls."""

    seq: int
    group: str
    call: str
    ranks: list[int]
    others: list[tuple[str, list[int]]]
    by_rank: dict[int, dict[int, str]]

    @property
    def extra(self) -> bool:
        """The odd ranks made a call the others never made."""
        return self.call != "" and all(call == "" for call, _ in self.others)


def _odd_calls(dumps: dict[int, dict]) -> list[_Odd]:
    calls: dict[str, dict[int, dict[int, str]]] = {}
    names: dict[str, str] = {}
    for rank, dump in dumps.items():
        for entry in dump.get("entries", []):
            if entry.get("is_p2p"):
                continue
            name, desc = (entry.get("process_group") or ["?", ""])[:2]
            calls.setdefault(name, {}).setdefault(rank, {})[int(entry["collective_seq_id"])] = _call(entry)
            names[name] = desc
    found = []
    for name, by_rank in calls.items():
        if len(by_rank) < 2:
            continue
        start = max(min(seqs) for seqs in by_rank.values())  # older entries may have left a ring
        end = max(max(seqs) for seqs in by_rank.values())
        for seq in range(start, end + 1):
            what: dict[str, list[int]] = {}
            for rank, seqs in by_rank.items():
                what.setdefault(seqs.get(seq, ""), []).append(rank)
            if len(what) > 1:
                call, ranks = min(what.items(), key=lambda kv: (len(kv[1]), kv[0] == ""))  # the fewest ranks
                others = [(c, r) for c, r in what.items() if c != call]
                found.append(_Odd(seq, _group(name, names[name]), call, ranks, others, by_rank))
                break
    return found


def first_disagreement(dumps: dict[int, dict]) -> tuple[list[int], str] | None:
    """The first collective the ranks' rings disagree on: the ranks that did the odd thing,
    and it in words (None: they agree, or fewer than two rings share a group). Where the
    ranks that never made one group's call made another group's that the others never made,
    both are said: they skipped the first, or called the two in another order."""
    found = _odd_calls(dumps)
    if not found:
        return None
    for odd in found:
        instead = [e for e in found if e.extra and set(e.ranks) == set(odd.ranks) and e.group != odd.group]
        if odd.call == "" and instead:
            (other_call, other_ranks), extra = odd.others[0], instead[0]
            op, _, shape = other_call.partition("|")
            made, _, made_shape = extra.call.partition("|")
            who, them = ranks_in_words(odd.ranks), ranks_in_words(other_ranks)
            return odd.ranks, f"{who} never called {op} #{odd.seq} on {odd.group} ({shape}), which {them} " \
                f"called; {'it' if len(odd.ranks) == 1 else 'they'} called {made} #{extra.seq} on {extra.group} " \
                f"({made_shape}) instead"  # fmt: skip
    odd = min(found, key=lambda f: f.seq)
    seq, call, ranks, where = odd.seq, odd.call, odd.ranks, odd.group
    if call == "":
        earlier = [s for r in ranks for s in odd.by_rank[r] if s < seq]
        before = f" (its last there: #{max(earlier)})" if earlier else ""
        other_call, other_ranks = odd.others[0]
        op, _, shape = other_call.partition("|")
        who, them = ranks_in_words(ranks), ranks_in_words(other_ranks)
        return ranks, f"{who} never called #{seq} on {where}{before} while {them} called {op} #{seq} ({shape})"
    op, _, shape = call.partition("|")
    said = []
    for other_call, other_ranks in odd.others:
        if other_call == "":
            said.append(f"{ranks_in_words(other_ranks)} never called it")
        else:
            other_op, _, other_shape = other_call.partition("|")
            said.append(f"{ranks_in_words(other_ranks)} called {other_op} #{seq} ({other_shape})")
    return ranks, f"{ranks_in_words(ranks)} called {op} #{seq} on {where} ({shape}) while {'; '.join(said)}"


def _p2p(entry: dict) -> str:
    shape = "x".join(str(d) for d in entry.get("size") or []) or "scalar"
    return f"#{entry['seq']} (tag {entry['tag']}, {shape} {entry.get('dtype', '?')})"


def _waiter(w: tuple) -> tuple:
    """Receives on streams never sent on first, then the other receives, then sends; by rank."""
    op, src, dst, _tag, _entry, other = w
    return other is not None, op != "recv", dst if op == "recv" else src


def p2p_knot(dumps: dict[int, dict]) -> tuple[list[int], str] | None:
    """Sends and receives that were posted and never met (each rank's own record, p2p_ring.py):
    a receive whose sender never posted it, and the send that waits on its receiver meanwhile.
    The culprit is the rank waiting on a stream its sender never used (another tag or peer
    than the schedule's), else every rank waiting to receive. None: every send met its receive."""
    posted: dict[tuple, dict] = {}  # (op, src, dst, tag) -> the latest entry of that stream
    for rank, dump in dumps.items():
        for entry in dump.get("shardwise_p2p", []):
            src, dst = (rank, entry["peer"]) if entry["op"] == "send" else (entry["peer"], rank)
            posted[(entry["op"], src, dst, entry["tag"])] = entry
    if not posted:
        return None
    # a stream is matched up to the smaller of its two sides' counts; what lies beyond waits.
    # Only streams both of whose ends left a record: a rank that stopped, straggled or was
    # killed left none, and a receive waiting on it is its fallout, not a deadlock
    waiting = []
    for (op, src, dst, tag), entry in posted.items():
        if src not in dumps or dst not in dumps:
            continue
        other = posted.get(("recv" if op == "send" else "send", src, dst, tag))
        if entry["seq"] > (other["seq"] if other else 0):
            waiting.append((op, src, dst, tag, entry, other))
    receives = [w for w in waiting if w[0] == "recv"]
    if not receives:
        return None
    never = [w for w in receives if w[5] is None]  # on a stream its sender never used: the odd call
    culprits = sorted({dst for _, _, dst, *_ in never or receives})
    said = []
    for op, src, dst, _tag, entry, other in sorted(waiting, key=_waiter):
        if op == "recv":
            never = "never sent on that tag" if other is None else f"sent only to #{other['seq']} there"
            said.append(f"rank {dst} waits to receive {_p2p(entry)} from rank {src}, which rank {src} {never}")
        else:
            said.append(f"rank {src}'s send {_p2p(entry)} to rank {dst} waits for rank {dst} to receive it")
    return culprits, "; ".join(said)


def explain(failure, err_dir: Path, out: Path | None, *, stalled: int):
    """`failure` (launch.RankFailure) with the rings' first disagreement added to its message
    (or in its place, naming the rank the rings name, where that is another), and the rings
    copied to OUT/logs; as it was where no rings were dumped, or where a rank failed by an
    error of its own or died (its ring then only shows it left). `stalled`: the exit code
    of a rank that did not fail by itself."""
    if failure is None:
        return None
    dumps: dict[int, dict] = {}
    paths = {int(p.name.removeprefix("rank").split(".")[0]): p for p in err_dir.glob(f"rank*.json{DUMP_SUFFIX}")}
    for rank, path in sorted(paths.items()):
        try:
            dumps[rank] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    if out is not None and dumps:
        (out / "logs").mkdir(parents=True, exist_ok=True)
        for rank in dumps:
            shutil.copyfile(err_dir / f"rank{rank}.json{DUMP_SUFFIX}", out / "logs" / f"rank{rank}-collectives.json")
    # gloo aborted the rank in C++ (another size than it expected), its ring dumped on the way
    aborted = failure.exit_code == -signal.SIGABRT and not failure.kind and failure.rank in dumps
    if failure.exit_code != stalled and not failure.fallout and not aborted:  # a rank's own error: said already
        return failure
    found = first_disagreement(dumps)
    # a rank the launcher found stopped or late is named already: the others' waits are its fallout
    knot = p2p_knot(dumps) if found is None and failure.exit_code != stalled else None
    if knot is not None:  # the collectives agree; sends and receives did not meet
        said = f"deadlocked on point-to-point messages: {knot[1]}"
        return dataclasses.replace(failure, rank=knot[0][0], exit_code=stalled, message=said, traceback="")
    if found is None:
        return failure
    culprits, line = found
    if aborted:  # a death the rings explain: gloo ends a rank whose peer sent another size than it expected
        died = "" if failure.rank in culprits else f"; rank {failure.rank} died of it (exit {failure.exit_code})"
        said = f"disagrees with the others' collectives: {line}{died}"
        return dataclasses.replace(failure, rank=culprits[0], exit_code=stalled, message=said, traceback="")
    if failure.rank in culprits and " never called " in line:  # a skipped collective: the launcher's
        return dataclasses.replace(failure, message=f"{failure.message}; the first disagreement: {line}")  # too
    # another call where the others made theirs (another shape, type or operation), or another rank
    said = f"disagrees with the others' collectives: {line}"
    return dataclasses.replace(failure, rank=culprits[0], exit_code=stalled, message=said, traceback="")

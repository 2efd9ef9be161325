"""What a stuck job's ranks were doing: torch's flight recorder (TORCH_FR_BUFFER_SIZE, which
covers gloo and NCCL in this torch) keeps each rank's last collectives (process group,
sequence number, operation, sizes, dtypes); a rank that fails dumps its ring beside its
error record (worker.py), and the launcher compares the rings.

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


def _ranks(ranks: list[int]) -> str:
    names = [str(r) for r in sorted(ranks)]
    return f"rank {names[0]}" if len(names) == 1 else f"ranks {', '.join(names[:-1])} and {names[-1]}"


def _group(name: str, desc: str) -> str:
    """A process group in words: shardwise names its groups by axis (topology.py)."""
    if desc == "default_pg":
        return "the default group"
    return f"the {desc} group" if desc and desc != "undefined" else f"group {name}"


def first_disagreement(dumps: dict[int, dict]) -> tuple[list[int], str] | None:
    """The first collective the ranks' rings disagree on: the ranks that did the odd thing,
    and it in words (None: they agree, or fewer than two rings share a group)."""
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
                found.append((seq, name, what, by_rank))
                break
    if not found:
        return None
    seq, name, what, by_rank = min(found, key=lambda f: f[0])
    odd = min(what.items(), key=lambda kv: (len(kv[1]), kv[0] == ""))  # the fewest ranks did it
    others = [(call, ranks) for call, ranks in what.items() if call != odd[0]]
    call, ranks = odd
    where = _group(name, names[name])
    if call == "":
        last = max(s for r in ranks for s in by_rank[r] if s < seq) if any(
            s < seq for r in ranks for s in by_rank[r]) else None  # fmt: skip
        before = f" (its last there: #{last})" if last is not None else ""
        other_call, other_ranks = others[0]
        op, _, shape = other_call.partition("|")
        return ranks, f"{_ranks(ranks)} never called #{seq} on {where}{before} while {_ranks(other_ranks)} " \
                      f"called {op} #{seq} ({shape})"  # fmt: skip
    op, _, shape = call.partition("|")
    said = []
    for other_call, other_ranks in others:
        if other_call == "":
            said.append(f"{_ranks(other_ranks)} never called it")
        else:
            other_op, _, other_shape = other_call.partition("|")
            said.append(f"{_ranks(other_ranks)} called {other_op} #{seq} ({other_shape})")
    return ranks, f"{_ranks(ranks)} called {op} #{seq} on {where} ({shape}) while {'; '.join(said)}"


def explain(failure, err_dir: Path, out: Path | None, *, stalled: int):
    """`failure` (launch.RankFailure) with the rings' first disagreement added to its message
    (or in its place, naming the rank the rings name, where that is another), and the rings
    copied to OUT/logs; as it was where no rings were dumped, or where a rank failed by an
    error of its own or died (its ring then only shows it left). `stalled`: the exit code
    of a rank that did not fail by itself."""
    if failure is None:
        return None
    dumps: dict[int, dict] = {}
    for path in sorted(err_dir.glob(f"rank*.json{DUMP_SUFFIX}")):
        try:
            dumps[int(path.name.removeprefix("rank").split(".")[0])] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    if out is not None and dumps:
        (out / "logs").mkdir(parents=True, exist_ok=True)
        for rank in dumps:
            shutil.copyfile(err_dir / f"rank{rank}.json{DUMP_SUFFIX}", out / "logs" / f"rank{rank}-collectives.json")
    if failure.exit_code != stalled and not failure.fallout:  # a rank's own error, or a death: said already
        return failure
    found = first_disagreement(dumps)
    if found is None:
        return failure
    culprits, line = found
    if failure.rank in culprits and " never called " in line:  # a skipped collective: the launcher's
        return dataclasses.replace(failure, message=f"{failure.message}; the first disagreement: {line}")  # too
    # another call where the others made theirs (another shape, type or operation), or another rank
    said = f"disagrees with the others' collectives: {line}"
    return dataclasses.replace(failure, rank=culprits[0], exit_code=stalled, message=said, traceback="")

"""The launcher's reading of the ranks' flight-recorder rings (the format torch's
`_dump_fr_trace_json` writes), on rings made by hand; tests/test_recovery.py reads real ones."""

from __future__ import annotations

from shardwise.hangs import first_disagreement


def _entry(seq, op, size, dtype="Float", group=("3", "dp")):
    return {"collective_seq_id": seq, "profiling_name": f"gloo:{op}", "input_sizes": [[size]],
            "input_dtypes": [dtype], "process_group": list(group), "is_p2p": False}  # fmt: skip


def test_agreeing_rings_name_nothing_and_a_dropped_start_is_not_a_disagreement():
    rings = {r: {"entries": [_entry(s, "all_reduce", 8) for s in range(first, 9)]} for r, first in ((0, 1), (1, 4))}
    assert first_disagreement(rings) is None


def test_another_dtype_is_named_with_both_calls():
    rings = {0: {"entries": [_entry(1, "all_reduce", 8), _entry(2, "all_gather", 4)]},
             1: {"entries": [_entry(1, "all_reduce", 8), _entry(2, "all_gather", 4, "Double")]},
             2: {"entries": [_entry(1, "all_reduce", 8), _entry(2, "all_gather", 4)]}}  # fmt: skip
    ranks, said = first_disagreement(rings)
    assert ranks == [1]
    assert said == "rank 1 called all_gather #2 on the dp group (4 float64) while ranks 0 and 2 called all_gather #2 " \
                   "(4 float32)"  # fmt: skip


def test_the_earliest_disagreement_over_groups_is_named():
    world = ("0", "default_pg")
    rings = {0: {"entries": [_entry(1, "broadcast", 2, group=world), _entry(5, "all_reduce", 8)]},
             1: {"entries": [_entry(1, "all_reduce", 2, group=world), _entry(5, "all_reduce", 9)]}}  # fmt: skip
    ranks, said = first_disagreement(rings)
    assert said.startswith("rank 0 called broadcast #1 on the default group (2 float32) while rank 1 called all_reduce")

"""The launcher's reading of the ranks' flight-recorder rings (the format torch's
`_dump_fr_trace_json` writes), on rings made by hand; tests/test_recovery.py reads real ones."""

from __future__ import annotations

from shardwise.hangs import first_disagreement, p2p_knot


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


def test_a_call_never_made_on_one_group_and_made_on_another_are_named_together():
    """A skipped collective, or two in another order: rank 1 went on to the default group's
    call while the others wait on the agree group's."""
    world, agree = ("0", "default_pg"), ("1", "agree")
    step = [_entry(1, "all_reduce", 4, group=world), _entry(1, "all_reduce", 1, group=agree)]
    rings = {r: {"entries": [*step, _entry(2, "all_reduce", 1, group=agree)]} for r in (0, 2)}
    rings[1] = {"entries": [*step, _entry(2, "all_reduce", 1, "Double", world)]}
    ranks, said = first_disagreement(rings)
    assert ranks == [1]
    assert said == "rank 1 never called all_reduce #2 on the agree group (1 float32), which ranks 0 and 2 called; " \
                   "it called all_reduce #2 on the default group (1 float64) instead"  # fmt: skip


def _p2p(op, peer, seq, tag=0, size=(8, 4)):
    return {"op": op, "peer": peer, "tag": tag, "seq": seq, "size": list(size), "dtype": "float32"}


def test_sends_and_receives_that_met_name_nothing():
    rings = {0: {"shardwise_p2p": [_p2p("send", 1, n) for n in (1, 2)]},
             1: {"shardwise_p2p": [_p2p("recv", 0, n) for n in (1, 2)]}}  # fmt: skip
    assert p2p_knot(rings) is None
    rings[0]["shardwise_p2p"].append(_p2p("send", 1, 3))  # posted, not yet received: no receive waits
    assert p2p_knot(rings) is None


def test_a_receive_on_a_stream_never_sent_on_is_the_culprit():
    rings = {
        0: {"shardwise_p2p": [_p2p("send", 1, n) for n in (1, 2, 3)]},
        1: {"shardwise_p2p": [_p2p("recv", 0, n) for n in (1, 2)] + [_p2p("recv", 0, 1, tag=77, size=(1,))]},
    }
    ranks, said = p2p_knot(rings)
    assert ranks == [1]
    assert said == "rank 1 waits to receive #1 (tag 77, 1 float32) from rank 0, which rank 0 never sent on that " \
                   "tag; rank 0's send #3 (tag 0, 8x4 float32) to rank 1 waits for rank 1 to receive it"  # fmt: skip


def test_two_stages_each_waiting_to_receive_from_the_other_are_both_named():
    rings = {0: {"shardwise_p2p": [_p2p("send", 1, 1), _p2p("recv", 1, 2)]},
             1: {"shardwise_p2p": [_p2p("recv", 0, 1), _p2p("send", 0, 1), _p2p("recv", 0, 2)]}}  # fmt: skip
    ranks, said = p2p_knot(rings)
    assert ranks == [0, 1]
    assert said.startswith("rank 0 waits to receive #2 (tag 0, 8x4 float32) from rank 1, which rank 1 sent only to #1")


def test_a_receive_from_a_rank_that_left_no_record_is_its_fallout_not_a_deadlock():
    """Rank 2 was stopped or killed and dumped nothing: rank 1's receive from it waits on a
    stream with no sender on record, which says nothing of a deadlock."""
    rings = {0: {"shardwise_p2p": [_p2p("send", 1, n) for n in (1, 2)]},
             1: {"shardwise_p2p": [_p2p("recv", 0, n) for n in (1, 2)] + [_p2p("recv", 2, 1)]}}  # fmt: skip
    assert p2p_knot(rings) is None
    rings[2] = {"shardwise_p2p": []}  # with its record: it never sent
    assert p2p_knot(rings)[0] == [1]


def test_a_quiet_streams_last_call_outlives_the_ring(monkeypatch):
    """The ring keeps the last RING_SIZE calls; a stream quiet since keeps its last call (and
    its count) in the dump, first, so its receive can still be matched."""
    import collections

    import torch

    from shardwise import p2p_ring

    monkeypatch.setattr(p2p_ring, "RING", collections.deque(maxlen=3))
    monkeypatch.setattr(p2p_ring, "_latest", {})
    for _ in range(2):
        p2p_ring.record("recv", 2, 0, torch.empty(1))
    for _ in range(5):
        p2p_ring.record("send", 1, 0, torch.empty(4, 8))
    dumped = p2p_ring.entries()
    assert [(e["op"], e["peer"], e["seq"]) for e in dumped] == [("recv", 2, 2), ("send", 1, 3), ("send", 1, 4),
                                                                ("send", 1, 5)]  # fmt: skip
    assert dumped[-1]["size"] == [4, 8] and dumped[-1]["dtype"] == "float32"

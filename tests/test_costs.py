"""The communication cost formulas, against cases computed by hand."""

from __future__ import annotations

import pytest

from shardwise.comm.cost import Link, all_gather, all_reduce, bytes_sent_all_reduce, reduce_scatter

GBIT = Link.from_rate(1e9, alpha_s=50e-6)  # 1 Gbit/s, 50 us a message


def test_one_message_is_latency_plus_bytes_over_the_rate():
    assert GBIT.beta_s_per_byte == pytest.approx(8e-9)
    assert GBIT.send(1_000_000) == pytest.approx(50e-6 + 8e-3)  # 1 MB at 1 Gbit/s: 8 ms


def test_ring_collectives_by_hand():
    n = 4_000_000  # bytes
    # 4 ranks: 3 steps of 1 MB each, for each phase
    assert reduce_scatter(GBIT, 4, n) == pytest.approx(3 * (50e-6 + 8e-3))
    assert all_gather(GBIT, 4, n) == pytest.approx(3 * (50e-6 + 8e-3))
    assert all_reduce(GBIT, 4, n) == pytest.approx(6 * (50e-6 + 8e-3))
    # 2 ranks, no latency: each sends half the message twice, the whole message in all
    assert all_reduce(Link.from_rate(1e9), 2, n) == pytest.approx(n * 8 / 1e9)
    assert bytes_sent_all_reduce(4, n) == pytest.approx(6e6) and bytes_sent_all_reduce(1, n) == 0.0


def test_one_rank_communicates_nothing():
    assert all_reduce(GBIT, 1, 10**9) == reduce_scatter(GBIT, 1, 10**9) == 0.0

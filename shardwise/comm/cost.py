"""What communication costs, by the alpha-beta model: a message of n bytes over a link
takes alpha + n x beta seconds (alpha: the latency of a message, beta: seconds per byte,
8 / the link's rate in bits). `shardwise cluster probe` fits both from ping-pong times.

Collectives are costed by the algorithms gloo and NCCL run for large messages, the ring:
each of n ranks sends its neighbour n - 1 pieces of n_bytes / n per phase, and an
all-reduce is a reduce-scatter phase then an all-gather phase, so every rank sends
2 (n - 1) / n of the message in 2 (n - 1) steps. These are the formulas the planner's
cost model (issue 17) builds every layout's communication from; the emulated cluster's
test checks the all-reduce against a measured one on a shaped link.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Link:
    """One rank's link: alpha seconds per message, beta seconds per byte."""

    alpha_s: float
    beta_s_per_byte: float

    @classmethod
    def from_rate(cls, bits_per_s: float, alpha_s: float = 0.0) -> Link:
        return cls(alpha_s, 8.0 / bits_per_s)

    def send(self, n_bytes: float) -> float:
        """One message of `n_bytes` from one rank to another."""
        return self.alpha_s + n_bytes * self.beta_s_per_byte


def reduce_scatter(link: Link, ranks: int, n_bytes: float) -> float:
    """Ring reduce-scatter of an `n_bytes` tensor over `ranks`: n - 1 steps of n_bytes / n."""
    if ranks <= 1:
        return 0.0
    return (ranks - 1) * link.send(n_bytes / ranks)


def all_gather(link: Link, ranks: int, n_bytes: float) -> float:
    """Ring all-gather of pieces that make an `n_bytes` tensor: n - 1 steps of n_bytes / n."""
    return reduce_scatter(link, ranks, n_bytes)


def all_reduce(link: Link, ranks: int, n_bytes: float) -> float:
    """Ring all-reduce: a reduce-scatter, then an all-gather (2 (n - 1) / n of the bytes sent)."""
    return reduce_scatter(link, ranks, n_bytes) + all_gather(link, ranks, n_bytes)


def bytes_sent_all_reduce(ranks: int, n_bytes: float) -> float:
    """What each rank sends in a ring all-reduce (its "bus" traffic, as nccl-tests count it)."""
    return 2.0 * (ranks - 1) / ranks * n_bytes if ranks > 1 else 0.0

"""What communication costs, by the alpha-beta model: a message of n bytes over a link
takes alpha + n x beta seconds (alpha: the latency of a message, beta: seconds per byte,
8 / the link's rate in bits). `shardwise cluster probe` fits both from ping-pong times.

Collectives are costed by the algorithms gloo and NCCL run for large messages, the ring:
each of n ranks sends its neighbour n - 1 pieces of n_bytes / n per phase, and an
all-reduce is a reduce-scatter phase then an all-gather phase, so every rank sends
2 (n - 1) / n of the message in 2 (n - 1) steps. These are the formulas the planner's
cost model (issue 17) builds every layout's communication from; the emulated cluster's
test checks the all-reduce against a measured one on a shaped link.

A backend runs each collective at its own efficiency: gloo's all-reduce comes close to the
ring, its all-gather and reduce-scatter into one flat tensor take several times the ring's
time on a CPU. So a link can carry, per collective, a measured calibration (`calibrate`
fits it from timed collectives): a fixed cost per call and a factor on the ring's time.
An all-reduce of half-precision entries (bf16, fp16) is calibrated apart: gloo sums them
on the CPU at its own rate, fp16's several times float32's per byte, so that halving the
bytes does not halve the time. And `overlap`: the measured share of a collective's time that compute running beside it
hides (1: all of it; 0: none; below 0: the two slow each other down, as on a CPU whose
cores and memory bandwidth the ranks already fill).
"""

from __future__ import annotations

from dataclasses import dataclass, field

KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_reduce_bf16", "all_reduce_fp16")


@dataclass(frozen=True)
class Link:
    """One rank's link: alpha seconds per message, beta seconds per byte; and, where
    measured, each collective's (seconds per call, factor on the ring's time), the
    share of a collective that compute beside it hides, and a small exchange's cost
    between computing ranks."""

    alpha_s: float
    beta_s_per_byte: float
    collectives: dict[str, tuple[float, float]] = field(default_factory=dict, compare=False)
    overlap: float = 1.0
    # a small exchange between ranks that compute between exchanges (a band's halo, a norm's
    # statistics): what each costs beyond the compute, waiting on the peer included
    sync_s: float = 0.0

    @classmethod
    def from_rate(cls, bits_per_s: float, alpha_s: float = 0.0) -> Link:
        return cls(alpha_s, 8.0 / bits_per_s)

    def send(self, n_bytes: float) -> float:
        """One message of `n_bytes` from one rank to another."""
        return self.alpha_s + n_bytes * self.beta_s_per_byte


def _ring_half(link: Link, ranks: int, n_bytes: float) -> float:
    """n - 1 ring steps of n_bytes / n: a reduce-scatter's or an all-gather's."""
    return (ranks - 1) * link.send(n_bytes / ranks) if ranks > 1 else 0.0


def _ring_bytes(kind: str, ranks: int, n_bytes: float) -> float:
    """The bytes each rank sends in the ring algorithm of `kind` on an `n_bytes` tensor."""
    half = (ranks - 1) * n_bytes / ranks
    return 2 * half if kind.startswith("all_reduce") else half


def _cost(link: Link, kind: str, ranks: int, n_bytes: float) -> float:
    """The ring's time, or, where `kind` is calibrated, its measured per-call cost plus its
    factor on the ring's transfer time."""
    if ranks <= 1 or n_bytes <= 0:
        return 0.0
    return per_call(link, kind, ranks) + transfer(link, kind, ranks, n_bytes)


def per_call(link: Link, kind: str, ranks: int) -> float:
    """The measured cost per call of `kind` on `ranks` ranks (0 where the link has no
    calibration of it: the ring's latency per step then counts with its bytes)."""
    return link.collectives[kind][0] if ranks > 1 and kind in link.collectives else 0.0


def transfer(link: Link, kind: str, ranks: int, n_bytes: float) -> float:
    """What `kind` of an `n_bytes` tensor costs beyond its cost per call: the measured factor
    on the ring's transfer time, or, uncalibrated, the ring's whole time."""
    if ranks <= 1 or n_bytes <= 0:
        return 0.0
    if kind in link.collectives:
        return link.collectives[kind][1] * _ring_bytes(kind, ranks, n_bytes) * link.beta_s_per_byte
    return (2 if kind.startswith("all_reduce") else 1) * _ring_half(link, ranks, n_bytes)


def between_compute(link: Link, seconds: float) -> float:
    """What an exchange of `seconds` costs ranks that compute before and after it: at least
    what a small exchange among such ranks measured (`sync_s`), each waiting on the others'
    scheduling and compute (a band's halos and norms, FSDP2's calls, the loop's agreement)."""
    return max(seconds, link.sync_s)


def reduce_scatter(link: Link, ranks: int, n_bytes: float) -> float:
    """Ring reduce-scatter of an `n_bytes` tensor over `ranks`: n - 1 steps of n_bytes / n."""
    return _cost(link, "reduce_scatter", ranks, n_bytes)


def all_gather(link: Link, ranks: int, n_bytes: float) -> float:
    """Ring all-gather of pieces that make an `n_bytes` tensor: n - 1 steps of n_bytes / n."""
    return _cost(link, "all_gather", ranks, n_bytes)


def all_reduce(link: Link, ranks: int, n_bytes: float, half: str = "") -> float:
    """Ring all-reduce: a reduce-scatter, then an all-gather (2 (n - 1) / n of the bytes sent);
    of `half` (bf16, fp16) entries: that type's calibration, where the link has one."""
    kind = f"all_reduce_{half}" if half else "all_reduce"
    return _cost(link, kind if kind in link.collectives else "all_reduce", ranks, n_bytes)


def small_exchange(link: Link, ranks: int, n_bytes: float = 4.0) -> float:
    """An all-reduce of a few bytes between ranks that compute before and after it (a flag
    every rank must agree on), `between_compute`."""
    return between_compute(link, all_reduce(link, ranks, n_bytes)) if ranks > 1 else 0.0


def bytes_sent_all_reduce(ranks: int, n_bytes: float) -> float:
    """What each rank sends in a ring all-reduce (its "bus" traffic, as nccl-tests count it)."""
    return 2.0 * (ranks - 1) / ranks * n_bytes if ranks > 1 else 0.0


def beside(link: Link, comm_s: float, compute_s: float) -> float:
    """What `comm_s` of collectives costs when issued beside `compute_s` of compute: the
    measured overlap hides its share of the time both run (or, below 0, adds to it)."""
    return comm_s - link.overlap * min(comm_s, compute_s)


def calibrate(link: Link, ranks: int, timed: dict[str, list[tuple[float, float]]], overlap: float) -> Link:
    """`link` with each collective's calibration fitted from `timed[kind]`: (bytes, seconds)
    of that collective on `ranks` ranks, at two sizes at least. The factor is the slope of
    the measured time over the ring's transfer time (bytes sent x beta) between the two
    largest sizes (a model's gradients are that large, and a CPU's caches make the first
    megabytes cheaper per byte than the rest); the per-call cost what is left of the
    smallest size's time (never below zero)."""
    fits = {}
    for kind, points in timed.items():
        points = sorted(points)
        r0, r1 = (_ring_bytes(kind, ranks, n) * link.beta_s_per_byte for n, _ in points[-2:])
        t0, t1 = (t for _, t in points[-2:])
        factor = max((t1 - t0) / (r1 - r0), 0.0) if r1 > r0 else 1.0
        small_n, small_t = points[0]
        fits[kind] = (max(small_t - factor * _ring_bytes(kind, ranks, small_n) * link.beta_s_per_byte, 0.0), factor)
    return Link(link.alpha_s, link.beta_s_per_byte, fits, overlap)

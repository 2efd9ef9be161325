"""Pipeline timelines: when each rank ran each stage's micro-batch, and the bubble.

An event is (step, kind, micro-batch, start, end, stage) with kind 0 = forward,
1 = backward (whole, or the input's gradient alone) and 2 = the weights' gradient,
times in wall-clock seconds. In one step the pipeline spans from the first start to
the last end over all ranks; the bubble fraction is the part of P x that span in which
ranks sat idle (waiting on a neighbour, or on communication). Each schedule's own bubble
in theory is its order played out with equal stages (`parallel/pipeline_cost.py
ideal_bubble`): (P - 1) / (M + P - 1) for GPipe and 1F1B (Huang et al., "GPipe", 2019),
(P - 1) / (V M + P - 1) for interleaved 1F1B with V stages a rank (Narayanan et al., 2021).
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch
import torch.distributed as dist

from shardwise.files import atomic_path
from shardwise.parallel.pipeline_cost import ideal_bubble
from shardwise.topology import ParallelDims

FIELDS = 6  # step, kind, micro-batch, start, end, stage


def gather_events(events: list[tuple], group: dist.ProcessGroup) -> list[torch.Tensor]:
    """Every stage's events, in stage order (a collective over the pipeline group)."""
    mine = torch.tensor(events, dtype=torch.float64).reshape(-1, FIELDS)
    counts = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, torch.tensor([len(mine)]), group=group)
    longest = max(int(c) for c in counts)
    padded = torch.cat([mine, mine.new_zeros(longest - len(mine), FIELDS)])
    pieces = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(pieces, padded, group=group)
    return [p[: int(c)] for p, c in zip(pieces, counts, strict=True)]


def bubble_fractions(stages: list[torch.Tensor]) -> list[float]:
    """The measured bubble fraction of every step found in all stages' events."""
    out = []
    for step in sorted({int(s) for s in stages[0][:, 0].tolist()}):
        rows = [e[e[:, 0] == step] for e in stages]
        span = max(r[:, 4].max().item() for r in rows) - min(r[:, 3].min().item() for r in rows)
        busy = sum((r[:, 4] - r[:, 3]).sum().item() for r in rows)
        out.append(1.0 - busy / (len(stages) * span) if span > 0 else 0.0)
    return out


def bubble_summary(stages: list[torch.Tensor], dims: ParallelDims, warmup: int = 5) -> dict[str, float]:
    measured = bubble_fractions(stages)
    steady = measured[warmup:] or measured or [float("nan")]  # no step: nothing measured (null in JSON)
    return {
        "schedule": dims.schedule,
        "stages_per_rank": dims.virtual,
        "bubble_measured": statistics.median(steady),
        "bubble_theoretical": ideal_bubble(dims.schedule, dims.pp, dims.virtual, dims.microbatches),
    }


def plot_timeline(path: Path, stages: list[torch.Tensor], title: str) -> None:
    """A Gantt chart of the last step: one row per rank, forward and backward of each
    micro-batch (labelled stage:micro-batch where a rank holds several stages)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last = int(stages[0][:, 0].max().item())
    rows = [e[e[:, 0] == last] for e in stages]
    t0 = min(r[:, 3].min().item() for r in rows)
    fig, ax = plt.subplots(figsize=(10, 1 + 0.6 * len(rows)))
    colors = {0: "tab:blue", 1: "tab:orange", 2: "tab:green"}
    several = any(len(set(r[:, 5].tolist())) > 1 for r in rows)
    for k, r in enumerate(rows):
        for _, kind, mb, start, end, stage in r.tolist():
            ax.broken_barh([(1e3 * (start - t0), 1e3 * (end - start))], (k - 0.4, 0.8), color=colors[int(kind)])
            label = f"{int(stage)}:{int(mb)}" if several else str(int(mb))
            ax.text(1e3 * ((start + end) / 2 - t0), k, label, ha="center", va="center", fontsize=7)
    ax.set(yticks=range(len(rows)), yticklabels=[f"rank {k}" for k in range(len(rows))], xlabel="ms")
    ax.invert_yaxis()
    kinds = sorted({int(x) for r in rows for x in r[:, 1].tolist()})
    names = ["forward", "backward (input)" if 2 in kinds else "backward", "backward (weights)"]
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colors[k]) for k in kinds], labels=[names[k] for k in kinds])
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)

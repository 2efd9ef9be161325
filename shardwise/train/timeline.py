"""Pipeline timelines: when each stage ran each micro-batch, and the bubble.

An event is (step, kind, micro-batch, start, end) with kind 0 = forward and
1 = backward, times in wall-clock seconds. In one step the pipeline spans from
the first start to the last end over all stages; the bubble fraction is the
part of P x that span in which stages sat idle (waiting on a neighbour, or on
communication). The ideal schedule's bubble is (P - 1) / (M + P - 1) for
equal stages (Huang et al., "GPipe", 2019).
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch
import torch.distributed as dist

from shardwise.files import atomic_path

FIELDS = 5  # step, kind, micro-batch, start, end


def theoretical_bubble(stages: int, microbatches: int) -> float:
    return (stages - 1) / (microbatches + stages - 1)


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


def bubble_summary(stages: list[torch.Tensor], microbatches: int, warmup: int = 5) -> dict[str, float]:
    measured = bubble_fractions(stages)
    steady = measured[warmup:] or measured or [float("nan")]  # no step: nothing measured (null in JSON)
    return {
        "bubble_measured": statistics.median(steady),
        "bubble_theoretical": theoretical_bubble(len(stages), microbatches),
    }


def plot_timeline(path: Path, stages: list[torch.Tensor], title: str) -> None:
    """A Gantt chart of the last step: one row per stage, forward and backward of each micro-batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last = int(stages[0][:, 0].max().item())
    rows = [e[e[:, 0] == last] for e in stages]
    t0 = min(r[:, 3].min().item() for r in rows)
    fig, ax = plt.subplots(figsize=(10, 1 + 0.6 * len(rows)))
    colors = {0: "tab:blue", 1: "tab:orange"}
    for k, r in enumerate(rows):
        for _, kind, mb, start, end in r.tolist():
            ax.broken_barh([(1e3 * (start - t0), 1e3 * (end - start))], (k - 0.4, 0.8), color=colors[int(kind)])
            ax.text(1e3 * ((start + end) / 2 - t0), k, str(int(mb)), ha="center", va="center", fontsize=7)
    ax.set(yticks=range(len(rows)), yticklabels=[f"stage {k}" for k in range(len(rows))], xlabel="ms")
    ax.invert_yaxis()
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()], labels=["forward", "backward"])
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)

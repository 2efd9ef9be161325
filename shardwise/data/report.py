"""The per-rank balance report rank 0 prints at start (and keeps in summary.json)."""

from __future__ import annotations

import numpy as np


def balance_report(rank_samples: list[np.ndarray], labels: np.ndarray, num_classes: int) -> dict:
    """The report of each rank's samples `rank_samples` (indices into `labels`)."""
    return counts_report([np.bincount(labels[idx], minlength=num_classes) for idx in rank_samples])


def counts_report(rank_counts: list[np.ndarray]) -> dict:
    """From each rank's samples per class: per rank, sample count, label coverage, largest
    class share and label skew (total-variation distance of its label distribution from
    the whole set's, 0 = same mix, 1 = disjoint). Overall: size imbalance, largest / mean
    count."""
    total = np.sum(rank_counts, axis=0)
    overall = total / max(1, total.sum())
    ranks = []
    for r, counts in enumerate(rank_counts):
        counts = np.asarray(counts)
        dist = counts / max(1, counts.sum())
        ranks.append(
            {
                "rank": r,
                "samples": int(counts.sum()),
                "classes": int((counts > 0).sum()),
                "top_class": int(counts.argmax()),
                "top_share": float(dist.max()),
                "label_skew": float(0.5 * np.abs(dist - overall).sum()),
            }
        )
    sizes = np.array([r["samples"] for r in ranks], dtype=float)
    return {
        "ranks": ranks,
        "size_imbalance": float(sizes.max() / sizes.mean()) if sizes.mean() > 0 else 0.0,
        "max_label_skew": max(r["label_skew"] for r in ranks),
        "num_classes": len(total),
    }


def render_report(report: dict, title: str):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in ("rank", "samples", "classes", "top class (share)", "label skew"):
        table.add_column(col, justify="right")
    for r in report["ranks"]:
        table.add_row(
            str(r["rank"]),
            str(r["samples"]),
            f"{r['classes']}/{report['num_classes']}",
            f"{r['top_class']} ({r['top_share']:.0%})",
            f"{r['label_skew']:.3f}",
        )
    table.caption = (
        f"size imbalance (largest / mean) {report['size_imbalance']:.2f}; "
        f"label skew = total-variation distance from the whole set's label mix"
    )
    return table

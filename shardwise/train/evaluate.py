from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from shardwise.data.loader import RankData


@torch.no_grad()
def evaluate(model: nn.Module, data: RankData, *, group: dist.ProcessGroup | None) -> dict[str, float]:
    """Loss and accuracy over the whole validation set, each rank scoring its own
    slice and the sums reduced over the data-parallel group."""
    model.eval()
    device = data.device
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    for x, y in data.val_batches():
        logits = model(x)
        totals[0] += F.cross_entropy(logits, y, reduction="sum").double()
        totals[1] += (logits.argmax(dim=1) == y).sum()
        totals[2] += len(y)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(totals, group=group)
    model.train()
    loss_sum, correct, count = totals.tolist()
    return {"val_loss": loss_sum / count, "val_accuracy": correct / count}

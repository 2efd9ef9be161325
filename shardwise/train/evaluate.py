from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from shardwise.comm.collectives import all_gather_uneven
from shardwise.data.loader import RankData


def score(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(loss sum, correct, count) of one batch."""
    loss = F.cross_entropy(logits, y, reduction="sum").double()
    return torch.stack([loss, (logits.argmax(dim=1) == y).sum().double(), loss.new_tensor(float(len(y)))])


def summarize(totals: torch.Tensor, group: dist.ProcessGroup | None) -> dict[str, float]:
    """Validation loss and accuracy from every data-parallel rank's (loss sum, correct, count)."""
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(totals, group=group)
    loss_sum, correct, count = totals.tolist()
    return {"val_loss": loss_sum / count, "val_accuracy": correct / count}


def gather_rows(local: torch.Tensor, data: RankData, group: dist.ProcessGroup | None) -> torch.Tensor:
    """The rows every data-parallel rank computed for its slice of the validation set
    (`val_batches`), gathered in the validation set's order on every rank."""
    if group is None or dist.get_world_size(group) == 1:
        return local
    return torch.cat(all_gather_uneven(local, data.val_sizes(), dim=0, group=group))


@torch.no_grad()
def predict(model: nn.Module, data: RankData, *, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Class probabilities (float64) of the whole validation set, in its order, on every rank."""
    model.eval()
    probs = torch.cat([torch.softmax(model(x).double(), dim=1) for x, _ in data.val_batches()])
    model.train()
    return gather_rows(probs, data, group)


@torch.no_grad()
def evaluate(model: nn.Module, data: RankData, *, group: dist.ProcessGroup | None) -> dict[str, float]:
    """Loss and accuracy over the whole validation set, each rank scoring its own
    slice and the sums reduced over the data-parallel group."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=data.device)
    for x, y in data.val_batches():
        totals += score(model(x), y)
    model.train()
    return summarize(totals, group)

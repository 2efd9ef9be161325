"""Starting a run from a checkpoint: find it, verify it, put the weights into the whole model."""

from __future__ import annotations

from pathlib import Path

import torch

from shardwise.checkpoint.manifest import find_checkpoint
from shardwise.checkpoint.state import model_weights
from shardwise.checkpoint.store import Checkpoint, read_checkpoint
from shardwise.config import Config
from shardwise.errors import ShardwiseError


def read_resume(cfg: Config) -> Checkpoint | None:
    if not cfg.run.resume:
        return None
    return read_checkpoint(find_checkpoint(Path(cfg.run.resume)), verify_key=cfg.checkpoint.verify_key)


def load_weights(model: torch.nn.Module, checkpoint: Checkpoint) -> None:
    weights = model_weights(checkpoint.tensors)
    have, want = set(weights), set(model.state_dict())
    if have != want:
        missing = sorted(want - have)[:3] or sorted(have - want)[:3]
        raise ShardwiseError(
            "resume", f"{checkpoint.folder} holds another model ({len(have)} tensors, this one {len(want)}; {missing})"
        )
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ShardwiseError("resume", f"{checkpoint.folder}: {str(e).splitlines()[-1].strip()}") from None
